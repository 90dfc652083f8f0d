//! WebSocket through the proxy: HTTP/1.1 upgrades and HTTP/2 extended CONNECT, against a
//! real tungstenite echo backend.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use portcullis::streams::StreamKind;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::support::*;
#[tokio::test]
async fn websocket_frames_of_every_kind_cross_the_proxy() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("authorization", &bearer(PROD_KEY))])
        .await
        .unwrap();
    wait_streams(&proxy, StreamKind::WebSocket, 1).await;

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(big));
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match next_message(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected the backend's close echo, got {other:?}"),
    }
    wait_streams(&proxy, StreamKind::WebSocket, 0).await;

    // The backend saw who the caller is and never the key.
    let seen = backend.last_headers.lock().unwrap().clone();
    assert_eq!(seen["x-authenticated-user"], "production-backend");
    assert!(seen.get("authorization").is_none());
    assert_eq!(seen["upgrade"], "websocket");

    // The access log line is written when the tunnel ends, with status 101.
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["status"], 101);
    assert_eq!(lines[0]["outcome"], "ok");
    assert!(lines[0]["bytes"].as_u64().unwrap() > 1024 * 1024);
}

#[tokio::test]
async fn a_refused_handshake_never_reaches_the_backend() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    for (headers, status) in [
        (vec![], 403),
        (vec![("x-api-key", "mas_wrong")], 401),
        (vec![("x-api-key", DISABLED_KEY)], 401),
        // The restricted key may use /mcp but not /admin.
        (vec![("x-api-key", RESTRICTED_KEY)], 403),
    ] {
        match connect_ws(&proxy, "/admin", &headers).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), status, "{headers:?}"),
            other => panic!(
                "expected a refusal for {headers:?}, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    assert_eq!(backend.handshakes.load(Ordering::SeqCst), 0);
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", RESTRICTED_KEY)])
        .await
        .unwrap();
    ws.send(Message::text("allowed")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("allowed"));
}

#[tokio::test]
async fn two_hundred_concurrent_sessions_through_one_proxy() {
    let backend = EchoBackend::start().await;
    // Every session comes from 127.0.0.1 with one key: lift the per-client limits.
    let proxy = Proxy::with_server(
        &backend.url(),
        "max_connections_per_ip = 1000\n[rate_limit]\nenabled = false",
    )
    .await;
    let proxy = Arc::new(proxy);
    let mut sessions = Vec::new();
    for i in 0..200 {
        let proxy = proxy.clone();
        sessions.push(tokio::spawn(async move {
            let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
                .await
                .unwrap();
            for round in 0..3 {
                let text = format!("session {i} round {round}");
                ws.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(next_message(&mut ws).await, Message::text(text));
            }
            ws
        }));
    }
    let mut open = Vec::new();
    for s in sessions {
        open.push(s.await.unwrap());
    }
    wait_streams(&proxy, StreamKind::WebSocket, 200).await;
    drop(open);
    wait_streams(&proxy, StreamKind::WebSocket, 0).await;
}

#[tokio::test]
async fn revoking_a_credential_closes_its_websockets_only() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut prod = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    let mut web = connect_ws(&proxy, "/mcp", &[("x-api-key", WEB_KEY)])
        .await
        .unwrap();
    wait_streams(&proxy, StreamKind::WebSocket, 2).await;

    let streams = proxy.inner().streams.clone();
    let prod_digest = portcullis::auth::api_key::digest(PROD_KEY.as_bytes());
    let closed = streams.revoke(|c| *c == portcullis::auth::CredId::Key(prod_digest));
    assert_eq!(closed, 1);
    until_closed(&mut prod).await;
    wait_streams(&proxy, StreamKind::WebSocket, 1).await;

    web.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut web).await, Message::text("still here"));
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "revoked");
    assert_eq!(lines[0]["identity"], "production-backend");
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_stream_idle_timeout() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::with_server(
        &backend.url(),
        "stream_idle_timeout = \"300ms\"\nmax_stream_lifetime = \"1h\"",
    )
    .await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    ws.send(Message::text("one")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("one"));
    until_closed(&mut ws).await;
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "stream_idle_timeout");
}

#[tokio::test]
async fn a_websocket_is_closed_at_max_stream_lifetime() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::with_server(&backend.url(), "max_stream_lifetime = \"500ms\"").await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    until_closed(&mut ws).await;
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "stream_lifetime");
}

#[tokio::test]
async fn websocket_toward_an_http2_upstream_is_refused_with_501() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&backend.url(), "protocol = \"http2\"").await;
    match connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)]).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 501),
        other => panic!("expected 501, got {:?}", other.map(|_| ())),
    }
    assert_eq!(backend.handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_an_http1_backend() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let mut resp = h2_websocket(&proxy, "/mcp", PROD_KEY).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    ws.send(Message::text("over h2")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("over h2"));
    wait_streams(&proxy, StreamKind::WebSocket, 1).await;
    let seen = backend.last_headers.lock().unwrap().clone();
    assert!(seen.contains_key("sec-websocket-key"));
    ws.close(None).await.unwrap();
    wait_streams(&proxy, StreamKind::WebSocket, 0).await;
}

#[tokio::test]
async fn a_plain_connect_is_refused() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let text = raw(
        proxy.addr,
        format!(
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nX-API-Key: {PROD_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&text), 400);
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn shutdown_closes_open_websockets_when_the_grace_runs_out() {
    let backend = EchoBackend::start().await;
    let mut proxy = Proxy::with_server(&backend.url(), "shutdown_grace = \"300ms\"").await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before"));
    let server = proxy.server.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown waited on the tunnel forever");
    until_closed(&mut ws).await;
}

#[tokio::test]
async fn a_backend_that_drops_a_websocket_closes_the_client_side_too() {
    // Answers the handshake, echoes one message, then drops the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                if let Some(Ok(msg)) = ws.next().await {
                    let _ = ws.send(msg).await;
                }
                drop(ws);
            });
        }
    });
    let proxy = Proxy::start(&format!("http://{addr}"), "").await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    ws.send(Message::text("last")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("last"));
    until_closed(&mut ws).await;
    wait_streams(&proxy, StreamKind::WebSocket, 0).await;
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["status"], 101);
}
