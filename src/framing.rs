//! HTTP/1.1 request framing, followed as the bytes arrive, for the one ambiguity hyper settles
//! silently: a request with both `Transfer-Encoding` and `Content-Length`. hyper frames it by
//! `Transfer-Encoding` (RFC 9112 §6.3), drops the `Content-Length` before the request is seen
//! and closes the connection after the response; intermediaries that read it the other way
//! are how requests are smuggled, so portcullis refuses it outright, as nginx does (400, and
//! the connection closed).
//!
//! [`Framing`] wraps an HTTP/1 connection's reads. It finds each request head, notes whether
//! it names both headers, and skips the body by its length or its chunks to find the next
//! head. Whatever it does not understand (an upgrade, `CONNECT`, a line longer than it keeps)
//! ends the tracking for that connection: hyper still parses and refuses what is malformed,
//! and this only ever adds a refusal.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};

/// The longest line kept while looking for a head's end or a chunk size.
const MAX_LINE: usize = 64 * 1024;

/// Which request of a connection first carried both `Transfer-Encoding` and `Content-Length`
/// (1 for the first request; 0: none yet). Shared by the reader and the request pipeline.
#[derive(Debug, Default)]
pub struct Conflicts(AtomicU64);

impl Conflicts {
    /// Whether the connection's `n`-th request (counting from 1) carried both.
    pub fn at(&self, n: u64) -> bool {
        self.0.load(Ordering::Acquire) == n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request line and headers.
    Head,
    /// Skipping a body of this many more bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping this many more bytes of chunk data.
    ChunkData(u64),
    /// Reading the line break after a chunk's data.
    ChunkEnd,
    /// Reading trailer lines up to the empty one.
    Trailers,
    /// Not following this connection any further.
    Off,
}

/// What one head says about framing.
#[derive(Debug, Default)]
struct Head {
    request_line_seen: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    upgrade: bool,
    connect: bool,
}

/// The framing of one connection's requests, fed the bytes it reads.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    line: Vec<u8>,
    head: Head,
    heads: u64,
    conflicts: Arc<Conflicts>,
}

impl Tracker {
    pub fn new(conflicts: Arc<Conflicts>) -> Tracker {
        Tracker {
            state: State::Head,
            line: Vec::new(),
            head: Head::default(),
            heads: 0,
            conflicts,
        }
    }

    /// Follow `bytes`, the next bytes the connection read.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(left) | State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    let left = left - n;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', bytes) else {
                        self.keep(bytes);
                        return;
                    };
                    let (part, rest) = (&bytes[..end], &bytes[end + 1..]);
                    bytes = rest;
                    if self.line.is_empty() {
                        // The whole line is in this read: looked at where it lies.
                        self.line_done(strip_cr(part));
                    } else {
                        self.keep(part);
                        let line = std::mem::take(&mut self.line);
                        self.line_done(strip_cr(&line));
                        self.line = line;
                        self.line.clear();
                    }
                }
            }
        }
    }

    fn keep(&mut self, part: &[u8]) {
        if self.line.len() + part.len() > MAX_LINE {
            self.state = State::Off;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        match self.state {
            State::Head => self.head_line(line),
            State::ChunkSize => {
                let size = line.split(|&b| b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(size).ok().map(str::trim);
                self.state = match size.and_then(|s| u64::from_str_radix(s, 16).ok()) {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    None => State::Off,
                };
            }
            State::ChunkEnd => {
                self.state = if line.is_empty() {
                    State::ChunkSize
                } else {
                    State::Off
                };
            }
            State::Trailers => {
                if line.is_empty() {
                    self.state = State::Head;
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Off => {}
        }
    }

    fn head_line(&mut self, line: &[u8]) {
        if !self.head.request_line_seen {
            // Empty lines before a request line are tolerated (RFC 9112 §2.2).
            if !line.is_empty() {
                self.head.request_line_seen = true;
                self.head.connect = line.starts_with(b"CONNECT ");
            }
            return;
        }
        if !line.is_empty() {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return;
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                self.head.content_length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .or(Some(u64::MAX));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                self.head.transfer_encoding = true;
                let last = value.rsplit(|&b| b == b',').next().map(trim);
                self.head.chunked_last = last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                self.head.upgrade = true;
            }
            return;
        }
        // The head's end.
        self.heads += 1;
        let head = std::mem::take(&mut self.head);
        if head.transfer_encoding && head.content_length.is_some() {
            let _ = self.conflicts.0.compare_exchange(
                0,
                self.heads,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.state = if head.upgrade || head.connect {
            // What follows may be a tunnel's bytes, not requests.
            State::Off
        } else if head.transfer_encoding {
            if head.chunked_last {
                State::ChunkSize
            } else {
                State::Off
            }
        } else {
            match head.content_length {
                None | Some(0) => State::Head,
                Some(u64::MAX) => State::Off,
                Some(n) => State::Body(n),
            }
        };
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// An HTTP/1 connection whose reads go through a [`Tracker`].
pub struct Framing<T> {
    inner: T,
    tracker: Tracker,
}

impl<T> Framing<T> {
    pub fn new(inner: T, conflicts: Arc<Conflicts>) -> Framing<T> {
        Framing {
            inner,
            tracker: Tracker::new(conflicts),
        }
    }
}

impl<T: Read + Unpin> Read for Framing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // Read into a small stack buffer first, so the bytes can be looked at before they are
        // handed on (hyper's cursor gives no access to what it was filled with).
        if buf.remaining() == 0 {
            // Nothing can be read into it: hand the cursor on, so an empty read is never
            // mistaken for the end of the stream.
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let this = &mut *self;
        // The inner reader fills hyper's own buffer; the bytes it filled are looked at, then
        // the cursor is moved past them. No copy.
        // SAFETY: the slice is only ever written through `ReadBuf`, which never uninitializes a
        // byte, and the cursor is advanced by exactly the bytes that `ReadBuf` reports filled.
        let dst = unsafe { buf.as_mut() };
        let mut inner_buf = hyper::rt::ReadBuf::uninit(dst);
        let polled = Pin::new(&mut this.inner).poll_read(cx, inner_buf.unfilled());
        let filled = inner_buf.filled();
        let n = filled.len();
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.tracker.feed(filled);
        }
        // SAFETY: `n` bytes were initialized by the read above.
        unsafe { buf.advance(n) };
        polled
    }
}

impl<T: Write + Unpin> Write for Framing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The heads (1-based) marked as carrying both, feeding `input` in pieces of `step`.
    fn conflict(input: &[u8], step: usize) -> u64 {
        let conflicts = Arc::new(Conflicts::default());
        let mut t = Tracker::new(conflicts.clone());
        for piece in input.chunks(step) {
            t.feed(piece);
        }
        conflicts.0.load(Ordering::Acquire)
    }

    #[test]
    fn both_framing_headers_are_found_in_either_order_and_any_split() {
        let te_cl = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let cl_te = b"POST /a HTTP/1.1\r\nHost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 2, 7, 1000] {
            assert_eq!(conflict(te_cl, step), 1, "step {step}");
            assert_eq!(conflict(cl_te, step), 1, "step {step}");
        }
    }

    #[test]
    fn bodies_are_skipped_so_a_later_head_is_found_and_body_text_is_not_taken_for_one() {
        let mut input = Vec::new();
        // A body that looks like a smuggling head, framed by its length: not a head.
        let body = b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        input.extend_from_slice(
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        input.extend_from_slice(body);
        // A chunked request with an extension and a trailer.
        input.extend_from_slice(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n");
        assert_eq!(conflict(&input, 3), 0);
        // The third request carries both.
        input.extend_from_slice(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(conflict(&input, 3), 3);
        assert_eq!(conflict(&input, 4096), 3);
    }

    proptest::proptest! {
        /// However the bytes are split across reads, the same head is found (or none), and
        /// no input makes the tracker panic.
        #[test]
        fn the_split_of_the_bytes_never_changes_the_verdict(
            heads in proptest::collection::vec(0u8..4, 1..6),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            step in 1usize..40,
        ) {
            let mut input = Vec::new();
            for h in &heads {
                input.extend_from_slice(match h {
                    0 => &b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                    1 => &b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"[..],
                    2 => &b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;x\r\nhi\r\n0\r\n\r\n"[..],
                    _ => &b"POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n"[..],
                });
            }
            input.extend_from_slice(&garbage);
            let want = heads.iter().position(|h| *h == 3).map_or(0, |i| i as u64 + 1);
            proptest::prop_assert_eq!(conflict(&input, input.len().max(1)), want);
            proptest::prop_assert_eq!(conflict(&input, step), want);
        }
    }

    #[test]
    fn tracking_stops_after_an_upgrade() {
        let mut input =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                .to_vec();
        input.extend_from_slice(b"Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(conflict(&input, 5), 0);
    }
}
