//! [`Reject`]: every way the proxy itself answers a request (DESIGN.md §4), in one place.
//!
//! Bodies are short, fixed JSON: never an echo of a credential, an upstream error or an
//! internal detail.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::auth::api_key::KeyRefusal;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// No credential at all, and only API keys are configured.
    #[error("no credentials")]
    MissingCredentials,
    /// `Authorization` without a token, duplicated credential headers, non-ASCII values.
    #[error("malformed credentials")]
    MalformedCredentials,
    /// A scheme this proxy does not accept (e.g. `Digest`, or `Basic` with no htpasswd file).
    #[error("authorization scheme not accepted")]
    InvalidScheme,
    /// Unknown, disabled or expired key.
    #[error("invalid token ({0:?})")]
    InvalidToken(KeyRefusal),
    /// Authenticated, but the key's `allow` list does not cover this method and path.
    #[error("forbidden")]
    Forbidden,
    #[error("payload too large")]
    PayloadTooLarge,
    /// Malformed or ambiguous request (bad path, smuggling shapes).
    #[error("bad request")]
    BadRequest,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timeout")]
    UpstreamTimeout,
}

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::MissingCredentials | Reject::MalformedCredentials | Reject::InvalidScheme => {
                StatusCode::FORBIDDEN
            }
            Reject::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            Reject::Forbidden => StatusCode::FORBIDDEN,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BadRequest => StatusCode::BAD_REQUEST,
            Reject::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error` field of the body.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::MissingCredentials | Reject::MalformedCredentials => "invalid_authorization",
            Reject::InvalidScheme => "invalid_scheme",
            Reject::InvalidToken(_) => "invalid_token",
            Reject::Forbidden => "forbidden",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::BadRequest => "bad_request",
            Reject::UpstreamUnavailable => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
        }
    }

    fn message(&self) -> &'static str {
        match self {
            Reject::MissingCredentials => {
                "An API key is required: send Authorization: Bearer <key> or X-API-Key: <key>."
            }
            Reject::MalformedCredentials => "The credentials in the request are malformed.",
            Reject::InvalidScheme => "This authorization scheme is not accepted.",
            Reject::InvalidToken(_) => "The API key is not valid.",
            Reject::Forbidden => "This key may not access this method and path.",
            Reject::PayloadTooLarge => "The request body is too large.",
            Reject::BadRequest => "The request is malformed.",
            Reject::UpstreamUnavailable => "The service is unavailable.",
            Reject::UpstreamTimeout => "The service did not answer in time.",
        }
    }

    /// The `outcome` of the access log and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Reject::MissingCredentials
            | Reject::MalformedCredentials
            | Reject::InvalidScheme
            | Reject::InvalidToken(_) => "unauthenticated",
            Reject::Forbidden => "forbidden",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::BadRequest => "bad_request",
            Reject::UpstreamUnavailable => "upstream_error",
            Reject::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// Why authentication failed, for logs and metrics (`None` when it is not an auth failure).
    pub fn auth_reason(&self) -> Option<&'static str> {
        Some(match self {
            Reject::MissingCredentials => "missing",
            Reject::MalformedCredentials => "malformed",
            Reject::InvalidScheme => "invalid_scheme",
            Reject::InvalidToken(KeyRefusal::Unknown) => "invalid_token",
            Reject::InvalidToken(KeyRefusal::Disabled) => "disabled",
            Reject::InvalidToken(KeyRefusal::Expired) => "expired",
            _ => return None,
        })
    }

    /// The response, with `body` as its body type.
    pub fn response<B: From<Bytes>>(&self) -> Response<B> {
        let body = format!(
            "{{\"error\":\"{}\",\"message\":\"{}\"}}\n",
            self.code(),
            self.message()
        );
        let mut resp = Response::new(B::from(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Reject::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Reject::BadRequest => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    /// Pins DESIGN.md §4 for the rows this build implements.
    #[test]
    fn statuses_codes_and_headers_follow_the_design_table() {
        type Row = (
            Reject,
            u16,
            &'static str,
            Option<(&'static str, &'static str)>,
        );
        let table: &[Row] = &[
            (
                Reject::MissingCredentials,
                403,
                "invalid_authorization",
                None,
            ),
            (
                Reject::MalformedCredentials,
                403,
                "invalid_authorization",
                None,
            ),
            (Reject::InvalidScheme, 403, "invalid_scheme", None),
            (
                Reject::InvalidToken(KeyRefusal::Unknown),
                401,
                "invalid_token",
                Some(("www-authenticate", "Bearer error=\"invalid_token\"")),
            ),
            (
                Reject::InvalidToken(KeyRefusal::Disabled),
                401,
                "invalid_token",
                Some(("www-authenticate", "Bearer error=\"invalid_token\"")),
            ),
            (
                Reject::InvalidToken(KeyRefusal::Expired),
                401,
                "invalid_token",
                Some(("www-authenticate", "Bearer error=\"invalid_token\"")),
            ),
            (Reject::Forbidden, 403, "forbidden", None),
            (Reject::PayloadTooLarge, 413, "payload_too_large", None),
            (
                Reject::BadRequest,
                400,
                "bad_request",
                Some(("connection", "close")),
            ),
            (
                Reject::UpstreamUnavailable,
                502,
                "upstream_unavailable",
                None,
            ),
            (Reject::UpstreamTimeout, 504, "upstream_timeout", None),
        ];
        for (reject, status, code, header) in table {
            let resp: Response<Full<Bytes>> = reject.response();
            assert_eq!(resp.status().as_u16(), *status, "{reject:?}");
            assert_eq!(reject.code(), *code);
            if let Some((name, value)) = header {
                assert_eq!(resp.headers()[*name], *value, "{reject:?}");
            }
            assert_eq!(resp.headers()["content-type"], "application/json");
        }
    }
}
