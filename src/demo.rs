//! `portcullis demo`: a built-in echo backend behind the proxy on loopback, with a fresh key,
//! so a newcomer sees the proxy work before writing any config.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::auth::api_key;
use crate::config::Config;
use crate::proxy::text_response;
use crate::server::Server;

/// Answer every request with a JSON description of what arrived: method, path, query, the
/// headers and the body length. What the backend is shown is exactly what it prints.
pub async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
    Ok(text_response(
        StatusCode::OK,
        "application/json",
        format!("{body:#}\n"),
    ))
}

/// Serve [`echo`] on `listener` until the task is dropped.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(echo))
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

Health and readiness (admin listener, loopback only):
  curl -i http://{admin}/readyz

Access log lines follow below (Apache combined format). Ctrl-C stops the demo.
"#
    );
}
