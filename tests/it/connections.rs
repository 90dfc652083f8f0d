//! Connection-level limits: header size and time, idle keep-alive, max_connections.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

async fn proxy_with(server: &str) -> (Backend, Proxy) {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n[upstream]\nurl = \"{}\"\n",
        backend.url()
    ))
    .await;
    (backend, proxy)
}

/// Read until the peer closes; returns what was read and how long it took.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<(String, Duration)> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((String::from_utf8_lossy(&out).into_owned(), start.elapsed()))
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let (backend, proxy) = proxy_with("max_header_bytes = \"8KiB\"").await;
    let big = "a".repeat(16 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\nX-Big: {big}\r\n\r\n");
    let text = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&text), 431, "{text}");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn a_client_trickling_headers_is_cut_off_at_header_read_timeout() {
    let (backend, proxy) = proxy_with("header_read_timeout = \"500ms\"").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let (_, took) = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the slow client is disconnected");
    // Well before hyper's or the kernel's own limits would end it.
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    // Meanwhile an ordinary client is served.
    assert_eq!(
        get(&proxy.url("/"), &[("x-api-key", PROD_KEY)])
            .await
            .status,
        200
    );
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let (_backend, proxy) = proxy_with("idle_timeout = \"500ms\"").await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (text, took) = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the idle connection is closed");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Closed by the idle timeout, not by the 10 s header_read_timeout default.
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_once() {
    let (_backend, proxy) = proxy_with("max_connections = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        // A complete request proves the connection holds a slot.
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (text, _) = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("the third connection is closed");
    assert!(text.is_empty(), "{text}");
    // A freed slot is usable again.
    drop(held.pop());
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let text = raw(proxy.addr, format!("GET / HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\nConnection: close\r\n\r\n").as_bytes()).await;
            if !text.is_empty() {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a freed connection slot is reused");
    assert_eq!(raw_status(&r), 200);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_header_read_timeout() {
    let (backend, proxy) =
        proxy_with("header_read_timeout = \"500ms\"\nidle_timeout = \"60s\"").await;
    // Silent, and stalled inside the HTTP/2 preface (which the proxy must wait out to tell
    // the protocol): both are clients that never send a request.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut partial = TcpStream::connect(proxy.addr).await.unwrap();
    partial.write_all(b"PR").await.unwrap();
    for (what, s) in [("silent", &mut silent), ("partial preface", &mut partial)] {
        let (text, _) = read_until_closed(s, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("the {what} connection is closed"));
        assert_eq!(text, "", "{what}");
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{what}: closed after {took:?}"
        );
    }
    assert_eq!(
        get(&proxy.url("/"), &[("x-api-key", PROD_KEY)])
            .await
            .status,
        200
    );
    assert_eq!(backend.count(), 1);
}
