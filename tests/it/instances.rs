//! Several backend instances (DESIGN.md §11): balancing, a killed instance and a failing health
//! check cost no request, a restarted one comes back, a POST is never sent twice, and MCP
//! sessions stay on the instance that issued them (with the official Python SDK).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::support::*;

/// How an instance answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// 200 with its name.
    Serve,
    /// Reads the request, then closes the connection without an answer (it died mid-way).
    Vanish,
}

/// A backend instance that can be killed (listener and every open connection closed at once)
/// and started again on the same port, and whose `/health` can be turned to 503.
struct Instance {
    name: &'static str,
    addr: SocketAddr,
    mode: Mode,
    /// Requests seen (health checks apart): method and body.
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
    health_checks: Arc<AtomicUsize>,
    sick: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Instance {
    async fn start(name: &'static str, mode: Mode) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut i = Instance {
            name,
            addr: listener.local_addr().unwrap(),
            mode,
            seen: Default::default(),
            health_checks: Default::default(),
            sick: Default::default(),
            task: None,
        };
        i.serve(listener);
        i
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, mode) = (self.name, self.mode);
        let (seen, checks, sick) = (
            self.seen.clone(),
            self.health_checks.clone(),
            self.sick.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task when killed: every connection closes with it.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, checks, sick) = (seen.clone(), checks.clone(), sick.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (seen, checks, sick) = (seen.clone(), checks.clone(), sick.clone());
                        async move {
                            if req.uri().path() == "/health" {
                                checks.fetch_add(1, Ordering::Relaxed);
                                let status = if sick.load(Ordering::Relaxed) {
                                    StatusCode::SERVICE_UNAVAILABLE
                                } else {
                                    StatusCode::OK
                                };
                                let mut r = Response::new(full("health"));
                                *r.status_mut() = status;
                                return Ok::<_, std::io::Error>(r);
                            }
                            let method = req.method().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push((method, body));
                            if mode == Mode::Vanish {
                                return Err(std::io::Error::other("vanished"));
                            }
                            Ok(Response::new(full(name)))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }

    /// Stop at once: the listener and every open connection.
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Start again on the same port.
    async fn restart(&mut self) {
        self.kill();
        let listener = crate::support::eventually(Duration::from_secs(5), async || {
            TcpListener::bind(self.addr).await.ok()
        })
        .await
        .expect("the port is free again");
        self.serve(listener);
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn urls(instances: &[&Instance]) -> String {
    let list: Vec<String> = instances
        .iter()
        .map(|i| format!("\"{}\"", i.url()))
        .collect();
    list.join(", ")
}

async fn start_proxy(instances: &[&Instance], extra: &str) -> Proxy {
    Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurls = [{}]\nconnect_timeout = \"1s\"\n{extra}\n\
         [rate_limit]\nrequests_per_second = 100000\n",
        urls(instances)
    ))
    .await
}

/// Send `n` requests from `clients` concurrent clients, each with the key; the statuses.
async fn load(proxy: &Proxy, method: &'static str, n: usize, clients: usize) -> Vec<u16> {
    let mut set = JoinSet::new();
    for c in 0..clients {
        let url = proxy.url("/api/v1/invoke");
        set.spawn(async move {
            let mut out = Vec::new();
            for k in 0..n / clients {
                let body = format!("client {c} request {k}");
                let body = if method == "GET" { "" } else { body.as_str() };
                let r = send(method, &url, &[("authorization", &bearer(PROD_KEY))], body).await;
                out.push(r.status.as_u16());
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

async fn readyz(proxy: &Proxy) -> (u16, serde_json::Value) {
    let r = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    (r.status.as_u16(), r.json())
}

#[tokio::test]
async fn requests_are_shared_and_a_killed_instance_costs_no_request() {
    let a = Instance::start("a", Mode::Serve).await;
    let mut b = Instance::start("b", Mode::Serve).await;
    let c = Instance::start("c", Mode::Serve).await;
    let proxy = start_proxy(&[&a, &b, &c], "").await;
    let statuses = load(&proxy, "GET", 30, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        (a.count(), b.count(), c.count()),
        (10, 10, 10),
        "round robin"
    );

    // Killed under load (every connection cut): GETs in flight there are sent again, new
    // ones go elsewhere; no client sees an error.
    let loader = {
        let url = proxy.url("/api/v1/invoke");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
            while tokio::time::Instant::now() < deadline {
                let mut set = JoinSet::new();
                for _ in 0..4 {
                    let url = url.clone();
                    set.spawn(async move {
                        get(&url, &[("authorization", &bearer(PROD_KEY))])
                            .await
                            .status
                            .as_u16()
                    });
                }
                while let Some(s) = set.join_next().await {
                    statuses.push(s.unwrap());
                }
            }
            statuses
        })
    };
    crate::support::eventually(Duration::from_secs(5), async || {
        (b.count() > 20).then_some(())
    })
    .await
    .expect("b serves part of the load");
    b.kill();
    let statuses = loader.await.unwrap();
    let failed: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    let s = scrape(&proxy).await;
    let instance = b.url();
    assert!(
        value(
            &s,
            "portcullis_upstream_instance_failures_total",
            &[("instance", &instance), ("kind", "connect")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &s,
            "portcullis_upstream_instance_up",
            &[("instance", &instance)]
        ),
        0.0,
        "left out"
    );
    assert_eq!(
        value(
            &s,
            "portcullis_upstream_instance_up",
            &[("instance", &a.url())]
        ),
        1.0
    );
    let (status, ready) = readyz(&proxy).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready["upstream"]["instances"][1]["reachable"], false,
        "{ready}"
    );
    assert_eq!(ready["upstream"]["instances"][0]["ready"], true, "{ready}");

    // A POST whose connection failed reaches another instance whole.
    let before = (a.count(), c.count());
    let statuses = load(&proxy, "POST", 8, 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(a.count() + c.count(), before.0 + before.1 + 8);
    let bodies: Vec<Bytes> = [&a, &c]
        .iter()
        .flat_map(|i| i.seen.lock().unwrap().clone())
        .filter(|(m, _)| m == "POST")
        .map(|(_, b)| b)
        .collect();
    assert!(
        bodies.iter().all(|b| b.starts_with(b"client ")),
        "{bodies:?}"
    );
}

#[tokio::test]
async fn a_post_is_never_sent_twice_and_a_get_is_sent_again_after_a_cut_connection() {
    let dies = Instance::start("dies", Mode::Vanish).await;
    let lives = Instance::start("lives", Mode::Serve).await;
    let proxy = start_proxy(&[&dies, &lives], "").await;
    let statuses = load(&proxy, "POST", 6, 1).await;
    // Each POST reached exactly one instance: those that reached the dying one were not sent
    // again (it may have acted on them), and are the client's 502.
    assert_eq!(dies.count() + lives.count(), 6);
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        dies.count(),
        "{statuses:?}"
    );
    assert!(dies.count() >= 1, "round robin reaches both");
    // A GET without a body is: nothing is lost by asking again.
    let (d, l) = (dies.count(), lives.count());
    let statuses = load(&proxy, "GET", 6, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        dies.count() > d,
        "some GETs reached the dying instance first"
    );
    assert_eq!(
        lives.count() - l,
        6,
        "every GET was answered by the live one"
    );
    let s = scrape(&proxy).await;
    assert!(value(&s, "portcullis_upstream_retries_total", &[]) >= 1.0);
    // The access log names the instance that answered; a refused POST has none.
    let lines = proxy.access_lines(12).await;
    for l in &lines {
        match l["status"].as_u64() {
            Some(200) => assert_eq!(l["upstream"], lives.url().as_str(), "{l}"),
            _ => assert!(l.get("upstream").is_none(), "{l}"),
        }
    }
}

#[tokio::test]
async fn a_failing_health_check_takes_an_instance_out_and_a_restart_brings_it_back() {
    let mut a = Instance::start("a", Mode::Serve).await;
    let b = Instance::start("b", Mode::Serve).await;
    let proxy = start_proxy(
        &[&a, &b],
        "balance = \"least_requests\"\nhealth_path = \"/health\"\nhealth_interval = \"100ms\"\n\
         health_timeout = \"100ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
    )
    .await;
    let up = async |proxy: &Proxy, i: usize| {
        readyz(proxy).await.1["upstream"]["instances"][i]["ready"] == true
    };
    crate::support::eventually(Duration::from_secs(5), async || {
        (a.health_checks.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await
    .expect("health checks run");

    // 503 from /health: out of rotation; the requests that follow all go to b.
    a.sick.store(true, Ordering::Relaxed);
    crate::support::eventually(Duration::from_secs(5), async || {
        (!up(&proxy, 0).await).then_some(())
    })
    .await
    .expect("a is taken out");
    let before = a.count();
    let statuses = load(&proxy, "GET", 10, 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        a.count(),
        before,
        "nothing goes to an instance out of rotation"
    );

    // Healthy again: back.
    a.sick.store(false, Ordering::Relaxed);
    crate::support::eventually(Duration::from_secs(5), async || {
        up(&proxy, 0).await.then_some(())
    })
    .await
    .expect("a is back");

    // Killed: the checks take it out; started again: back in rotation, and served.
    a.kill();
    crate::support::eventually(Duration::from_secs(5), async || {
        (!up(&proxy, 0).await).then_some(())
    })
    .await
    .expect("a dead instance is taken out");
    let statuses = load(&proxy, "GET", 10, 2).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    a.restart().await;
    crate::support::eventually(Duration::from_secs(5), async || {
        up(&proxy, 0).await.then_some(())
    })
    .await
    .expect("a restarted instance comes back");
    let before = a.count();
    let statuses = load(&proxy, "GET", 10, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(a.count() > before, "the restarted instance is served again");

    // Every instance failing its checks: 502 at once, and not ready.
    a.sick.store(true, Ordering::Relaxed);
    b.sick.store(true, Ordering::Relaxed);
    crate::support::eventually(Duration::from_secs(5), async || {
        (readyz(&proxy).await.0 == 503).then_some(())
    })
    .await
    .expect("not ready with no healthy instance");
    let r = get(
        &proxy.url("/api/v1/invoke"),
        &[("authorization", &bearer(PROD_KEY))],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unavailable");
}

#[tokio::test]
async fn config_mistakes_in_upstream_instances_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
        std::fs::write(dir.path().join("short.key"), "too short").unwrap();
        let out = check_config(&path);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let err = write("[upstream]\nurl = \"http://127.0.0.1:1\"\nurls = [\"http://127.0.0.1:2\"]\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(
        err.contains("proxy.toml:3:8") && err.contains("not both"),
        "{err}"
    );
    let err = write("[upstream]\nurls = [\"http://127.0.0.1:2\", \"https://127.0.0.1:3\"]\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(err.contains("same scheme"), "{err}");
    let err = write("[upstream]\nurls = [\"http://127.0.0.1:2\", \"http://127.0.0.1:2/\"]\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(err.contains("listed twice"), "{err}");
    let err = write("[upstream]\nurls = [\"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\nhealth_interval = \"1s\"\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(
        err.contains("proxy.toml:3:") && err.contains("health_path"),
        "{err}"
    );
    let err = write("[upstream]\nurls = [\"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\nsession_key_file = \"short.key\"\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(
        err.contains("short.key") && err.contains("at least 32"),
        "{err}"
    );
    assert!(!err.contains("too short"), "the key is never echoed: {err}");
    let err = write("[upstream]\nurls = [\"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\nbalance = \"random\"\n[auth]\nkeys_file = \"keys.toml\"\n");
    assert!(
        err.contains("round_robin") && err.contains("least_requests"),
        "{err}"
    );
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The `Mcp-Session-Id` of an answer.
fn session_of(r: &Reply) -> String {
    r.headers
        .get("mcp-session-id")
        .expect("a session id")
        .to_str()
        .unwrap()
        .to_string()
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
const CALL_ADD: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":20,"b":22}}}"#;

fn mcp_headers<'a>(key: &'a str, session: Option<&'a str>) -> Vec<(&'a str, String)> {
    let mut h = vec![
        ("authorization", bearer(key)),
        ("accept", "application/json, text/event-stream".to_string()),
        ("content-type", "application/json".to_string()),
        ("mcp-protocol-version", "2025-06-18".to_string()),
    ];
    if let Some(s) = session {
        h.push(("mcp-session-id", s.to_string()));
    }
    h
}

async fn mcp_post(proxy: &Proxy, key: &str, session: Option<&str>, body: &str) -> Reply {
    let h = mcp_headers(key, session);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    send("POST", &proxy.url("/mcp"), &h, body).await
}

#[tokio::test]
async fn mcp_sessions_stay_on_their_instance_across_replicas_and_open_for_their_caller_only() {
    let (Some(s1), Some(s2)) = (McpServer::start(false), McpServer::start(false)) else {
        return;
    };
    let key = "0123456789abcdef0123456789abcdef-shared-by-both-replicas";
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurls = [\"{}\", \"{}\"]\nsession_key_file = \"session.key\"\n\
         [auth]\nkeys_file = \"keys.toml\"\n[mcp]\npath = \"/mcp\"\n",
        s1.origin(),
        s2.origin()
    );
    let files = [("keys.toml", keys_file()), ("session.key", key.to_string())];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let p1 = Proxy::start_with_files(&config, &files).await;
    let p2 = Proxy::start_with_files(&config, &files).await;

    // The official client: four sessions of 30 tool calls each, all answered.
    let url = p1.url("/mcp");
    let auth = bearer(PROD_KEY);
    let mut args = vec!["calls", url.as_str(), auth.as_str()];
    args.extend(std::iter::repeat_n("add", 30));
    let mut set = JoinSet::new();
    for _ in 0..4 {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        set.spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mcp_client(&args).await
        });
    }
    while let Some(out) = set.join_next().await {
        let out = out.unwrap();
        let calls = out["calls"].as_array().unwrap_or_else(|| panic!("{out}"));
        assert_eq!(calls.len(), 30, "{out}");
        for call in calls {
            assert_eq!(call["result"], serde_json::json!(["5"]), "{out}");
        }
    }
    // The sessions were spread over both instances, and each instance saw only its own.
    let inits = |s: &McpServer| {
        s.seen()
            .iter()
            .filter(|l| l["rpc"]["method"] == "initialize")
            .count()
    };
    assert!(
        inits(&s1) >= 1 && inits(&s2) >= 1,
        "{} / {}",
        inits(&s1),
        inits(&s2)
    );
    assert_eq!(inits(&s1) + inits(&s2), 4);
    let ids = |s: &McpServer| -> std::collections::HashSet<String> {
        s.seen()
            .iter()
            .filter_map(|l| l["headers"]["mcp-session-id"].as_str().map(str::to_string))
            .collect()
    };
    let (ids1, ids2) = (ids(&s1), ids(&s2));
    assert!(ids1.is_disjoint(&ids2), "a session reached both instances");
    assert!(
        ids1.iter().chain(&ids2).all(|id| !id.starts_with("ps1.")),
        "the backend sees its own id"
    );
    // The session's server stream (GET) and its end (DELETE) went to its instance too.
    let methods: std::collections::HashSet<String> = s1
        .seen()
        .iter()
        .chain(s2.seen().iter())
        .filter(|l| l["headers"]["mcp-session-id"].is_string())
        .filter_map(|l| l["method"].as_str().map(str::to_string))
        .collect();
    assert!(
        methods.contains("GET") && methods.contains("DELETE"),
        "{methods:?}"
    );

    // A session opened through one replica continues through the other (same key file).
    let r = mcp_post(&p1, PROD_KEY, None, INIT).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let sealed = session_of(&r);
    assert!(sealed.starts_with("ps1."), "{sealed}");
    assert_eq!(
        mcp_post(&p2, PROD_KEY, Some(&sealed), INITIALIZED)
            .await
            .status,
        202
    );
    let r = mcp_post(&p2, PROD_KEY, Some(&sealed), CALL_ADD).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(text(&r).contains("\"42\""), "{}", text(&r));

    // Presented by another key, or altered: 404, and no instance hears of it.
    let seen = s1.seen().len() + s2.seen().len();
    let r = mcp_post(&p2, WEB_KEY, Some(&sealed), CALL_ADD).await;
    assert_eq!(r.status, 404, "{}", text(&r));
    let mut forged = sealed.clone();
    forged.pop();
    forged.push(if sealed.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        mcp_post(&p1, PROD_KEY, Some(&forged), CALL_ADD)
            .await
            .status,
        404
    );
    let unsealed = sealed.split('.').nth(2).unwrap();
    assert_eq!(
        mcp_post(&p1, PROD_KEY, Some(unsealed), CALL_ADD)
            .await
            .status,
        404
    );
    assert_eq!(
        s1.seen().len() + s2.seen().len(),
        seen,
        "refused before any backend"
    );

    // Its instance gone: 404, so the client starts a new session (which lands on the other).
    let instance: usize = sealed.split('.').nth(1).unwrap().parse().unwrap();
    let (gone, other) = if instance == 0 { (s1, s2) } else { (s2, s1) };
    drop(gone);
    let r = mcp_post(&p1, PROD_KEY, Some(&sealed), CALL_ADD).await;
    assert_eq!(r.status, 404, "{}", text(&r));
    let r = mcp_post(&p1, PROD_KEY, None, INIT).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(session_of(&r).starts_with(&format!("ps1.{}.", 1 - instance)));
    drop(other);
}
