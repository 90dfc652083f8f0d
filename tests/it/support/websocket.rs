//! A WebSocket echo backend (recording what it was sent) and a WebSocket client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::*;

/// A WebSocket echo server on loopback that counts handshakes and keeps the last one's headers.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub handshakes: Arc<AtomicUsize>,
    pub last_headers: Arc<Mutex<HeaderMap>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let last_headers = Arc::new(Mutex::new(HeaderMap::new()));
        let (h, l) = (handshakes.clone(), last_headers.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, l) = (h.clone(), l.clone());
                tokio::spawn(async move {
                    // The callback's signature is tungstenite's; its error type is large.
                    #[allow(clippy::result_large_err)]
                    fn record(
                        h: &AtomicUsize,
                        l: &Mutex<HeaderMap>,
                        req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                        resp: tokio_tungstenite::tungstenite::handshake::server::Response,
                    ) -> Result<
                        tokio_tungstenite::tungstenite::handshake::server::Response,
                        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
                    > {
                        *l.lock().unwrap() = req.headers().clone();
                        h.fetch_add(1, Ordering::SeqCst);
                        Ok(resp)
                    }
                    #[allow(clippy::result_large_err)]
                    let record = |req: &_, resp| record(&h, &l, req, resp);
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    // tungstenite answers pings and closes by itself.
                    while let Some(Ok(msg)) = ws.next().await {
                        let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                        if echo && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoBackend {
            addr,
            handshakes,
            last_headers,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// For a backend built on [`Backend::with`]: if `req` is a WebSocket handshake, answer 101 and
/// echo its text messages once upgraded.
pub fn websocket_echo(
    req: &mut http::Request<hyper::body::Incoming>,
) -> Option<http::Response<Body>> {
    let key = req.headers().get("sec-websocket-key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(up), Role::Server, None)
                .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    Some(
        http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap(),
    )
}

/// Open a WebSocket to the proxy at `path` with `headers`.
pub async fn connect_ws(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, WsError> {
    let mut req = format!("ws://{}{path}", proxy.addr)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (ws, _resp) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(ws)
}

pub async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream is open")
        .expect("a valid message")
}

/// Wait until the connection ends (close frame, EOF or reset); panics after 10 s.
pub async fn until_closed<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the WebSocket was not closed");
}

/// Ask for a WebSocket over HTTP/2 (RFC 8441 extended CONNECT) on `path` with `key`; the
/// response, whose upgrade the caller may take.
pub async fn h2_websocket(
    proxy: &Proxy,
    path: &str,
    key: &str,
) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}{path}", proxy.addr))
        .header("sec-websocket-version", "13")
        .header("x-api-key", key)
        .body(full(""))
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    send.send_request(req).await.unwrap()
}
