//! Hostile requests spoken as raw bytes (where a client library would refuse to send them), and
//! backends that misbehave. Nothing may reach the backend that was not authorised, nothing may
//! hang past its timeout, and a bad request never takes down a connection it does not own.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

async fn proxy_for(backend: &Backend, extra: &str) -> Proxy {
    Proxy::start(&backend.url(), extra).await
}

/// Every response status in raw HTTP/1 text, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i + 9..].get(..3)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn smuggling_shapes_are_refused_and_no_second_request_reaches_the_backend() {
    let backend = Backend::recording_bodies().await;
    let proxy = proxy_for(&backend, "").await;
    let k = PROD_KEY;
    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL.TE",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nContent-Length: 6\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two Content-Lengths",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nContent-Length: 3\r\n\
                 Content-Length: 40\r\n\r\nabc{smuggled}"
            ),
        ),
        (
            "a list in Content-Length",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nContent-Length: 3, 40\r\n\r\nabc{smuggled}"
            ),
        ),
        (
            "obs-fold",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nTransfer-Encoding:\r\n chunked\r\n\
                 Content-Length: 3\r\n\r\nabc{smuggled}"
            ),
        ),
        (
            "a bad chunk size",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nTransfer-Encoding: chunked\r\n\r\n\
                 zz\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding other than chunked",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nTransfer-Encoding: gzip, identity\r\n\r\n\
                 abc{smuggled}"
            ),
        ),
        (
            "a space before the colon",
            format!(
                "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {k}\r\nContent-Length : 40\r\n\r\n{smuggled}"
            ),
        ),
    ];
    for (name, request) in cases {
        let text = raw(proxy.addr, request.as_bytes()).await;
        let got = statuses(&text);
        // Both framings: hyper lets Transfer-Encoding win (RFC 9112 §6.3), answers the one
        // request so framed and closes the connection, so the rest is never read as a request.
        let framed_by_te_then_closed = name == "CL.TE"
            && got == vec![200]
            && text.to_ascii_lowercase().contains("connection: close");
        assert!(
            framed_by_te_then_closed || (!got.is_empty() && got.iter().all(|s| *s == 400)),
            "{name}: {got:?}\n{text}"
        );
        let seen = backend.take();
        assert!(
            seen.iter().all(|s| !s.target.starts_with("/admin")),
            "{name}: a smuggled request reached the backend: {seen:?}"
        );
    }
}

#[tokio::test]
async fn control_characters_cannot_inject_headers_toward_the_backend() {
    let backend = Backend::ok().await;
    let proxy = proxy_for(&backend, "").await;
    for bad in [
        "X-Forwarded-For: 1.2.3.4\r\n\rX-Authenticated-User: admin\r\n",
        "X-Note: a\0b\r\n",
        "X-Note: a\rX-Authenticated-User: admin\r\n",
    ] {
        let request = format!("GET /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n{bad}\r\n");
        let text = raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(statuses(&text), vec![400], "{bad:?}: {text}");
    }
    assert_eq!(backend.count(), 0);
    // The identity header the backend sees is portcullis' own, whatever the client sent.
    let r = get(
        &proxy.url("/api"),
        &[("x-api-key", PROD_KEY), ("x-authenticated-user", "admin")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    let values: Vec<_> = seen[0]
        .headers
        .get_all("x-authenticated-user")
        .iter()
        .collect();
    assert_eq!(values, vec!["production-backend"]);
}

#[tokio::test]
async fn an_oversized_request_line_is_refused_before_the_backend() {
    let backend = Backend::ok().await;
    let proxy = Proxy::with_server(&backend.url(), "max_header_bytes = \"8KiB\"").await;
    let long = "a".repeat(64 * 1024);
    let request = format!("GET /{long} HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    let text = raw(proxy.addr, request.as_bytes()).await;
    let got = statuses(&text);
    assert!(
        got == vec![414] || got == vec![431],
        "a 64 KiB request line: {got:?}"
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn absolute_form_targets_are_forwarded_as_the_path_that_was_authorised() {
    let backend = Backend::ok().await;
    let proxy = proxy_for(&backend, "").await;
    // The restricted key may use /api/* only: an absolute-form target naming another host
    // and an allowed-looking path must be judged and forwarded on its path alone.
    let request = format!(
        "GET http://evil.example/admin HTTP/1.1\r\nHost: api.internal\r\nX-API-Key: {RESTRICTED_KEY}\r\nConnection: close\r\n\r\n"
    );
    let text = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&text), vec![403], "{text}");
    let request = format!(
        "GET http://evil.example/api/x HTTP/1.1\r\nHost: api.internal\r\nX-API-Key: {RESTRICTED_KEY}\r\nConnection: close\r\n\r\n"
    );
    let text = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(statuses(&text), vec![200], "{text}");
    let seen = backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/api/x");
    // The backend's Host is the upstream's, never the one in the request target.
    assert_eq!(seen[0].headers["host"], backend.addr.to_string());
}

#[tokio::test]
async fn a_bad_request_on_one_connection_leaves_the_others_alone() {
    let backend = Backend::ok().await;
    let proxy = proxy_for(&backend, "").await;
    let mut good = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    good.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = good.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let text = raw(proxy.addr, b"GARBAGE\r\n\r\n").await;
    assert_eq!(statuses(&text), vec![400]);
    good.write_all(request.as_bytes()).await.unwrap();
    let n = good.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "the other connection was disturbed"
    );
}

/// A backend that reads one request and then does `what` with the socket.
async fn faulty_backend(what: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                match what {
                    "reset" => {
                        // Linger 0: close with RST. Blocking on drop is no concern with 0.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        drop(s);
                    }
                    "garbage" => {
                        let _ = s.write_all(b"this is not HTTP\r\n\r\n").await;
                    }
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    "stall" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")
                            .await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    "short" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a part")
                            .await;
                    }
                    _ => unreachable!(),
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn backend_faults_give_the_documented_status_and_never_hang() {
    for (what, want) in [("reset", 502), ("garbage", 502), ("hang", 504)] {
        let addr = faulty_backend(what).await;
        let proxy = Proxy::start(&format!("http://{addr}"), "response_timeout = \"500ms\"").await;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            get(&proxy.url("/x"), &[("x-api-key", PROD_KEY)]),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the client hung"));
        assert_eq!(r.status, want, "{what}");
        assert!(r.headers.contains_key("x-request-id"));
    }
    // A response cut short: the client sees an error, not a complete short body.
    let addr = faulty_backend("short").await;
    let proxy = Proxy::start(&format!("http://{addr}"), "").await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/x"))
                .header("x-api-key", PROD_KEY)
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the cut body ends promptly");
    assert!(body.is_err(), "a truncated body looked complete");
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_at_stream_idle_timeout() {
    let addr = faulty_backend("stall").await;
    let proxy =
        Proxy::with_server(&format!("http://{addr}"), "stream_idle_timeout = \"300ms\"").await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/x"))
                .header("x-api-key", PROD_KEY)
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the stalled body is cut, not waited on forever");
    assert!(body.is_err());
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "stream_idle_timeout");
}

#[tokio::test]
async fn a_client_that_stops_reading_a_large_response_is_disconnected() {
    let big = bytes::Bytes::from(vec![b'x'; 32 * 1024 * 1024]);
    let backend = Backend::with(move |_req| {
        let big = big.clone();
        async move { http::Response::new(full(big)) }
    })
    .await;
    let proxy = Proxy::with_server(
        &backend.url(),
        "idle_timeout = \"300ms\"\nstream_idle_timeout = \"500ms\"",
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    // The slow reader: reads nothing while the proxy's send buffer fills and stays full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Now drain: a connection the proxy closed ends long before the 32 MiB body does.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection was never closed");
    assert!(
        total < 32 * 1024 * 1024,
        "the whole body was delivered: {total} bytes"
    );
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_are_still_served() {
    let backend = Backend::ok().await;
    let proxy = Proxy::with_server(
        &backend.url(),
        "max_connections_per_ip = 1000\n[rate_limit]\nenabled = false",
    )
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    // Open streams and reset each at once (CVE-2023-44487), far past the server's budget.
    let mut sent = 0;
    for _ in 0..5_000 {
        let req = http::Request::get(format!("http://{}/api", proxy.addr))
            .header("x-api-key", PROD_KEY)
            .body(())
            .unwrap();
        let Ok(ready) = h2.clone().ready().await else {
            break;
        };
        h2 = ready;
        let Ok((response, mut stream)) = h2.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        sent += 1;
    }
    // The server sends GOAWAY (ENHANCE_YOUR_CALM) and closes; the handle is still held
    // here, so the connection can only have ended from the server's side.
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .unwrap_or_else(|_| panic!("the flooding connection was never closed ({sent} resets sent)"))
        .unwrap();
    let err = ended.expect_err("the server ended the connection with an error");
    // GOAWAY(ENHANCE_YOUR_CALM), or the closed socket under the client's next write.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err}"
    );
    let served = backend.count();
    assert!(
        served < sent / 2,
        "{served} of {sent} reset streams reached the backend"
    );
    drop(h2);
    // Everyone else is still served.
    let r = get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 200);
}

/// One HTTP/2 frame: 9-byte header (length, type, flags, stream id) and the payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn an_http2_continuation_flood_is_cut_off_before_the_backend() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
                                                             // HEADERS without END_HEADERS: :method GET, :scheme http, :path /, :authority, x-api-key.
    let authority = proxy.addr.to_string();
    let mut block = vec![0x82, 0x86, 0x84, 0x41, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    block.extend_from_slice(&[0x00, 9]);
    block.extend_from_slice(b"x-api-key");
    block.push(PROD_KEY.len() as u8);
    block.extend_from_slice(PROD_KEY.as_bytes());
    tcp.write_all(&h2_frame(0x1, 0x1, 1, &block)).await.unwrap();
    // Then CONTINUATION frames that never end the header block (CVE-2024-27316 and kin): each
    // one a small valid header field, so only a bound on the frames or the list stops it.
    let mut field = vec![0x00, 3];
    field.extend_from_slice(b"x-p");
    field.push(16);
    field.extend_from_slice(b"aaaaaaaaaaaaaaaa");
    let frame = h2_frame(0x9, 0, 1, &field);
    let flood = frame.repeat(1_000);
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        for _ in 0..200 {
            if wr.write_all(&flood).await.is_err() {
                return (sent, true);
            }
            sent += 1_000;
        }
        (sent, false)
    });
    // The server answers with GOAWAY and closes; read until it does.
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the flooding connection was never closed");
    let (sent, write_failed) = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the flood writer finished")
        .unwrap();
    assert!(
        write_failed,
        "all {sent} CONTINUATION frames (about {} MB) were accepted",
        sent * frame.len() / 1_000_000
    );
    // A GOAWAY frame (type 7) is among what the server sent before closing.
    let mut at = 0;
    let mut goaway = false;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        goaway |= got[at + 3] == 0x7;
        at += 9 + len;
    }
    assert!(goaway, "no GOAWAY in {} bytes from the server", got.len());
    assert_eq!(
        backend.count(),
        0,
        "the unfinished request reached the backend"
    );
    // Everyone else is still served.
    let r = get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 200);
}
