//! The MCP endpoint (`[mcp]`, DESIGN.md §9, MCP.md §1): what MCP clients need on the wire
//! from the resource server in front of an MCP server.
//!
//! - Protected Resource Metadata (RFC 9728) at `/.well-known/oauth-protected-resource{path}`
//!   and at the root, unauthenticated and CORS-open; a JSON 404 there when OAuth is off.
//! - The MCP error profile on the MCP path: every authentication refusal is a 401 with a
//!   `Bearer` challenge first (`resource_metadata`, `scope`), Basic after it when htpasswd is
//!   on; `invalid_token` for bad tokens; 403 `insufficient_scope` with every scope needed.
//! - CORS for browser-based clients, and the `Origin` rule (DNS-rebinding defence): a present
//!   `Origin` that is not allowed is refused with 403 before anything else; toward the
//!   backend `Origin` is removed, so the MCP SDK servers' own guard accepts the request.
//!
//! - Session binding: an `Mcp-Session-Id` the backend issued in an answer to one identity and
//!   presented later by another gets 404 (MCP's answer for an unknown session), backend
//!   untouched. Kept in this process's memory, bounded ([`Sessions`]).
//! - Tool rules (`tool_policy`, MCP.md §3): who may use which tools, prompts and resources
//!   ([`policy`]); POST bodies read, parsed strictly ([`jsonrpc`]) and judged ([`inspect`]);
//!   list answers filtered in JSON and in event streams ([`filter`], [`sse`]).
//!
//! Fails closed: an `Origin` that is not exactly an allowed one (or the resource's own) is
//! refused, a preflight from it too; a session bound to another identity is refused. Fails
//! open where it cannot know: a session id this process never saw issued (issued before a
//! restart, or by a request through another replica) passes to the backend, which knows its
//! own sessions.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::error::Reject;

pub mod filter;
pub mod inspect;
pub mod jsonrpc;
pub mod policy;
mod sessions;
pub mod sse;

pub use sessions::Sessions;

/// `[mcp]`, validated.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The MCP endpoint as the proxy sees it, e.g. `/mcp`.
    pub path: String,
    /// The canonical public URI of the endpoint (required with `[auth.jwt]`).
    pub resource: Option<http::Uri>,
    pub resource_name: Option<String>,
    /// Default: `[auth.jwt] issuer`.
    pub authorization_servers: Vec<String>,
    pub scopes_supported: Vec<String>,
    /// Origins allowed besides the resource's own, as `scheme://host[:port]`, lower case.
    pub allowed_origins: Vec<String>,
    /// `tool_policy = true`: JSON-RPC bodies read and judged by the tool rules.
    pub policy: Option<policy::PolicyConfig>,
}

/// The MCP endpoint's behaviour, built once from the config.
pub struct Mcp {
    /// Which identity each session was issued to.
    pub sessions: Sessions,
    /// The tool rules, with `tool_policy = true`.
    pub policy: Option<policy::Policy>,
    path: String,
    /// OAuth is on (`[auth.jwt]`): metadata is served and challenges point at it.
    oauth: bool,
    /// The Protected Resource Metadata document.
    metadata: Bytes,
    /// The metadata paths served besides the root one.
    metadata_paths: Vec<String>,
    /// The 401 challenge without an error, and with `error="invalid_token"`.
    challenge: HeaderValue,
    invalid_token: HeaderValue,
    /// `resource_metadata="…"` for an insufficient-scope challenge (empty when OAuth is off).
    metadata_param: String,
    /// The Basic challenge that follows the Bearer one, when htpasswd is on.
    basic: Option<HeaderValue>,
    allowed_origins: Vec<String>,
    /// The resource's own origin, always allowed.
    own_origin: Option<String>,
}

const METADATA_ROOT: &str = "/.well-known/oauth-protected-resource";

/// The header that carries an MCP session id.
pub static MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// What every answer on the MCP path exposes to a browser-based client.
const EXPOSE: HeaderValue =
    HeaderValue::from_static("WWW-Authenticate, Mcp-Session-Id, MCP-Protocol-Version");

/// What a request on the MCP path carries through the pipeline.
#[derive(Debug, Clone, Default)]
pub struct McpRequest {
    /// The request's `Origin`, when it is allowed (echoed in `Access-Control-Allow-Origin`).
    pub allowed_origin: Option<HeaderValue>,
    /// The `Mcp-Session-Id` it carries, and who sent it, once authenticated.
    pub session: Option<HeaderValue>,
    pub owner: Option<String>,
    /// A DELETE: the session ends when the backend accepts it.
    pub delete: bool,
}

/// The `scheme://host[:port]` of a URI, lower case, without a default port.
fn origin_of(uri: &http::Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    let host = authority.host().to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    Some(match authority.port_u16() {
        Some(p) if p != default => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// An `Origin` header value in the same form as [`origin_of`]; `None` for `null` or junk.
pub fn normalize_origin(value: &str) -> Option<String> {
    let uri: http::Uri = value.trim().parse().ok()?;
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return None;
    }
    origin_of(&uri)
}

fn quoted(v: &str) -> String {
    v.replace(['"', '\\'], "")
}

impl Mcp {
    /// `oauth`: `[auth.jwt]` is on. `basic`: htpasswd is on (its challenge follows the
    /// Bearer one). `realm`: `[auth] realm`. `rate`: the `[rate_limit]` limiter, whose Redis
    /// (if any) keeps the tool limits too.
    pub fn new(
        config: &McpConfig,
        oauth: bool,
        basic: bool,
        realm: &str,
        rate: &crate::ratelimit::RateLimits,
    ) -> Mcp {
        let resource = config.resource.as_ref();
        let resource_path = resource.map(|r| r.path().trim_end_matches('/').to_string());
        let metadata_url = resource.and_then(|r| {
            Some(format!(
                "{}{METADATA_ROOT}{}",
                origin_of(r)?,
                resource_path.as_deref().unwrap_or("")
            ))
        });
        let scope = config.scopes_supported.join(" ");
        let (challenge, invalid_token, metadata_param) = match (&metadata_url, oauth) {
            (Some(url), true) => {
                let meta = format!("resource_metadata=\"{}\"", quoted(url));
                let scope = if scope.is_empty() {
                    String::new()
                } else {
                    format!(", scope=\"{}\"", quoted(&scope))
                };
                (
                    format!("Bearer {meta}{scope}"),
                    format!("Bearer error=\"invalid_token\", {meta}{scope}"),
                    format!(", {meta}"),
                )
            }
            // Keys only: a Bearer challenge without metadata (no client starts a sign-in
            // that cannot succeed), which still tells it to send a token.
            _ => (
                format!("Bearer realm=\"{}\"", quoted(realm)),
                format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\"",
                    quoted(realm)
                ),
                String::new(),
            ),
        };
        let mut metadata = serde_json::json!({
            "resource": resource.map(|r| r.to_string().trim_end_matches('/').to_string()),
            "authorization_servers": config.authorization_servers,
            "bearer_methods_supported": ["header"],
        });
        if !config.scopes_supported.is_empty() {
            metadata["scopes_supported"] = config.scopes_supported.clone().into();
        }
        if let Some(name) = &config.resource_name {
            metadata["resource_name"] = name.clone().into();
        }
        let mut metadata_paths = vec![format!("{METADATA_ROOT}{}", config.path)];
        if let Some(p) = resource_path.filter(|p| !p.is_empty() && *p != config.path) {
            metadata_paths.push(format!("{METADATA_ROOT}{p}"));
        }
        Mcp {
            path: config.path.clone(),
            oauth,
            metadata: Bytes::from(format!("{metadata}\n")),
            metadata_paths,
            challenge: HeaderValue::from_str(&challenge).expect("quoted header text"),
            invalid_token: HeaderValue::from_str(&invalid_token).expect("quoted header text"),
            metadata_param,
            basic: basic
                .then(|| crate::error::basic_challenge(realm))
                .flatten(),
            allowed_origins: config.allowed_origins.clone(),
            own_origin: resource.and_then(origin_of),
            sessions: Sessions::default(),
            policy: config.policy.clone().map(|p| policy::Policy::new(p, rate)),
        }
    }

    /// Whether a normalised path is the MCP endpoint (or below it).
    pub fn is_endpoint(&self, path: &str) -> bool {
        path.strip_prefix(self.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Whether an `Origin` value may reach the MCP endpoint.
    fn origin_allowed(&self, value: &HeaderValue) -> bool {
        let Some(origin) = value.to_str().ok().and_then(normalize_origin) else {
            return false;
        };
        self.own_origin.as_deref() == Some(origin.as_str())
            || self.allowed_origins.contains(&origin)
    }

    /// The `Origin` rule for a request on the MCP path: absent is fine, allowed is echoed,
    /// anything else is refused.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<McpRequest, Reject> {
        match crate::headers::single(headers, &header::ORIGIN) {
            Ok(None) => Ok(McpRequest::default()),
            Ok(Some(o)) if self.origin_allowed(o) => Ok(McpRequest {
                allowed_origin: Some(o.clone()),
                ..McpRequest::default()
            }),
            _ => Err(Reject::ForbiddenOrigin),
        }
    }

    /// What the proxy answers itself, before any authentication: the metadata document (any
    /// origin) and the CORS preflight on the MCP path (allowed origins). `None`: not one of
    /// those; the request goes through the pipeline. `path` is the normalised path.
    pub fn local<B>(
        &self,
        req: &Request<B>,
        path: &str,
    ) -> Option<(Response<Full<Bytes>>, &'static str)> {
        if path == METADATA_ROOT || self.metadata_paths.iter().any(|p| p == path) {
            return Some(self.metadata_answer(req.method(), req.headers()));
        }
        if path.starts_with(METADATA_ROOT) && path[METADATA_ROOT.len()..].starts_with('/') {
            return Some((
                json(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "No metadata for this resource.",
                ),
                "not_found",
            ));
        }
        let preflight = req.method() == Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight && self.is_endpoint(path) {
            return Some(self.preflight(req.headers()));
        }
        None
    }

    fn metadata_answer(
        &self,
        method: &Method,
        h: &HeaderMap,
    ) -> (Response<Full<Bytes>>, &'static str) {
        let mut resp = if *method == Method::OPTIONS {
            (preflight_answer("GET, HEAD, OPTIONS", h), "cors_preflight")
        } else if *method != Method::GET && *method != Method::HEAD {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Use GET.",
            );
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            (r, "method_not_allowed")
        } else if !self.oauth {
            (
                json(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "OAuth is not configured for this resource; send an API key.",
                ),
                "not_found",
            )
        } else {
            let mut r = Response::new(Full::new(self.metadata.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            (r, "metadata")
        };
        resp.0.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        resp
    }

    /// The CORS preflight of the MCP endpoint: answered without credentials for an allowed
    /// origin, 403 for any other.
    fn preflight(&self, h: &HeaderMap) -> (Response<Full<Bytes>>, &'static str) {
        let req = match self.check_origin(h) {
            Ok(r) => r,
            Err(reject) => {
                let mut resp = reject.response();
                resp.headers_mut()
                    .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
                return (resp, reject.outcome());
            }
        };
        let mut resp = preflight_answer("GET, POST, DELETE, OPTIONS", h);
        self.cors(resp.headers_mut(), &req);
        (resp, "cors_preflight")
    }

    /// Session binding, once the caller is known: an `Mcp-Session-Id` issued to another
    /// identity is refused (404). Anonymous callers are not bound. Two copies of the header
    /// are refused too (which would the backend read?).
    pub fn check_session(
        &self,
        headers: &HeaderMap,
        req: &mut McpRequest,
        owner: Option<String>,
    ) -> Result<(), Reject> {
        let id = crate::headers::single(headers, &MCP_SESSION_ID)
            .map_err(|_| Reject::BadRequest)?
            .cloned();
        if let (Some(id), Some(owner)) = (&id, &owner) {
            if !self.sessions.allows(id, owner) {
                tracing::warn!(event = "mcp_session_mismatch", identity = %owner, "an MCP session issued to another identity was presented: 404");
                return Err(Reject::SessionNotFound);
            }
        }
        (req.session, req.owner) = (id, owner);
        Ok(())
    }

    /// What the backend's answer says about sessions: one issued (bound to the caller), or
    /// one ended by an accepted DELETE.
    pub fn answered(&self, req: &McpRequest, status: StatusCode, headers: &HeaderMap) {
        let Some(owner) = &req.owner else {
            return;
        };
        if let Some(id) = headers.get(&MCP_SESSION_ID) {
            self.sessions.issued(id, owner);
        }
        if let (true, Some(id)) = (req.delete && status.is_success(), &req.session) {
            self.sessions.ended(id);
        }
    }

    /// The CORS headers of every answer on the MCP path, refusals included.
    pub fn cors(&self, h: &mut HeaderMap, req: &McpRequest) {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
        if let Some(origin) = &req.allowed_origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }

    /// A refusal on the MCP path in the MCP profile: an authentication refusal is a 401 with
    /// the Bearer challenge first (and Basic after it with htpasswd), never a 403 without a
    /// challenge; insufficient scope names `resource_metadata` too.
    pub fn profile(&self, reject: &Reject, resp: &mut Response<Full<Bytes>>) {
        let challenge = match reject {
            Reject::MissingCredentials
            | Reject::InvalidScheme
            | Reject::BasicRequired(_)
            | Reject::BadPassword(_) => &self.challenge,
            Reject::MalformedCredentials | Reject::InvalidToken(_) | Reject::InvalidJwt(_) => {
                &self.invalid_token
            }
            Reject::InsufficientScope(scopes) => {
                let v = format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{}\"{}, error_description=\"The token lacks a scope this needs.\"",
                    quoted(scopes),
                    self.metadata_param
                );
                if let Ok(v) = HeaderValue::from_str(&v) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return;
            }
            _ => return,
        };
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        let h = resp.headers_mut();
        h.insert(header::WWW_AUTHENTICATE, challenge.clone());
        if let Some(basic) = &self.basic {
            h.append(header::WWW_AUTHENTICATE, basic.clone());
        }
    }
}

/// A 204 to a CORS preflight: `methods`, the requested headers (when they are header names),
/// cached for ten minutes.
fn preflight_answer(methods: &'static str, h: &HeaderMap) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let rh = resp.headers_mut();
    rh.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    if let Some(v) = h
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| header_list(v))
    {
        rh.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    rh.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}

/// Whether `Access-Control-Request-Headers` is a list of header names (echoed back as is).
fn header_list(v: &HeaderValue) -> bool {
    v.to_str().is_ok_and(|s| {
        s.split(',')
            .all(|n| HeaderName::from_bytes(n.trim().as_bytes()).is_ok())
    })
}

fn json(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": code, "message": message });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcp(oauth: bool, basic: bool) -> Mcp {
        let config = McpConfig {
            path: "/mcp".into(),
            resource: Some("https://mcp.example.com/mcp".parse().unwrap()),
            resource_name: Some("Marcus MCP".into()),
            authorization_servers: vec!["https://idp.example.com/realms/acme".into()],
            scopes_supported: vec!["mcp:tools".into()],
            allowed_origins: vec!["https://claude.ai".into()],
            policy: None,
        };
        Mcp::new(
            &config,
            oauth,
            basic,
            "portcullis",
            &crate::ratelimit::RateLimits::Off,
        )
    }

    #[test]
    fn origins_compare_by_scheme_host_and_port_only() {
        assert_eq!(
            normalize_origin("HTTPS://Claude.AI:443").as_deref(),
            Some("https://claude.ai")
        );
        assert_eq!(
            normalize_origin("http://localhost:6274").as_deref(),
            Some("http://localhost:6274")
        );
        assert_eq!(normalize_origin("null"), None);
        assert_eq!(normalize_origin("https://a.example/path"), None);
        let m = mcp(true, false);
        let h = |o: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            h
        };
        assert!(m.check_origin(&h("https://claude.ai")).is_ok());
        assert!(
            m.check_origin(&h("https://mcp.example.com")).is_ok(),
            "the resource's own"
        );
        assert_eq!(
            m.check_origin(&h("https://evil.example")).unwrap_err(),
            Reject::ForbiddenOrigin
        );
        assert_eq!(
            m.check_origin(&h("null")).unwrap_err(),
            Reject::ForbiddenOrigin
        );
        assert!(m
            .check_origin(&HeaderMap::new())
            .unwrap()
            .allowed_origin
            .is_none());
    }

    #[test]
    fn the_401_challenge_is_bearer_with_absolute_metadata_then_basic() {
        let m = mcp(true, true);
        let mut resp: Response<Full<Bytes>> = Reject::MissingCredentials.response();
        m.profile(&Reject::MissingCredentials, &mut resp);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let all: Vec<_> = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .collect();
        assert_eq!(
            all[0],
            "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\", scope=\"mcp:tools\""
        );
        assert!(all[1].to_str().unwrap().starts_with("Basic realm="));
        let mut resp: Response<Full<Bytes>> = Reject::InsufficientScope("a b".into()).response();
        m.profile(&Reject::InsufficientScope("a b".into()), &mut resp);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let v = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            v.starts_with(
                "Bearer error=\"insufficient_scope\", scope=\"a b\", resource_metadata=\"https://"
            ),
            "{v}"
        );
    }

    #[test]
    fn keys_only_advertises_no_metadata() {
        let m = mcp(false, false);
        let mut resp: Response<Full<Bytes>> = Reject::MissingCredentials.response();
        m.profile(&Reject::MissingCredentials, &mut resp);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let v = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert_eq!(v, "Bearer realm=\"portcullis\"");
        let req = Request::get("/.well-known/oauth-protected-resource/mcp")
            .body(())
            .unwrap();
        let (resp, _) = m.local(&req, req.uri().path()).unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    }
}
