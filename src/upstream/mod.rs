//! The backend side of the pipeline (DESIGN.md §11): the instances and the pooled client that
//! takes requests to them, retries on another instance when a connection fails before any byte
//! was sent, health checks, MCP session affinity, and how a failed exchange is named (502 or
//! 504, the metric's `kind`).
//!
//! Fails closed: a request that cannot be placed on a healthy instance is answered 502
//! `upstream_unavailable`; a request that may have reached a backend is never sent again unless
//! it is idempotent with an empty body; a session whose instance is gone is answered 404.

pub mod affinity;
mod body;
mod config;
mod health;
mod instances;
mod own;

use std::io;
use std::sync::Arc;

use http::request::Parts;
use http::{Method, Request, Response, Uri};
use http_body_util::LengthLimitError;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::access_log::Text;
use crate::error::Reject;
use crate::metrics::Metrics;

use body::ClientBodyError;
pub use body::{ClientBody, Replay};
pub use config::{HostHeader, UpstreamConfig, UpstreamProtocol};
pub use instances::{
    Balance, HealthCheck, InFlight, InstanceStatus, Instances, Target, FAILURE_KINDS, MAX_INSTANCES,
};
use own::{Claim, OwnedCount};
pub use own::{OwnConnection, OWNED_IDLE};

/// The backend: its instances, and the pooled client that takes requests there.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: Client<HttpsConnector<HttpConnector>, ClientBody>,
    /// What opens a client connection's own backend connection (see `own.rs`).
    connector: HttpsConnector<HttpConnector>,
    h1: hyper::client::conn::http1::Builder,
    /// The client connections' own backend connections open now (at most `own::MAX_OWNED`).
    owned: OwnedCount,
    pub instances: Arc<Instances>,
}

/// Where a request may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Any instance, by the balance rule.
    Balanced,
    /// The instance that issued the request's MCP session, and no other.
    Pinned(usize),
}

/// The backend's answer and the instance it came from (in flight until dropped).
pub struct Sent {
    pub response: Response<Incoming>,
    pub attempt: InFlight,
}

impl Upstream {
    pub fn new(up: &UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(up.connect_timeout));
        connector.enforce_http(false);
        let connector = upstream_connector(connector, up);
        let mut h1 = hyper::client::conn::http1::Builder::new();
        h1.writev(false);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            // As on the public listener: one flat write per request (see server/mod.rs).
            .http1_writev(false)
            .http2_only(up.protocol == UpstreamProtocol::Http2);
        Upstream {
            client: builder.build(connector.clone()),
            connector,
            h1,
            owned: OwnedCount::default(),
            instances: Arc::new(Instances::new(&up.targets, up.balance, up.eject_for)),
            config: up.clone(),
        }
    }

    /// Send a request for `path` (normalised; the query is the request URI's) and wait for the
    /// response headers, within `response_timeout` for every attempt together.
    ///
    /// The instance is the route's; for a balanced request whose connection failed before any
    /// byte was written, another one (any method: nothing reached a backend), and after a
    /// failure once bytes may have been written, another one only for an idempotent method
    /// with an empty body. A pinned request has only its instance: when that is down or
    /// unreachable, its session is gone (404). A failure is named: the client's body (413 over
    /// the limit, 400 when it broke) or the backend's (502, 504), counted by kind and instance.
    ///
    /// `own` is the client connection's own backend connection (HTTP/1 clients, no upgrade):
    /// used when it goes to the chosen instance and is free, opened when there is none; the
    /// pool otherwise.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        mut parts: Parts,
        path: &str,
        body: ClientBody,
        route: Route,
        own: Option<&OwnConnection>,
        metrics: &Metrics,
        request_id: &Text,
    ) -> Result<Sent, Reject> {
        let own = own.filter(|_| self.config.protocol == UpstreamProtocol::Http1);
        let timeout = self.config.response_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let several = route == Route::Balanced && self.instances.len() > 1;
        let (mut body, replay) = if several {
            let (b, r) = body.replayable();
            (Some(b), Some(r))
        } else {
            (Some(body), None)
        };
        // The client's URI: its query goes into every attempt's URI.
        let client_uri = std::mem::take(&mut parts.uri);
        let query = client_uri.query();
        let repeatable = idempotent(&parts.method);
        let mut tried: u64 = 0;
        // A request given back unsent by the attempt before (its connection never opened).
        let mut unsent: Option<Request<ClientBody>> = None;
        loop {
            let i = match route {
                Route::Pinned(i) if tried == 0 && self.instances.healthy(i) => Some(i),
                Route::Pinned(i) => {
                    tracing::warn!(event = "mcp_session_instance_gone", request_id = %request_id, instance = %self.instances.target(i).label, "the instance that issued this MCP session is down: 404, the client starts a new session");
                    return Err(Reject::SessionNotFound);
                }
                Route::Balanced => self.instances.pick(tried),
            };
            let Some(i) = i else {
                if tried == 0 {
                    metrics.upstream_error("no_healthy_instance");
                    tracing::warn!(request_id = %request_id, "no healthy upstream instance");
                }
                return Err(Reject::UpstreamUnavailable);
            };
            tried |= 1 << i;
            let target = self.instances.target(i);
            // The owned connection when it can take this request; the pool otherwise.
            let claim = own.and_then(|o| Some((o, o.claim(i, &self.owned)?)));
            let pq = target.path_and_query(path, query)?;
            let uri = match claim {
                Some(_) => Uri::from(pq),
                None => target.absolute(pq)?,
            };
            // Another attempt may follow this one.
            let more = several && (tried.count_ones() as usize) < self.instances.len();
            let mut req = match unsent.take() {
                Some(req) => req,
                None => {
                    let Some(this_body) = body.take() else {
                        return Err(Reject::UpstreamUnavailable);
                    };
                    // Kept to be sent again when the attempt may consume it and fail: the pool
                    // drops a request whose connection fails; the owned connection gives it
                    // back unless bytes were written, after which only an idempotent request
                    // with an empty body is sent again.
                    let keep = more
                        && (claim.is_none()
                            || (repeatable && replay.as_ref().is_some_and(|r| r.is_empty())));
                    if keep {
                        let mut again = Request::new(this_body);
                        *again.method_mut() = parts.method.clone();
                        *again.version_mut() = parts.version;
                        *again.headers_mut() = parts.headers.clone();
                        again
                    } else {
                        Request::from_parts(
                            std::mem::replace(&mut parts, Request::new(()).into_parts().0),
                            this_body,
                        )
                    }
                }
            };
            *req.uri_mut() = uri;
            if self.config.host_header == HostHeader::Upstream {
                req.headers_mut()
                    .insert(http::header::HOST, target.host.clone());
            }
            let attempt = self.instances.start(i);
            let exchange = async {
                match claim {
                    Some((own, claim)) => self.send_own(own, claim, i, target, req).await,
                    None => self.client.request(req).await.map_err(Failed::pooled),
                }
            };
            let mut failure = match tokio::time::timeout_at(deadline, exchange).await {
                Ok(Ok(response)) => return Ok(Sent { response, attempt }),
                Err(_elapsed) => {
                    metrics.upstream_error("timeout");
                    self.instances.failed(i, "timeout");
                    tracing::warn!(request_id = %request_id, instance = %target.label, timeout = ?timeout, "upstream response timeout");
                    return Err(Reject::UpstreamTimeout);
                }
                Ok(Err(e)) => e,
            };
            drop(attempt);
            let error: &(dyn std::error::Error + 'static) = &*failure.error;
            if caused_by::<LengthLimitError>(error) {
                return Err(Reject::PayloadTooLarge);
            }
            if caused_by::<ClientBodyError>(error) {
                tracing::debug!(request_id = %request_id, error = %crate::error::chain(error), "client request body failed");
                return Err(Reject::BadRequest);
            }
            let kind = upstream_error_kind(failure.connect, error);
            metrics.upstream_error(kind);
            self.instances.failed(i, kind);
            let connect = failure.connect;
            if let Route::Pinned(_) = route {
                if connect {
                    tracing::warn!(event = "mcp_session_instance_gone", request_id = %request_id, instance = %target.label, error = %crate::error::chain(error), "the instance that issued this MCP session is unreachable: 404, the client starts a new session");
                    return Err(Reject::SessionNotFound);
                }
            }
            // Sent again only when nothing can have reached a backend, or nothing is lost.
            if more && failure.unsent.is_some() {
                unsent = failure.unsent.take();
            } else {
                body = replay.as_ref().and_then(|r| {
                    let safe = connect || (repeatable && r.is_empty());
                    safe.then(|| r.again()).flatten()
                });
            }
            let retry = more && (unsent.is_some() || body.is_some());
            tracing::warn!(request_id = %request_id, instance = %target.label, connect, retry, error = %crate::error::chain(&*failure.error), "upstream request failed");
            if !retry {
                return Err(Reject::UpstreamUnavailable);
            }
            metrics.upstream_retry();
        }
    }

    /// One attempt on the client connection's own backend connection: the one held when it
    /// is free, or a new one (also when the one held was closed by the backend before the
    /// request could be written: the request comes back whole and goes on a new one, or on the
    /// pool when `own::MAX_OWNED` are open).
    async fn send_own(
        &self,
        own: &OwnConnection,
        claim: Claim,
        i: usize,
        target: &Target,
        mut req: Request<ClientBody>,
    ) -> Result<Response<Incoming>, Failed> {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, target.host.clone());
        }
        let permit = match claim {
            Claim::Open(permit) => permit,
            Claim::Held(mut sender) => {
                let answer = sender.try_send_request(req);
                own.put_back(sender);
                let mut e = match answer.await {
                    Ok(response) => return Ok(response),
                    Err(e) => e,
                };
                let Some(back) = e.take_message() else {
                    return Err(Failed::sent(e.into_error()));
                };
                req = back;
                own.close();
                match self.owned.acquire() {
                    Some(permit) => permit,
                    None => {
                        let pq = req.uri().path_and_query().cloned();
                        let pq = pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                        *req.uri_mut() = target.absolute(pq).map_err(|_| Failed::uri())?;
                        return self.client.request(req).await.map_err(Failed::pooled);
                    }
                }
            }
        };
        let opened = async {
            let uri = target.absolute(http::uri::PathAndQuery::from_static("/"));
            let uri = uri.map_err(|_| Failed::uri().error)?;
            let io = tower_service::Service::call(&mut self.connector.clone(), uri).await?;
            let (sender, conn) = self.h1.handshake::<_, ClientBody>(io).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sender, conn))
        };
        let (mut sender, conn) = match opened.await {
            Ok(c) => c,
            Err(error) => {
                return Err(Failed {
                    connect: true,
                    error,
                    unsent: Some(req),
                })
            }
        };
        let answer = sender.try_send_request(req);
        own.install(i, sender, Box::pin(conn), permit);
        answer.await.map_err(|e| Failed::sent(e.into_error()))
    }
}

/// A failed attempt: whether its connection never opened, why, and the request when it was
/// given back unsent.
struct Failed {
    connect: bool,
    error: Box<dyn std::error::Error + Send + Sync>,
    unsent: Option<Request<ClientBody>>,
}

impl Failed {
    /// The pool's failure: `is_connect` when no connection opened (the request is lost with it).
    fn pooled(e: hyper_util::client::legacy::Error) -> Failed {
        Failed {
            connect: e.is_connect(),
            error: Box::new(e),
            unsent: None,
        }
    }

    /// The instance's address makes no URI (its configuration was checked: not expected).
    fn uri() -> Failed {
        Failed {
            connect: true,
            error: "the instance's address makes no URI".into(),
            unsent: None,
        }
    }

    /// A failure after the request was handed to a connection.
    fn sent(e: hyper::Error) -> Failed {
        Failed {
            connect: false,
            error: Box::new(e),
            unsent: None,
        }
    }
}

/// Methods a backend may receive twice without a different effect (RFC 9110 §9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The connector for the backend: plain TCP for `http://`, rustls for `https://` with ALPN
/// for the configured protocol only, so an `http2` upstream is spoken to in h2 and an `http1`
/// one in HTTP/1.1.
fn upstream_connector(tcp: HttpConnector, up: &UpstreamConfig) -> HttpsConnector<HttpConnector> {
    let builder = match &up.tls_roots {
        Some(roots) => {
            let tls = crate::tls::upstream_client_config(roots.clone())
                .expect("TLS 1.2 and 1.3 are supported by the built-in provider");
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only()
        }
        // Never used for TLS: the URL is http://, so every connection is plain.
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .expect("default versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
            .https_or_http(),
    };
    match up.protocol {
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(tcp),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(tcp),
    }
}

/// The `kind` label of `portcullis_upstream_errors_total` for a failed exchange.
fn upstream_error_kind(connect: bool, e: &(dyn std::error::Error + 'static)) -> &'static str {
    if connect {
        return "connect";
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) {
                return "reset";
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return "reset";
            }
        }
        cur = err.source();
    }
    "protocol"
}

fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Full, Limited};

    #[test]
    fn body_limit_errors_are_recognised_through_wrapping() {
        #[derive(Debug)]
        struct Wrap(LengthLimitError);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let limited = Limited::new(Full::new(Bytes::from_static(b"12345")), 1);
        let err = futures_lite_block_on_err(limited);
        assert!(caused_by::<LengthLimitError>(&Wrap(
            *err.downcast::<LengthLimitError>().unwrap()
        )));
        assert!(!caused_by::<LengthLimitError>(&std::io::Error::other("x")));
    }

    fn futures_lite_block_on_err(
        body: Limited<Full<Bytes>>,
    ) -> Box<dyn std::error::Error + Send + Sync> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            use http_body_util::BodyExt;
            body.collect().await.unwrap_err()
        })
    }
}
