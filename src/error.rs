//! [`Reject`]: every way the proxy itself answers a request (DESIGN.md §4), in one place.
//!
//! Bodies are short, fixed JSON: never an echo of a credential, an upstream error or an
//! internal detail.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// The Basic challenge (RFC 7617): the realm (validated at load: printable, no quotes), and
/// UTF-8 as the credentials' charset.
pub fn basic_challenge(realm: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")).ok()
}

/// An error with every cause under it, `outer: inner: …`, for logs.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

/// Why a presented key was refused. Defined here, where every refusal is, and used by the
/// keys-file lookup (`auth::api_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    Unknown,
    Disabled,
    Expired,
}

/// Why a JWT access token was refused (`[auth.jwt]`). Each is an `invalid_token` to the
/// client; logs and metrics tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a JWS, or a header that does not parse (including `alg: none`).
    Malformed,
    /// An algorithm off the allow-list (HMAC always), or one the key's type or `alg` disagrees with.
    Algorithm,
    /// No key of the issuer's set has the token's `kid`.
    UnknownKey,
    Signature,
    Issuer,
    Audience,
    Expired,
    NotYetValid,
    /// The header's `typ` is not the configured one.
    Type,
    /// A claim missing or of the wrong type (the identity claim, `exp`).
    Claims,
}

impl TokenRefusal {
    /// The `reason` of logs and of `portcullis_auth_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "jwt_malformed",
            TokenRefusal::Algorithm => "jwt_algorithm",
            TokenRefusal::UnknownKey => "jwt_unknown_key",
            TokenRefusal::Signature => "jwt_signature",
            TokenRefusal::Issuer => "jwt_issuer",
            TokenRefusal::Audience => "jwt_audience",
            TokenRefusal::Expired => "jwt_expired",
            TokenRefusal::NotYetValid => "jwt_not_yet_valid",
            TokenRefusal::Type => "jwt_type",
            TokenRefusal::Claims => "jwt_claims",
        }
    }
}

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
    /// A JWT access token that does not verify.
    #[error("invalid token ({0:?})")]
    InvalidJwt(TokenRefusal),
    /// A valid token without every scope needed (the scopes needed, space separated).
    #[error("insufficient scope")]
    InsufficientScope(Arc<str>),
    /// On the MCP path: an `Origin` that is not allowed (DNS-rebinding defence).
    #[error("forbidden origin")]
    ForbiddenOrigin,
    /// No credential, and HTTP Basic is accepted: challenge for it (the realm).
    #[error("credentials required")]
    BasicRequired(Arc<str>),
    /// Wrong Basic user or password (the realm).
    #[error("wrong user or password")]
    BadPassword(Arc<str>),
    /// Too many failed authentications from this client: banned for `retry_after` seconds.
    #[error("banned")]
    Banned { retry_after: u64 },
    /// Too many requests from this client; try again after `retry_after` seconds.
    #[error("rate limited")]
    RateLimited { retry_after: u64 },
    /// Authenticated, but the key's `allow` list does not cover this method and path.
    #[error("forbidden")]
    Forbidden,
    /// The client's network is not in `allow_cidrs`.
    #[error("forbidden network")]
    ForbiddenNetwork,
    #[error("payload too large")]
    PayloadTooLarge,
    /// Request line and headers over `max_header_bytes`.
    #[error("headers too large")]
    HeadersTooLarge,
    /// Malformed or ambiguous request (bad path, smuggling shapes).
    #[error("bad request")]
    BadRequest,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// A WebSocket upgrade toward an `http2` upstream, which cannot carry it.
    #[error("upgrade not supported")]
    UpgradeUnsupported,
    /// On the MCP path: an `Mcp-Session-Id` issued to another identity (404, the MCP answer
    /// for a session the server does not know; the client starts a new one).
    #[error("session not found")]
    SessionNotFound,
    /// On the MCP path under tool rules: a POST body that is not one strict JSON-RPC message
    /// (why: `batch`, `duplicate_key`, `not_json`, …).
    #[error("invalid JSON-RPC ({0})")]
    InvalidJsonRpc(&'static str),
    /// `Mcp-Method` / `Mcp-Name` disagree with the body (the JSON-RPC error body).
    #[error("MCP header mismatch")]
    McpHeaderMismatch(Arc<str>),
    /// A tool, prompt or resource outside the caller's rules (the JSON-RPC error body, with
    /// the request's id).
    #[error("tool denied")]
    ToolDenied(Arc<str>),
    /// A `[[mcp.tool_limits]]` budget spent (the JSON-RPC error body).
    #[error("tool rate limited")]
    ToolRateLimited { body: Arc<str>, retry_after: u64 },
}

/// A JSON-RPC error answer of the proxy's own, with the request's `id` (`null` when unknown).
/// `code` is one of [`RPC_DENIED`], [`RPC_LIMITED`], or a JSON-RPC / MCP code for a message
/// that could not be judged.
pub fn jsonrpc_error(
    id: Option<&serde_json::Value>,
    code: i64,
    message: &str,
    data: Option<serde_json::Value>,
) -> Arc<str> {
    let mut error = serde_json::json!({ "code": code, "message": message });
    if let Some(d) = data {
        error["data"] = d;
    }
    let body = serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": error });
    Arc::from(format!("{body}\n"))
}

/// The JSON-RPC error code of a call the tool rules refuse: outside the range JSON-RPC and
/// MCP reserve (−32768…−32000), read like the HTTP status it stands for.
pub const RPC_DENIED: i64 = 403;
/// The JSON-RPC error code of a call held back by a tool limit.
pub const RPC_LIMITED: i64 = 429;
/// MCP's error for `Mcp-Method` / `Mcp-Name` headers that disagree with the body (2026-07-28).
pub const RPC_HEADER_MISMATCH: i64 = -32020;

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::MissingCredentials | Reject::MalformedCredentials | Reject::InvalidScheme => {
                StatusCode::FORBIDDEN
            }
            Reject::InvalidToken(_)
            | Reject::InvalidJwt(_)
            | Reject::BasicRequired(_)
            | Reject::BadPassword(_) => StatusCode::UNAUTHORIZED,
            Reject::InsufficientScope(_) | Reject::ForbiddenOrigin => StatusCode::FORBIDDEN,
            Reject::Banned { .. } | Reject::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reject::Forbidden | Reject::ForbiddenNetwork => StatusCode::FORBIDDEN,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::BadRequest => StatusCode::BAD_REQUEST,
            Reject::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::UpgradeUnsupported => StatusCode::NOT_IMPLEMENTED,
            Reject::SessionNotFound => StatusCode::NOT_FOUND,
            Reject::InvalidJsonRpc(_) | Reject::McpHeaderMismatch(_) => StatusCode::BAD_REQUEST,
            // A JSON-RPC error the client reads as the call's answer, not a transport failure.
            Reject::ToolDenied(_) | Reject::ToolRateLimited { .. } => StatusCode::OK,
        }
    }

    /// The `error` field of the body.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::MissingCredentials | Reject::MalformedCredentials => "invalid_authorization",
            Reject::InvalidScheme => "invalid_scheme",
            Reject::InvalidToken(_) | Reject::InvalidJwt(_) => "invalid_token",
            Reject::InsufficientScope(_) => "insufficient_scope",
            Reject::ForbiddenOrigin => "forbidden_origin",
            Reject::BasicRequired(_) | Reject::BadPassword(_) => "unauthorized",
            Reject::Banned { .. } => "banned",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::Forbidden => "forbidden",
            Reject::ForbiddenNetwork => "forbidden_network",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BadRequest => "bad_request",
            Reject::UpstreamUnavailable => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::UpgradeUnsupported => "upgrade_unsupported",
            Reject::SessionNotFound => "session_not_found",
            Reject::InvalidJsonRpc(_) => "invalid_jsonrpc",
            Reject::McpHeaderMismatch(_) => "mcp_header_mismatch",
            Reject::ToolDenied(_) => "tool_denied",
            Reject::ToolRateLimited { .. } => "tool_rate_limited",
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
            Reject::InvalidJwt(TokenRefusal::Expired) => "The access token has expired.",
            Reject::InvalidJwt(_) => "The access token is not valid.",
            Reject::InsufficientScope(_) => "The access token lacks a scope this needs.",
            Reject::ForbiddenOrigin => "Requests from this origin are not accepted.",
            Reject::BasicRequired(_) => "Authentication is required.",
            Reject::BadPassword(_) => "The user name or password is not valid.",
            Reject::Banned { .. } => "Too many failed authentications; try again later.",
            Reject::RateLimited { .. } => "Too many requests; try again later.",
            Reject::Forbidden => "This key may not access this method and path.",
            Reject::ForbiddenNetwork => "Requests from this network are not accepted.",
            Reject::PayloadTooLarge => "The request body is too large.",
            Reject::HeadersTooLarge => "The request line and headers are too large.",
            Reject::BadRequest => "The request is malformed.",
            Reject::UpstreamUnavailable => "The service is unavailable.",
            Reject::UpstreamTimeout => "The service did not answer in time.",
            Reject::UpgradeUnsupported => {
                "WebSocket is not available: the upstream is spoken to in HTTP/2."
            }
            Reject::SessionNotFound => "No such session; start a new one.",
            Reject::InvalidJsonRpc(_) => "The body is not one JSON-RPC 2.0 message.",
            Reject::McpHeaderMismatch(_) => "Mcp-Method or Mcp-Name does not match the body.",
            Reject::ToolDenied(_) => "Not permitted.",
            Reject::ToolRateLimited { .. } => "Rate limited.",
        }
    }

    /// The `outcome` of the access log and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Reject::MissingCredentials
            | Reject::MalformedCredentials
            | Reject::InvalidScheme
            | Reject::InvalidToken(_)
            | Reject::InvalidJwt(_)
            | Reject::BasicRequired(_)
            | Reject::BadPassword(_) => "unauthenticated",
            Reject::InsufficientScope(_) => "insufficient_scope",
            Reject::ForbiddenOrigin => "forbidden_origin",
            Reject::Banned { .. } => "banned",
            Reject::RateLimited { .. } => "rate_limited",
            Reject::Forbidden => "forbidden",
            Reject::ForbiddenNetwork => "forbidden_network",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BadRequest => "bad_request",
            Reject::UpstreamUnavailable => "upstream_error",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::UpgradeUnsupported => "upgrade_unsupported",
            Reject::SessionNotFound => "session_mismatch",
            Reject::InvalidJsonRpc(_) => "invalid_jsonrpc",
            Reject::McpHeaderMismatch(_) => "mcp_header_mismatch",
            Reject::ToolDenied(_) => "tool_denied",
            Reject::ToolRateLimited { .. } => "tool_rate_limited",
        }
    }

    /// The gRPC status code of this refusal (grpc/doc/statuscodes.md).
    pub fn grpc_status(&self) -> u8 {
        match self {
            Reject::MissingCredentials
            | Reject::MalformedCredentials
            | Reject::InvalidScheme
            | Reject::InvalidToken(_)
            | Reject::InvalidJwt(_)
            | Reject::BasicRequired(_)
            | Reject::BadPassword(_) => 16, // UNAUTHENTICATED
            Reject::Forbidden
            | Reject::ForbiddenNetwork
            | Reject::InsufficientScope(_)
            | Reject::ForbiddenOrigin => 7, // PERMISSION_DENIED
            Reject::Banned { .. }
            | Reject::RateLimited { .. }
            | Reject::PayloadTooLarge
            | Reject::HeadersTooLarge => 8, // RESOURCE_EXHAUSTED
            Reject::BadRequest => 3,           // INVALID_ARGUMENT
            Reject::UpstreamUnavailable => 14, // UNAVAILABLE
            Reject::UpstreamTimeout => 4,      // DEADLINE_EXCEEDED
            Reject::UpgradeUnsupported => 12,  // UNIMPLEMENTED
            Reject::SessionNotFound => 5,      // NOT_FOUND
            Reject::InvalidJsonRpc(_) | Reject::McpHeaderMismatch(_) => 3,
            Reject::ToolDenied(_) => 7,
            Reject::ToolRateLimited { .. } => 8,
        }
    }

    /// The refusal as a gRPC client understands it: a "trailers-only" response, HTTP 200 with
    /// `grpc-status` and `grpc-message` in the headers and no body, plus the same challenge
    /// and `Retry-After` headers as the plain response.
    pub fn grpc_response<B: From<Bytes>>(&self) -> Response<B> {
        let plain: Response<B> = self.response();
        let (mut parts, _) = plain.into_parts();
        parts.status = StatusCode::OK;
        let h = &mut parts.headers;
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        h.insert(
            "grpc-message",
            HeaderValue::from_static(self.grpc_message()),
        );
        h.remove(header::CONNECTION);
        Response::from_parts(parts, B::from(Bytes::new()))
    }

    /// `grpc-message`: the message, percent-encoded as gRPC requires (only spaces need it).
    fn grpc_message(&self) -> &'static str {
        match self.grpc_status() {
            16 => "authentication%20required",
            7 => "permission%20denied",
            8 => "resource%20exhausted",
            3 => "invalid%20request",
            14 => "service%20unavailable",
            4 => "deadline%20exceeded",
            5 => "not%20found",
            _ => "unimplemented",
        }
    }

    /// For an authentication failure: its reason (for logs and metrics) and whether a
    /// credential was presented, which is what counts toward a ban (DESIGN.md §4: a request
    /// without credentials, a browser's first try, does not). `None` for every other refusal.
    /// Every variant is named: a new refusal does not compile until it is decided here.
    fn auth_failure(&self) -> Option<(&'static str, bool)> {
        Some(match self {
            Reject::MissingCredentials | Reject::BasicRequired(_) => ("missing", false),
            Reject::BadPassword(_) => ("bad_password", true),
            Reject::MalformedCredentials => ("malformed", true),
            Reject::InvalidScheme => ("invalid_scheme", true),
            Reject::InvalidToken(KeyRefusal::Unknown) => ("invalid_token", true),
            Reject::InvalidToken(KeyRefusal::Disabled) => ("disabled", true),
            Reject::InvalidToken(KeyRefusal::Expired) => ("expired", true),
            Reject::InvalidJwt(r) => (r.reason(), true),
            Reject::InsufficientScope(_)
            | Reject::ForbiddenOrigin
            | Reject::Banned { .. }
            | Reject::RateLimited { .. }
            | Reject::Forbidden
            | Reject::ForbiddenNetwork
            | Reject::PayloadTooLarge
            | Reject::HeadersTooLarge
            | Reject::BadRequest
            | Reject::UpstreamUnavailable
            | Reject::UpstreamTimeout
            | Reject::UpgradeUnsupported
            | Reject::SessionNotFound
            | Reject::InvalidJsonRpc(_)
            | Reject::McpHeaderMismatch(_)
            | Reject::ToolDenied(_)
            | Reject::ToolRateLimited { .. } => return None,
        })
    }

    /// Why authentication failed, for logs and metrics (`None` when it is not an auth failure).
    pub fn auth_reason(&self) -> Option<&'static str> {
        self.auth_failure().map(|(reason, _)| reason)
    }

    /// Whether this refusal counts toward a ban: presented credentials that failed.
    pub fn counts_toward_ban(&self) -> bool {
        self.auth_failure().is_some_and(|(_, presented)| presented)
    }

    /// The JSON-RPC error body of a refusal made inside MCP's JSON-RPC.
    fn jsonrpc_body(&self) -> Option<String> {
        Some(match self {
            Reject::InvalidJsonRpc(why) => {
                // -32700: not JSON at all; -32600: JSON, but not one acceptable request.
                let code = if *why == "not_json" { -32700 } else { -32600 };
                let message = format!("Invalid request: {}.", refusal_text(why));
                jsonrpc_error(None, code, &message, None).to_string()
            }
            Reject::McpHeaderMismatch(body)
            | Reject::ToolDenied(body)
            | Reject::ToolRateLimited { body, .. } => body.to_string(),
            _ => return None,
        })
    }

    /// The response, with `body` as its body type.
    pub fn response<B: From<Bytes>>(&self) -> Response<B> {
        if let Some(rpc) = self.jsonrpc_body() {
            let mut resp = Response::new(B::from(Bytes::from(rpc)));
            *resp.status_mut() = self.status();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Reject::ToolRateLimited { retry_after, .. } = self {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            return resp;
        }
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
            Reject::InvalidToken(_) | Reject::InvalidJwt(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Reject::InsufficientScope(scopes) => {
                let challenge = format!("Bearer error=\"insufficient_scope\", scope=\"{scopes}\"");
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Reject::BasicRequired(realm) | Reject::BadPassword(realm) => {
                if let Some(v) = basic_challenge(realm) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Reject::Banned { retry_after } | Reject::RateLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Reject::BadRequest => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// What an [`Reject::InvalidJsonRpc`] reason means, for the client.
fn refusal_text(why: &str) -> &'static str {
    match why {
        "batch" => "batches are not accepted (MCP removed them in 2025-06-18)",
        "duplicate_key" => "an object has the same key twice",
        "not_json" => "the body is not JSON",
        "not_object" => "the body is not a JSON object",
        "version" => "\"jsonrpc\" must be \"2.0\"",
        "method" => "\"method\" must be a string",
        "id" => "\"id\" must be a string or an integer",
        "params" => "\"params\" must be an object naming what it asks for",
        _ => "the body is not one JSON-RPC 2.0 message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    /// DESIGN.md §4: presented credentials that fail count toward a ban; a request without
    /// credentials, a `forbidden` and a rate-limited one do not.
    #[test]
    fn only_presented_credentials_that_fail_count_toward_a_ban() {
        let counted = [
            Reject::MalformedCredentials,
            Reject::InvalidScheme,
            Reject::InvalidToken(KeyRefusal::Unknown),
            Reject::InvalidToken(KeyRefusal::Disabled),
            Reject::InvalidToken(KeyRefusal::Expired),
            Reject::BadPassword("r".into()),
            Reject::InvalidJwt(TokenRefusal::Expired),
            Reject::InvalidJwt(TokenRefusal::UnknownKey),
        ];
        let not_counted = [
            Reject::InsufficientScope("mcp:tools".into()),
            Reject::ForbiddenOrigin,
            Reject::MissingCredentials,
            Reject::BasicRequired("r".into()),
            Reject::Banned { retry_after: 1 },
            Reject::RateLimited { retry_after: 1 },
            Reject::Forbidden,
            Reject::ForbiddenNetwork,
            Reject::PayloadTooLarge,
            Reject::HeadersTooLarge,
            Reject::BadRequest,
            Reject::UpstreamUnavailable,
            Reject::UpstreamTimeout,
            Reject::UpgradeUnsupported,
            Reject::SessionNotFound,
        ];
        for r in &counted {
            assert!(r.counts_toward_ban(), "{r:?}");
            assert!(r.auth_reason().is_some(), "{r:?}");
        }
        for r in &not_counted {
            assert!(!r.counts_toward_ban(), "{r:?}");
        }
        assert_eq!(Reject::MissingCredentials.auth_reason(), Some("missing"));
        assert_eq!(Reject::Forbidden.auth_reason(), None);
    }

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
            (
                Reject::BasicRequired("api".into()),
                401,
                "unauthorized",
                Some(("www-authenticate", "Basic realm=\"api\", charset=\"UTF-8\"")),
            ),
            (
                Reject::BadPassword("api".into()),
                401,
                "unauthorized",
                Some(("www-authenticate", "Basic realm=\"api\", charset=\"UTF-8\"")),
            ),
            (
                Reject::Banned { retry_after: 900 },
                429,
                "banned",
                Some(("retry-after", "900")),
            ),
            (
                Reject::RateLimited { retry_after: 1 },
                429,
                "rate_limited",
                Some(("retry-after", "1")),
            ),
            (Reject::Forbidden, 403, "forbidden", None),
            (Reject::PayloadTooLarge, 413, "payload_too_large", None),
            (Reject::HeadersTooLarge, 431, "headers_too_large", None),
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
