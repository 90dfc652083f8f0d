//! The `[forward_auth]` listener: checks on its path answered with the proxy's decision
//! ([`crate::forward_auth`] reads the described request), `/healthz`, and 404 for anything
//! else. Nothing is ever forwarded.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;

use crate::conn::ConnInfo;
use crate::forward_auth::{describe, ForwardAuthConfig};
use crate::proxy::{LoggedBody, Proxy, ResponseBody};

use super::text_response;

/// Serve one request on the forward-auth listener.
pub async fn handle(
    proxy: Arc<Proxy>,
    config: Arc<ForwardAuthConfig>,
    check: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Result<Response<ResponseBody>, std::convert::Infallible> {
    let path = check.uri().path();
    if path == "/healthz" {
        return Ok(text_response(StatusCode::OK, "text/plain", "ok\n".into()).map(LoggedBody::own));
    }
    if path != config.path {
        let body = "{\"error\":\"not_found\",\"message\":\"This listener answers authentication checks only.\"}\n";
        return Ok(
            text_response(StatusCode::NOT_FOUND, "application/json", body.into())
                .map(LoggedBody::own),
        );
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
