//! The per-request pipeline (DESIGN.md, "request pipeline"), as named stages in order:
//!
//! [`Proxy::admit`] (method, framing, path, network, body size) → what portcullis answers itself
//! on the MCP endpoint's behalf (`Mcp::local`), and its Origin rule → [`Auth::authenticate`] (bans,
//! then the credential) → [`Proxy::authorize`] (the key's `allow` rules) →
//! [`Proxy::rate_limit`] → [`Proxy::judge_mcp`] (on the MCP path under tool rules: the
//! JSON-RPC body read and judged) → [`Proxy::rewrite`] (headers for the backend, in
//! `rewrite.rs`) → [`Upstream::send`] (streaming) → [`Proxy::accept_upgrade`] → response
//! headers (and MCP lists filtered), in [`Proxy::handle`].
//!
//! Every refusal is a [`Reject`]; the access log line is written when the response body is
//! finished (or the client goes away). Each stage fails closed: whatever it cannot decide is
//! refused.

mod affinity;
mod decide;
mod exchange;
mod rewrite;
pub mod tunnel;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::access_log::AccessLogger;
use crate::auth::{Auth, CredId, Identity, Verified};
use crate::config::Config;
use crate::conn::ConnInfo;
use crate::error::Reject;
use crate::headers::{self, RequestIds, X_REQUEST_ID};
use crate::mcp::Mcp;
use crate::metrics::Metrics;
use crate::ratelimit::{RateLimits, Subject};
use crate::streams::{StreamGuard, StreamKind, Streams};
use crate::upstream::{ClientBody, Route, Upstream};
use affinity::{seal_session, ANONYMOUS_OWNER};
pub use decide::CREDENTIAL_FP;
pub use exchange::{Exchange, LoggedBody};
use tunnel::{Limits, Upgrade, Watch};

/// What the proxy sends back: the backend's body, or one of its own.
pub type ResponseBody = LoggedBody;

pub struct Proxy {
    pub config: Arc<Config>,
    /// Who the client is: credentials, bans, the Basic verification cache.
    pub auth: Arc<Auth>,
    upstream: Arc<Upstream>,
    pub(crate) access: AccessLogger,
    ids: RequestIds,
    /// What a request loses on its way to the backend: what a client could spoof, and its
    /// credentials unless `pass_credentials`.
    request_strip: headers::NameSet,
    /// What a request's trailers lose: the same, and every credential header always (a
    /// trailer is never the credential that was verified).
    trailer_strip: Arc<headers::NameSet>,
    proto: &'static str,
    /// The public listener terminates TLS.
    tls: bool,
    /// Live WebSocket tunnels and streaming responses, by credential.
    pub streams: Arc<Streams>,
    /// Per-client rate limits.
    pub rate: Arc<RateLimits>,
    /// The event metrics (the registry adds state read at scrape time).
    pub metrics: Arc<Metrics>,
    limits: Limits,
    /// The MCP endpoint (`[mcp]`): metadata, the MCP error profile, CORS, the Origin rule.
    mcp: Option<Mcp>,
}

/// What the pipeline ends with: the backend's answer, or one portcullis gives itself (with its
/// access-log outcome).
enum Answer {
    Backend(Response<Incoming>),
    Own(Response<Full<Bytes>>, &'static str),
}

/// A request past [`Proxy::admit`]: its normalised path, and its WebSocket handshake if any.
struct Admitted {
    path: String,
    upgrade: Option<(Upgrade, OnUpgrade)>,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        access: AccessLogger,
        auth: Arc<Auth>,
        streams: Arc<Streams>,
        rate: Arc<RateLimits>,
    ) -> Proxy {
        let mut request_strip = headers::spoofable(&config.auth.identity_header);
        if !config.upstream.pass_credentials {
            request_strip.extend(config.auth.api_key_headers.iter().cloned());
            request_strip.push(header::AUTHORIZATION);
        }
        let mcp = config.mcp.as_ref().map(|m| {
            let (oauth, basic) = (
                config.auth.jwt.is_some(),
                config.auth.htpasswd_file.is_some(),
            );
            Mcp::new(m, oauth, basic, &config.auth.realm, &rate)
        });
        let mut trailer_strip = headers::spoofable(&config.auth.identity_header);
        trailer_strip.extend(config.auth.api_key_headers.iter().cloned());
        trailer_strip.push(header::AUTHORIZATION);
        Proxy {
            trailer_strip: Arc::new(trailer_strip.into_iter().collect()),
            request_strip: request_strip.into_iter().collect(),
            upstream: Arc::new(Upstream::new(&config.upstream)),
            auth,
            access,
            ids: RequestIds::new(),
            proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            tls: config.tls.is_some(),
            streams,
            rate,
            metrics: Arc::default(),
            limits: Limits {
                idle: config.server.stream_idle_timeout,
                lifetime: config.server.max_stream_lifetime,
                token_expires: None,
            },
            mcp,
            config,
        }
    }

    /// Serve one request. Never fails: refusals are responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let mut ex = Exchange::start(&self, &req, &conn);
        let result = match self.forward(req, &conn, &mut ex).await {
            Ok(Answer::Own(resp, outcome)) => {
                ex.record.outcome = outcome;
                return Ok(self.finish_local(resp, ex));
            }
            Ok(Answer::Backend(resp)) => Ok(resp),
            Err(reject) => Err(reject),
        };
        let (mut guard, mut revoked) = (None, false);
        let mut resp = match result.and_then(|resp| {
            let kind = match ex.tunnel {
                Some(_) => Some(StreamKind::WebSocket),
                None => stream_kind(&resp),
            };
            if let Some(kind) = kind {
                let registered = self.register_stream(&mut ex, kind);
                revoked = registered.is_err();
                guard = Some(registered?);
            }
            Ok(resp)
        }) {
            Ok(mut resp) => {
                ex.record.outcome = "ok";
                // Under MCP tool rules, lists in the answer are cut to the caller's.
                let filter = ex
                    .mcp_list
                    .take()
                    .filter(|f| f.prepare(resp.status(), resp.headers_mut()));
                match filter {
                    Some(f) => {
                        let sse = is_event_stream(resp.headers());
                        resp.map(|b| Either::Left(Either::Right(f.wrap(b, sse))))
                    }
                    None => resp.map(|b| Either::Left(Either::Left(b))),
                }
            }
            Err(reject) => {
                // A stream refused as it starts drops the backend's answer (and upgrade).
                ex.tunnel = None;
                let resp = self.refusal(&reject, &mut ex).map(Either::Right);
                if revoked {
                    ex.record.outcome = "revoked";
                }
                resp
            }
        };
        // Room for what is added below at once, rather than growing the map as it fills: the
        // request id, two RateLimit fields, the security headers and HSTS.
        resp.headers_mut()
            .reserve(4 + self.config.headers.add.len());
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), ex.record.request_id.value().clone());
        if let (Some(mcp), Some(req), "ok") = (&self.mcp, &ex.mcp, ex.record.outcome) {
            mcp.answered(req, resp.status(), resp.headers());
        }
        self.judgment_headers(resp.headers_mut(), &ex);
        headers::secure_response(resp.headers_mut(), &self.config.headers, self.tls);
        ex.record.status = resp.status().as_u16();
        if let Some((client, upstream)) = ex.tunnel.take() {
            // A tunnel is always registered (register_stream above) before it gets here.
            let Some(guard) = guard.take() else {
                return Ok(resp.map(|inner| LoggedBody {
                    inner,
                    ex: Some(ex),
                    watch: None,
                    idle_limit: self.limits.idle,
                }));
            };
            let limits = self.stream_limits(&ex);
            self.spawn_tunnel(client, upstream, guard, ex, conn, limits);
            return Ok(resp.map(|inner| LoggedBody {
                inner,
                ex: None,
                watch: None,
                idle_limit: self.limits.idle,
            }));
        }
        let limits = self.stream_limits(&ex);
        Ok(resp.map(|inner| LoggedBody {
            inner,
            ex: Some(ex),
            watch: guard.map(|g| Watch::new(g, limits)),
            idle_limit: self.limits.idle,
        }))
    }

    /// What an answer says of the judgment behind it, proxied or forward auth's: the MCP
    /// path's CORS headers, and the `RateLimit` headers of a checked request.
    fn judgment_headers(&self, h: &mut http::HeaderMap, ex: &Exchange) {
        if let (Some(mcp), Some(req)) = (&self.mcp, &ex.mcp) {
            mcp.cors(h, req);
        }
        if let Some(decision) = &ex.rate {
            for (name, value) in decision.headers() {
                h.insert(name.clone(), value);
            }
        }
    }

    /// The backend instances and the client that reaches them.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Drop full rate-limit buckets (the clients' and the MCP tools').
    pub fn housekeep(&self) {
        self.rate.housekeep();
        if let Some(policy) = self.mcp.as_ref().and_then(|m| m.policy.as_ref()) {
            policy.housekeep();
        }
    }

    /// The limits a stream lives under: the configured ones, and for a token the moment it
    /// expires (the stream ends then, outcome `token_expired`).
    fn stream_limits(&self, ex: &Exchange) -> Limits {
        let mut limits = self.limits;
        if let Some(Identity::Token(t)) = &ex.record.identity {
            let left = t
                .expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            limits.token_expires = Some(std::time::Instant::now() + left);
        }
        limits
    }

    /// A response of the proxy's own, finished like any other (request id, security headers,
    /// the access-log line when its body ends).
    fn finish_local(
        &self,
        mut resp: Response<Full<Bytes>>,
        ex: Exchange,
    ) -> Response<ResponseBody> {
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), ex.record.request_id.value().clone());
        headers::secure_response(resp.headers_mut(), &self.config.headers, self.tls);
        if ex.unread_body && ex.record.protocol.starts_with("HTTP/1") {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let mut ex = ex;
        ex.record.status = resp.status().as_u16();
        resp.map(|inner| LoggedBody {
            inner: Either::Right(inner),
            ex: Some(ex),
            watch: None,
            idle_limit: self.limits.idle,
        })
    }

    /// A refusal as the client gets it: JSON (or gRPC's trailers-only form), counted, and with
    /// `Connection: close` when an HTTP/1 request body was left unread.
    fn refusal(&self, reject: &Reject, ex: &mut Exchange) -> Response<Full<Bytes>> {
        ex.record.outcome = reject.outcome();
        if let Some(reason) = reject.auth_reason() {
            tracing::debug!(client = %ex.record.client, reason, request_id = %ex.record.request_id, "authentication failed");
        }
        self.metrics.refused(reject);
        let mut resp: Response<Full<Bytes>> = if ex.grpc {
            reject.grpc_response()
        } else {
            reject.response()
        };
        if let (Some(mcp), Some(_), false) = (&self.mcp, &ex.mcp, ex.grpc) {
            mcp.profile(reject, &mut resp);
        }
        if ex.unread_body && ex.record.protocol.starts_with("HTTP/1") {
            // Do not try to read what is left of a refused body: close instead.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Register a stream under its credential, then check that credential against the
    /// credentials in force now: in this order, a revocation is never missed. One that came
    /// while the backend was answering is seen here, and the stream is refused before it
    /// starts (the client gets the refusal its credential now earns, 401); one that comes
    /// later finds the stream registered and closes it.
    fn register_stream(&self, ex: &mut Exchange, kind: StreamKind) -> Result<StreamGuard, Reject> {
        let cred = ex.cred.clone().unwrap_or(CredId::Anonymous);
        let guard = self.streams.register(cred, kind);
        if let Some(verified) = ex.verified.take() {
            if let Err(reject) = self.auth.still_valid(&verified, SystemTime::now()) {
                tracing::info!(
                    event = "credential_revoked",
                    request_id = %ex.record.request_id,
                    reason = reject.auth_reason(),
                    "credential no longer valid as its stream starts: stream refused"
                );
                guard.revoke();
                return Err(reject);
            }
        }
        Ok(guard)
    }

    /// Copy bytes both ways once both sides have upgraded, registered under the credential;
    /// the access log line is written when the tunnel ends, with what it moved. The tunnel
    /// holds the connection's slot (`conn`) until then.
    fn spawn_tunnel(
        &self,
        client: OnUpgrade,
        upstream: OnUpgrade,
        guard: StreamGuard,
        mut ex: Exchange,
        conn: Arc<ConnInfo>,
        limits: Limits,
    ) {
        let force = self.streams.force.clone();
        self.streams.tracker.spawn(async move {
            let (end, moved) = tunnel::run(client, upstream, guard, limits, force).await;
            ex.record.bytes = moved.down;
            ex.record.outcome = end.outcome();
            drop(ex);
            drop(conn);
        });
    }

    /// The stages, in order; the first refusal ends the request.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        ex: &mut Exchange,
    ) -> Result<Answer, Reject> {
        let admitted = self.admit(&mut req, ex)?;
        // What portcullis answers itself on the MCP endpoint's behalf, once admitted and
        // before any authentication: Protected Resource Metadata, the CORS preflight.
        if let Some(own) = self
            .mcp
            .as_ref()
            .and_then(|m| m.local(&req, &admitted.path))
        {
            return Ok(Answer::Own(own.0, own.1));
        }
        // A WebSocket over HTTP/2 (CONNECT) is judged as the GET it becomes toward the backend,
        // so one rule covers it over both HTTP versions.
        let method = match &admitted.upgrade {
            Some((Upgrade::ExtendedConnect, _)) => Method::GET,
            _ => req.method().clone(),
        };
        let verified = self
            .judge(&method, &admitted.path, req.headers(), conn, ex)
            .await?;
        if ex.mcp.is_some() {
            req.headers_mut().remove(header::ORIGIN);
        }
        let (mut parts, body) = req.into_parts();
        let identity = &verified.identity;
        let judged = self
            .judge_mcp(&mut parts, body, admitted.upgrade.is_some(), identity, ex)
            .await?;
        let how = admitted.upgrade.as_ref().map(|(how, _)| *how);
        self.rewrite(&mut parts, &verified, how, conn, ex)?;
        // Whom an MCP session is sealed to, with affinity on.
        let owner = self
            .upstream
            .config
            .session_affinity
            .as_ref()
            .map(|_| verified.identity.owner());
        let owner = owner
            .as_ref()
            .map(|o| o.as_deref().unwrap_or(ANONYMOUS_OWNER));
        let route = match owner {
            Some(owner) => self.session_route(&mut parts.headers, owner, ex)?,
            None => Route::Balanced,
        };
        ex.verified = Some(verified);
        let body = match judged {
            Ok(bytes) => ClientBody::whole(bytes),
            Err(body) => ClientBody::new(
                body,
                self.config.server.max_body_bytes,
                self.trailer_strip.clone(),
            ),
        };
        ex.unread_body = false;
        let sent = self
            .upstream
            .send(
                parts,
                &admitted.path,
                body,
                route,
                // From the connection's second request on: a client that sends one request
                // and idles (or closes) never holds a backend connection of its own.
                conn.own.as_ref().filter(|_| {
                    admitted.upgrade.is_none() && conn.requests.load(Ordering::Relaxed) > 1
                }),
                &self.metrics,
                &ex.record.request_id,
            )
            .await?;
        let mut resp = sent.response;
        if let (Some(sealer), Some(owner)) = (&self.upstream.config.session_affinity, owner) {
            seal_session(sealer, sent.attempt.index(), owner, &mut resp, ex)?;
        }
        if self.upstream.instances.len() > 1 {
            let i = sent.attempt.index();
            ex.record.upstream = Some(self.upstream.instances.target(i).label.clone());
        }
        ex.attempt = Some(sent.attempt);
        self.accept_upgrade(resp, admitted.upgrade, ex)
            .map(Answer::Backend)
    }

    /// Whether this client may make `method path` (normalised), and who it is: on the MCP path
    /// the Origin rule first, then authentication (bans, then the credential), the key's allow
    /// rules, the MCP session binding, the rate limit. The decision the proxy forwards on, and
    /// forward auth's answer. Fails closed: the first refusal ends it.
    pub(crate) async fn judge(
        &self,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
        conn: &ConnInfo,
        ex: &mut Exchange,
    ) -> Result<Verified, Reject> {
        if let Some(mcp) = self.mcp.as_ref().filter(|m| m.is_endpoint(path)) {
            // The Origin rule comes first: a foreign page never learns more than 403. Its
            // refusal is on the MCP path too (profile and CORS headers), hence the default.
            let checked = mcp.check_origin(headers);
            let mut on_path = checked.clone().unwrap_or_default();
            on_path.delete = method == Method::DELETE;
            ex.mcp = Some(on_path);
            checked?;
        }
        let public = self
            .config
            .auth
            .public_paths
            .iter()
            .any(|p| p.matches(path));
        let verified = if public {
            Verified::public()
        } else {
            // Never a ban keyed on a trusted proxy's own address: it stands for everyone behind it.
            let ban_subject = (!ex.client_trusted).then_some(ex.client);
            self.auth
                .authenticate(headers, conn.client_cert.as_ref(), ex.client, ban_subject)
                .await?
        };
        let identity = &verified.identity;
        ex.record.identity = Some(identity.clone());
        ex.cred = Some(identity.id());
        Proxy::authorize(identity, method, path)?;
        if let (Some(mcp), Some(m)) = (&self.mcp, &mut ex.mcp) {
            mcp.check_session(headers, m, identity.owner())?;
        }
        self.rate_limit(identity, ex).await?;
        Ok(verified)
    }

    /// Under MCP tool rules (`[mcp] tool_policy`), on the MCP path: a POST's body is read
    /// (up to `max_inspect_bytes`) and judged, and `Ok(bytes)` is what will be forwarded; the
    /// answer to a GET (a server stream, maybe a resumed one) has its lists filtered. Any
    /// other request keeps its body streaming: `Err(body)`.
    async fn judge_mcp(
        &self,
        parts: &mut Parts,
        body: Incoming,
        upgrade: bool,
        identity: &Identity,
        ex: &mut Exchange,
    ) -> Result<Result<Bytes, Incoming>, Reject> {
        let Some(policy) = self
            .mcp
            .as_ref()
            .filter(|_| ex.mcp.is_some())
            .and_then(|m| m.policy.as_ref())
        else {
            return Ok(Err(body));
        };
        use crate::mcp::inspect;
        if upgrade {
            // A WebSocket's frames are never judged: refused rather than let through unjudged.
            return Err(Reject::Forbidden);
        }
        if parts.method != Method::GET && parts.method != Method::POST {
            return Ok(Err(body));
        }
        // Answers are read to be filtered: asked for as they can be read, not compressed (a
        // compressed list answer would not parse, and be cut).
        parts.headers.remove(header::ACCEPT_ENCODING);
        if parts.method == Method::GET {
            ex.mcp_list = Some(inspect::list_filter(policy, identity, &self.metrics));
            return Ok(Err(body));
        }
        let limit = (policy.config.max_inspect_bytes as u64).min(self.config.server.max_body_bytes);
        let bytes =
            inspect::read_body(body, limit as usize, self.config.upstream.response_timeout).await?;
        ex.unread_body = false;
        let judged = inspect::judge(
            policy,
            identity,
            &parts.headers,
            bytes,
            &self.metrics,
            &mut ex.mcp_call,
        )
        .await?;
        ex.mcp_list = judged.list;
        ex.mcp_in_flight = judged.in_flight;
        Ok(Ok(judged.body))
    }

    /// What is refused before anyone is asked who the client is: CONNECT other than
    /// WebSocket's, a head over `max_header_bytes`, an HTTP/1.1 request without exactly one
    /// Host, framing that intermediaries disagree about, a path that is ambiguous once decoded,
    /// a network outside `allow_cidrs`, a declared body over `max_body_bytes`.
    fn admit(&self, req: &mut Request<Incoming>, ex: &mut Exchange) -> Result<Admitted, Reject> {
        let how = tunnel::websocket_upgrade(req);
        if how.is_none() && req.method() == Method::CONNECT {
            // Only WebSocket's extended CONNECT (RFC 8441); a proxy tunnel is never opened.
            return Err(Reject::BadRequest);
        }
        // Taken before the request is split (hyper keeps the upgrade in its extensions).
        let upgrade = how.map(|how| (how, hyper::upgrade::on(&mut *req)));
        if head_size(req) > self.config.server.max_header_bytes {
            return Err(Reject::HeadersTooLarge);
        }
        let h = req.headers();
        // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; none or two is a 400 (which
        // Host would a backend or a cache believe?). HTTP/1.0 may omit it.
        let hosts = h.get_all(header::HOST).iter().count();
        if hosts > 1 || (hosts == 0 && req.version() == Version::HTTP_11) {
            return Err(Reject::BadRequest);
        }
        // Framing intermediaries disagree about (RFC 9112 §6.3; hyper drops the
        // Content-Length before it is seen here, so `framing` watched the bytes).
        if ex.framing_conflict
            || (h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH))
        {
            return Err(Reject::BadRequest);
        }
        let path = crate::path::normalize(req.uri().path()).map_err(|_| Reject::BadRequest)?;
        ex.record.path.clone_from(&path);
        if !self.config.server.net.allows(ex.client) {
            return Err(Reject::ForbiddenNetwork);
        }
        let declared_len = match h.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Reject::BadRequest)?,
            ),
        };
        if declared_len.is_some_and(|n| n > self.config.server.max_body_bytes) {
            return Err(Reject::PayloadTooLarge);
        }
        Ok(Admitted { path, upgrade })
    }

    /// A key's `allow` rules must cover the method and the normalised path; other identities
    /// have no rules. Fails closed: a key with rules that match nothing is refused.
    fn authorize(identity: &Identity, method: &Method, path: &str) -> Result<(), Reject> {
        if let Identity::Key(key) = identity {
            key.stats.used(SystemTime::now());
            if !crate::authz::is_allowed(key.allow.as_deref(), method, path) {
                return Err(Reject::Forbidden);
            }
        }
        Ok(())
    }

    /// The client's budget: by identity when authenticated, else by address; a key's own
    /// quota overrides `[rate_limit]`. The verdict is kept for the `RateLimit` headers.
    async fn rate_limit(&self, identity: &Identity, ex: &mut Exchange) -> Result<(), Reject> {
        let (per_second, burst) = match identity {
            Identity::Key(k) => (k.requests_per_second, k.burst),
            Identity::User(_)
            | Identity::ClientCert(_)
            | Identity::Token(_)
            | Identity::Anonymous => (None, None),
        };
        let subject = Subject::of(ex.cred.as_ref(), ex.client);
        if ex.client_trusted && matches!(subject, Subject::Address(_)) {
            // Never a limit keyed on a trusted proxy's own address (see NetPolicy::client_ip).
            return Ok(());
        }
        if let Some(decision) = self.rate.check(&subject, per_second, burst).await {
            ex.rate = Some(decision);
            if !decision.allowed {
                return Err(Reject::RateLimited {
                    retry_after: decision.retry_after,
                });
            }
        }
        Ok(())
    }

    /// The backend's answer: hop-by-hop headers removed; a 101 to an upgrade the client asked
    /// for becomes the client's tunnel (a 200 for HTTP/2's extended CONNECT); a 101 nobody
    /// asked for is the backend's protocol error.
    fn accept_upgrade(
        &self,
        mut resp: Response<Incoming>,
        upgrade: Option<(Upgrade, OnUpgrade)>,
        ex: &mut Exchange,
    ) -> Result<Response<Incoming>, Reject> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(resp.headers_mut());
        match upgrade {
            Some((how, client)) if switching => {
                let upstream = hyper::upgrade::on(&mut resp);
                tunnel::to_client_handshake(how, &mut resp);
                ex.tunnel = Some((client, upstream));
            }
            _ if switching => {
                self.metrics.upstream_error("protocol");
                tracing::warn!(request_id = %ex.record.request_id, "upstream switched protocols without being asked to");
                return Err(Reject::UpstreamUnavailable);
            }
            _ => {}
        }
        Ok(resp)
    }
}

/// The size of the request line and headers as HTTP/1.1 writes them (for HTTP/2, the same
/// measure of its header list): what `max_header_bytes` bounds.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

/// Whether an answer is a `text/event-stream`.
fn is_event_stream(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        })
}

/// Whether a response is a stream to register: SSE, or any body of unknown length.
fn stream_kind(resp: &Response<Incoming>) -> Option<StreamKind> {
    let sse = is_event_stream(resp.headers());
    let body = resp.body();
    if sse {
        Some(StreamKind::Sse)
    } else if !body.is_end_stream() && body.size_hint().exact().is_none() {
        Some(StreamKind::Stream)
    } else {
        None
    }
}
