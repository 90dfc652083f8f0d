//! Accepting connections: network policy and connection caps before any byte is read, TLS,
//! then HTTP/1.1 or HTTP/2; idle and header timeouts; graceful and forced close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{Activity, ActivityIo, ConnInfo, ConnSlot};
use crate::proxy::Proxy;
use crate::upstream::OwnConnection;

#[derive(Clone)]
pub(super) struct Accept {
    pub limit: Arc<Semaphore>,
    /// The public listener's network policy and per-address connection limit.
    pub gate: Option<(crate::netpolicy::NetPolicy, Arc<crate::netpolicy::PerIp>)>,
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    pub tracker: TaskTracker,
    pub idle_timeout: Duration,
    /// How long a new connection may stay silent.
    pub header_read_timeout: Duration,
    /// A connection with requests in flight but no bytes moving for this long is closed (a
    /// client that stopped reading a response, a backend that stalls).
    pub stream_idle_timeout: Duration,
}

/// The public listener's connection builders.
pub(super) struct Builders {
    pub h1: hyper::server::conn::http1::Builder,
    pub h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// The HTTP/2 client preface starts with this; nothing else a client sends does.
const H2_PREFACE_START: &[u8] = b"PRI ";

impl Accept {
    /// Accept until shutdown. Over `max_connections`, a new connection is closed at once.
    /// Accept errors (EMFILE and the like) back off and never end the loop.
    pub async fn accept_loop<F, Fut>(self, listener: TcpListener, name: &'static str, serve: F)
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
    pub async fn first_bytes(&self, stream: &TcpStream, peer: SocketAddr) -> Option<bool> {
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
    pub async fn serve_proxied<I>(
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
        let framing = info.framing.clone();
        let conn_info = info.clone();
        // Boxed per request: hyper keeps an unboxed request future in a slot of its size for the
        // connection's whole life, about 5 KB more per idle keep-alive connection.
        let svc = service_fn(move |req| Box::pin(proxy.clone().handle(req, info.clone())));
        let own = conn_info.own.as_ref();
        if h2 {
            let conn = builders.h2.serve_connection(io, svc);
            let stop = hyper::server::conn::http2::Connection::graceful_shutdown;
            Box::pin(self.drive(conn, stop, &activity, peer, own)).await
        } else {
            let io = crate::framing::Framing::new(io, framing);
            let conn = builders.h1.serve_connection(io, svc).with_upgrades();
            let stop = hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown;
            Box::pin(self.drive(conn, stop, &activity, peer, own)).await
        }
        if let Some(own) = own {
            own.close();
        }
    }

    /// Run one proxy connection to its end: graceful close on shutdown or when idle, abrupt
    /// close when the shutdown grace runs out. The client connection's own backend
    /// connection, if any, is polled here beside it: one task serves both.
    async fn drive<C>(
        &self,
        conn: C,
        graceful_shutdown: fn(Pin<&mut C>),
        activity: &Activity,
        peer: SocketAddr,
        own: Option<&OwnConnection>,
    ) where
        C: std::future::Future<Output = hyper::Result<()>>,
    {
        tokio::pin!(conn);
        let idle = self.idle_timeout;
        // The owned backend connection is closed sooner than the client's when idle.
        let own_idle = crate::upstream::OWNED_IDLE;
        let idle_timer = tokio::time::sleep(match own {
            Some(_) => idle.min(own_idle),
            None => idle,
        });
        tokio::pin!(idle_timer);
        let mut draining = false;
        let shutdown = cancelled(&self.shutdown);
        let force = cancelled(&self.force);
        tokio::pin!(shutdown, force);
        loop {
            tokio::select! {
                biased;
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = &mut shutdown, if !draining => {
                    draining = true;
                    graceful_shutdown(conn.as_mut());
                }
                _ = std::future::poll_fn(|cx| own.map_or(std::task::Poll::Pending, |o| o.poll_drive(cx))), if own.is_some() => {}
                _ = &mut force => return,
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
                        continue;
                    }
                    let mut next = if busy { (now + idle).min(stalled_at) } else { deadline };
                    if let Some(o) = own.filter(|o| !busy && o.holds()) {
                        let release = activity.last() + own_idle;
                        if release <= now {
                            tracing::debug!(peer = %peer, "client idle; closing its backend connection");
                            o.close();
                        } else {
                            next = next.min(release);
                        }
                    }
                    idle_timer.as_mut().reset(next.into());
                }
            }
        }
    }
}

/// `token.cancelled()` for a loop that wakes often: registered with the token once (again only
/// if the task's waker changes), then an atomic load per wake-up instead of the token's lock.
async fn cancelled(token: &CancellationToken) {
    let mut inner = std::pin::pin!(token.cancelled());
    let mut registered: Option<std::task::Waker> = None;
    std::future::poll_fn(|cx| {
        if token.is_cancelled() {
            return std::task::Poll::Ready(());
        }
        if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return std::task::Poll::Pending;
        }
        registered = Some(cx.waker().clone());
        std::future::Future::poll(inner.as_mut(), cx)
    })
    .await
}

impl Accept {
    /// Serve the public listener's connections: TLS when `acceptor` is set (within
    /// `header_read_timeout`), then HTTP/1.1 or HTTP/2 into the pipeline.
    pub fn proxied(
        self,
        proxy: Arc<Proxy>,
        builders: Arc<Builders>,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> impl Fn(TcpStream, SocketAddr, Arc<Activity>, ConnSlot) -> BoxFuture + Clone {
        let ctx = self;
        let handshake_timeout = ctx.header_read_timeout;
        move |stream: TcpStream, peer: SocketAddr, activity: Arc<Activity>, permit: ConnSlot| {
            let proxy = proxy.clone();
            let builders = builders.clone();
            let ctx = ctx.clone();
            let acceptor = acceptor.clone();
            Box::pin(async move {
                let Some(acceptor) = acceptor else {
                    // Nothing but this small task is held for a connection that has not
                    // sent a byte; hyper's buffers come with the first one.
                    let Some(h2) = ctx.first_bytes(&stream, peer).await else {
                        return;
                    };
                    let mut info = ConnInfo::new(peer, activity.clone(), None, permit);
                    info.own = (!h2).then(OwnConnection::default);
                    let info = Arc::new(info);
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
                let mut info = ConnInfo::new(peer, activity, client_cert, permit);
                info.own = (!h2).then(OwnConnection::default);
                let info = Arc::new(info);
                ctx.serve_proxied(TokioIo::new(stream), h2, proxy, info, &builders)
                    .await;
            })
        }
    }
}

impl Accept {
    /// Serve plain HTTP/1.1 with `handler` (the admin and redirect listeners).
    /// As [`Accept::http1`], with the connection's facts (the peer, for trusted proxies)
    /// handed to the handler, and any response body.
    pub fn http1_conn<H, Fut, B>(
        self,
        handler: H,
    ) -> impl Fn(TcpStream, SocketAddr, Arc<Activity>, ConnSlot) -> BoxFuture + Clone
    where
        H: Fn(Request<Incoming>, Arc<ConnInfo>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Response<B>, std::convert::Infallible>>
            + Send
            + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        move |stream: TcpStream, peer: SocketAddr, activity: Arc<Activity>, permit: ConnSlot| {
            let info = Arc::new(ConnInfo::new(peer, activity.clone(), None, permit));
            let io = TokioIo::new(ActivityIo::new(stream, activity.clone()));
            let handler = handler.clone();
            let svc = service_fn(move |req| handler(req, info.clone()));
            let ctx = self.clone();
            Box::pin(async move {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(ctx.header_read_timeout);
                let conn = b.serve_connection(io, svc);
                let stop = hyper::server::conn::http1::Connection::graceful_shutdown;
                ctx.drive(conn, stop, &activity, peer, None).await;
            })
        }
    }

    pub fn http1<H, Fut>(
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
                ctx.drive(conn, stop, &activity, peer, None).await;
                drop(permit);
            })
        }
    }
}

type BoxFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

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
