//! The per-request pipeline (DESIGN.md, "request pipeline") and the pooled upstream client.
//!
//! One straight async function: request id → path → body size → authenticate → authorize →
//! rewrite → forward (streaming) → response headers. Every refusal is a [`Reject`]; the access
//! log line is written when the response body is finished (or the client goes away).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use crate::access_log::{AccessLogger, Record, Text};
use crate::auth::basic::{BasicVerifier, Verdict};
use crate::auth::{Authenticator, Credential, Identity};
use crate::ban::{Bans, Recorded};
use crate::config::{Config, HostHeader, UpstreamProtocol};
use crate::error::Reject;
use crate::headers::{self, RequestIds, X_REQUEST_ID};
use crate::ratelimit::Subject;
use crate::state::Snapshot;
use crate::streams::{CredId, StreamKind, Streams};
use crate::tunnel::{self, Limits, Watch};

type UpstreamBody = ClientBody;

/// The client's request body on its way to the backend: limited to `max_body_bytes`, and with
/// the client's own failures (bad chunking, a reset) told apart from the backend's.
pub struct ClientBody(Limited<Incoming>);

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
        Pin::new(&mut self.0).poll_frame(cx).map_err(|e| {
            if e.is::<LengthLimitError>() {
                e
            } else {
                Box::new(ClientBodyError(e)) as Self::Error
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// What the proxy sends back: the backend's body, or one of its own.
pub type ResponseBody = LoggedBody;

/// Per-connection facts the pipeline needs, and the activity the idle timer watches.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` / `X-Real-IP` carry it, made once.
    peer_value: HeaderValue,
    pub activity: Arc<Activity>,
    /// The identity of the verified client certificate (mTLS), if any.
    pub client_cert: Option<Arc<str>>,
    /// The connection's place under `max_connections` and `max_connections_per_ip`, held by
    /// whatever holds this (a WebSocket tunnel outlives the HTTP connection it came from).
    pub slot: ConnSlot,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        activity: Arc<Activity>,
        client_cert: Option<Arc<str>>,
        slot: ConnSlot,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            peer_value: headers::ip_value(crate::netpolicy::canonical(peer.ip())),
            activity,
            client_cert,
            slot,
        }
    }
}

/// A connection's places under the connection limits, released on drop.
pub struct ConnSlot {
    pub _all: OwnedSemaphorePermit,
    pub _per_ip: Option<crate::netpolicy::IpSlot>,
}

/// When a connection last moved bytes, and how many of its requests are unfinished.
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    pub in_flight: AtomicUsize,
    read: AtomicU64,
    written: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// Bytes read from the socket so far.
    pub fn read_bytes(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the socket so far.
    pub fn written_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The instant of the last activity.
    pub fn last(&self) -> Instant {
        self.base + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// A socket that records when it last moved bytes (for idle timeouts) and how many.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> ActivityIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> ActivityIo<T> {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 && matches!(r, Poll::Ready(Ok(()))) {
            self.activity.touch();
            self.activity.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.touch();
                self.activity.written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.touch();
                self.activity.written.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct Proxy {
    pub config: Arc<Config>,
    pub snapshot: ArcSwap<Snapshot>,
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    pub(crate) access: AccessLogger,
    ids: RequestIds,
    upstream_host: HeaderValue,
    /// What a request loses on its way to the backend: what a client could spoof, and its
    /// credentials unless `pass_credentials`.
    request_strip: Vec<HeaderName>,
    proto: &'static str,
    /// The public listener terminates TLS.
    tls: bool,
    pub bans: Bans,
    pub basic: BasicVerifier,
    realm: Arc<str>,
    /// Live WebSocket tunnels and streaming responses, by credential.
    pub streams: Arc<Streams>,
    /// Per-client rate limits.
    pub rate: crate::ratelimit::RateLimits,
    /// Bans every replica shares, when Redis is configured.
    shared_bans: Option<crate::ratelimit::SharedBans>,
    /// The event metrics (the registry adds state read at scrape time).
    pub metrics: Arc<crate::metrics::Metrics>,
    limits: Limits,
    /// What the last reloads of the keys and htpasswd files did.
    pub reloads: crate::state::Reloads,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        access: AccessLogger,
        streams: Arc<Streams>,
        rate: crate::ratelimit::RateLimits,
        shared_bans: Option<crate::ratelimit::SharedBans>,
    ) -> Proxy {
        let up = &config.upstream;
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
            // As on the public listener: one flat write per request (see server.rs).
            .http1_writev(false)
            .http2_only(up.protocol == UpstreamProtocol::Http2);
        let client = builder.build(connector);
        let snapshot = ArcSwap::from_pointee(Snapshot::from_config(&config));
        let mut request_strip = headers::spoofable(&config.auth.identity_header).to_vec();
        if !up.pass_credentials {
            request_strip.extend(config.auth.api_key_headers.iter().cloned());
            request_strip.push(header::AUTHORIZATION);
        }
        Proxy {
            request_strip,
            upstream_host: HeaderValue::from_str(up.authority.as_str())
                .expect("an authority is a header value"),
            snapshot,
            client,
            access,
            ids: RequestIds::new(),
            proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            tls: config.tls.is_some(),
            bans: Bans::new(config.ban),
            basic: BasicVerifier::new(
                config.auth.htpasswd_cache_ttl,
                config.auth.htpasswd_cache_entries,
            ),
            realm: config.auth.realm.as_str().into(),
            streams,
            rate,
            shared_bans,
            metrics: Arc::default(),
            reloads: crate::state::Reloads::new(&config),
            limits: Limits {
                idle: config.server.stream_idle_timeout,
                lifetime: config.server.max_stream_lifetime,
            },
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
        let result = self.forward(req, &conn, &mut ex).await;
        let mut watch = None;
        let mut resp = match result {
            Ok(resp) => {
                ex.record.outcome = "ok";
                if ex.tunnel.is_none() {
                    if let Some(kind) = stream_kind(&resp) {
                        let cred = ex.cred.clone().unwrap_or(CredId::Anonymous);
                        watch = Some(Watch::new(self.streams.register(cred, kind), self.limits));
                    }
                }
                resp.map(Either::Left)
            }
            Err(reject) => {
                ex.record.outcome = reject.outcome();
                if let Some(reason) = reject.auth_reason() {
                    tracing::debug!(client = %ex.record.client, reason, request_id = %ex.record.request_id, "authentication failed");
                    self.metrics
                        .auth_failures
                        .get_or_create(&crate::metrics::ReasonLabels { reason })
                        .inc();
                }
                match reject {
                    Reject::RateLimited { .. } => {
                        self.metrics.rate_limited.inc();
                    }
                    Reject::Banned { .. } => {
                        self.metrics.banned.inc();
                    }
                    _ => {}
                }
                let mut resp: Response<Full<Bytes>> = if ex.grpc {
                    reject.grpc_response()
                } else {
                    reject.response()
                };
                if ex.unread_body && ex.record.protocol.starts_with("HTTP/1") {
                    // Do not try to read what is left of a refused body: close instead.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp.map(Either::Right)
            }
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), ex.record.request_id.value().clone());
        if let Some(decision) = &ex.rate {
            for (name, value) in decision.headers() {
                resp.headers_mut().insert(name.clone(), value);
            }
        }
        headers::secure_response(resp.headers_mut(), &self.config.headers, self.tls);
        ex.record.status = resp.status().as_u16();
        if let Some((client, upstream)) = ex.tunnel.take() {
            // The access log line is written when the tunnel ends, with what it moved.
            let cred = ex.cred.clone().unwrap_or(CredId::Anonymous);
            let guard = self.streams.register(cred, StreamKind::WebSocket);
            let (limits, force) = (self.limits, self.streams.force.clone());
            self.streams.tracker.spawn(async move {
                let (end, moved) = tunnel::run(client, upstream, guard, limits, force).await;
                ex.record.bytes = moved.down;
                ex.record.outcome = end.outcome();
                drop(ex);
                drop(conn);
            });
            return Ok(resp.map(|inner| LoggedBody {
                inner,
                ex: None,
                watch: None,
                idle_limit: self.limits.idle,
            }));
        }
        Ok(resp.map(|inner| LoggedBody {
            inner,
            ex: Some(ex),
            watch,
            idle_limit: self.limits.idle,
        }))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        ex: &mut Exchange,
    ) -> Result<Response<Incoming>, Reject> {
        let upgrade = websocket_upgrade(&req);
        if upgrade.is_none() && req.method() == Method::CONNECT {
            // Only WebSocket's extended CONNECT (RFC 8441); a proxy tunnel is never opened.
            return Err(Reject::BadRequest);
        }
        let client_upgrade = upgrade.map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let cfg = &self.config;

        // Request framing that intermediaries disagree about is refused outright.
        if parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            return Err(Reject::BadRequest);
        }
        let path = crate::path::normalize(parts.uri.path()).map_err(|_| Reject::BadRequest)?;
        ex.record.path.clone_from(&path);
        if !cfg.server.net.allows(ex.client) {
            return Err(Reject::ForbiddenNetwork);
        }

        let declared_len = match parts.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(Reject::BadRequest)?,
            ),
        };
        if declared_len.is_some_and(|n| n > cfg.server.max_body_bytes) {
            return Err(Reject::PayloadTooLarge);
        }

        let public = cfg.auth.public_paths.iter().any(|p| p.matches(&path));
        let identity = if public {
            Identity::Anonymous
        } else {
            self.authenticate(&parts.headers, conn, ex.client).await?
        };
        ex.record.identity = Some(identity.clone());
        ex.cred = Some(CredId::of(&identity));
        if let Identity::Key(key) = &identity {
            key.stats.used(SystemTime::now());
            if !crate::authz::is_allowed(key.allow.as_deref(), &parts.method, &path) {
                return Err(Reject::Forbidden);
            }
        }
        let (per_second, burst) = match &identity {
            Identity::Key(k) => (k.requests_per_second, k.burst),
            _ => (None, None),
        };
        let subject = Subject::of(ex.cred.as_ref(), ex.client);
        if let Some(decision) = self.rate.check(&subject, per_second, burst).await {
            ex.rate = Some(decision);
            if !decision.allowed {
                return Err(Reject::RateLimited {
                    retry_after: decision.retry_after,
                });
            }
        }

        // Rewrite for the backend.
        let client_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let h = &mut parts.headers;
        // gRPC over h2c needs `TE: trailers`, the one TE value that may cross an HTTP/2 hop.
        let keep_te_trailers =
            cfg.upstream.protocol == UpstreamProtocol::Http2 && headers::te_has_trailers(h);
        headers::strip_hop_by_hop(h);
        if keep_te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(how) = upgrade {
            if cfg.upstream.protocol == UpstreamProtocol::Http2 {
                return Err(Reject::UpgradeUnsupported);
            }
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if how == Upgrade::ExtendedConnect {
                // RFC 8441 → RFC 6455: the HTTP/1.1 handshake the backend expects.
                parts.method = Method::GET;
                parts.extensions.remove::<hyper::ext::Protocol>();
                h.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
                h.entry(header::SEC_WEBSOCKET_VERSION)
                    .or_insert(HeaderValue::from_static("13"));
            }
        }
        let forwarded_chain = cfg.server.net.incoming_chain(conn.peer.ip(), h);
        headers::remove_all(h, &self.request_strip);
        headers::set_forwarded(
            h,
            &headers::Forwarded {
                client_ip: ex.client,
                peer: crate::netpolicy::canonical(conn.peer.ip()),
                peer_value: &conn.peer_value,
                chain: forwarded_chain.as_deref(),
                proto: self.proto,
                client_host: client_host.as_ref(),
            },
        );
        if let Some(v) = identity.header_value() {
            h.insert(cfg.auth.identity_header.clone(), v);
        }
        h.insert(X_REQUEST_ID.clone(), ex.record.request_id.value().clone());
        match cfg.upstream.host_header {
            HostHeader::Upstream => {
                h.insert(header::HOST, self.upstream_host.clone());
            }
            HostHeader::Preserve => {
                if let Some(host) = client_host {
                    h.insert(header::HOST, host);
                }
            }
        }
        parts.uri = self.upstream_uri(&path, parts.uri.query())?;
        parts.version = match cfg.upstream.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };

        let body = ClientBody(Limited::new(body, cfg.server.max_body_bytes as usize));
        let upstream_req = Request::from_parts(parts, body);
        ex.unread_body = false;
        let sent = tokio::time::timeout(
            cfg.upstream.response_timeout,
            self.client.request(upstream_req),
        )
        .await;
        let mut resp = match sent {
            Err(_elapsed) => {
                self.metrics.upstream_error("timeout");
                tracing::warn!(request_id = %ex.record.request_id, timeout = ?cfg.upstream.response_timeout, "upstream response timeout");
                return Err(Reject::UpstreamTimeout);
            }
            Ok(Err(e)) => {
                if caused_by::<LengthLimitError>(&e) {
                    return Err(Reject::PayloadTooLarge);
                }
                if caused_by::<ClientBodyError>(&e) {
                    tracing::debug!(request_id = %ex.record.request_id, error = %error_chain(&e), "client request body failed");
                    return Err(Reject::BadRequest);
                }
                self.metrics.upstream_error(upstream_error_kind(&e));
                tracing::warn!(request_id = %ex.record.request_id, connect = e.is_connect(), error = %error_chain(&e), "upstream request failed");
                return Err(Reject::UpstreamUnavailable);
            }
            Ok(Ok(resp)) => resp,
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        headers::strip_hop_by_hop(resp.headers_mut());
        match (upgrade, client_upgrade) {
            (Some(how), Some(client)) if switching => {
                let upstream = hyper::upgrade::on(&mut resp);
                let h = resp.headers_mut();
                match how {
                    Upgrade::Http1 => {
                        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                    }
                    Upgrade::ExtendedConnect => {
                        // HTTP/2 accepts a WebSocket with 200 and no Sec-WebSocket-Accept.
                        h.remove(header::SEC_WEBSOCKET_ACCEPT);
                        *resp.status_mut() = StatusCode::OK;
                    }
                }
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

    /// Who the request is. A banned client is refused before any credential is looked at;
    /// presented credentials that fail count toward a ban.
    async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        conn: &ConnInfo,
        client: IpAddr,
    ) -> Result<Identity, Reject> {
        let now = Instant::now();
        let banned = |left: std::time::Duration| Reject::Banned {
            retry_after: left.as_secs_f64().ceil() as u64,
        };
        if let Some(left) = self.bans.banned_for(client, now) {
            return Err(banned(left));
        }
        if let Some(shared) = &self.shared_bans {
            if let Some(left) = shared.banned_for(client).await {
                // Banned by another replica: remember it here too.
                self.bans.mirror(client, now, left);
                return Err(banned(left));
            }
        }
        let result = self.check_credentials(headers, conn, client, now).await;
        if let Err(reject) = &result {
            if reject.counts_toward_ban() {
                let local = self.bans.record_failure(client, now);
                let shared = match &self.shared_bans {
                    Some(shared) => shared.record_failure(client).await,
                    None => None,
                };
                let started = match (local, shared) {
                    (_, Some(d)) => {
                        self.bans.mirror(client, now, d);
                        Some(d)
                    }
                    (Recorded::BanStarted(d), None) => Some(d),
                    _ => None,
                };
                if let Some(d) = started {
                    tracing::warn!(event = "ban_start", client = %client, duration = ?d, failures = self.bans.config().failures, shared = self.shared_bans.is_some(), "client banned after repeated authentication failures");
                }
            }
        }
        result
    }

    async fn check_credentials(
        &self,
        headers: &http::HeaderMap,
        conn: &ConnInfo,
        client: IpAddr,
        now: Instant,
    ) -> Result<Identity, Reject> {
        let snapshot = self.snapshot.load();
        let cfg = &self.config.auth;
        let auth = Authenticator {
            keys: &snapshot.keys,
            api_key_headers: &cfg.api_key_headers,
            anonymous: cfg.anonymous,
            basic_realm: snapshot.htpasswd.as_ref().map(|_| &self.realm),
        };
        match auth.extract(headers)? {
            None => match &conn.client_cert {
                // The handshake verified the certificate against client_ca.
                Some(name) if cfg.client_cert_identity => Ok(Identity::ClientCert(name.clone())),
                _ => auth.without_credentials(),
            },
            Some(Credential::ApiKey(token)) => auth.check_key(token, SystemTime::now()),
            Some(Credential::Basic { user, password }) => {
                let Some(file) = &snapshot.htpasswd else {
                    return Err(Reject::InvalidScheme);
                };
                match self.basic.verify(file, &user, &password, client, now).await {
                    Verdict::Valid => Ok(Identity::User(user.into())),
                    Verdict::Invalid => Err(Reject::BadPassword(self.realm.clone())),
                    Verdict::Throttled => Err(Reject::RateLimited { retry_after: 1 }),
                }
            }
        }
    }

    fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, Reject> {
        let up = &self.config.upstream;
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
}

/// How a client asks for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket` (RFC 6455).
    Http1,
    /// HTTP/2 `CONNECT` with `:protocol = websocket` (RFC 8441).
    ExtendedConnect,
}

fn websocket_upgrade<B>(req: &Request<B>) -> Option<Upgrade> {
    if req.method() == Method::CONNECT {
        let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
        return protocol
            .as_str()
            .eq_ignore_ascii_case("websocket")
            .then_some(Upgrade::ExtendedConnect);
    }
    let h = req.headers();
    let lists = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    (req.version() == Version::HTTP_11
        && lists(header::CONNECTION, "upgrade")
        && lists(header::UPGRADE, "websocket"))
    .then_some(Upgrade::Http1)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
fn websocket_key() -> HeaderValue {
    use base64::Engine;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).expect("base64 is a header value")
}

/// Whether a response is a stream to register: SSE, or any body of unknown length.
fn stream_kind(resp: &Response<Incoming>) -> Option<StreamKind> {
    let sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        });
    let body = resp.body();
    if sse {
        Some(StreamKind::Sse)
    } else if !body.is_end_stream() && body.size_hint().exact().is_none() {
        Some(StreamKind::Stream)
    } else {
        None
    }
}

/// The connector for the backend: plain TCP for `http://`, rustls for `https://` with ALPN
/// for the configured protocol only, so an `http2` upstream is spoken to in h2 and an `http1`
/// one in HTTP/1.1.
fn upstream_connector(
    tcp: HttpConnector,
    up: &crate::config::UpstreamConfig,
) -> HttpsConnector<HttpConnector> {
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

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// One request from arrival to the end of its response body: owns its access log record and
/// its place in the connection's in-flight count. Dropped unfinished, it logs the client as gone.
pub struct Exchange {
    access: AccessLogger,
    metrics: Arc<crate::metrics::Metrics>,
    start: Instant,
    activity: Arc<Activity>,
    pub record: Record,
    /// The request has a body nobody has started to read.
    unread_body: bool,
    finished: bool,
    /// Who the request authenticated as, once known.
    cred: Option<CredId>,
    /// A gRPC request: refusals are answered the gRPC way.
    grpc: bool,
    /// Both halves of an accepted WebSocket upgrade: the client's and the backend's.
    tunnel: Option<(hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade)>,
    /// The client: the socket peer, or what a trusted proxy says it forwarded for.
    client: IpAddr,
    /// The rate limit verdict, for the `RateLimit` headers.
    rate: Option<crate::ratelimit::Decision>,
}

impl Exchange {
    fn start(proxy: &Proxy, req: &Request<Incoming>, conn: &ConnInfo) -> Exchange {
        conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let headers = req.headers();
        let request_id = headers
            .get(&X_REQUEST_ID)
            .filter(|v| headers::acceptable_request_id(v))
            .cloned()
            .unwrap_or_else(|| proxy.ids.next());
        let text = |name: header::HeaderName| headers.get(name).and_then(Text::new);
        let unread_body = !req.body().is_end_stream();
        let client = proxy.config.server.net.client_ip(conn.peer.ip(), headers);
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Exchange {
            access: proxy.access.clone(),
            metrics: proxy.metrics.clone(),
            start: Instant::now(),
            activity: conn.activity.clone(),
            record: Record {
                time: SystemTime::now(),
                client,
                method: req.method().clone(),
                // Until the path is normalised: the raw path, never the query.
                path: req.uri().path().to_owned(),
                protocol: protocol_name(req.version()),
                status: 499,
                bytes: 0,
                duration_ms: 0.0,
                identity: None,
                // Plain by construction (acceptable_request_id, or hex).
                request_id: Text::new(&request_id).expect("a request id is visible ASCII"),
                outcome: "client_closed",
                user_agent: text(header::USER_AGENT),
                referer: text(header::REFERER),
            },
            unread_body,
            finished: false,
            cred: None,
            grpc,
            tunnel: None,
            client,
            rate: None,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            let elapsed = self.start.elapsed();
            self.record.set_duration(elapsed);
            self.access.log(&self.record);
            self.metrics.request(
                self.record.outcome,
                self.record.status,
                elapsed.as_secs_f64(),
            );
            self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that counts what it sends and writes the access log line when done.
pub struct LoggedBody {
    inner: Either<Incoming, Full<Bytes>>,
    ex: Option<Exchange>,
    /// For a registered stream: the revocation, idle and lifetime limits. For any other
    /// backend body, an idle limit set up the first time it makes the client wait.
    watch: Option<Watch>,
    idle_limit: std::time::Duration,
}

impl LoggedBody {
    fn finish(&mut self) {
        // Dropping the exchange logs it.
        self.ex.take();
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away mid-response.
        if let Some(ex) = self.ex.as_mut() {
            if !self.inner.is_end_stream() {
                ex.record.outcome = "client_closed";
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(ex) = this.ex.as_mut() {
                        ex.record.bytes += data.len() as u64;
                    }
                    if let Some(w) = this.watch.as_mut() {
                        w.touch();
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(ex) = this.ex.as_mut() {
                    ex.record.outcome = "upstream_error";
                    ex.metrics.upstream_error("reset");
                    tracing::warn!(request_id = %ex.record.request_id, error = %e, "upstream response body failed");
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {
                if this.watch.is_none() && matches!(this.inner, Either::Left(_)) {
                    // Most bodies end within their first poll: the timer is only paid for
                    // by those that make the client wait.
                    this.watch = Some(Watch::idle_only(this.idle_limit));
                }
                if let Some(Poll::Ready(end)) = this.watch.as_mut().map(|w| w.poll_end(cx)) {
                    if let Some(ex) = this.ex.as_mut() {
                        ex.record.outcome = end.outcome();
                        tracing::debug!(request_id = %ex.record.request_id, outcome = end.outcome(), "stream closed by the proxy");
                    }
                    this.watch = None;
                    this.finish();
                    // An error, not an end: the client must not take a cut stream for a
                    // complete one (HTTP/1.1 closes the connection, HTTP/2 resets the stream).
                    return Poll::Ready(Some(Err(end.outcome().into())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A plain response from the proxy itself (admin endpoints, demo).
pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

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
