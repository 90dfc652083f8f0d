//! The backend side of the pipeline: the pooled client and its connector, the client's body on
//! its way there, and how a failed exchange is named (502 or 504, the metric's `kind`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::access_log::Text;
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::error::Reject;
use crate::metrics::Metrics;

/// The backend: where requests go, and the pooled client that takes them there.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: Client<HttpsConnector<HttpConnector>, ClientBody>,
    /// The upstream's authority as a `Host` value, made once.
    pub host: HeaderValue,
}

impl Upstream {
    pub fn new(up: &UpstreamConfig) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(up.connect_timeout));
        connector.enforce_http(false);
        let connector = upstream_connector(connector, up);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            // As on the public listener: one flat write per request (see server/mod.rs).
            .http1_writev(false)
            .http2_only(up.protocol == UpstreamProtocol::Http2);
        Upstream {
            client: builder.build(connector),
            host: HeaderValue::from_str(up.authority.as_str())
                .expect("an authority is a header value"),
            config: up.clone(),
        }
    }

    /// The backend's URI for a (normalised) path and the client's query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, Reject> {
        let up = &self.config;
        let mut pq = String::with_capacity(up.base_path.len() + path.len() + 1);
        pq.push_str(&up.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq).map_err(|_| Reject::BadRequest)?;
        Uri::builder()
            .scheme(up.scheme.clone())
            .authority(up.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| Reject::BadRequest)
    }

    /// Send a request and wait for the response headers, within `response_timeout`. A failure
    /// is named: the client's body (413 over the limit, 400 when it broke) or the backend's
    /// (502, 504), counted by kind.
    pub async fn send(
        &self,
        req: Request<ClientBody>,
        metrics: &Metrics,
        request_id: &Text,
    ) -> Result<Response<Incoming>, Reject> {
        let timeout = self.config.response_timeout;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_elapsed) => {
                metrics.upstream_error("timeout");
                tracing::warn!(request_id = %request_id, timeout = ?timeout, "upstream response timeout");
                Err(Reject::UpstreamTimeout)
            }
            Ok(Err(e)) => {
                if caused_by::<LengthLimitError>(&e) {
                    return Err(Reject::PayloadTooLarge);
                }
                if caused_by::<ClientBodyError>(&e) {
                    tracing::debug!(request_id = %request_id, error = %crate::error::chain(&e), "client request body failed");
                    return Err(Reject::BadRequest);
                }
                metrics.upstream_error(upstream_error_kind(&e));
                tracing::warn!(request_id = %request_id, connect = e.is_connect(), error = %crate::error::chain(&e), "upstream request failed");
                Err(Reject::UpstreamUnavailable)
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// The client's request body on its way to the backend: limited to `max_body_bytes`, and with
/// the client's own failures (bad chunking, a reset) told apart from the backend's.
/// Its trailers (HTTP/2, chunked HTTP/1.1) lose what request headers lose: a trailer is a
/// header that arrives late, and a backend may merge it with the others.
pub struct ClientBody {
    body: Source,
    /// Names no trailer may carry toward the backend.
    trailer_strip: Arc<[HeaderName]>,
}

enum Source {
    /// Streamed from the client as it arrives.
    Stream(Limited<Incoming>),
    /// Read whole and judged before it is sent (MCP tool rules): exactly these bytes go.
    Whole(Option<Bytes>),
}

impl ClientBody {
    pub fn new(body: Incoming, limit: u64, trailer_strip: Arc<[HeaderName]>) -> ClientBody {
        ClientBody {
            body: Source::Stream(Limited::new(body, limit as usize)),
            trailer_strip,
        }
    }

    /// A body already read and judged: sent as it is.
    pub fn whole(bytes: Bytes) -> ClientBody {
        ClientBody {
            body: Source::Whole((!bytes.is_empty()).then_some(bytes)),
            trailer_strip: Arc::new([]),
        }
    }
}

/// The client's request body failed: the client's fault, answered 400.
#[derive(Debug)]
struct ClientBodyError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let body = match &mut this.body {
            Source::Whole(whole) => return Poll::Ready(whole.take().map(|b| Ok(Frame::data(b)))),
            Source::Stream(body) => body,
        };
        let polled = Pin::new(body).poll_frame(cx).map_err(|e| {
            if e.is::<LengthLimitError>() {
                e
            } else {
                Box::new(ClientBodyError(e)) as Self::Error
            }
        });
        polled.map_ok(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                crate::headers::strip_hop_by_hop(&mut trailers);
                crate::headers::remove_all(&mut trailers, &this.trailer_strip);
                crate::headers::remove_underscored(&mut trailers);
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Source::Whole(w) => w.is_none(),
            Source::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Source::Whole(w) => SizeHint::with_exact(w.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Stream(body) => body.size_hint(),
        }
    }
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
fn upstream_error_kind(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
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
    use http_body_util::Full;

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
