//! One request's record from arrival to the end of its response body: the access-log line and
//! metrics it writes when it ends, and the response body that reports that end.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, Request, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::access_log::{AccessLogger, Record, Text};
use crate::auth::CredId;
use crate::conn::{Activity, ConnInfo};
use crate::headers::{self, X_REQUEST_ID};

use super::tunnel::Watch;
use super::Proxy;

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// One request from arrival to the end of its response body: owns its access log record and
/// its place in the connection's in-flight count. Dropped unfinished, it logs the client as gone.
pub struct Exchange {
    access: AccessLogger,
    metrics: Arc<crate::metrics::Metrics>,
    start: Instant,
    activity: Arc<Activity>,
    pub record: Record,
    /// The request has a body nobody has started to read.
    pub(super) unread_body: bool,
    finished: bool,
    /// Who the request authenticated as, once known.
    pub(super) cred: Option<CredId>,
    /// What the credential was verified against, until a stream it opens is registered.
    pub(super) verified: Option<crate::auth::Verified>,
    /// The request carried both `Transfer-Encoding` and `Content-Length`.
    pub(super) framing_conflict: bool,
    /// A gRPC request: refusals are answered the gRPC way.
    pub(super) grpc: bool,
    /// Both halves of an accepted WebSocket upgrade: the client's and the backend's.
    pub(super) tunnel: Option<(hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade)>,
    /// The client: the socket peer, or what a trusted proxy says it forwarded for.
    pub(super) client: IpAddr,
    /// The client is one of `trusted_proxies` (nobody is named behind it): never the key of a
    /// ban or an address limit.
    pub(super) client_trusted: bool,
    /// The rate limit verdict, for the `RateLimit` headers.
    pub(super) rate: Option<crate::ratelimit::Decision>,
    /// A request on the MCP path: its answers get the MCP profile and CORS headers.
    pub(super) mcp: Option<crate::mcp::McpRequest>,
    /// Under MCP tool rules: the call's audit record (logged when the exchange ends), the
    /// filter its answer's lists go through, and its place in a concurrency limit.
    pub(super) mcp_call: Option<crate::mcp::inspect::CallRecord>,
    pub(super) mcp_list: Option<crate::mcp::filter::ListFilter>,
    pub(super) mcp_in_flight: Option<crate::mcp::policy::InFlight>,
    /// The backend instance answering, in flight until the exchange ends.
    pub(super) attempt: Option<crate::upstream::InFlight>,
}

impl Exchange {
    pub(crate) fn start<B: Body>(proxy: &Proxy, req: &Request<B>, conn: &ConnInfo) -> Exchange {
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let headers = req.headers();
        let request_id = headers
            .get(&X_REQUEST_ID)
            .filter(|v| headers::acceptable_request_id(v))
            .cloned()
            .unwrap_or_else(|| proxy.ids.next());
        let text = |name: header::HeaderName| headers.get(name).and_then(Text::new);
        let unread_body = !req.body().is_end_stream();
        let client = proxy.config.server.net.client_ip(conn.peer.ip(), headers);
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Exchange {
            access: proxy.access.clone(),
            metrics: proxy.metrics.clone(),
            start: Instant::now(),
            activity: conn.activity.clone(),
            record: Record {
                time: SystemTime::now(),
                client,
                method: req.method().clone(),
                // Until the path is normalised: the raw path, never the query.
                path: req.uri().path().to_owned(),
                protocol: protocol_name(req.version()),
                status: 499,
                bytes: 0,
                duration_ms: 0.0,
                identity: None,
                // Plain by construction (acceptable_request_id, or hex).
                request_id: Text::new(&request_id).expect("a request id is visible ASCII"),
                outcome: "client_closed",
                user_agent: text(header::USER_AGENT),
                referer: text(header::REFERER),
                upstream: None,
            },
            unread_body,
            finished: false,
            cred: None,
            verified: None,
            framing_conflict: conn
                .framing
                .at(conn.requests.fetch_add(1, Ordering::Relaxed) + 1),
            grpc,
            tunnel: None,
            client_trusted: proxy.config.server.net.is_trusted(client),
            client,
            rate: None,
            mcp: None,
            mcp_call: None,
            mcp_list: None,
            mcp_in_flight: None,
            attempt: None,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            let elapsed = self.start.elapsed();
            self.record.set_duration(elapsed);
            self.access.log(&self.record);
            if let Some(call) = &self.mcp_call {
                call.log(&self.record);
            }
            self.metrics.request(
                self.record.outcome,
                self.record.status,
                elapsed.as_secs_f64(),
            );
            self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The backend's answer body: as it comes, or with its MCP lists filtered.
pub type BackendBody = Either<Incoming, crate::mcp::filter::Filtered<Incoming>>;

/// A response body that counts what it sends and writes the access log line when done.
pub struct LoggedBody {
    pub(super) inner: Either<BackendBody, Full<Bytes>>,
    pub(super) ex: Option<Exchange>,
    /// For a registered stream: the revocation, idle and lifetime limits. For any other
    /// backend body, an idle limit set up the first time it makes the client wait.
    pub(super) watch: Option<Watch>,
    pub(super) idle_limit: std::time::Duration,
}

impl LoggedBody {
    /// A body of the proxy's own, outside any exchange (nothing to log).
    pub fn own(body: Full<Bytes>) -> LoggedBody {
        LoggedBody {
            inner: Either::Right(body),
            ex: None,
            watch: None,
            idle_limit: std::time::Duration::ZERO,
        }
    }

    fn finish(&mut self) {
        // Dropping the exchange logs it.
        self.ex.take();
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-response.
        if let Some(ex) = self.ex.as_mut() {
            if !self.inner.is_end_stream() {
                ex.record.outcome = "client_closed";
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(ex) = this.ex.as_mut() {
                        ex.record.bytes += data.len() as u64;
                    }
                    if let Some(w) = this.watch.as_mut() {
                        w.touch();
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(ex) = this.ex.as_mut() {
                    ex.record.outcome = "upstream_error";
                    ex.metrics.upstream_error("reset");
                    tracing::warn!(request_id = %ex.record.request_id, error = %e, "upstream response body failed");
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {
                if this.watch.is_none() && matches!(this.inner, Either::Left(_)) {
                    // Most bodies end within their first poll: the timer is only paid for
                    // by those that make the client wait.
                    this.watch = Some(Watch::idle_only(this.idle_limit));
                }
                if let Some(Poll::Ready(end)) = this.watch.as_mut().map(|w| w.poll_end(cx)) {
                    if let Some(ex) = this.ex.as_mut() {
                        ex.record.outcome = end.outcome();
                        tracing::debug!(request_id = %ex.record.request_id, outcome = end.outcome(), "stream closed by the proxy");
                    }
                    this.watch = None;
                    this.finish();
                    // An error, not an end: the client must not take a cut stream for a
                    // complete one (HTTP/1.1 closes the connection, HTTP/2 resets the stream).
                    return Poll::Ready(Some(Err(end.outcome().into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
