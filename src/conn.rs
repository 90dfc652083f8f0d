//! Connection facts the pipeline needs (peer, client certificate), a connection's places under
//! the connection limits, and the byte counters the idle timers and access log read. Shared by
//! the listeners (`server`) and the request pipeline (`proxy`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

/// Per-connection facts the pipeline needs, and the activity the idle timer watches.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` / `X-Real-IP` carry it, made once.
    pub peer_value: HeaderValue,
    pub activity: Arc<Activity>,
    /// The identity of the verified client certificate (mTLS), if any.
    pub client_cert: Option<Arc<str>>,
    /// The connection's place under `max_connections` and `max_connections_per_ip`, held by
    /// whatever holds this (a WebSocket tunnel outlives the HTTP connection it came from).
    pub slot: ConnSlot,
    /// Which HTTP/1 request first carried both framing headers (see `framing`).
    pub framing: Arc<crate::framing::Conflicts>,
    /// Requests begun on this connection so far.
    pub requests: AtomicU64,
    /// The backend connection an HTTP/1 client connection keeps for itself, polled by the task
    /// that serves it (`server::accept`); `None` for HTTP/2 clients and the other listeners.
    pub own: Option<crate::upstream::OwnConnection>,
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
            peer_value: crate::headers::ip_value(crate::netpolicy::canonical(peer.ip())),
            activity,
            client_cert,
            slot,
            framing: Arc::default(),
            requests: AtomicU64::new(0),
            own: None,
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
