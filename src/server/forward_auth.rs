//! The `[forward_auth]` listener: checks on its path answered with the proxy's decision
//! ([`crate::forward_auth`] reads the described request), `/healthz`, and 404 for anything
//! else. Nothing is ever forwarded.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;

use crate::conn::ConnInfo;
use crate::forward_auth::{describe, ForwardAuthConfig};
use crate::proxy::{LoggedBody, Proxy, ResponseBody};

/// Serve one request on the forward-auth listener.
pub async fn handle(
    proxy: Arc<Proxy>,
    config: Arc<ForwardAuthConfig>,
    check: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    let path = check.uri().path();
    if path == "/healthz" {
        return Ok(plain(StatusCode::OK, "ok\n"));
    }
    if path != config.path {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "{\"error\":\"not_found\",\"message\":\"This listener answers authentication checks only.\"}\n",
        ));
    }
    let resp = match describe(&check, config.convention) {
        Ok(described) => proxy.decide(described, &conn, None).await,
        Err(reject) => {
            tracing::debug!(peer = %conn.peer, "a forward-auth check that describes no usable request");
            let mut blank = Request::new(Empty::new());
            *blank.uri_mut() = check.uri().clone();
            proxy.decide(blank, &conn, Some(reject)).await
        }
    };
    Ok(resp)
}

fn plain(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if body.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        }),
    );
    resp.map(LoggedBody::own)
}
