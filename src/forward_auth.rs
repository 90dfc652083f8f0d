//! Forward auth (`[forward_auth]`, DESIGN.md §10): portcullis' decisions for an nginx
//! (`auth_request`), Caddy (`forward_auth`) or Traefik (`ForwardAuth`) already in place. A
//! listener of its own answers checks on `path` and never proxies anything.
//!
//! The request judged is the one the front proxy describes: `X-Forwarded-Method`,
//! `X-Forwarded-Uri`, `X-Forwarded-Host`, `X-Forwarded-Proto` (Traefik, Caddy) or
//! `X-Original-Method` / `X-Original-URI` or `-URL` (nginx, ingress-nginx). Its path is
//! normalised as a proxied one, and everything else (credentials, allow rules, limits, bans,
//! the MCP profile) is the proxy's own judgment (`Proxy::decide`; the listener is served from
//! `server/`). The client is the front proxy's client, read from `X-Forwarded-For` only when
//! the front proxy is one of `trusted_proxies`.
//!
//! Fails closed: a check that describes no request, describes it twice (a header repeated),
//! or, under `convention = "auto"`, carries both conventions (a front proxy passes a client's
//! own copy of the other convention's headers on) is refused with 400; anything but the check
//! path is 404 and nothing is forwarded.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::Empty;

use crate::error::Reject;

/// Which headers describe the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// Whichever one the check carries; both at once is refused.
    Auto,
    /// `X-Original-Method` / `X-Original-URI` (nginx `auth_request`); the others ignored.
    Nginx,
    /// `X-Forwarded-Method` / `-Uri` / `-Host` / `-Proto` (Traefik, Caddy); the others ignored.
    Forwarded,
}

/// `[forward_auth]`, validated.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    pub listen: std::net::SocketAddr,
    /// The check path (a query after it is accepted: Caddy sends the client's).
    pub path: String,
    pub convention: Convention,
}

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");

/// The one value of a header; two (which would the front proxy have meant?) are refused.
fn single<'a>(h: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, Reject> {
    crate::headers::single(h, name).map_err(|_| Reject::BadRequest)
}

/// The request a check describes, as a request the proxy can judge: the described method and
/// URI (path and query), the check's headers (the client's credentials, `X-Forwarded-For`),
/// and the described host as `Host`.
pub fn describe<B>(
    check: &Request<B>,
    convention: Convention,
) -> Result<Request<Empty<Bytes>>, Reject> {
    let h = check.headers();
    let nginx = h.contains_key(&X_ORIGINAL_URI) || h.contains_key(&X_ORIGINAL_URL);
    let forwarded = h.contains_key(&X_FORWARDED_URI);
    let use_nginx = match convention {
        Convention::Nginx => true,
        Convention::Forwarded => false,
        Convention::Auto if nginx && forwarded => return Err(Reject::BadRequest),
        Convention::Auto => nginx,
    };
    let (method_h, uri_h) = if use_nginx {
        (&X_ORIGINAL_METHOD, &X_ORIGINAL_URI)
    } else {
        (&X_FORWARDED_METHOD, &X_FORWARDED_URI)
    };
    let path = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .filter(|u| u.starts_with('/'))
            .and_then(|u| u.parse::<http::Uri>().ok())
    };
    // ingress-nginx sends the whole URL (`X-Original-URL`) instead of the path.
    let mut host = None;
    let uri = match (single(h, uri_h)?, use_nginx) {
        (Some(v), _) => path(v),
        (None, true) => single(h, &X_ORIGINAL_URL)?
            .and_then(|v| v.to_str().ok())
            .and_then(|u| u.parse::<http::Uri>().ok())
            .filter(|u| u.scheme().is_some())
            .and_then(|u| {
                host = u
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                u.path_and_query()?.as_str().parse::<http::Uri>().ok()
            }),
        (None, false) => None,
    }
    .ok_or(Reject::BadRequest)?;
    // nginx's subrequest keeps the client's method when the recipe does not name it.
    let method = match single(h, method_h)? {
        Some(v) => Method::from_bytes(v.as_bytes()).map_err(|_| Reject::BadRequest)?,
        None if use_nginx => check.method().clone(),
        None => return Err(Reject::BadRequest),
    };
    let mut req = Request::new(Empty::new());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = check.version();
    let headers = req.headers_mut();
    headers.clone_from(h);
    if !use_nginx {
        host = single(h, &X_FORWARDED_HOST)?.cloned();
    }
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        convention: Convention,
        headers: &[(&str, &str)],
    ) -> Result<(Method, String, Option<String>), Reject> {
        let mut req = Request::get("/auth?x=1").body(()).unwrap();
        for (n, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let d = describe(&req, convention)?;
        Ok((
            d.method().clone(),
            d.uri().to_string(),
            d.headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap().to_string()),
        ))
    }

    #[test]
    fn the_request_judged_is_the_one_the_front_proxy_describes() {
        let traefik = [
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/api/v1/invoke?q=1"),
            ("x-forwarded-host", "mcp.example.com"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(
            check(Convention::Auto, &traefik),
            Ok((
                Method::POST,
                "/api/v1/invoke?q=1".into(),
                Some("mcp.example.com".into())
            ))
        );
        let nginx = [("x-original-method", "DELETE"), ("x-original-uri", "/mcp")];
        assert_eq!(
            check(Convention::Auto, &nginx).map(|d| (d.0, d.1)),
            Ok((Method::DELETE, "/mcp".into()))
        );
        // ingress-nginx: the whole URL.
        assert_eq!(
            check(
                Convention::Auto,
                &[
                    ("x-original-method", "POST"),
                    ("x-original-url", "https://mcp.example.com/mcp?x=1")
                ]
            ),
            Ok((
                Method::POST,
                "/mcp?x=1".into(),
                Some("mcp.example.com".into())
            ))
        );
        // nginx without X-Original-Method: the subrequest's own method.
        assert_eq!(
            check(Convention::Nginx, &[("x-original-uri", "/x")]).map(|d| d.0),
            Ok(Method::GET)
        );
    }

    #[test]
    fn a_check_that_could_be_read_two_ways_is_refused() {
        let both = [
            ("x-original-uri", "/api"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/admin"),
        ];
        assert_eq!(check(Convention::Auto, &both), Err(Reject::BadRequest));
        // A named convention reads its own headers and ignores the client's copy of the other.
        assert_eq!(
            check(Convention::Nginx, &both).map(|d| d.1),
            Ok("/api".into())
        );
        assert_eq!(
            check(Convention::Forwarded, &both).map(|d| d.1),
            Ok("/admin".into())
        );
        let twice = [
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/a"),
            ("x-forwarded-uri", "/b"),
        ];
        assert_eq!(check(Convention::Auto, &twice), Err(Reject::BadRequest));
        assert_eq!(check(Convention::Auto, &[]), Err(Reject::BadRequest));
        assert_eq!(
            check(Convention::Forwarded, &[("x-forwarded-uri", "/a")]),
            Err(Reject::BadRequest),
            "Traefik and Caddy always name the method"
        );
        assert_eq!(
            check(
                Convention::Auto,
                &[
                    ("x-forwarded-method", "GET"),
                    ("x-forwarded-uri", "http://evil/a")
                ]
            ),
            Err(Reject::BadRequest),
            "a path, not an absolute URL"
        );
    }
}
