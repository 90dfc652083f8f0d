//! Operations: Prometheus metrics parsed with a real exposition parser, access log formats,
//! redaction of every secret from every log line, logrotate's SIGUSR1, secrets from files.

use std::time::Duration;

use http::Response;

use crate::support::*;

#[tokio::test]
async fn every_metric_family_moves_with_its_event() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [rate_limit]\nrequests_per_second = 1\nburst = 2\n[ban]\nfailures = 2\n",
        backend.url()
    ))
    .await;
    let before = scrape(&proxy).await;
    assert_eq!(
        value(
            &before,
            "portcullis_credentials_loaded",
            &[("kind", "api_key")]
        ),
        3.0
    );
    assert_eq!(
        value(&before, "portcullis_credentials_generation", &[]),
        1.0
    );
    assert!(value(&before, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&before, "process_start_time_seconds", &[]) > 1.7e9);

    let url = proxy.url("/api");
    assert_eq!(get(&url, &[("x-api-key", PROD_KEY)]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", PROD_KEY)]).await.status, 200);
    assert_eq!(get(&url, &[("x-api-key", PROD_KEY)]).await.status, 429);
    assert_eq!(get(&url, &[]).await.status, 403);
    assert_eq!(get(&url, &[("x-api-key", DISABLED_KEY)]).await.status, 401);
    assert_eq!(
        get(&url, &[("x-api-key", "mas_wrong_wrong_wrong")])
            .await
            .status,
        401
    );
    assert_eq!(get(&url, &[("x-api-key", WEB_KEY)]).await.status, 429);

    let s = scrape(&proxy).await;
    let req = |outcome, code| {
        value(
            &s,
            "portcullis_requests_total",
            &[("outcome", outcome), ("code", code)],
        )
    };
    assert_eq!(req("ok", "2xx"), 2.0);
    assert_eq!(req("rate_limited", "4xx"), 1.0);
    assert_eq!(req("unauthenticated", "4xx"), 3.0);
    assert_eq!(req("banned", "4xx"), 1.0);
    assert_eq!(
        value(
            &s,
            "portcullis_request_duration_seconds",
            &[("outcome", "ok")]
        ),
        2.0
    );
    let fail = |reason| value(&s, "portcullis_auth_failures_total", &[("reason", reason)]);
    assert_eq!(fail("missing"), 1.0);
    assert_eq!(fail("disabled"), 1.0);
    assert_eq!(fail("invalid_token"), 1.0);
    assert_eq!(value(&s, "portcullis_rate_limited_total", &[]), 1.0);
    assert_eq!(value(&s, "portcullis_banned_total", &[]), 1.0);
    assert_eq!(value(&s, "portcullis_bans_active", &[]), 1.0);

    // A failed reload, then a good one.
    std::fs::write(proxy.dir.path().join("keys.toml"), "[[keys]]\nname = 1\n").unwrap();
    let reloads = |s: &prometheus_parse::Scrape, result| {
        value(
            s,
            "portcullis_reloads_total",
            &[("file", "keys"), ("result", result)],
        )
    };
    eventually(Duration::from_secs(10), async || {
        (reloads(&scrape(&proxy).await, "error") >= 1.0).then_some(())
    })
    .await
    .expect("no failed reload counted");
    std::fs::write(
        proxy.dir.path().join("keys.toml"),
        keys_file().replace("old-key", "older-key"),
    )
    .unwrap();
    let s = eventually(Duration::from_secs(10), async || {
        let s = scrape(&proxy).await;
        (reloads(&s, "ok") >= 1.0).then_some(s)
    })
    .await
    .expect("no good reload counted");
    assert_eq!(value(&s, "portcullis_credentials_generation", &[]), 2.0);
    assert!(
        value(
            &s,
            "portcullis_reload_last_success_timestamp_seconds",
            &[("file", "keys")]
        ) > 1.7e9
    );
}

#[tokio::test]
async fn upstream_errors_and_streams_are_counted() {
    let proxy = Proxy::start(&format!("http://{}", dead_addr()), "").await;
    assert_eq!(
        get(&proxy.url("/x"), &[("x-api-key", PROD_KEY)])
            .await
            .status,
        502
    );
    let s = scrape(&proxy).await;
    assert_eq!(
        value(
            &s,
            "portcullis_upstream_errors_total",
            &[("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "portcullis_requests_total",
            &[("outcome", "upstream_error"), ("code", "5xx")]
        ),
        1.0
    );

    let (tx_slot, rx_slot) = tokio::sync::oneshot::channel();
    let tx_slot = std::sync::Mutex::new(Some(tx_slot));
    let backend = Backend::with(move |_req| {
        let (tx, body) = channel_body();
        if let Some(slot) = tx_slot.lock().unwrap().take() {
            let _ = slot.send(tx);
        }
        async move {
            let mut r = Response::new(body);
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    })
    .await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let resp = client()
        .request(
            http::Request::get(proxy.url("/events"))
                .header("x-api-key", PROD_KEY)
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let tx = rx_slot.await.unwrap();
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "portcullis_streams_active", &[("kind", "sse")]),
        1.0
    );
    assert_eq!(value(&s, "portcullis_connections_active", &[]), 1.0);
    drop((tx, resp));
    wait_streams(&proxy, portcullis::streams::StreamKind::Sse, 0).await;
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "portcullis_streams_active", &[("kind", "sse")]),
        0.0
    );
}

#[tokio::test]
async fn the_combined_access_log_matches_the_fail2ban_filter_with_the_right_host() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [log]\naccess_log = \"access.log\"\naccess_format = \"combined\"\n",
        backend.url()
    ))
    .await;
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_local_address(Some("127.0.0.2".parse().unwrap()));
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(c);
    let r = send_with(
        &client,
        "GET",
        &proxy.url("/api?token=secret"),
        &[("x-api-key", "mas_wrong_0000000000000000")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    let path = proxy.access_log_path();
    let line = eventually(Duration::from_secs(5), async || {
        std::fs::read_to_string(&path)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await
    .expect("a combined line");
    // The filter from the deployment guide, with fail2ban's <HOST> expanded as it does.
    let filter = regex::Regex::new(r"^(?P<host>\S+) .* 401 .*$").unwrap();
    let caps = filter
        .captures(line.trim_end())
        .expect("the fail2ban filter matches");
    assert_eq!(&caps["host"], "127.0.0.2");
    assert!(
        !line.contains("secret"),
        "the query string was logged: {line}"
    );
}

#[tokio::test]
async fn no_secret_reaches_any_log_line_at_trace_level() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let password = "correct horse battery staple 7";
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let (token, jwks) = es256_token(serde_json::json!({
        "iss": "https://idp.example.com", "aud": "portcullis", "sub": "token-user", "exp": exp
    }));
    let (foreign, _) = es256_token(serde_json::json!({
        "iss": "https://idp.example.com", "aud": "portcullis", "sub": "mallory", "exp": exp
    }));
    std::fs::write(dir.path().join("jwks.json"), jwks).unwrap();
    std::fs::write(
        dir.path().join("htpasswd"),
        format!("alice:{}\n", bcrypt::hash(password, 4).unwrap()),
    )
    .unwrap();
    let Running {
        mut child,
        addr,
        lines: rx,
        ..
    } = run_binary(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\n\
             [auth.jwt]\nissuer = \"https://idp.example.com\"\njwks_file = \"jwks.json\"\naudiences = [\"portcullis\"]\n\
             [log]\nlevel = \"trace\"\nformat = \"json\"\naccess_log = \"access.log\"\n",
            backend.url()
        ),
    );
    let url = format!("http://{addr}");
    let cookie = "session=cookie-secret-4242";
    let proxy_auth = "Basic cHJveHktc2VjcmV0LTk5OTk=";
    let query_secret = "query-secret-1234";
    let basic_ok = basic_auth("alice", password);
    let basic_bad = basic_auth("alice", "wrong-password-5678");
    let bearer_prod = bearer(PROD_KEY);
    let (bearer_token, bearer_foreign) = (bearer(&token), bearer(&foreign));
    let requests: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", &bearer_prod), ("cookie", cookie)],
        vec![("x-api-key", WEB_KEY), ("proxy-authorization", proxy_auth)],
        vec![("x-api-key", DISABLED_KEY)],
        vec![("authorization", "Bearer mas_unknown_key_secret_0000000")],
        vec![("authorization", &basic_ok)],
        vec![("authorization", &basic_bad)],
        vec![("authorization", "Basic !!!not-base64-secret!!!")],
        vec![("authorization", &bearer_token)],
        vec![("authorization", &bearer_foreign)],
    ];
    for headers in &requests {
        get(
            &format!("{url}/api/v1/invoke?api_key={query_secret}"),
            headers,
        )
        .await;
    }
    let code = stop(&mut child, "-TERM").await;
    assert!(code.success());
    let mut logged: Vec<String> = rx.try_iter().collect();
    // The process log was captured, at debug level and below: a test that read no line would
    // find no secret in it.
    let failures = logged
        .iter()
        .filter(|l| l.contains("authentication failed"))
        .count();
    assert!(
        failures >= 4,
        "{failures} \"authentication failed\" lines among {} process-log lines captured",
        logged.len()
    );
    let access = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    assert!(
        access.lines().count() >= requests.len(),
        "every request was logged"
    );
    logged.extend(access.lines().map(str::to_owned));
    let basic_ok_b64 = basic_ok.trim_start_matches("Basic ");
    for secret in [
        PROD_KEY,
        WEB_KEY,
        DISABLED_KEY,
        "mas_unknown_key_secret_0000000",
        "cookie-secret-4242",
        "cHJveHktc2VjcmV0LTk5OTk",
        query_secret,
        password,
        basic_ok_b64,
        "wrong-password-5678",
        "not-base64-secret",
        // Any part of a token: its payload and signature alone are secrets too.
        token.split('.').nth(1).unwrap(),
        token.split('.').nth(2).unwrap(),
        foreign.split('.').nth(2).unwrap(),
    ] {
        for line in &logged {
            assert!(!line.contains(secret), "{secret:?} was logged: {line}");
        }
    }
    // The keys appear as name and fingerprint; the token as its identity claim.
    assert!(access.contains("production-backend"));
    assert!(access.contains("\"identity\":\"token-user\""), "{access}");
}

#[tokio::test]
async fn sigusr1_reopens_the_access_log_after_logrotate_moved_it() {
    if find_tool("kill", "procps").is_none() {
        return;
    }
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let Running {
        mut child, addr, ..
    } = run_binary(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
             [log]\nformat = \"json\"\naccess_log = \"access.log\"\n",
            backend.url()
        ),
    );
    let url = format!("http://{addr}/x");
    let log = dir.path().join("access.log");
    get(&url, &[("x-api-key", PROD_KEY)]).await;
    eventually(Duration::from_secs(5), async || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.lines().count() == 1)
    })
    .await
    .expect("the first line");
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    let sent = std::process::Command::new("kill")
        .arg("-USR1")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
    // Requests until one lands in a new access.log (the signal is handled asynchronously).
    eventually(Duration::from_secs(10), async || {
        get(&url, &[("x-api-key", PROD_KEY)]).await;
        log.exists().then_some(())
    })
    .await
    .expect("access.log was not reopened");
    let code = stop(&mut child, "-TERM").await;
    assert!(code.success());
    let rotated = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
    assert!(!rotated.is_empty());
}
