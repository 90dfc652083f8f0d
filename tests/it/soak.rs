//! A bounded soak: API-key, Basic, WebSocket and SSE traffic, invalid and rate-limited clients,
//! and a keys file rewritten every second, all at once. Valid traffic must never see an
//! unexpected status, every gauge must be back to zero at the end, and resident memory must be
//! flat after warm-up (middle to end: at most a tenth or 4 MiB more). SOAK_SECONDS sets the
//! length (default 8; the closing note's figures come from longer runs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const LIMITED_KEY: &str = "mas_SoakLimited000000000000000000000000000000000000";

/// Plain requests get "ok", `/events` three SSE events, an upgrade a WebSocket echo.
async fn soak_backend() -> Backend {
    Backend::with(|mut req: Request<Incoming>| async move {
        if let Some(resp) = crate::support::websocket_echo(&mut req) {
            return resp;
        }
        if req.uri().path() == "/events" {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                for n in 0..3 {
                    let event = bytes::Bytes::from(format!("data: {n}\n\n"));
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap();
        }
        Response::new(full("ok"))
    })
    .await
}

/// The resident memory of process `pid`, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_soak_fails_no_valid_request_and_leaves_every_gauge_at_zero() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let backend = soak_backend().await;
    let dir_keys = format!(
        "{}\n[[keys]]\nname = \"limited\"\napi_key = \"{LIMITED_KEY}\"\nrequests_per_second = 5\nburst = 5\n",
        keys_file()
    );
    let htpasswd = format!("soak:{}\n", bcrypt::hash("soak password", 4).unwrap());
    // The real binary, so that its memory is measured alone.
    let proxy = Proxy::spawn_with_files(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_connections_per_ip = 1000\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\n\
             [rate_limit]\nrequests_per_second = 100000\nburst = 100000\n\
             [log]\nformat = \"json\"\naccess_log = \"off\"\n",
            backend.url()
        ),
        &[("keys.toml", &dir_keys), ("htpasswd", &htpasswd)],
    );
    let pid = proxy.child.as_ref().expect("a process of its own").id();
    let proxy = Arc::new(proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let unexpected = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();

    let spawn_loop = |name: &'static str,
                      f: Arc<
        dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync,
    >| {
        let (stop, unexpected, done) = (stop.clone(), unexpected.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if f().await {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    unexpected.fetch_add(1, Ordering::Relaxed);
                    eprintln!("soak: unexpected result in {name}");
                }
            }
        })
    };

    let p = proxy.clone();
    let c = client();
    tasks.push(spawn_loop(
        "api key",
        Arc::new(move || {
            let (p, c) = (p.clone(), c.clone());
            Box::pin(async move {
                send_with(&c, "GET", &p.url("/api"), &[("x-api-key", PROD_KEY)], "")
                    .await
                    .status
                    == 200
            })
        }),
    ));
    let p = proxy.clone();
    let c = client();
    tasks.push(spawn_loop(
        "basic",
        Arc::new(move || {
            let (p, c) = (p.clone(), c.clone());
            Box::pin(async move {
                let auth = basic_auth("soak", "soak password");
                send_with(&c, "GET", &p.url("/api"), &[("authorization", &auth)], "")
                    .await
                    .status
                    == 200
            })
        }),
    ));
    let p = proxy.clone();
    tasks.push(spawn_loop(
        "websocket",
        Arc::new(move || {
            let p = p.clone();
            Box::pin(async move {
                let Ok(mut ws) = connect_ws(&p, "/mcp", &[("x-api-key", WEB_KEY)]).await else {
                    return false;
                };
                for n in 0..5 {
                    let text = format!("m{n}");
                    if ws.send(Message::text(text.clone())).await.is_err()
                        || next_message(&mut ws).await != Message::text(text)
                    {
                        return false;
                    }
                }
                ws.close(None).await.is_ok()
            })
        }),
    ));
    let p = proxy.clone();
    let c = client();
    tasks.push(spawn_loop(
        "sse",
        Arc::new(move || {
            let (p, c) = (p.clone(), c.clone());
            Box::pin(async move {
                let r =
                    send_with(&c, "GET", &p.url("/events"), &[("x-api-key", PROD_KEY)], "").await;
                r.status == 200 && r.body == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
            })
        }),
    ));
    let p = proxy.clone();
    let c = client_from("127.0.0.9");
    tasks.push(spawn_loop(
        "invalid credentials",
        Arc::new(move || {
            let (p, c) = (p.clone(), c.clone());
            Box::pin(async move {
                let s = send_with(
                    &c,
                    "GET",
                    &p.url("/api"),
                    &[("x-api-key", "mas_invalid_soak_key_000000")],
                    "",
                )
                .await
                .status;
                s == 401 || s == 429
            })
        }),
    ));
    let p = proxy.clone();
    let c = client();
    tasks.push(spawn_loop(
        "rate limited",
        Arc::new(move || {
            let (p, c) = (p.clone(), c.clone());
            Box::pin(async move {
                let s = send_with(&c, "GET", &p.url("/api"), &[("x-api-key", LIMITED_KEY)], "")
                    .await
                    .status;
                s == 200 || s == 429
            })
        }),
    ));

    // Reloads: the keys file rewritten (editor-style rename) every second, valid keys kept.
    let keys_path = proxy.dir.path().join("keys.toml");
    let reloader = {
        let stop = stop.clone();
        let keys = dir_keys.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let text = format!(
                    "{keys}\n[[keys]]\nname = \"rotating\"\napi_key = \"mas_rotating{n:0>40}\"\n"
                );
                let tmp = keys_path.with_extension("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &keys_path).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            n
        })
    };

    // The test backend records every request it sees; forget them so that the process's
    // memory reflects the proxy and its clients.
    let backend = Arc::new(backend);
    let drain = {
        let (stop, backend) = (stop.clone(), backend.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                backend.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let start = Instant::now();
    let rss_start = rss_kb(pid);
    tokio::time::sleep(Duration::from_secs(seconds / 2)).await;
    let rss_middle = rss_kb(pid);
    tokio::time::sleep(Duration::from_secs(seconds - seconds / 2)).await;
    let rss_end = rss_kb(pid);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let reloads = reloader.await.unwrap();
    drain.await.unwrap();
    eprintln!(
        "soak: {:?}, {} exchanges, {} keys-file rewrites, proxy RSS {} / {} / {} kB (start / middle / end)",
        start.elapsed(),
        done.load(Ordering::Relaxed),
        reloads,
        rss_start,
        rss_middle,
        rss_end
    );
    assert_eq!(
        unexpected.load(Ordering::Relaxed),
        0,
        "unexpected results during the soak"
    );
    assert!(done.load(Ordering::Relaxed) > 100, "the soak barely ran");
    // Memory is flat after warm-up: from the middle of the run to its end, resident memory
    // grows by at most a tenth or 4 MiB, whichever is larger (a per-request leak of a few
    // hundred bytes crosses it in a minute's soak).
    let allowed = (rss_middle / 10).max(4 * 1024);
    assert!(
        rss_end <= rss_middle + allowed,
        "memory grew after warm-up: {rss_middle} kB at the middle, {rss_end} kB at the end (bound {allowed} kB)"
    );
    let generation = value(
        &scrape(&proxy).await,
        "portcullis_credentials_generation",
        &[],
    );
    assert!(generation >= 2.0, "no reload happened during the soak");
    for kind in ["websocket", "sse", "stream"] {
        let open = eventually(Duration::from_secs(10), async || {
            let s = scrape(&proxy).await;
            let n = value(&s, "portcullis_streams_active", &[("kind", kind)]);
            (n == 0.0).then_some(())
        })
        .await;
        assert!(open.is_some(), "{kind} streams still open after the soak");
    }
}
