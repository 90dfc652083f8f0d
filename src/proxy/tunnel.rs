//! Long-lived traffic: the WebSocket handshake in both HTTP versions, the byte tunnel behind
//! it, and the limits every stream lives under (idle timeout, maximum lifetime, revocation).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::conn::{Activity, ActivityIo};
use crate::streams::StreamGuard;

/// How a client asks for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket` (RFC 6455).
    Http1,
    /// HTTP/2 `CONNECT` with `:protocol = websocket` (RFC 8441).
    ExtendedConnect,
}

pub fn websocket_upgrade<B>(req: &Request<B>) -> Option<Upgrade> {
    if req.method() == Method::CONNECT {
        let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
        return protocol
            .as_str()
            .eq_ignore_ascii_case("websocket")
            .then_some(Upgrade::ExtendedConnect);
    }
    let h = req.headers();
    let lists = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    (req.version() == Version::HTTP_11
        && lists(header::CONNECTION, "upgrade")
        && lists(header::UPGRADE, "websocket"))
    .then_some(Upgrade::Http1)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
fn websocket_key() -> HeaderValue {
    use base64::Engine;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).expect("base64 is a header value")
}

/// Turn the client's handshake into the HTTP/1.1 one the backend expects: `Connection:
/// upgrade` and `Upgrade: websocket`, and for HTTP/2's extended CONNECT (RFC 8441 → RFC 6455) a
/// GET with a fresh `Sec-WebSocket-Key`.
pub fn to_http1_handshake(
    how: Upgrade,
    method: &mut Method,
    extensions: &mut http::Extensions,
    h: &mut http::HeaderMap,
) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if how == Upgrade::ExtendedConnect {
        *method = Method::GET;
        extensions.remove::<hyper::ext::Protocol>();
        h.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
        h.entry(header::SEC_WEBSOCKET_VERSION)
            .or_insert(HeaderValue::from_static("13"));
    }
}

/// The backend's 101 as the client's protocol accepts it: the HTTP/1.1 upgrade headers, or for
/// HTTP/2 a 200 without `Sec-WebSocket-Accept`.
pub fn to_client_handshake<B>(how: Upgrade, resp: &mut Response<B>) {
    let h = resp.headers_mut();
    match how {
        Upgrade::Http1 => {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        Upgrade::ExtendedConnect => {
            h.remove(header::SEC_WEBSOCKET_ACCEPT);
            *resp.status_mut() = StatusCode::OK;
        }
    }
}

/// Why a stream ended, as the access log's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Either side closed.
    Closed,
    /// Either side failed (reset, broken upgrade).
    Error,
    /// Its credential was revoked.
    Revoked,
    /// No bytes either way for `stream_idle_timeout`.
    Idle,
    /// `max_stream_lifetime` reached.
    Lifetime,
    /// The access token it was opened with expired.
    TokenExpired,
    /// The shutdown grace ran out.
    Shutdown,
}

impl End {
    pub fn outcome(self) -> &'static str {
        match self {
            End::Closed => "ok",
            End::Error => "upstream_error",
            End::Revoked => "revoked",
            End::Idle => "stream_idle_timeout",
            End::Lifetime => "stream_lifetime",
            End::TokenExpired => "token_expired",
            End::Shutdown => "shutdown",
        }
    }
}

/// The limits of one stream.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub lifetime: Option<Duration>,
    /// When the access token the stream was opened with expires.
    pub token_expires: Option<Instant>,
}

/// Resolves at `at`, never when `None`.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What a finished tunnel moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// From the client to the backend.
    pub up: u64,
    /// From the backend to the client.
    pub down: u64,
}

/// Wait for both sides of an upgrade, then copy bytes both ways until either side closes, the
/// credential is revoked, the stream idles or outlives its limits, or shutdown forces it.
pub async fn run(
    client: OnUpgrade,
    upstream: OnUpgrade,
    guard: StreamGuard,
    limits: Limits,
    force: tokio_util::sync::CancellationToken,
) -> (End, Moved) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return (End::Error, Moved::default());
        }
    };
    let activity = Arc::new(Activity::new());
    activity.touch();
    let mut client = ActivityIo::new(TokioIo::new(client), activity.clone());
    let mut upstream = TokioIo::new(upstream);
    let revoked = guard.revoked().clone();
    let lifetime = until(limits.lifetime.map(|d| Instant::now() + d));
    // When either side finishes, the tunnel ends: what it sent is delivered and the other side
    // is closed, rather than waiting on a peer that may never close its half (a WebSocket
    // client waits for the server to close after the closing handshake).
    let (mut client_read, mut client_write) = tokio::io::split(&mut client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(&mut upstream);
    let up = async {
        let r = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        r
    };
    let end = tokio::select! {
        r = up => copied(r),
        r = down => copied(r),
        _ = revoked.cancelled() => End::Revoked,
        _ = force.cancelled() => End::Shutdown,
        _ = lifetime => End::Lifetime,
        _ = until(limits.token_expires) => End::TokenExpired,
        _ = idle(&activity, limits.idle) => End::Idle,
    };
    let moved = Moved {
        up: activity.read_bytes(),
        down: activity.written_bytes(),
    };
    (end, moved)
}

fn copied(r: std::io::Result<u64>) -> End {
    match r {
        Ok(_) => End::Closed,
        Err(e) => {
            tracing::debug!(error = %e, "tunnel ended with an error");
            End::Error
        }
    }
}

/// Resolves once `activity` has seen no bytes for `limit`.
async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let deadline = activity.last() + limit;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// The limits a streaming response body is polled against: revocation, idle, lifetime.
pub struct Watch {
    /// The stream's registration, held until the body ends; `None` for a body of known
    /// length, which is only timed.
    _guard: Option<StreamGuard>,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    idle: Pin<Box<Sleep>>,
    idle_limit: Duration,
    last_data: Instant,
    lifetime: Option<Pin<Box<Sleep>>>,
    token_expires: Option<Pin<Box<Sleep>>>,
}

impl Watch {
    pub fn new(guard: StreamGuard, limits: Limits) -> Watch {
        let revoked = Box::pin(guard.revoked().clone().cancelled_owned());
        Watch {
            _guard: Some(guard),
            revoked: Some(revoked),
            idle: Box::pin(tokio::time::sleep(limits.idle)),
            idle_limit: limits.idle,
            last_data: Instant::now(),
            lifetime: limits.lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
            token_expires: limits
                .token_expires
                .map(|at| Box::pin(tokio::time::sleep_until(at.into()))),
        }
    }

    /// Only the idle limit, for a response body of known length that stalls: a backend that
    /// stops sending mid-body must not hold the client forever.
    pub fn idle_only(idle: Duration) -> Watch {
        Watch {
            _guard: None,
            revoked: None,
            idle: Box::pin(tokio::time::sleep(idle)),
            idle_limit: idle,
            last_data: Instant::now(),
            lifetime: None,
            token_expires: None,
        }
    }

    /// Data moved: the idle clock starts again (the timer is moved lazily when it fires).
    pub fn touch(&mut self) {
        self.last_data = Instant::now();
    }

    /// `Ready(end)` when the stream must end now.
    pub fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        if let Some(revoked) = &mut self.revoked {
            if revoked.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Revoked);
            }
        }
        if let Some(l) = &mut self.lifetime {
            if l.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Lifetime);
            }
        }
        if let Some(t) = &mut self.token_expires {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::TokenExpired);
            }
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            let deadline = self.last_data + self.idle_limit;
            if deadline <= Instant::now() {
                return Poll::Ready(End::Idle);
            }
            self.idle.as_mut().reset(deadline.into());
        }
        Poll::Pending
    }
}
