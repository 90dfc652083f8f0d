//! The backend connection an HTTP/1 client connection keeps for itself (docs/behaviour.md,
//! "Backend connections"): reused request after request, closed with the client's, replaced
//! without loss when the backend closed it, and never used by HTTP/2 clients.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::support::*;

/// What a raw HTTP/1 backend saw: connections accepted, and each one's end.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// One message per connection that ended: the requests it carried.
    ended: mpsc::UnboundedReceiver<usize>,
    /// The bodies of the requests, in order.
    bodies: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one HTTP/1 message (head and Content-Length body) from `s`, after what `buf` already
/// holds: its head (lowercased) and body; `None` at end of stream.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return Some((head, body));
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl RawBackend {
    /// Answers every request 200 "ok" with keep-alive; when `close_after_each` is set, it
    /// closes the connection right after each response, as a backend whose keep-alive timeout
    /// ran out does (no `Connection: close` warns the proxy).
    async fn start(close_after_each: bool) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let (bodies_tx, bodies) = mpsc::unbounded_channel();
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (ended_tx, bodies_tx) = (ended_tx.clone(), bodies_tx.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    while let Some((_, body)) = read_message(&mut s, &mut buf).await {
                        served += 1;
                        let _ = bodies_tx.send(body);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(reply).await.is_err() || close_after_each {
                            break;
                        }
                    }
                    drop(s);
                    let _ = ended_tx.send(served);
                });
            }
        });
        RawBackend {
            addr,
            accepted,
            ended,
            bodies,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next connection to end, within 5 s: the requests it carried.
    async fn next_end(&mut self) -> usize {
        tokio::time::timeout(Duration::from_secs(5), self.ended.recv())
            .await
            .expect("a backend connection ends within 5 s")
            .unwrap()
    }
}

/// Send one request on an open client connection and read its response: status and body.
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, method: &str, body: &str) -> (u16, String) {
    let req = format!(
        "{method} /api/x HTTP/1.1\r\nhost: app.example\r\nx-api-key: {PROD_KEY}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let read = read_message(s, buf);
    let (head, body) = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a response within 5 s")
        .expect("the proxy keeps the client connection open");
    (raw_status(&head), body)
}

#[tokio::test]
async fn a_client_connection_keeps_a_backend_connection_from_its_second_request_and_closes_it_with_its_own(
) {
    let mut backend = RawBackend::start(false).await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..5 {
        let (status, body) = exchange(&mut s, &mut buf, "POST", &format!("request {i}")).await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }
    // The first request took the shared pool; the second opened the connection's own, which
    // carried the other four.
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    for i in 0..5 {
        assert_eq!(backend.bodies.recv().await.unwrap(), format!("request {i}"));
    }
    // A second client connection's first request takes the pool's idle connection; its second
    // opens a backend connection of its own.
    let mut other = TcpStream::connect(proxy.addr).await.unwrap();
    let mut other_buf = Vec::new();
    assert_eq!(exchange(&mut other, &mut other_buf, "GET", "").await.0, 200);
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        2,
        "the pool's connection again"
    );
    assert_eq!(exchange(&mut other, &mut other_buf, "GET", "").await.0, 200);
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    // The first client goes away: its own backend connection is closed too.
    drop(s);
    assert_eq!(backend.next_end().await, 4);
}

#[tokio::test]
async fn a_backend_connection_closed_while_idle_is_replaced_without_losing_the_request() {
    let mut backend = RawBackend::start(true).await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        // A POST is never sent twice: it must reach the backend on a connection that is open.
        let (status, body) = exchange(&mut s, &mut buf, "POST", &format!("post {i}")).await;
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
        assert_eq!(backend.bodies.recv().await.unwrap(), format!("post {i}"));
        // The backend has closed the connection that carried it before the next is sent.
        assert_eq!(backend.next_end().await, 1);
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    let scrape = scrape(&proxy).await;
    let errors: Vec<_> = scrape
        .samples
        .iter()
        .filter(|x| x.metric.starts_with("portcullis_upstream_errors"))
        .filter(|x| !matches!(x.value, prometheus_parse::Value::Counter(v) if v == 0.0))
        .collect();
    assert!(
        errors.is_empty(),
        "no failed exchange was counted: {errors:?}"
    );
}

#[tokio::test]
async fn http2_clients_share_the_pool() {
    let backend = RawBackend::start(false).await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let client = h2_client();
    for _ in 0..3 {
        let r = send_with(
            &client,
            "GET",
            &proxy.url("/api/x"),
            &[("x-api-key", PROD_KEY)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        1,
        "the pool's one idle connection carries the HTTP/2 client's sequential requests"
    );
}

#[tokio::test]
async fn a_client_connection_owns_an_https_backend_connection_verified_like_the_pools() {
    let pki = crate::support::pki::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.crt");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    // Three requests on one keep-alive client connection through a proxy to `backend`: the
    // first takes the pool, the next two the connection's own, opened over TLS and verified
    // against `ca`.
    let three = async |backend: &Backend| -> Vec<Reply> {
        let url = format!("https://localhost:{}", backend.addr.port());
        let proxy = Proxy::start(&url, &format!("ca = \"{}\"", ca.display())).await;
        let keep_alive = client();
        let mut replies = Vec::new();
        for _ in 0..3 {
            let key = [("x-api-key", PROD_KEY)];
            replies.push(send_with(&keep_alive, "GET", &proxy.url("/api"), &key, "").await);
        }
        replies
    };
    let leaf = pki.server();
    let backend = Backend::tls(&leaf.cert, &leaf.key).await;
    for (i, r) in three(&backend).await.iter().enumerate() {
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        assert_eq!(r.body, "HTTP/1.1".as_bytes(), "request {i}");
    }
    let host = format!("localhost:{}", backend.addr.port());
    assert!(backend
        .take()
        .iter()
        .all(|seen| seen.headers["host"] == host));
    // A backend whose certificate names another host is refused on the owned connection as on
    // the pool's: 502, request after request.
    let other = pki.server_for("elsewhere.example");
    let misnamed = Backend::tls(&other.cert, &other.key).await;
    for (i, r) in three(&misnamed).await.iter().enumerate() {
        assert_eq!(r.status, 502, "request {i}");
    }
    assert_eq!(
        misnamed.count(),
        0,
        "no request reached the misnamed backend"
    );
}
