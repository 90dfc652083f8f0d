//! A real backend and a real proxy on 127.0.0.1:0, and clients that speak to them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod binary;
mod metrics;
pub mod peers;
pub mod pki;
mod streams;
mod websocket;

pub use binary::*;
pub use metrics::*;
pub use peers::*;
pub use streams::*;
pub use websocket::*;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The three keys of the deployment guides' key list: two enabled, one disabled.
pub const PROD_KEY: &str = "mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ";
pub const WEB_KEY: &str = "mas_Wb7xQ2cL9vKp4RtY1nZs8HdF3gJm6UaE0iOwBqXyTcVrNkPl5eDhGj";
pub const DISABLED_KEY: &str = "mas_Dz3kP9sL2mQ7vX1cR8nB4tY6wH0jF5gA_eUoIiKlMnOpZrStUvWxY2";
pub const EXPIRED_KEY: &str = "mas_Ex9pired0000000000000000000000000000000000000000000000";
pub const RESTRICTED_KEY: &str = "mas_Re5trictedKey000000000000000000000000000000000000000000";

pub fn keys_file() -> String {
    format!(
        r#"
[[keys]]
name = "production-backend"
api_key = "{PROD_KEY}"
enabled = true

[[keys]]
name = "web-application"
sha256 = "{web}"
enabled = true

[[keys]]
name = "disabled-key"
api_key = "{DISABLED_KEY}"
enabled = false

[[keys]]
name = "old-key"
api_key = "{EXPIRED_KEY}"
expires = "2020-01-01T00:00:00Z"

[[keys]]
name = "restricted"
api_key = "{RESTRICTED_KEY}"
allow = ["GET /api/*", "POST /api/v1/invoke", "* /mcp"]
"#,
        web = sha256_hex(WEB_KEY)
    )
}

pub fn sha256_hex(s: &str) -> String {
    portcullis::auth::api_key::hex(&portcullis::auth::api_key::digest(s.as_bytes()))
}

/// What the backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// A real HTTP backend on loopback that records every request it sees.
pub struct Backend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<VecDeque<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

impl Backend {
    /// Answers 200 "ok" to everything.
    pub async fn ok() -> Backend {
        Backend::with(|_req| async { Response::new(full("ok")) }).await
    }

    /// Answers with `handler`; the request seen by the handler is recorded first (its body
    /// is read and recorded only by the default handlers).
    pub async fn with<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        Backend::start(handler, true, None).await
    }

    /// An HTTPS backend (h2 and http/1.1 by ALPN) that answers 200 with the HTTP version it
    /// was spoken to in, serving `cert` and `key` (PEM).
    pub async fn tls(cert: &str, key: &str) -> Backend {
        Backend::tls_with(cert, key, |r: Request<Incoming>| async move {
            Response::new(full(format!("{:?}", r.version())))
        })
        .await
    }

    /// An HTTPS backend serving `cert` and `key` (PEM) that answers with `handler`.
    pub async fn tls_with<F, Fut>(cert: &str, key: &str, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        Backend::start(handler, true, Some(Arc::new(config))).await
    }

    /// Records each request with its full body, then answers 200 "ok".
    pub async fn recording_bodies() -> Backend {
        let handler: Handler = Arc::new(|_r| Box::pin(async { Response::new(full("ok")) }));
        Backend::start(handler, false, None).await
    }

    async fn start(
        handler: Handler,
        headers_only: bool,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<VecDeque<Seen>>> = Default::default();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let seen = seen2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let seen = seen.clone();
                        async move {
                            let mut record = Seen {
                                method: req.method().to_string(),
                                target: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: req.headers().clone(),
                                body: Bytes::new(),
                                version: req.version(),
                            };
                            let resp = if headers_only {
                                seen.lock().unwrap().push_back(record);
                                handler(req).await
                            } else {
                                let body = req.into_body().collect().await;
                                record.body = body.map(|b| b.to_bytes()).unwrap_or_default();
                                seen.lock().unwrap().push_back(record);
                                Response::new(full("ok"))
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Backend { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far, oldest first, taken out of the record.
    pub fn take(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().drain(..).collect()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A running proxy with its files in a temporary directory: in this process (`server`), or
/// the real binary in its own (`child`, stopped when this is dropped).
pub struct Proxy {
    pub server: Option<portcullis::Server>,
    pub child: Option<std::process::Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Proxy {
    /// The running proxy's state (credentials, limits, streams, counters).
    pub fn inner(&self) -> &portcullis::proxy::Proxy {
        self.server.as_ref().expect("the proxy is running").proxy()
    }

    /// Start a proxy in front of `upstream` with the standard keys file and `extra` TOML
    /// appended (sections other than [upstream] and [auth]'s keys_file).
    pub async fn start(upstream: &str, extra: &str) -> Proxy {
        Proxy::start_with(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{upstream}\"\n{extra}\n"
        ))
        .await
    }

    /// Start a proxy in front of `upstream` with `server` lines added to its [server] section.
    pub async fn with_server(upstream: &str, server: &str) -> Proxy {
        Proxy::start_with(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n\
             [upstream]\nurl = \"{upstream}\"\n"
        ))
        .await
    }

    /// Start a proxy from a complete config. `[auth] keys_file = "keys.toml"` is added unless
    /// the text has an [auth] section; the access log goes to `access.log` unless [log] is set.
    pub async fn start_with(config: &str) -> Proxy {
        Proxy::start_with_keys(config, &keys_file()).await
    }

    /// As [`Proxy::start_with`], with `keys` as keys.toml.
    pub async fn start_with_keys(config: &str, keys: &str) -> Proxy {
        Proxy::start_with_files(config, &[("keys.toml", keys)]).await
    }

    /// As [`Proxy::start_with`], with these files (name, content) in its directory.
    pub async fn start_with_files(config: &str, files: &[(&str, &str)]) -> Proxy {
        let (dir, text) = Proxy::files(config, files);
        let path = dir.path().join("proxy.toml");
        let config = portcullis::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
        let server = portcullis::Server::bind(config).await.unwrap();
        Proxy {
            addr: server.local_addr(),
            admin: server.admin_addr(),
            server: Some(server),
            child: None,
            dir,
        }
    }

    /// As [`Proxy::start_with_files`], run as the real binary in a process of its own (its
    /// memory is its own); the process log is JSON on the binary's stderr, read and dropped.
    pub fn spawn_with_files(config: &str, files: &[(&str, &str)]) -> Proxy {
        let (dir, text) = Proxy::files(config, files);
        let Running {
            child,
            addr,
            admin,
            lines,
        } = run_binary(dir.path(), &text);
        // Keep reading, so the binary never blocks on a full stderr pipe.
        std::thread::spawn(move || for _ in lines.iter() {});
        Proxy {
            server: None,
            child: Some(child),
            addr,
            admin,
            dir,
        }
    }

    /// The directory with `files` and `proxy.toml` (`config`, completed as documented on
    /// [`Proxy::start_with`]); the config's text.
    fn files(config: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let mut text = config.to_string();
        if !text.contains("[auth]") {
            text.push_str("\n[auth]\nkeys_file = \"keys.toml\"\n");
        }
        if !text.contains("[log]") {
            text.push_str("\n[log]\naccess_log = \"access.log\"\n");
        }
        std::fs::write(dir.path().join("proxy.toml"), &text).unwrap();
        (dir, text)
    }

    /// A URL on the `[forward_auth]` listener.
    pub fn forward_auth_url(&self, path: &str) -> String {
        let addr = self
            .server
            .as_ref()
            .and_then(|s| s.forward_auth_addr())
            .expect("[forward_auth] is configured");
        format!("http://{addr}{path}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// The access log's lines, waiting up to 5 s for at least `n`.
    pub async fn access_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let path = self.access_log_path();
        let lines = eventually(Duration::from_secs(5), async || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("access log lines are JSON"))
                .collect();
            (lines.len() >= n).then_some(lines)
        })
        .await;
        lines.unwrap_or_else(|| panic!("fewer than {n} access log lines"))
    }
}

/// Wait (10 s at most) until the proxy has `n` live streams of `kind`.
pub async fn wait_streams(proxy: &Proxy, kind: portcullis::streams::StreamKind, n: usize) {
    let streams = proxy.inner().streams.clone();
    let reached = eventually(Duration::from_secs(10), async || {
        (streams.active(kind) == n).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "{kind:?} streams: {} (want {n})",
        streams.active(kind)
    );
}

/// Poll `f` every 20 ms until it returns `Some`, or `None` after `deadline`.
pub async fn eventually<T>(deadline: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Send a request with HTTP/1.1 and read the whole response.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    send_with(&client(), method, url, headers, body).await
}

pub async fn send_with(
    client: &Client<HttpConnector, Body>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(full(body.to_string())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20 s")
        .expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send("GET", url, headers, "").await
}

/// Write raw bytes and read until the server closes or 5 s pass.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in raw HTTP/1 text.
pub fn raw_status(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

type Chunk = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A body fed chunk by chunk through a channel; an `Err` chunk fails the body, dropping the
/// sender ends it.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Chunk>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (tx, ChannelBody(rx).boxed())
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Chunk>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| c.map(http_body::Frame::data)))
    }
}

/// The `Authorization` value for HTTP Basic.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Find a real peer on PATH. Missing: loud, and a failure under CI.
pub fn find_tool(name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let message =
            format!("`{name}` is not on PATH (Debian package {package}); this test cannot run");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// An address nothing listens on: a port that was bound and released again.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A client whose connections come from `ip`.
pub fn client_from(ip: &str) -> Client<HttpConnector, Body> {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(ip.parse().unwrap()));
    Client::builder(TokioExecutor::new()).build(c)
}

/// A signer with a fresh ES256 key (kid "test") and the JWKS that verifies what it signs: for
/// tests that need valid tokens without an OAuth server.
pub struct Es256Issuer {
    key: jsonwebtoken::EncodingKey,
    pub jwks: String,
}

impl Es256Issuer {
    pub fn new() -> Es256Issuer {
        use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey};
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("test".into());
        let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
        Es256Issuer { key, jwks }
    }

    /// A token with `claims`, and `typ` in its header.
    pub fn sign(&self, typ: &str, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test".into());
        header.typ = Some(typ.into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

/// A token signed by a fresh [`Es256Issuer`], and its JWKS.
pub fn es256_token(claims: serde_json::Value) -> (String, String) {
    let issuer = Es256Issuer::new();
    (issuer.sign("JWT", claims), issuer.jwks)
}
