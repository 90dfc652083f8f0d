//! `redirect_http`: a plain listener that answers every request with 308 to https://.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::admin::text_response;

/// 308 to the same host and path on https (the public listener's port).
pub fn redirect_to_https(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map(|a| a.host().to_string());
    let Some(host) = host else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "a Host header is required\n".into(),
        );
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    let mut resp = text_response(StatusCode::PERMANENT_REDIRECT, "text/plain", String::new());
    match http::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(http::header::LOCATION, v);
            resp
        }
        Err(_) => text_response(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "bad request\n".into(),
        ),
    }
}
