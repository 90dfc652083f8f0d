//! Listeners: the public proxy listener and the loopback admin listener, connection limits,
//! idle and header timeouts, and graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::proxy::ConnSlot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::config::Config;
use crate::proxy::{text_response, Activity, ActivityIo, ConnInfo, Proxy};

/// A running proxy: bound listeners and the tasks serving them.
pub struct Server {
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    redirect_addr: Option<SocketAddr>,
    /// The served certificate, when the public listener terminates TLS.
    resolver: Option<Arc<crate::tls::CertResolver>>,
    /// Kept alive for as long as the server runs: certificate files, credential files.
    _watchers: [Option<notify::RecommendedWatcher>; 2],
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// Bind the listeners and start serving. The config has been validated already.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let access = AccessLogger::open(&config.log.access_log, config.log.access_format)
            .map_err(|e| anyhow::anyhow!("cannot open access_log: {e}"))?;
        Server::bind_with_logger(config, access).await
    }

    /// As [`Server::bind`], with the access log going where `access` sends it.
    pub async fn bind_with_logger(config: Config, access: AccessLogger) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on admin_listen {}: {e}",
                    config.server.admin_listen
                )
            })?;
        let redirect = match config.server.redirect_http {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on redirect_http {addr}: {e}"))?,
            ),
            None => None,
        };
        let local_addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let config = Arc::new(config);
        let tracker = TaskTracker::new();
        let force = CancellationToken::new();
        let streams = Arc::new(crate::streams::Streams::new(tracker.clone(), force.clone()));
        let link = match &config.rate_limit.redis {
            Some(r) => Some(Arc::new(
                crate::ratelimit::RedisLink::new(r.clone())
                    .map_err(|e| anyhow::anyhow!("[rate_limit] {e}"))?,
            )),
            None => None,
        };
        let rate = crate::ratelimit::RateLimits::new(&config.rate_limit, link.clone());
        let shared_bans = link
            .filter(|_| config.ban.enabled)
            .map(|l| crate::ratelimit::SharedBans::new(l, config.ban));
        let proxy = Arc::new(Proxy::new(
            config.clone(),
            access,
            streams,
            rate,
            shared_bans,
        ));
        let resolver = config
            .tls
            .as_ref()
            .map(|t| Arc::new(crate::tls::CertResolver::new(t.cert.clone())));
        let shutdown = CancellationToken::new();

        let watcher = match (&config.tls, &resolver) {
            (Some(tls), Some(resolver)) => {
                let (files, resolver) = (tls.files.clone(), resolver.clone());
                let watched = [files.cert.clone(), files.key.clone()];
                let w = crate::reload::watch(&watched, shutdown.clone(), move || {
                    reload_certificate(&resolver, &files);
                })
                .map_err(|e| anyhow::anyhow!("cannot watch the certificate files: {e}"))?;
                Some(w)
            }
            _ => None,
        };
        // The keys and htpasswd files, watched through their directories.
        let credential_files: Vec<_> = [&config.auth.keys_file, &config.auth.htpasswd_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let credentials_watcher = if credential_files.is_empty() {
            None
        } else {
            let proxy = proxy.clone();
            let w = crate::reload::watch(&credential_files, shutdown.clone(), move || {
                proxy.reload_credentials();
            })
            .map_err(|e| anyhow::anyhow!("cannot watch the credential files: {e}"))?;
            Some(w)
        };
        let server = Server {
            local_addr,
            admin_addr,
            redirect_addr: redirect.as_ref().and_then(|l| l.local_addr().ok()),
            _watchers: [watcher, credentials_watcher],
            resolver: resolver.clone(),
            proxy: proxy.clone(),
            shutdown: shutdown.clone(),
            force,
            tracker,
        };

        // One builder per protocol rather than hyper-util's auto builder: a connection then
        // holds only its own protocol's state (an HTTP/1.1 connection pays nothing for HTTP/2).
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(config.server.header_read_timeout)
            .max_buf_size(config.server.max_header_bytes.max(8192))
            // Head and body copied into one buffer and written with one write: cheaper than
            // writev for the small responses an API proxy mostly carries (measured: about
            // 1 µs of 23 per proxied request), no slower on 1 MiB bodies.
            .writev(false);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(config.server.max_header_bytes as u32)
            // No keep-alive pings: their bytes would keep an idle connection alive forever.
            .max_concurrent_streams(256)
            // Rapid reset (CVE-2023-44487) and streams reset for our own errors: bounded.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(1024))
            // WebSocket over HTTP/2 (RFC 8441 extended CONNECT).
            .enable_connect_protocol();
        let builders = Arc::new(Builders { h1, h2 });

        let ctx = Accept {
            limit: Arc::new(Semaphore::new(config.server.max_connections)),
            gate: Some((
                config.server.net.clone(),
                crate::netpolicy::PerIp::new(config.server.max_connections_per_ip),
            )),
            shutdown: server.shutdown.clone(),
            force: server.force.clone(),
            tracker: server.tracker.clone(),
            idle_timeout: config.server.idle_timeout,
            header_read_timeout: config.server.header_read_timeout,
            stream_idle_timeout: config.server.stream_idle_timeout,
        };
        let admin_ctx = Accept {
            limit: Arc::new(Semaphore::new(64)),
            gate: None,
            ..ctx.clone()
        };
        let acceptor = match (&config.tls, &resolver) {
            (Some(tls), Some(resolver)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&tls.files, resolver.clone())
                    .map_err(|e| anyhow::anyhow!(e))?,
            ))),
            _ => None,
        };
        let handshake_timeout = config.server.header_read_timeout;
        let serve = {
            let ctx = ctx.clone();
            move |stream: TcpStream, peer: SocketAddr, activity: Arc<Activity>, permit: ConnSlot| {
                let proxy = proxy.clone();
                let builders = builders.clone();
                let ctx = ctx.clone();
                let acceptor = acceptor.clone();
                async move {
                    let Some(acceptor) = acceptor else {
                        // Nothing but this small task is held for a connection that has not
                        // sent a byte; hyper's buffers come with the first one.
                        let Some(h2) = ctx.first_bytes(&stream, peer).await else {
                            return;
                        };
                        let info = Arc::new(ConnInfo::new(peer, activity.clone(), None, permit));
                        let io = TokioIo::new(ActivityIo::new(stream, activity));
                        return ctx.serve_proxied(io, h2, proxy, info, &builders).await;
                    };
                    let io = ActivityIo::new(stream, activity.clone());
                    let stream =
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let tls = stream.get_ref().1;
                    let h2 = tls.alpn_protocol() == Some(b"h2");
                    let client_cert = tls
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(crate::tls::client_identity)
                        .map(Arc::from);
                    let info = Arc::new(ConnInfo::new(peer, activity, client_cert, permit));
                    ctx.serve_proxied(TokioIo::new(stream), h2, proxy, info, &builders)
                        .await;
                }
            }
        };
        server
            .tracker
            .spawn(ctx.clone().accept_loop(listener, "proxy", serve));

        let admin_state = Arc::new(Admin {
            registry: crate::metrics::registry(
                &server.proxy.metrics,
                Arc::downgrade(&server.proxy),
                server.resolver.clone(),
                ctx.limit.clone(),
                config.server.max_connections,
            ),
            proxy: server.proxy.clone(),
            tls: server.resolver.clone(),
        });
        let admin_serve = admin_ctx
            .clone()
            .http1(move |req| admin_handle(admin_state.clone(), req));
        server
            .tracker
            .spawn(admin_ctx.accept_loop(admin, "admin", admin_serve));

        if let Some(redirect) = redirect {
            let https_port = local_addr.port();
            let redirect_ctx = Accept {
                limit: Arc::new(Semaphore::new(config.server.max_connections)),
                gate: None,
                ..ctx.clone()
            };
            let serve = redirect_ctx
                .clone()
                .http1(move |req| async move { Ok(redirect_to_https(&req, https_port)) });
            server
                .tracker
                .spawn(redirect_ctx.accept_loop(redirect, "redirect_http", serve));
        }

        // Every second: close the streams of keys that just expired. Every ten: drop expired
        // bans and stale failure counters.
        let housekeeping = server.proxy.clone();
        let stop = server.shutdown.clone();
        server.tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut since = std::time::SystemTime::now();
            for n in 0u64.. {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = std::time::SystemTime::now();
                housekeeping.revoke_expired(since, now);
                since = now;
                if n % 10 == 9 {
                    housekeeping.rate.housekeep();
                    let ended = housekeeping.bans.housekeep(std::time::Instant::now());
                    if ended > 0 {
                        tracing::info!(event = "ban_end", count = ended, "bans expired");
                    }
                }
            }
        });

        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        tracing::info!(listen = %local_addr, admin = %admin_addr, upstream = %config.upstream.url, "portcullis listening");
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The redirect_http listener's address, if there is one.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect_addr
    }

    /// What serves certificates to new TLS handshakes, if TLS is on.
    pub fn tls(&self) -> Option<&Arc<crate::tls::CertResolver>> {
        self.resolver.as_ref()
    }

    /// Re-read what can change without a restart (the TLS certificate and key), as SIGHUP does.
    /// A file that fails to load keeps the last good state.
    pub fn reload(&self) {
        if let (Some(resolver), Some(tls)) = (&self.resolver, &self.proxy.config.tls) {
            reload_certificate(resolver, &tls.files);
        }
        self.proxy.reload_credentials();
    }

    /// Reopen the access log file (after logrotate moved it away).
    pub fn reopen_logs(&self) {
        self.proxy.access.reopen();
    }

    /// The request pipeline and its shared state (bans, verification cache).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Stop accepting, let in-flight requests finish within `shutdown_grace`, then close
    /// whatever is left. Returns once every connection task has ended.
    pub async fn shutdown(self) {
        let grace = self.proxy.config.server.shutdown_grace;
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "shutdown grace period over; closing remaining connections");
            self.force.cancel();
            self.tracker.wait().await;
        }
        tracing::info!("portcullis stopped");
    }
}

#[derive(Clone)]
struct Accept {
    limit: Arc<Semaphore>,
    /// The public listener's network policy and per-address connection limit.
    gate: Option<(crate::netpolicy::NetPolicy, Arc<crate::netpolicy::PerIp>)>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
    idle_timeout: Duration,
    /// How long a new connection may stay silent.
    header_read_timeout: Duration,
    /// A connection with requests in flight but no bytes moving for this long is closed (a
    /// client that stopped reading a response, a backend that stalls).
    stream_idle_timeout: Duration,
}

/// The public listener's connection builders.
struct Builders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// The HTTP/2 client preface starts with this; nothing else a client sends does.
const H2_PREFACE_START: &[u8] = b"PRI ";

impl Accept {
    /// Accept until shutdown. Over `max_connections`, a new connection is closed at once.
    /// Accept errors (EMFILE and the like) back off and never end the loop.
    async fn accept_loop<F, Fut>(self, listener: TcpListener, name: &'static str, serve: F)
    where
        F: Fn(TcpStream, SocketAddr, Arc<Activity>, ConnSlot) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    a
                }
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, backoff = ?backoff, "accept failed; backing off");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            // Before any byte is read (and before TLS): the network policy, then the limits.
            let mut ip_slot = None;
            if let Some((net, per_ip)) = &self.gate {
                let ip = peer.ip();
                let trusted = net.is_trusted(ip);
                if !trusted && !net.allows(ip) {
                    tracing::debug!(listener = name, peer = %peer, "client network not in allow_cidrs; closing connection");
                    continue;
                }
                if !trusted {
                    match per_ip.take(ip) {
                        Some(slot) => ip_slot = Some(slot),
                        None => {
                            tracing::debug!(listener = name, peer = %peer, "max_connections_per_ip reached; closing new connection");
                            continue;
                        }
                    }
                }
            }
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                tracing::debug!(listener = name, peer = %peer, "connection limit reached; closing new connection");
                drop(stream);
                continue;
            };
            let permit = ConnSlot {
                _all: permit,
                _per_ip: ip_slot,
            };
            let _ = stream.set_nodelay(true);
            let activity = Arc::new(Activity::new());
            activity.touch();
            // The permit travels with the connection (and with a tunnel it turns into).
            self.tracker.spawn(serve(stream, peer, activity, permit));
        }
    }

    /// Wait for a plain connection's first bytes and tell whether it speaks HTTP/2 (prior
    /// knowledge); `None` when it closes, sends no request start within `header_read_timeout`
    /// (as a TLS client must finish its handshake within it), or the server stops.
    async fn first_bytes(&self, stream: &TcpStream, peer: SocketAddr) -> Option<bool> {
        let sniff = async {
            let mut buf = [0u8; 4];
            loop {
                let n = stream.peek(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                if n == buf.len() || buf[..n] != H2_PREFACE_START[..n] {
                    return Some(buf[..n] == *H2_PREFACE_START);
                }
                // A prefix of the preface: wait for the rest (peek does not consume, so it
                // would return at once).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            h2 = sniff => h2,
            _ = tokio::time::sleep(self.header_read_timeout) => {
                tracing::debug!(peer = %peer, "nothing sent within header_read_timeout; closing connection");
                None
            }
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Serve one proxy connection with the protocol it speaks. The connection's state lives in
    /// one allocation sized for that protocol, and each request's in another.
    async fn serve_proxied<I>(
        &self,
        io: I,
        h2: bool,
        proxy: Arc<Proxy>,
        info: Arc<ConnInfo>,
        builders: &Builders,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let activity = info.activity.clone();
        let svc = service_fn(move |req| Box::pin(proxy.clone().handle(req, info.clone())));
        if h2 {
            let conn = builders.h2.serve_connection(io, svc);
            let stop = hyper::server::conn::http2::Connection::graceful_shutdown;
            Box::pin(self.drive(conn, stop, &activity, peer)).await
        } else {
            let conn = builders.h1.serve_connection(io, svc).with_upgrades();
            let stop = hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown;
            Box::pin(self.drive(conn, stop, &activity, peer)).await
        }
    }

    /// Run one proxy connection to its end: graceful close on shutdown or when idle, abrupt
    /// close when the shutdown grace runs out.
    async fn drive<C>(
        &self,
        conn: C,
        graceful_shutdown: fn(Pin<&mut C>),
        activity: &Activity,
        peer: SocketAddr,
    ) where
        C: std::future::Future<Output = hyper::Result<()>>,
    {
        tokio::pin!(conn);
        let idle = self.idle_timeout;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        let mut draining = false;
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    graceful_shutdown(conn.as_mut());
                }
                _ = self.force.cancelled() => return,
                _ = &mut idle_timer, if !draining => {
                    let busy = activity.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0;
                    let now = tokio::time::Instant::now().into_std();
                    let deadline = activity.last() + idle;
                    let stalled_at = activity.last() + self.stream_idle_timeout;
                    if busy && stalled_at <= now {
                        // Requests in flight and nothing moving either way: a client that
                        // stopped reading. Closing is the only way to free what it holds.
                        tracing::debug!(peer = %peer, "no bytes moved for stream_idle_timeout with requests in flight; closing connection");
                        return;
                    }
                    if !busy && deadline <= now {
                        tracing::debug!(peer = %peer, "idle timeout; closing connection");
                        draining = true;
                        graceful_shutdown(conn.as_mut());
                    } else {
                        let next = if busy { (now + idle).min(stalled_at) } else { deadline };
                        idle_timer.as_mut().reset(next.into());
                    }
                }
            }
        }
    }
}

/// Load the certificate pair again and serve it to new handshakes; a broken or mismatched
/// pair keeps the last good one in force.
fn reload_certificate(resolver: &crate::tls::CertResolver, files: &crate::tls::TlsConfig) {
    match crate::tls::load_cert(&files.cert, &files.key) {
        Ok(new) => {
            let old = resolver.current();
            if old.key.cert == new.key.cert {
                return;
            }
            tracing::info!(
                event = "reload", file = "tls", result = "ok",
                subject = %new.subject,
                not_after = %humantime::format_rfc3339_seconds(new.not_after),
                "certificate reloaded"
            );
            if let Some(w) =
                crate::tls::expiry_warning(&new, &files.cert, std::time::SystemTime::now())
            {
                tracing::warn!("{w}");
            }
            resolver.swap(new);
            resolver
                .reloads_ok
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            resolver
                .reloads_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(event = "reload", file = "tls", result = "error", error = %e, "certificate not reloaded; the previous one stays in use");
        }
    }
}

impl Accept {
    /// Serve plain HTTP/1.1 with `handler` (the admin and redirect listeners).
    fn http1<H, Fut>(
        self,
        handler: H,
    ) -> impl Fn(TcpStream, SocketAddr, Arc<Activity>, ConnSlot) -> BoxFuture + Clone
    where
        H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, std::convert::Infallible>>
            + Send
            + 'static,
    {
        move |stream: TcpStream, peer: SocketAddr, activity: Arc<Activity>, permit: ConnSlot| {
            let io = TokioIo::new(ActivityIo::new(stream, activity.clone()));
            let svc = service_fn(handler.clone());
            let ctx = self.clone();
            Box::pin(async move {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                let conn = b.serve_connection(io, svc);
                let stop = hyper::server::conn::http1::Connection::graceful_shutdown;
                ctx.drive(conn, stop, &activity, peer).await;
                drop(permit);
            })
        }
    }
}

type BoxFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// 308 to the same host and path on https (the public listener's port).
fn redirect_to_https(req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
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

/// Errors of one connection that `accept` reports but that say nothing about the listener.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// `/healthz`: the process answers. `/readyz`: credentials are loaded and the backend accepts
/// TCP connections; 503 with the same JSON detail otherwise.
/// What the admin listener serves from.
struct Admin {
    proxy: Arc<Proxy>,
    tls: Option<Arc<crate::tls::CertResolver>>,
    registry: prometheus_client::registry::Registry,
}

async fn admin_handle(
    admin: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readiness(&admin.proxy, admin.tls.as_deref()).await,
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
                Ok(()) => text_response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics could not be encoded\n".into(),
                ),
            }
        }
        "/keys" => keys_report(&admin.proxy),
        _ => text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// `/keys`: every key's name, fingerprint, state and use; never the key. What a rotation
/// runbook watches: the old key's requests stop growing once every client has moved.
fn keys_report(proxy: &Proxy) -> Response<Full<Bytes>> {
    let snapshot = proxy.snapshot.load();
    let now = std::time::SystemTime::now();
    let mut keys: Vec<_> = snapshot.keys.keys().collect();
    keys.sort_by(|a, b| a.name.cmp(&b.name).then(a.fingerprint.cmp(&b.fingerprint)));
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let (requests, last_used) = k.stats.snapshot();
            serde_json::json!({
                "name": k.name,
                "fingerprint": k.fingerprint,
                "enabled": k.enabled,
                "usable": k.usable(now),
                "expires": k.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "requests": requests,
                "last_used": last_used.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "rate_limit": {
                    "requests_per_second": k.requests_per_second,
                    "burst": k.burst,
                },
            })
        })
        .collect();
    let body = serde_json::json!({ "generation": snapshot.generation, "keys": rows });
    text_response(StatusCode::OK, "application/json", format!("{body:#}\n"))
}

async fn readiness(proxy: &Proxy, tls: Option<&crate::tls::CertResolver>) -> Response<Full<Bytes>> {
    let cfg = &proxy.config;
    let snapshot = proxy.snapshot.load();
    let keys_loaded = snapshot.keys.enabled_count();
    let users_loaded = snapshot.htpasswd.as_ref().map_or(0, |h| h.len());
    let credentials_ok = cfg.auth.anonymous || keys_loaded > 0 || users_loaded > 0;
    let authority = &cfg.upstream.authority;
    let default_port = if cfg.upstream.scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    let port = authority.port_u16().unwrap_or(default_port);
    let upstream_ok = matches!(
        tokio::time::timeout(
            Duration::from_secs(1).min(cfg.upstream.connect_timeout),
            TcpStream::connect((authority.host().trim_matches(['[', ']']), port)),
        )
        .await,
        Ok(Ok(_))
    );
    let ready = credentials_ok && upstream_ok;
    let body = serde_json::json!({
        "ready": ready,
        "credentials": {
            "ok": credentials_ok,
            "anonymous": cfg.auth.anonymous,
            "generation": snapshot.generation,
            "keys": {
                "file": cfg.auth.keys_file.as_ref().map(|p| p.display().to_string()),
                "loaded": snapshot.keys.len(),
                "enabled": keys_loaded,
                "reload": crate::state::Reloads::status(&proxy.reloads.keys),
            },
            "htpasswd": {
                "file": cfg.auth.htpasswd_file.as_ref().map(|p| p.display().to_string()),
                "users": users_loaded,
                "reload": crate::state::Reloads::status(&proxy.reloads.htpasswd),
            },
        },
        "streams": {
            "websocket": proxy.streams.active(crate::streams::StreamKind::WebSocket),
            "sse": proxy.streams.active(crate::streams::StreamKind::Sse),
            "stream": proxy.streams.active(crate::streams::StreamKind::Stream),
            "revoked_total": proxy.streams.revoked_total(),
        },
        "upstream": { "url": cfg.upstream.url.to_string(), "reachable": upstream_ok },
        "tls": tls.map(|t| {
            let cert = t.current();
            let not_after = humantime::format_rfc3339_seconds(cert.not_after).to_string();
            let left = cert
                .not_after
                .duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs());
            serde_json::json!({
                "subject": cert.subject,
                "not_after": not_after,
                "expires_in_seconds": left,
                "reloads_ok": t.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
                "reloads_failed": t.reloads_failed.load(std::sync::atomic::Ordering::Relaxed),
            })
        }),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text_response(status, "application/json", format!("{body}\n"))
}
