//! Streaming responses (SSE, MCP Streamable HTTP), HTTP/2 and gRPC through the proxy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis::streams::StreamKind;

use crate::support::*;

#[tokio::test]
async fn each_sse_event_is_forwarded_at_once_and_the_stream_outlives_response_timeout() {
    let sse = SseBackend::start().await;
    let proxy = Proxy::start(&sse.backend.url(), "response_timeout = \"500ms\"").await;
    let resp = open_stream(
        &proxy,
        &[
            ("x-api-key", PROD_KEY),
            ("accept", "text/event-stream"),
            ("last-event-id", "41"),
            ("mcp-session-id", "session-1234"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["mcp-session-id"], "session-1234");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let tx = sse.sender(0).await;
    wait_streams(&proxy, StreamKind::Sse, 1).await;

    // The second event is written only after the first has reached the client: a proxy that
    // buffered would never deliver the first.
    event(&tx, "one").await;
    assert_eq!(
        next_chunk(&mut body).await.unwrap().unwrap(),
        "data: one\n\n"
    );
    // Longer than response_timeout, which bounds only the wait for headers.
    tokio::time::sleep(Duration::from_millis(800)).await;
    event(&tx, "two").await;
    assert_eq!(
        next_chunk(&mut body).await.unwrap().unwrap(),
        "data: two\n\n"
    );
    drop(tx);
    sse.senders.lock().unwrap().clear();
    assert!(
        next_chunk(&mut body).await.is_none(),
        "the stream ends cleanly"
    );
    wait_streams(&proxy, StreamKind::Sse, 0).await;

    let seen = sse.backend.take();
    assert_eq!(seen[0].headers["accept"], "text/event-stream");
    assert_eq!(seen[0].headers["last-event-id"], "41");
    assert_eq!(seen[0].headers["mcp-session-id"], "session-1234");
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["bytes"], 22);
}

#[tokio::test]
async fn a_client_that_goes_away_closes_the_backend_stream() {
    let sse = SseBackend::start().await;
    let proxy = Proxy::start(&sse.backend.url(), "").await;
    let resp = open_stream(&proxy, &[("x-api-key", PROD_KEY)]).await;
    let mut body = resp.into_body();
    let tx = sse.sender(0).await;
    event(&tx, "one").await;
    next_chunk(&mut body).await.unwrap().unwrap();
    drop(body);
    sse.senders.lock().unwrap().clear();

    let closed = tokio::time::timeout(Duration::from_secs(10), tx.closed()).await;
    assert!(closed.is_ok(), "the backend's stream is still open");
    wait_streams(&proxy, StreamKind::Sse, 0).await;
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "client_closed");
}

#[tokio::test]
async fn revoking_a_credential_cuts_its_streams_and_the_backend_sees_it() {
    let sse = SseBackend::start().await;
    let proxy = Proxy::start(&sse.backend.url(), "").await;
    let mut revoked = open_stream(&proxy, &[("x-api-key", PROD_KEY)])
        .await
        .into_body();
    let tx_revoked = sse.sender(0).await;
    let mut kept = open_stream(&proxy, &[("x-api-key", WEB_KEY)])
        .await
        .into_body();
    let tx_kept = sse.sender(1).await;
    wait_streams(&proxy, StreamKind::Sse, 2).await;

    let streams = proxy.inner().streams.clone();
    let digest = portcullis::auth::api_key::digest(PROD_KEY.as_bytes());
    assert_eq!(
        streams.revoke(|c| *c == portcullis::auth::CredId::Key(digest)),
        1
    );
    // A cut stream is an error for the client, never a clean end.
    assert!(matches!(next_chunk(&mut revoked).await, Some(Err(_))));
    sse.senders.lock().unwrap().clear();
    let closed = tokio::time::timeout(Duration::from_secs(10), tx_revoked.closed()).await;
    assert!(closed.is_ok(), "the backend's stream is still open");
    wait_streams(&proxy, StreamKind::Sse, 1).await;

    event(&tx_kept, "still here").await;
    assert_eq!(
        next_chunk(&mut kept).await.unwrap().unwrap(),
        "data: still here\n\n"
    );
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "revoked");
}

#[tokio::test]
async fn a_silent_stream_is_closed_after_stream_idle_timeout() {
    let sse = SseBackend::start().await;
    let proxy = Proxy::with_server(&sse.backend.url(), "stream_idle_timeout = \"300ms\"").await;
    let mut body = open_stream(&proxy, &[("x-api-key", PROD_KEY)])
        .await
        .into_body();
    let tx = sse.sender(0).await;
    event(&tx, "one").await;
    next_chunk(&mut body).await.unwrap().unwrap();
    assert!(matches!(next_chunk(&mut body).await, Some(Err(_))));
    wait_streams(&proxy, StreamKind::Sse, 0).await;
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "stream_idle_timeout");
}

#[tokio::test]
async fn a_response_of_unknown_length_is_registered_as_a_stream() {
    let (tx_slot, rx_slot) = tokio::sync::oneshot::channel::<Sender>();
    let tx_slot = Arc::new(Mutex::new(Some(tx_slot)));
    let backend = Backend::with(move |_req| {
        let slot = tx_slot.lock().unwrap().take();
        async move {
            let (tx, body) = channel_body();
            if let Some(slot) = slot {
                let _ = slot.send(tx);
            }
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert("content-type", "application/x-ndjson".parse().unwrap());
            resp
        }
    })
    .await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut body = open_stream(&proxy, &[("x-api-key", PROD_KEY)])
        .await
        .into_body();
    let tx = rx_slot.await.unwrap();
    tx.send(Ok(Bytes::from_static(b"{\"n\":1}\n")))
        .await
        .unwrap();
    assert_eq!(next_chunk(&mut body).await.unwrap().unwrap(), "{\"n\":1}\n");
    wait_streams(&proxy, StreamKind::Stream, 1).await;
    drop(tx);
    assert!(next_chunk(&mut body).await.is_none());
    wait_streams(&proxy, StreamKind::Stream, 0).await;

    // A response with a Content-Length is not a stream.
    let r = get(&proxy.url("/plain"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 200);
    let streams = proxy.inner().streams.clone();
    for kind in StreamKind::ALL {
        assert_eq!(streams.active(kind), 0);
    }
}

/// An h2c backend answering like a gRPC server: a message, then `grpc-status` in trailers.
async fn grpc_backend() -> Backend {
    Backend::with(|_req| async {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames: Vec<Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut resp = Response::new(body.boxed());
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        resp
    })
    .await
}

async fn grpc_call(proxy: &Proxy, path: &str, key: Option<&str>) -> Response<Incoming> {
    let mut req = Request::post(proxy.url(path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    h2_client()
        .request(req.body(full(&b"\0\0\0\0\x02hi"[..])).unwrap())
        .await
        .expect("a response")
}

#[tokio::test]
async fn a_grpc_unary_call_gets_its_trailers_through_h2c_both_ways() {
    let backend = grpc_backend().await;
    let proxy = Proxy::start(&backend.url(), "protocol = \"http2\"").await;
    let resp = grpc_call(&proxy, "/echo.Echo/Say", Some(PROD_KEY)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
    let seen = backend.take();
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert_eq!(seen[0].headers["te"], "trailers");
}

#[tokio::test]
async fn grpc_calls_are_refused_with_grpc_status_codes() {
    let backend = grpc_backend().await;
    let proxy = Proxy::start(&backend.url(), "protocol = \"http2\"").await;
    for (path, key, status) in [
        ("/echo.Echo/Say", None, "16"),
        ("/echo.Echo/Say", Some("mas_not_a_key"), "16"),
        ("/echo.Echo/Say", Some(RESTRICTED_KEY), "7"),
    ] {
        let resp = grpc_call(&proxy, path, key).await;
        assert_eq!(resp.status(), 200, "{key:?}");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], status, "{key:?}");
        assert!(resp.headers().contains_key("grpc-message"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty());
    }
    assert_eq!(backend.count(), 0);
}
