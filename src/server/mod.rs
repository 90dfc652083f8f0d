//! Wiring: build everything from a validated [`Config`], start the listeners (public, admin,
//! redirect), the reloader and housekeeping, and stop them.
//!
//! The pieces are handed to each other explicitly here: the pipeline ([`Proxy`]), the reloader
//! and the admin endpoints share the credentials, streams and bans through `Arc`s; none of
//! them reaches into another.

mod accept;
mod admin;
mod forward_auth;
mod redirect;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLogger;
use crate::auth::Auth;
use crate::ban::Bans;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::ratelimit::RateLimits;
use crate::redis::RedisLink;
use crate::reload::Reloader;
use crate::streams::Streams;
use crate::tls::CertResolver;
use accept::{Accept, Builders};
pub use admin::text_response;

/// A running proxy: bound listeners and the tasks serving them.
pub struct Server {
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    redirect_addr: Option<SocketAddr>,
    forward_auth_addr: Option<SocketAddr>,
    /// The served certificate, when the public listener terminates TLS.
    resolver: Option<Arc<CertResolver>>,
    /// Kept alive for as long as the server runs: certificate files, credential files.
    _watchers: Vec<notify::RecommendedWatcher>,
    proxy: Arc<Proxy>,
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

/// The listeners, bound before anything else starts.
struct Listeners {
    public: TcpListener,
    admin: TcpListener,
    redirect: Option<TcpListener>,
    forward_auth: Option<TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let s = &config.server;
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {what}{addr}: {e}"))
        };
        Ok(Listeners {
            public: bind(s.listen, "").await?,
            admin: bind(s.admin_listen, "admin_listen ").await?,
            redirect: match s.redirect_http {
                Some(addr) => Some(bind(addr, "redirect_http ").await?),
                None => None,
            },
            forward_auth: match &config.forward_auth {
                Some(f) => Some(bind(f.listen, "[forward_auth] listen ").await?),
                None => None,
            },
        })
    }
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
        let listeners = Listeners::bind(&config).await?;
        let local_addr = listeners.public.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let config = Arc::new(config);
        let tracker = TaskTracker::new();
        let force = CancellationToken::new();
        let shutdown = CancellationToken::new();

        // The shared state, each piece built once and handed to whoever needs it.
        let streams = Arc::new(Streams::new(tracker.clone(), force.clone()));
        let redis = match &config.rate_limit.redis {
            Some(r) => Some(Arc::new(
                RedisLink::new(r.clone()).map_err(|e| anyhow::anyhow!("[rate_limit] {e}"))?,
            )),
            None => None,
        };
        let rate = Arc::new(RateLimits::new(&config.rate_limit, redis.clone()));
        let bans = Arc::new(Bans::new(config.ban, redis.clone()));
        let auth = Arc::new(Auth::new(&config.auth, bans.clone()));
        let resolver = config
            .tls
            .as_ref()
            .map(|t| Arc::new(CertResolver::new(t.cert.clone())));
        let reloader = Arc::new(Reloader::new(
            &config,
            auth.credentials.clone(),
            streams.clone(),
            resolver.clone(),
            auth.jwt.clone(),
        ));
        let watchers = reloader.watch(&shutdown)?;
        let proxy = Arc::new(Proxy::new(
            config.clone(),
            access,
            auth.clone(),
            streams.clone(),
            rate.clone(),
        ));
        let server = Server {
            local_addr,
            admin_addr,
            redirect_addr: listeners
                .redirect
                .as_ref()
                .and_then(|l| l.local_addr().ok()),
            forward_auth_addr: listeners
                .forward_auth
                .as_ref()
                .and_then(|l| l.local_addr().ok()),
            _watchers: watchers,
            resolver: resolver.clone(),
            proxy: proxy.clone(),
            reloader: reloader.clone(),
            shutdown,
            force,
            tracker,
        };

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
        let acceptor = match (&config.tls, &resolver) {
            (Some(tls), Some(resolver)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&tls.files, resolver.clone())
                    .map_err(|e| anyhow::anyhow!(e))?,
            ))),
            _ => None,
        };
        let serve = ctx
            .clone()
            .proxied(proxy.clone(), Arc::new(builders(&config)), acceptor);
        server
            .tracker
            .spawn(ctx.clone().accept_loop(listeners.public, "proxy", serve));

        let metrics = crate::metrics::Sources {
            connections: ctx.limit.clone(),
            max_connections: config.server.max_connections,
            tls: resolver.clone(),
            bans: bans.clone(),
            streams: streams.clone(),
            credentials: auth.credentials.clone(),
            reloads: reloader.clone(),
            redis,
            jwks: auth.jwt.clone(),
            upstream: proxy.upstream().instances.clone(),
            auth: auth.clone(),
        };
        let admin = admin::Admin {
            registry: crate::metrics::registry(&proxy.metrics, metrics),
            config: config.clone(),
            credentials: auth.credentials.clone(),
            reloader: reloader.clone(),
            streams,
            tls: resolver,
            jwks: auth.jwt.clone(),
            upstream: proxy.upstream().instances.clone(),
        };
        spawn_admin(&ctx, listeners.admin, admin);
        if let Some(jwks) = &auth.jwt {
            // Keeps a fetched key set fresh (a jwks_file is the reloader's).
            server
                .tracker
                .spawn(jwks.clone().run(server.shutdown.clone()));
        }

        if let Some(listener) = listeners.redirect {
            spawn_redirect(&ctx, listener, local_addr.port(), &config);
        }
        if let (Some(listener), Some(fa)) = (listeners.forward_auth, &config.forward_auth) {
            spawn_forward_auth(&ctx, listener, proxy.clone(), fa, &config);
        }

        if let Some(check) = &config.upstream.health {
            for i in 0..config.upstream.targets.len() {
                let up = proxy.upstream().clone();
                let token = server.shutdown.clone();
                server
                    .tracker
                    .spawn(up.health_loop(i, check.clone(), token));
            }
        }

        server
            .tracker
            .spawn(housekeeping(reloader, proxy, bans, server.shutdown.clone()));

        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        tracing::info!(listen = %local_addr, admin = %admin_addr, forward_auth = server.forward_auth_addr.map(tracing::field::display), upstream = %config.upstream.describe(), "portcullis listening");
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

    /// Where `[forward_auth]` listens, when configured.
    pub fn forward_auth_addr(&self) -> Option<SocketAddr> {
        self.forward_auth_addr
    }

    /// What serves certificates to new TLS handshakes, if TLS is on.
    pub fn tls(&self) -> Option<&Arc<CertResolver>> {
        self.resolver.as_ref()
    }

    /// Re-read what can change without a restart (keys, htpasswd, the TLS certificate and
    /// key), as SIGHUP does, off the runtime at the lowest CPU priority. A file that fails to
    /// load keeps the last good state.
    pub async fn reload(&self) {
        self.reloader.reload().await;
    }

    /// Reopen the access log file (after logrotate moved it away).
    pub fn reopen_logs(&self) {
        self.proxy.access.reopen();
    }

    /// The request pipeline and its shared state (credentials, bans, verification cache).
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

/// Serve the admin endpoints on their listener, with their own small connection limit.
fn spawn_admin(ctx: &Accept, listener: TcpListener, admin: admin::Admin) {
    let admin = Arc::new(admin);
    let admin_ctx = Accept {
        limit: Arc::new(Semaphore::new(64)),
        gate: None,
        ..ctx.clone()
    };
    let serve = admin_ctx
        .clone()
        .http1(move |req| admin::handle(admin.clone(), req));
    ctx.tracker
        .spawn(admin_ctx.accept_loop(listener, "admin", serve));
}

/// Answer front proxies' authentication checks on `[forward_auth] listen`, under the public
/// listener's connection limits (a check is as cheap to send as a request).
fn spawn_forward_auth(
    ctx: &Accept,
    listener: TcpListener,
    proxy: Arc<Proxy>,
    fa: &crate::forward_auth::ForwardAuthConfig,
    config: &Config,
) {
    let fa_ctx = Accept {
        limit: Arc::new(Semaphore::new(config.server.max_connections)),
        gate: None,
        ..ctx.clone()
    };
    let fa = Arc::new(fa.clone());
    let serve = fa_ctx
        .clone()
        .http1_conn(move |req, conn| forward_auth::handle(proxy.clone(), fa.clone(), req, conn));
    ctx.tracker
        .spawn(fa_ctx.accept_loop(listener, "forward_auth", serve));
}

/// Answer every request on `redirect_http` with 308 to https on `https_port`, with the
/// `[headers]` every answer carries (over plain HTTP: no HSTS).
fn spawn_redirect(ctx: &Accept, listener: TcpListener, https_port: u16, config: &Config) {
    let redirect_ctx = Accept {
        limit: Arc::new(Semaphore::new(config.server.max_connections)),
        gate: None,
        ..ctx.clone()
    };
    let headers = Arc::new(config.headers.clone());
    let serve = redirect_ctx.clone().http1(move |req| {
        let headers = headers.clone();
        async move {
            let mut resp = redirect::redirect_to_https(&req, https_port);
            crate::headers::secure_response(resp.headers_mut(), &headers, false);
            Ok(resp)
        }
    });
    ctx.tracker
        .spawn(redirect_ctx.accept_loop(listener, "redirect_http", serve));
}

/// The public listener's connection builders: one per protocol rather than hyper-util's auto
/// builder, so a connection holds only its own protocol's state (an HTTP/1.1 connection pays
/// nothing for HTTP/2).
fn builders(config: &Config) -> Builders {
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
    Builders { h1, h2 }
}

/// Every second: close the streams of keys that just expired. Every ten: drop expired bans,
/// stale failure counters and full rate-limit buckets.
async fn housekeeping(
    reloader: Arc<Reloader>,
    proxy: Arc<Proxy>,
    bans: Arc<Bans>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut since = std::time::SystemTime::now();
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::SystemTime::now();
        reloader.revoke_expired(since, now);
        since = now;
        if n % 10 == 9 {
            proxy.housekeep();
            let ended = bans.housekeep(std::time::Instant::now());
            if ended > 0 {
                tracing::info!(event = "ban_end", count = ended, "bans expired");
            }
        }
    }
}
