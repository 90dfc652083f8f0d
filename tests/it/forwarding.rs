//! What the backend sees and what the client gets back (DESIGN.md §5), and backend failures.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;

use crate::support::*;

fn key() -> [(&'static str, &'static str); 1] {
    [("x-api-key", PROD_KEY)]
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let r = get(
        &proxy.url("/api/x?a=1&b=2"),
        &[
            ("x-api-key", PROD_KEY),
            ("host", "public.example"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=203.0.113.9"),
            ("mcp-session-id", "session-123"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take().remove(0);
    assert_eq!(seen.target, "/api/x?a=1&b=2");
    let h = &seen.headers;
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "forwarded",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the backend");
    }
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "public.example");
    assert_eq!(h["host"], backend.addr.to_string().as_str());
    assert_eq!(h["mcp-session-id"], "session-123");
    // The request id is generated, sent upstream and echoed to the client.
    let rid = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(rid.len(), 32);
    assert_eq!(h["x-request-id"], rid);
}

#[tokio::test]
async fn a_client_request_id_is_kept_and_the_client_host_can_be_preserved() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "host_header = \"preserve\"").await;
    let r = get(
        &proxy.url("/"),
        &[
            ("x-api-key", PROD_KEY),
            ("x-request-id", "abc-123"),
            ("host", "mcp.internal:8443"),
        ],
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    let seen = backend.take().remove(0);
    assert_eq!(seen.headers["x-request-id"], "abc-123");
    assert_eq!(seen.headers["host"], "mcp.internal:8443");
    // A request id with spaces or control characters is replaced.
    let r = get(
        &proxy.url("/"),
        &[("x-api-key", PROD_KEY), ("x-request-id", "a b")],
    )
    .await;
    assert_ne!(r.headers["x-request-id"], "a b");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let backend = Backend::with(|_req| async {
        Response::builder()
            .header("connection", "x-internal")
            .header("x-internal", "secret")
            .header("keep-alive", "timeout=3")
            .header("x-end-to-end", "yes")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let r = get(&proxy.url("/"), &key()).await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("x-internal"));
    assert!(!r.headers.contains_key("keep-alive"));
    assert_eq!(r.headers["x-end-to-end"], "yes");
}

#[tokio::test]
async fn bodies_are_forwarded_whole_and_oversized_ones_refused_with_413() {
    let backend = Backend::recording_bodies().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n[upstream]\nurl = \"{}\"\n",
        backend.url()
    ))
    .await;
    let body = "x".repeat(1024);
    let r = send("POST", &proxy.url("/up"), &key(), &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(backend.take()[0].body.len(), 1024);

    // Declared too large: refused before anything is forwarded.
    let r = send("POST", &proxy.url("/up"), &key(), &"x".repeat(1025)).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), "payload_too_large");
    assert_eq!(backend.count(), 0);

    // Chunked, with no length: cut off once it passes the limit.
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send(Ok(Bytes::from(vec![b'y'; 512]))).await.is_err() {
                break;
            }
        }
    });
    let req = http::Request::post(proxy.url("/up"))
        .header("x-api-key", PROD_KEY)
        .body(body)
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn a_dead_backend_gives_502_and_a_slow_one_504() {
    let dead = dead_addr();
    let proxy = Proxy::start(&format!("http://{dead}"), "").await;
    let r = get(&proxy.url("/"), &key()).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unavailable");

    let slow = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(full("late"))
    })
    .await;
    let proxy = Proxy::start(&slow.url(), "response_timeout = \"300ms\"").await;
    let started = Instant::now();
    let r = get(&proxy.url("/"), &key()).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_streamed_response_reaches_the_client_before_the_backend_finishes() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let backend = Backend::with(move |_req| {
        let mut release = release_rx.clone();
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"data: first\n\n"))).await;
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: second\n\n"))).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let req = http::Request::get(proxy.url("/sse"))
        .header("x-api-key", PROD_KEY)
        .body(full(""))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrives while the backend is still writing")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    release_tx.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: second\n\n");
}

#[tokio::test]
async fn a_backend_that_resets_mid_body_does_not_hang_the_client() {
    let backend = Backend::with(|_req| async {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let _ = tx.send(Ok(Bytes::from_static(b"partial"))).await;
            let _ = tx.send(Err("backend failed".into())).await;
        });
        Response::builder()
            .header("content-length", "1000")
            .body(body)
            .unwrap()
    })
    .await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let req = http::Request::get(proxy.url("/"))
        .header("x-api-key", PROD_KEY)
        .body(full(""))
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let resp = client().request(req).await?;
        resp.into_body().collect().await.map_err(|e| e.into())
    })
    .await
    .expect("the client is not left hanging");
    // Whether the head was flushed before the failure or not, the client sees an error, never a
    // complete-looking response.
    let _: &Result<_, Box<dyn std::error::Error + Send + Sync>> = &outcome;
    assert!(
        outcome.is_err(),
        "a truncated body must surface as an error"
    );
}

#[tokio::test]
async fn http2_clients_are_served_and_forwarded_to_an_http1_backend() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let r = send_with(&h2_client(), "GET", &proxy.url("/h2"), &key(), "").await;
    assert_eq!(r.status, 200);
    let seen = backend.take().remove(0);
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["x-authenticated-user"], "production-backend");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr.to_string().as_str()
    );
}

#[tokio::test]
async fn readiness_reports_credentials_and_backend_reachability() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let admin = format!("http://{}", proxy.admin);
    assert_eq!(get(&format!("{admin}/healthz"), &[]).await.status, 200);
    let r = get(&format!("{admin}/readyz"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["credentials"]["keys"]["enabled"], 4);
    assert_eq!(r.json()["upstream"]["reachable"], true);
    let dead = dead_addr();
    let proxy = Proxy::start(&format!("http://{dead}"), "").await;
    let r = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["upstream"]["reachable"], false);
}

#[tokio::test]
async fn an_h2c_upstream_receives_http2_with_te_trailers_for_grpc() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "protocol = \"http2\"").await;
    let r = get(
        &proxy.url("/pkg.Service/Method"),
        &[("x-api-key", PROD_KEY), ("te", "trailers")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take().remove(0);
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["x-authenticated-user"], "production-backend");
}
