//! Hot reload of the keys and htpasswd files through the watcher, and revocation of the live
//! streams of credentials a reload took away.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use http::{Request, Response};
use hyper::body::Incoming;
use portcullis::streams::StreamKind;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A distinct, valid key for step `n`.
fn key(n: usize) -> String {
    format!("mas_reload{n:0>44}")
}

fn keys_toml(entries: &[(&str, &str, bool)]) -> String {
    entries
        .iter()
        .map(|(name, key, enabled)| {
            format!("[[keys]]\nname = \"{name}\"\napi_key = \"{key}\"\nenabled = {enabled}\n\n")
        })
        .collect()
}

/// Wait until `key` gets `status` from the proxy (10 s at most).
async fn until_status(proxy: &Proxy, key: &str, status: u16) {
    let mut got = http::StatusCode::OK;
    let reached = eventually(Duration::from_secs(10), async || {
        got = get(&proxy.url("/api"), &[("x-api-key", key)]).await.status;
        (got == status).then_some(())
    })
    .await;
    assert!(reached.is_some(), "{key} still gets {got}, want {status}");
}

async fn proxy_with_keys_at(backend_url: &str, keys: &Path) -> Proxy {
    Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{backend_url}\"\n[auth]\nkeys_file = \"{}\"\n\
         # Polling with a key not loaded yet must not get the test client banned, and the\n\
         # load loop must not be rate limited.\n\
         [ban]\nenabled = false\n[rate_limit]\nenabled = false\n",
        keys.display()
    ))
    .await
}

#[tokio::test]
async fn every_way_of_replacing_the_keys_file_is_picked_up_repeatedly() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, keys_toml(&[("k", &key(0), true)])).unwrap();
    let proxy = proxy_with_keys_at(&backend.url(), &path).await;
    until_status(&proxy, &key(0), 200).await;

    type Replace = fn(&Path, &str);
    let ways: [(&str, Replace); 5] = [
        ("edit in place", |p, text| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }),
        ("cp over", |p, text| {
            let src = p.with_file_name("staged.toml.src");
            std::fs::write(&src, text).unwrap();
            std::fs::copy(&src, p).unwrap();
            std::fs::remove_file(src).unwrap();
        }),
        ("editor write-rename", |p, text| {
            let tmp = p.with_file_name(".keys.toml.swp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, p).unwrap();
        }),
        ("mv from another directory", |p, text| {
            let other = p.parent().unwrap().join("incoming");
            std::fs::create_dir_all(&other).unwrap();
            std::fs::write(other.join("keys.toml"), text).unwrap();
            std::fs::rename(other.join("keys.toml"), p).unwrap();
        }),
        ("delete and recreate", |p, text| {
            std::fs::remove_file(p).unwrap();
            std::fs::write(p, text).unwrap();
        }),
    ];
    // Twice round, so every way also works after the file was replaced.
    let mut n = 0;
    for _round in 0..2 {
        for (how, replace) in ways {
            n += 1;
            replace(&path, &keys_toml(&[("k", &key(n), true)]));
            until_status(&proxy, &key(n), 200).await;
            let old = get(&proxy.url("/api"), &[("x-api-key", &key(n - 1))]).await;
            assert_eq!(old.status, 401, "{how}: the replaced key still works");
        }
    }
}

/// The Kubernetes Secret volume layout: `keys.toml -> ..data/keys.toml`,
/// `..data -> ..<timestamp>`, updated by swapping `..data` to a new timestamped directory.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: usize,
}

impl SecretVolume {
    fn new(keys: &str) -> SecretVolume {
        let dir = tempfile::tempdir().unwrap();
        let mut v = SecretVolume { dir, version: 0 };
        v.publish(keys);
        std::os::unix::fs::symlink("..data/keys.toml", v.dir.path().join("keys.toml")).unwrap();
        v
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// What the kubelet does: write a new timestamped directory, point `..data_tmp` at it,
    /// rename `..data_tmp` over `..data`, remove the old directory.
    fn publish(&mut self, keys: &str) {
        self.version += 1;
        let root = self.dir.path();
        let name = format!(
            "..2026_11_22_10_00_{:02}.{}",
            self.version,
            1000 + self.version
        );
        std::fs::create_dir(root.join(&name)).unwrap();
        std::fs::write(root.join(&name).join("keys.toml"), keys).unwrap();
        let tmp = root.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        if self.version > 1 {
            let old = format!(
                "..2026_11_22_10_00_{:02}.{}",
                self.version - 1,
                999 + self.version
            );
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }
}

#[tokio::test]
async fn a_kubernetes_secret_update_is_picked_up_twice() {
    let backend = Backend::ok().await;
    let mut volume = SecretVolume::new(&keys_toml(&[("k", &key(0), true)]));
    let proxy = proxy_with_keys_at(&backend.url(), &volume.path()).await;
    until_status(&proxy, &key(0), 200).await;
    for n in 1..=2 {
        volume.publish(&keys_toml(&[("k", &key(n), true)]));
        until_status(&proxy, &key(n), 200).await;
        until_status(&proxy, &key(n - 1), 401).await;
    }
}

/// Poll `/readyz` until `pred` holds for its JSON (10 s at most); returns that JSON.
async fn until_readyz(admin: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let matched = eventually(Duration::from_secs(10), async || {
        last = get(admin, &[]).await.json();
        pred(&last).then(|| last.clone())
    })
    .await;
    matched.unwrap_or_else(|| panic!("readyz never matched: {last}"))
}

#[tokio::test]
async fn a_broken_file_keeps_the_last_good_keys_and_a_fixed_one_recovers() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, keys_toml(&[("k", &key(0), true)])).unwrap();
    let proxy = proxy_with_keys_at(&backend.url(), &path).await;
    let admin = format!("http://{}/readyz", proxy.admin);

    // A duplicate key on line 6.
    std::fs::write(
        &path,
        keys_toml(&[("k", &key(1), true), ("again", &key(1), true)]),
    )
    .unwrap();
    let detail = until_readyz(&admin, |r| {
        r["credentials"]["keys"]["reload"]["reloads_failed"] == 1
    })
    .await;
    let reload = &detail["credentials"]["keys"]["reload"];
    let error = reload["error"].as_str().unwrap();
    assert!(error.contains("keys.toml:6:"), "{error}");
    assert!(reload["reloads_failed"].as_u64().unwrap() >= 1);
    assert_eq!(detail["ready"], true, "the last good set is still serving");
    // The old key still works; the half-written new one does not.
    assert_eq!(
        get(&proxy.url("/api"), &[("x-api-key", &key(0))])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&proxy.url("/api"), &[("x-api-key", &key(1))])
            .await
            .status,
        401
    );

    // Deleted: still the last good set.
    std::fs::remove_file(&path).unwrap();
    let detail = until_readyz(&admin, |r| {
        r["credentials"]["keys"]["reload"]["reloads_failed"] == 2
    })
    .await;
    let error = detail["credentials"]["keys"]["reload"]["error"]
        .as_str()
        .unwrap();
    assert!(error.contains("cannot read"), "{error}");
    assert_eq!(
        get(&proxy.url("/api"), &[("x-api-key", &key(0))])
            .await
            .status,
        200
    );

    std::fs::write(&path, keys_toml(&[("k", &key(2), true)])).unwrap();
    until_status(&proxy, &key(2), 200).await;
    until_status(&proxy, &key(0), 401).await;
    let r = get(&admin, &[]).await.json();
    assert_eq!(r["credentials"]["keys"]["reload"]["ok"], true, "{r}");
    assert!(r["credentials"]["generation"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn htpasswd_users_are_reloaded_and_removed_users_refused() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("htpasswd");
    let entry = |user: &str, pw: &str| format!("{user}:{}\n", bcrypt::hash(pw, 4).unwrap());
    std::fs::write(&path, entry("alice", "first")).unwrap();
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nhtpasswd_file = \"{}\"\n[ban]\nenabled = false\n",
        backend.url(),
        path.display()
    ))
    .await;
    let status = |user: &'static str, pw: &'static str| {
        let url = proxy.url("/api");
        async move {
            get(&url, &[("authorization", &basic_auth(user, pw))])
                .await
                .status
        }
    };
    assert_eq!(status("alice", "first").await, 200);
    let tmp = dir.path().join("htpasswd.tmp");
    std::fs::write(&tmp, entry("bob", "second")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    eventually(Duration::from_secs(10), async || {
        (status("bob", "second").await == 200).then_some(())
    })
    .await
    .expect("bob never got in");
    // alice's password was cached as valid; her removal wins over the cache.
    assert_eq!(status("alice", "first").await, 401);
}

/// A backend that echoes WebSocket messages on upgrade requests and answers anything else with
/// an SSE stream whose senders it keeps.
async fn mixed_backend(senders: Arc<Mutex<Vec<Sender>>>) -> Backend {
    Backend::with(move |mut req: Request<Incoming>| {
        let senders = senders.clone();
        async move {
            if let Some(resp) = crate::support::websocket_echo(&mut req) {
                return resp;
            }
            let (tx, body) = channel_body();
            senders.lock().unwrap().push(tx);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await
}

#[tokio::test]
async fn disabling_a_key_closes_its_streams_and_leaves_others_alone() {
    let senders: Arc<Mutex<Vec<Sender>>> = Default::default();
    let backend = mixed_backend(senders.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (a, b) = (key(1), key(2));
    std::fs::write(&path, keys_toml(&[("a", &a, true), ("b", &b, true)])).unwrap();
    let proxy = proxy_with_keys_at(&backend.url(), &path).await;

    let mut a_ws1 = connect_ws(&proxy, "/mcp", &[("x-api-key", &a)])
        .await
        .unwrap();
    let mut a_ws2 = connect_ws(&proxy, "/mcp", &[("x-api-key", &a)])
        .await
        .unwrap();
    let mut a_sse = open_stream(&proxy, &[("x-api-key", &a)]).await.into_body();
    let mut b_ws = connect_ws(&proxy, "/mcp", &[("x-api-key", &b)])
        .await
        .unwrap();
    wait_streams(&proxy, StreamKind::WebSocket, 3).await;
    wait_streams(&proxy, StreamKind::Sse, 1).await;
    for ws in [&mut a_ws1, &mut a_ws2, &mut b_ws] {
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_message(ws).await, Message::text("ping"));
    }

    std::fs::write(&path, keys_toml(&[("a", &a, false), ("b", &b, true)])).unwrap();
    until_closed(&mut a_ws1).await;
    until_closed(&mut a_ws2).await;
    assert!(matches!(next_chunk(&mut a_sse).await, Some(Err(_))));
    wait_streams(&proxy, StreamKind::WebSocket, 1).await;
    wait_streams(&proxy, StreamKind::Sse, 0).await;

    b_ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut b_ws).await, Message::text("still here"));
    let streams = proxy.inner().streams.clone();
    assert_eq!(streams.revoked_total(), 3);
    let revoked = proxy
        .access_lines(3)
        .await
        .into_iter()
        .filter(|l| l["outcome"] == "revoked")
        .count();
    assert_eq!(revoked, 3);
}

/// Requests with one key in a loop until stopped, counting those that were not a 200.
struct LoadLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    counts: Arc<[AtomicUsize; 2]>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadLoop {
    fn start(proxy: &Arc<Proxy>, key: String) -> LoadLoop {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let task = {
            let (proxy, stop, counts) = (proxy.clone(), stop.clone(), counts.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    let r =
                        send_with(&c, "GET", &proxy.url("/api"), &[("x-api-key", &key)], "").await;
                    counts[0].fetch_add(1, Ordering::Relaxed);
                    if r.status != 200 {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        LoadLoop { stop, counts, task }
    }

    /// Stop the loop: (requests sent, requests that failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let [sent, failed] = &*self.counts;
        (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }
}

#[tokio::test]
async fn requests_with_an_unchanged_key_never_fail_while_the_file_is_rewritten() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let steady = key(0);
    std::fs::write(&path, keys_toml(&[("steady", &steady, true)])).unwrap();
    let proxy = Arc::new(proxy_with_keys_at(&backend.url(), &path).await);

    let load = LoadLoop::start(&proxy, steady);
    // 50 rewrites in place (truncate, then write), each a different file.
    for n in 1..=50 {
        std::fs::write(
            &path,
            keys_toml(&[("steady", &key(0), true), ("rotating", &key(n), true)]),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    until_status(&proxy, &key(50), 200).await;
    let (sent, failed) = load.finish().await;
    assert!(sent > 50, "the load loop barely ran");
    assert_eq!(failed, 0);
    let generation = proxy.inner().auth.credentials.load().generation;
    assert!(generation >= 2, "no reload happened");
}

/// A keys file of `n` keys: `steady`, `rotating` and `n - 2` others.
fn big_keys_toml(n: usize, steady: &str, rotating: &str) -> String {
    let mut entries = vec![
        ("steady".to_string(), steady.to_string()),
        ("rotating".to_string(), rotating.to_string()),
    ];
    entries.extend((2..n).map(|i| (format!("bulk-{i}"), format!("mas_bulk{i:0>46}"))));
    entries
        .iter()
        .map(|(name, key)| format!("[[keys]]\nname = \"{name}\"\napi_key = \"{key}\"\n\n"))
        .collect()
}

#[tokio::test]
async fn a_keys_file_of_ten_thousand_keys_is_swapped_without_a_failed_request() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let steady = key(0);
    std::fs::write(&path, big_keys_toml(10_000, &steady, &key(1))).unwrap();
    let proxy = Arc::new(proxy_with_keys_at(&backend.url(), &path).await);
    until_status(&proxy, &key(1), 200).await;

    let load = LoadLoop::start(&proxy, steady);
    // Three swaps the way an editor or a deploy tool writes: a new file renamed over the old.
    for n in 2..=4 {
        let next = dir.path().join("keys.toml.new");
        std::fs::write(&next, big_keys_toml(10_000, &key(0), &key(n))).unwrap();
        std::fs::rename(&next, &path).unwrap();
        until_status(&proxy, &key(n), 200).await;
        until_status(&proxy, &key(n - 1), 401).await;
    }
    let (sent, failed) = load.finish().await;
    assert!(sent > 10, "the load loop barely ran");
    assert_eq!(failed, 0);
    assert_eq!(proxy.inner().auth.credentials.load().keys.len(), 10_000);
}

#[tokio::test]
async fn a_key_that_expires_while_running_stops_working_and_its_stream_closes() {
    let senders: Arc<Mutex<Vec<Sender>>> = Default::default();
    let backend = mixed_backend(senders).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let soon = std::time::SystemTime::now() + Duration::from_secs(2);
    let expires = humantime::format_rfc3339_seconds(soon + Duration::from_secs(1));
    std::fs::write(
        &path,
        format!(
            "[[keys]]\nname = \"short-lived\"\napi_key = \"{}\"\nexpires = \"{expires}\"\n",
            key(7)
        ),
    )
    .unwrap();
    let proxy = proxy_with_keys_at(&backend.url(), &path).await;
    let mut ws = connect_ws(&proxy, "/mcp", &[("x-api-key", &key(7))])
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before"));
    until_closed(&mut ws).await;
    assert_eq!(
        get(&proxy.url("/api"), &[("x-api-key", &key(7))])
            .await
            .status,
        401
    );
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "revoked");
}
