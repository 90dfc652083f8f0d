//! `portcullis demo`: a built-in echo backend behind the proxy on loopback, with a fresh key,
//! so a newcomer sees the proxy work before writing any config.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::auth::api_key;
use crate::config::Config;
use crate::server::text_response;
use crate::server::Server;

type EchoBody = BoxBody<Bytes, Infallible>;

/// Answer every request with a JSON description of what arrived: method, path, query, the
/// headers and the body length. What the backend is shown is exactly what it prints.
/// `/events` answers with a short Server-Sent Events stream, and a WebSocket upgrade with a
/// greeting frame.
pub async fn echo(mut req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    if let Some(accept) = websocket_accept(&req) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let text = b"hello from the echo backend, over a WebSocket through portcullis";
                // One unmasked text frame (RFC 6455 §5.2), then wait for the client to leave.
                let mut frame = vec![0x81, text.len() as u8];
                frame.extend_from_slice(text);
                let _ = io.write_all(&frame).await;
                let mut sink = [0u8; 1024];
                while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(Empty::new().boxed())
            .expect("a valid response");
        return Ok(resp);
    }
    if req.uri().path() == "/events" {
        return Ok(events());
    }
    let (parts, body) = req.into_parts();
    let body_len = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "backend": "echo",
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_len,
    });
    Ok(
        text_response(StatusCode::OK, "application/json", format!("{body:#}\n"))
            .map(BodyExt::boxed),
    )
}

/// `Sec-WebSocket-Accept` for a WebSocket handshake (RFC 6455 §4.2.2), if this is one.
fn websocket_accept(req: &Request<Incoming>) -> Option<String> {
    use base64::Engine;
    use sha1::Digest;
    let upgrade = req.headers().get(header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY)?.as_bytes();
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(sha.finalize()))
}

/// Five events, one a second: each reaches the client as soon as it is written.
fn events() -> Response<EchoBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for n in 1..=5 {
            let event = format!("id: {n}\ndata: {{\"tick\": {n}}}\n\n");
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let frames = channel_body(rx);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(frames)
        .expect("a valid response")
}

/// A body that yields what arrives on `rx` until it closes.
fn channel_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> EchoBody {
    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);
    impl http_body::Body for Channel {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
        }
    }
    Channel(rx).boxed()
}

/// Serve [`echo`] on `listener` until the task is dropped.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

/// A scratch directory removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the demo until Ctrl-C.
pub async fn run() -> anyhow::Result<()> {
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(serve_echo(backend));

    let key = api_key::generate("mas_")?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix)?;
    let dir =
        ScratchDir(std::env::temp_dir().join(format!("portcullis-demo-{}", api_key::hex(&suffix))));
    std::fs::create_dir_all(&dir.0)?;
    let keys = format!(
        "# Stored as a digest: the plaintext key is never written to disk.\n\
         [[keys]]\nname = \"demo-client\"\n{}\nenabled = true\n",
        api_key::sha256_entry(&key)
    );
    std::fs::write(dir.0.join("keys.toml"), keys)?;
    // An htpasswd user as `htpasswd -B` would write it (bcrypt, cost 10).
    let password = api_key::generate("pw-")?[3..23].to_string();
    let hash = bcrypt::hash(&password, 10)?;
    std::fs::write(dir.0.join("htpasswd"), format!("demo-user:{hash}\n"))?;
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
         [upstream]\nurl = \"http://{backend_addr}\"\n\
         [auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\npublic_paths = [\"/public/*\"]\n\
         [log]\naccess_format = \"combined\"\n"
    );
    let config_path = dir.0.join("proxy.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path).map_err(|d| anyhow::anyhow!("{d}"))?;
    let server = Server::bind(config).await?;
    print_instructions(
        server.local_addr(),
        server.admin_addr(),
        backend_addr,
        &key,
        &password,
    );

    tokio::signal::ctrl_c().await?;
    eprintln!("\nstopping the demo…");
    server.shutdown().await;
    Ok(())
}

fn print_instructions(
    proxy: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    key: &str,
    password: &str,
) {
    println!(
        r#"
portcullis demo: an echo backend on {backend}, protected by portcullis on {proxy}.

The demo key (shown once; the keys file holds only its SHA-256):
  {key}

With the key, the request reaches the backend, which echoes what it was shown
(note x-authenticated-user, x-forwarded-*, and that the key itself was not passed on): 200
  curl -i -H 'Authorization: Bearer {key}' http://{proxy}/api/v1/invoke

The same key in X-API-Key: 200
  curl -i -H 'X-API-Key: {key}' http://{proxy}/api/v1/invoke

HTTP Basic against the htpasswd file (user demo-user, bcrypt cost 10): 200. The first
request pays for bcrypt; the next ones are served from the verification cache.
  curl -i -u 'demo-user:{password}' http://{proxy}/api/v1/invoke

No credentials: 401 with a Basic challenge, and the backend never sees the request
  curl -i http://{proxy}/api/v1/invoke

A wrong password: 401 (ten failures in a minute ban the client for 15 minutes: 429)
  curl -i -u 'demo-user:wrong' http://{proxy}/api/v1/invoke

A wrong key: 401 invalid_token
  curl -i -H 'Authorization: Bearer mas_not_a_real_key_0000000000' http://{proxy}/api/v1/invoke

A public path (public_paths = ["/public/*"]): 200 without a key
  curl -i http://{proxy}/public/status

A path trick: normalised to /api/v1/invoke before the check, so it is not public: 401
  curl -i --path-as-is 'http://{proxy}/public/../api/v1/invoke'

A Server-Sent Events stream: five events, each printed the moment the backend sends it
  curl -N -H 'X-API-Key: {key}' http://{proxy}/events

A WebSocket handshake: 101 Switching Protocols, and the tunnel stays open until Ctrl-C.
The same handshake without the key gets 401 and never reaches the backend.
  curl -i -N --http1.1 -H 'X-API-Key: {key}' -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
       http://{proxy}/mcp

Health and readiness (admin listener, loopback only):
  curl -i http://{admin}/readyz

Access log lines follow below (Apache combined format). Ctrl-C stops the demo.
"#
    );
}
