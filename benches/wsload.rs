//! WebSocket echo throughput for `benches/compare.sh` (scenario `websocket`): an echo backend, and
//! a load generator that keeps CONNS WebSocket sessions each sending a message and waiting for
//! its echo, as wrk does with requests.
//!
//!   cargo run --release --example wsload -- echo 127.0.0.1:18184
//!   cargo run --release --example wsload -- load ws://127.0.0.1:18182/ 32 5 [HEADER: value]
//!
//! `load` prints "messages/s p50_us p99_us" on one line; any failure (a refused handshake, a
//! closed session, a wrong echo) ends it with an error.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The message each session sends: 64 bytes of text, the size of a small MCP notification.
const PAYLOAD: &str = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"p\":1}    ";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("echo") => rt.block_on(echo(args.get(1).ok_or("echo ADDR")?)),
        Some("load") => {
            let url = args.get(1).ok_or("load URL CONNS SECONDS [HEADER]")?;
            let conns: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
            let secs: u64 = args.get(3).map_or(Ok(5), |s| s.parse())?;
            rt.block_on(load(url, conns, Duration::from_secs(secs), args.get(4)))
        }
        _ => Err("usage: wsload echo ADDR | wsload load URL CONNS SECONDS [HEADER]".into()),
    }
}

async fn echo(addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn load(
    url: &str,
    conns: usize,
    duration: Duration,
    header: Option<&String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut sessions = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut req = url.into_client_request()?;
        if let Some((name, value)) = header.and_then(|h| h.split_once(':')) {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(name.trim().as_bytes())?,
                value.trim().parse()?,
            );
        }
        let addr = req.uri().authority().ok_or("URL without host")?.to_string();
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
        sessions.push(ws);
    }
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for mut ws in sessions {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                ws.send(Message::text(PAYLOAD))
                    .await
                    .map_err(|e| e.to_string())?;
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.as_str() == PAYLOAD => {}
                    other => return Err(format!("expected the echo, got {other:?}")),
                }
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            let _ = ws.close(None).await;
            Ok::<_, String>(latencies)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)));
    println!(
        "{:.0} {} {}",
        all.len() as f64 / elapsed,
        pct(0.50).copied().unwrap_or(0),
        pct(0.99).copied().unwrap_or(0)
    );
    Ok(())
}
