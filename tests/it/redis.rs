//! Shared rate limits through a real `redis-server` on loopback.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// A `redis-server` on a free loopback port, without persistence; killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    binary: std::path::PathBuf,
    password: Option<String>,
}

impl Redis {
    fn start() -> Option<Redis> {
        Redis::start_with(None)
    }

    /// A Redis that demands `password` (`requirepass`).
    fn start_with(password: Option<&str>) -> Option<Redis> {
        let binary = find_tool("redis-server", "redis-server")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            child: None,
            binary,
            password: password.map(str::to_owned),
        };
        r.spawn();
        Some(r)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn shared_proxy(backend: &Backend, redis: &Redis, failure: &str) -> Proxy {
    Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [ban]\nfailures = 3\n\
         [rate_limit]\nrequests_per_second = 1\nburst = 4\nbackend = \"redis\"\n\
         redis_url = \"{}\"\nredis_failure = \"{failure}\"\nredis_timeout = \"200ms\"\n",
        backend.url(),
        redis.url()
    ))
    .await
}

async fn status(proxy: &Proxy) -> u16 {
    get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)])
        .await
        .status
        .as_u16()
}

#[tokio::test]
async fn two_proxies_sharing_redis_enforce_one_limit_together() {
    let Some(redis) = Redis::start() else { return };
    let backend = Backend::ok().await;
    let a = shared_proxy(&backend, &redis, "allow").await;
    let b = shared_proxy(&backend, &redis, "allow").await;
    let mut allowed = 0;
    for _ in 0..4 {
        for proxy in [&a, &b] {
            if status(proxy).await == 200 {
                allowed += 1;
            }
        }
    }
    // Burst 4 between them (a fifth if a second passed meanwhile), not 4 each.
    assert!((4..=5).contains(&allowed), "{allowed} of 8 allowed");
    let r = get(&a.url("/api"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    // Another key has its own shared budget.
    assert_eq!(
        get(&b.url("/api"), &[("x-api-key", WEB_KEY)]).await.status,
        200
    );
}

#[tokio::test]
async fn losing_redis_follows_the_failure_policy_and_limits_resume_when_it_returns() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let backend = Backend::ok().await;
    let allow = shared_proxy(&backend, &redis, "allow").await;
    let deny = shared_proxy(&backend, &redis, "deny").await;
    // Spend the shared budget so that only Redis's verdict can let requests through.
    for _ in 0..20 {
        if status(&allow).await == 429 {
            break;
        }
    }
    assert_eq!(status(&allow).await, 429);
    assert_eq!(status(&deny).await, 429);

    redis.kill();
    // allow: requests pass without Redis; deny: refused.
    for _ in 0..3 {
        assert_eq!(status(&allow).await, 200, "redis_failure = allow");
        assert_eq!(status(&deny).await, 429, "redis_failure = deny");
    }
    let errors = match &*allow.inner().rate {
        portcullis::ratelimit::RateLimits::Shared { shared, .. } => shared
            .link
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        _ => panic!("not the shared limiter"),
    };
    assert!(errors >= 3, "failed calls are counted: {errors}");

    redis.spawn();
    // Limits resume: within the deadline the allow-policy proxy refuses again.
    eventually(Duration::from_secs(15), async || {
        (status(&allow).await == 429).then_some(())
    })
    .await
    .expect("limiting never resumed after Redis came back");
}

#[tokio::test]
async fn a_client_banned_through_one_proxy_is_banned_by_the_other() {
    let Some(redis) = Redis::start() else { return };
    let backend = Backend::ok().await;
    let a = shared_proxy(&backend, &redis, "allow").await;
    let b = shared_proxy(&backend, &redis, "allow").await;
    let wrong = [("x-api-key", "mas_wrong_key_0000000000000000")];
    // Three failures between the two proxies (failures = 3): two at a, one at b.
    for proxy in [&a, &a, &b] {
        assert_eq!(get(&proxy.url("/api"), &wrong).await.status, 401);
    }
    for proxy in [&a, &b] {
        let r = get(&proxy.url("/api"), &[("x-api-key", WEB_KEY)]).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.error_code(), "banned");
    }
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn a_password_protected_redis_url_can_come_from_a_secret_file() {
    let Some(redis) = Redis::start_with(Some("s3cret-redis-pass")) else {
        return;
    };
    let backend = Backend::ok().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("redis-url");
    std::fs::write(&secret, format!("{}\n", redis.url())).unwrap();
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [rate_limit]\nrequests_per_second = 1\nburst = 2\nbackend = \"redis\"\n\
         redis_url_file = \"{}\"\nredis_failure = \"allow\"\n",
        backend.url(),
        secret.display()
    ))
    .await;
    // Limited through Redis (a failing connection would let every request through).
    assert_eq!(status(&proxy).await, 200);
    assert_eq!(status(&proxy).await, 200);
    assert_eq!(status(&proxy).await, 429);
    let config_text = std::fs::read_to_string(proxy.dir.path().join("proxy.toml")).unwrap();
    assert!(!config_text.contains("s3cret-redis-pass"));
}

#[tokio::test]
async fn tool_limits_kept_in_redis_hold_across_replicas() {
    let Some(redis) = Redis::start() else { return };
    let backend = Backend::ok().await;
    let replica = async || {
        Proxy::start_with(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
             [rate_limit]\nrequests_per_second = 1000\nbackend = \"redis\"\nredis_url = \"{}\"\n\
             [mcp]\ntool_policy = true\n\
             [[mcp.tool_limits]]\ntools = [\"search_*\"]\nrequests_per_second = 1\nburst = 2\n",
            backend.url(),
            redis.url()
        ))
        .await
    };
    let (a, b) = (replica().await, replica().await);
    let call = async |proxy: &Proxy, tool: &str| {
        let r = send(
            "POST",
            &proxy.url("/mcp"),
            &[("x-api-key", PROD_KEY)],
            &format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}"}}}}"#
            ),
        )
        .await;
        assert_eq!(r.status, 200);
        // The backend answers "ok"; a refusal is the proxy's JSON-RPC error.
        serde_json::from_slice::<serde_json::Value>(&r.body)
            .map(|v| v["error"]["code"].as_i64().unwrap_or(0))
            .unwrap_or(0)
    };
    let mut allowed = 0;
    for _ in 0..3 {
        for proxy in [&a, &b] {
            if call(proxy, "search_docs").await == 0 {
                allowed += 1;
            }
        }
    }
    // Burst 2 between the replicas (a third if a second passed meanwhile), not 2 each.
    assert!((2..=3).contains(&allowed), "{allowed} of 6 allowed");
    assert_eq!(call(&a, "search_docs").await, 429);
    assert_eq!(call(&b, "get_time").await, 0, "a tool without a limit");
}
