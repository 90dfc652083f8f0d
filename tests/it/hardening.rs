//! The second hardening round: promises an adversarial review found broken, each tried the way
//! it was found (raw sockets, real HTTP/2 frames through hyper's client, files rewritten in
//! place under the watcher).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::support::*;

/// A proxy with a public path, so no credential is asked and nothing the client sends is
/// checked: what reaches the backend is only what the proxy lets through.
async fn public_proxy(backend: &Backend, extra: &str) -> Proxy {
    Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n{extra}\n\
         [auth]\nkeys_file = \"keys.toml\"\npublic_paths = [\"/public/*\"]\n",
        backend.url()
    ))
    .await
}

#[tokio::test]
async fn underscored_spellings_of_protected_headers_never_reach_the_backend() {
    let backend = Backend::ok().await;
    let proxy = public_proxy(&backend, "").await;
    let r = get(
        &proxy.url("/public/x"),
        &[
            ("x_authenticated_user", "admin"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("x-authenticated_user", "admin"),
            ("x-ok", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    let names: Vec<&str> = seen[0].headers.keys().map(|n| n.as_str()).collect();
    assert!(
        names.iter().all(|n| !n.contains('_')),
        "an underscored name reached the backend: {names:?}"
    );
    assert_eq!(seen[0].headers["x-ok"], "kept");
}

#[tokio::test]
async fn headers_a_backend_could_take_for_the_client_the_path_or_the_method_are_stripped() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let spoofed = [
        ("x-forwarded-port", "1"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-server", "evil"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-user", "admin"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
    ];
    let mut headers = vec![("x-api-key", RESTRICTED_KEY)];
    headers.extend(spoofed);
    let r = send("POST", &proxy.url("/api/v1/invoke"), &headers, "{}").await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    for (name, _) in spoofed {
        assert!(
            !seen[0].headers.contains_key(name),
            "{name} reached the backend"
        );
    }
}

#[tokio::test]
async fn with_pass_credentials_only_the_verified_credential_reaches_the_backend() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "pass_credentials = true").await;
    let auth = bearer(PROD_KEY);
    let r = get(
        &proxy.url("/api"),
        &[("authorization", &auth), ("x-api-key", DISABLED_KEY)],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    assert_eq!(seen[0].headers["authorization"], auth.as_str());
    assert!(
        !seen[0].headers.contains_key("x-api-key"),
        "an unverified key reached the backend"
    );
}

#[tokio::test]
async fn max_header_bytes_is_the_head_size_enforced() {
    let backend = Backend::ok().await;
    let proxy = Proxy::with_server(&backend.url(), "max_header_bytes = \"2KiB\"").await;
    let head = |filler: usize| {
        format!(
            "GET /api HTTP/1.1\r\nHost: t\r\nX-API-Key: {PROD_KEY}\r\nX-Fill: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(filler)
        )
    };
    assert_eq!(
        raw_status(&raw(proxy.addr, head(1_500).as_bytes()).await),
        200
    );
    let text = raw(proxy.addr, head(7_000).as_bytes()).await;
    assert_eq!(raw_status(&text), 431, "{text}");
    assert!(text.contains("headers_too_large"), "{text}");
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn an_http1_request_needs_exactly_one_host() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let two = format!(
        "GET /api HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nX-API-Key: {PROD_KEY}\r\n\r\n"
    );
    assert_eq!(raw_status(&raw(proxy.addr, two.as_bytes()).await), 400);
    let none = format!("GET /api HTTP/1.1\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    assert_eq!(raw_status(&raw(proxy.addr, none.as_bytes()).await), 400);
    let one = format!("GET /api HTTP/1.1\r\nHost: a.example\r\nX-API-Key: {PROD_KEY}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&raw(proxy.addr, one.as_bytes()).await), 200);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_an_http1_backend_as_one_line() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let req = Request::get(proxy.url("/api"))
        .header("x-api-key", PROD_KEY)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(full(""))
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = backend.take();
    let cookies: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"], "RFC 9113 §8.2.3");
}

/// An h2c backend that answers with the names of the request trailers it received.
async fn trailer_names_backend() -> Backend {
    Backend::with(|req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let mut names: Vec<String> = collected
            .trailers()
            .map(|t| t.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        names.sort();
        Response::new(full(names.join(",")))
    })
    .await
}

#[tokio::test]
async fn request_trailers_toward_an_http2_upstream_lose_what_headers_lose() {
    let backend = trailer_names_backend().await;
    let proxy = Proxy::start(&backend.url(), "protocol = \"http2\"").await;
    let mut trailers = HeaderMap::new();
    for (name, value) in [
        ("x-authenticated-user", "admin"),
        ("x_authenticated_user", "admin"),
        ("x-forwarded-for", "6.6.6.6"),
        ("authorization", "Bearer mas_not_verified_000000000000"),
        ("x-api-key", "mas_not_verified_000000000000"),
        ("grpc-status-details-bin", "kept"),
    ] {
        trailers.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let frames: Vec<Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"payload"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = Request::post(proxy.url("/api"))
        .header("x-api-key", PROD_KEY)
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let names = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(names, "grpc-status-details-bin", "trailers the backend got");
}

#[tokio::test]
async fn a_websocket_over_http2_is_judged_as_the_get_it_becomes() {
    let backend = EchoBackend::start().await;
    let keys = format!(
        "{}\n[[keys]]\nname = \"get-only\"\napi_key = \"mas_GetOnlyKey0000000000000000000000000000\"\nallow = [\"GET /ws\"]\n",
        keys_file()
    );
    let proxy = Proxy::start_with_keys(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n",
            backend.url()
        ),
        &keys,
    )
    .await;
    let resp = h2_websocket(&proxy, "/ws", "mas_GetOnlyKey0000000000000000000000000000").await;
    assert_eq!(
        resp.status(),
        200,
        "allow = [\"GET /ws\"] covers a WebSocket over HTTP/2 as over HTTP/1.1"
    );
}

#[tokio::test]
async fn a_forwarded_client_with_a_port_is_banned_alone_never_the_trusted_proxy() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [upstream]\nurl = \"{}\"\n[ban]\nfailures = 2\n",
        backend.url()
    ))
    .await;
    let url = proxy.url("/api");
    for _ in 0..3 {
        get(
            &url,
            &[
                ("x-forwarded-for", "192.0.2.7:51234"),
                ("x-api-key", "mas_wrong_key_00000000000000"),
            ],
        )
        .await;
    }
    let attacker = get(
        &url,
        &[
            ("x-forwarded-for", "192.0.2.7:51234"),
            ("x-api-key", PROD_KEY),
        ],
    )
    .await;
    assert_eq!(
        attacker.status, 429,
        "the client behind the proxy is banned"
    );
    let other = get(
        &url,
        &[
            ("x-forwarded-for", "[2001:db8::8]:443"),
            ("x-api-key", PROD_KEY),
        ],
    )
    .await;
    assert_eq!(other.status, 200, "everyone else behind the proxy is not");
    let direct = get(&url, &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(direct.status, 200, "nor is the proxy itself");
}

#[tokio::test]
async fn the_admin_listener_answers_only_local_ip_or_configured_hosts() {
    let backend = Backend::ok().await;
    let proxy = Proxy::with_server(&backend.url(), "admin_hosts = [\"Metrics.Internal\"]").await;
    let admin = format!("http://{}/keys", proxy.admin);
    let rebound = get(&admin, &[("host", "attacker.example:9901")]).await;
    assert_eq!(
        rebound.status, 421,
        "a DNS-rebinding page never reads /keys"
    );
    assert!(!String::from_utf8_lossy(&rebound.body).contains("production-backend"));
    for host in [
        "localhost:9901",
        "127.0.0.1:9901",
        "[::1]:9901",
        "10.1.2.3",
        "metrics.internal:9901",
    ] {
        let r = get(&admin, &[("host", host)]).await;
        assert_eq!(r.status, 200, "{host}");
    }
    let health = get(&format!("http://{}/healthz", proxy.admin), &[]).await;
    assert_eq!(health.headers["x-content-type-options"], "nosniff");
}

/// A backend that waits before it answers with an SSE stream of one event every 100 ms.
async fn slow_sse_backend(wait: Duration) -> Backend {
    Backend::with(move |_req: Request<Incoming>| async move {
        tokio::time::sleep(wait).await;
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for n in 0.. {
                let event = Bytes::from(format!("data: {n}\n\n"));
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn a_stream_whose_answer_comes_after_its_key_was_disabled_never_starts() {
    let backend = slow_sse_backend(Duration::from_secs(2)).await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let opened = {
        let url = proxy.url("/events");
        tokio::spawn(async move {
            let req = Request::get(url)
                .header("x-api-key", WEB_KEY)
                .body(full(""))
                .unwrap();
            client().request(req).await.expect("response headers")
        })
    };
    // While the backend takes its time, the key is removed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = proxy.dir.path().join("keys.toml");
    let tmp = path.with_extension("tmp");
    let web = format!("sha256 = \"{}\"\nenabled = true", sha256_hex(WEB_KEY));
    let disabled = web.replace("enabled = true", "enabled = false");
    assert!(keys_file().contains(&web));
    std::fs::write(&tmp, keys_file().replace(&web, &disabled)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let keys = format!("http://{}/keys", proxy.admin);
    eventually(Duration::from_secs(10), async || {
        let listed = get(&keys, &[]).await.json();
        let web = listed["keys"]
            .as_array()?
            .iter()
            .find(|k| k["name"] == "web-application")?
            .clone();
        (web["enabled"] == false).then_some(())
    })
    .await
    .expect("the key was disabled");
    // The backend answers after that: the stream must not start under a disabled key.
    let resp = opened.await.unwrap();
    assert_eq!(resp.status(), 401, "a stream started under a disabled key");
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    wait_streams(&proxy, portcullis::streams::StreamKind::Sse, 0).await;
}

#[tokio::test]
async fn a_keys_file_rewritten_in_place_with_a_pause_is_never_used_half_written() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let url = proxy.url("/admin/delete-everything");
    assert_eq!(
        get(&url, &[("x-api-key", RESTRICTED_KEY)]).await.status,
        403,
        "the restricted key may not call this"
    );
    let full_text = keys_file();
    let cut = full_text
        .find("allow = ")
        .expect("the restricted key's allow line");
    let path = proxy.dir.path().join("keys.toml");
    let writer = tokio::spawn(async move {
        use std::io::Write;
        // In place, as `cat > keys.toml` or a slow editor writes: the allow line comes last.
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&full_text.as_bytes()[..cut]).unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(450)).await;
        f.write_all(&full_text.as_bytes()[cut..]).unwrap();
        f.flush().unwrap();
    });
    let until = Instant::now() + Duration::from_millis(2_500);
    let mut statuses = Vec::new();
    while Instant::now() < until {
        statuses.push(
            get(&url, &[("x-api-key", RESTRICTED_KEY)])
                .await
                .status
                .as_u16(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 403),
        "the half-written file was used: {statuses:?}"
    );
}

#[tokio::test]
async fn a_cheap_hash_answers_no_sooner_than_the_costliest_in_the_file() {
    use base64::Engine;
    use sha1::Digest;
    let backend = Backend::ok().await;
    let sha = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(b"cheap"));
    let htpasswd = format!(
        "alice:{{SHA}}{sha}\nbob:{}\n",
        bcrypt::hash("costly", 12).unwrap()
    );
    let proxy = Proxy::start_with_files(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n\
             [auth]\nhtpasswd_file = \"htpasswd\"\n[ban]\nenabled = false\n",
            backend.url()
        ),
        &[("htpasswd", &htpasswd)],
    )
    .await;
    let timed = |user: &'static str, password: &'static str| {
        let url = proxy.url("/api");
        async move {
            let started = Instant::now();
            let r = get(&url, &[("authorization", &basic_auth(user, password))]).await;
            (r.status.as_u16(), started.elapsed())
        }
    };
    // bcrypt cost 12 takes hundreds of milliseconds; {SHA} a few microseconds.
    let (status, _) = timed("nobody", "x").await;
    assert_eq!(status, 401);
    for _ in 0..3 {
        let (status, took) = timed("alice", "wrong").await;
        assert_eq!(status, 401);
        assert!(
            took >= Duration::from_millis(100),
            "a wrong password for a {{SHA}} user answered in {took:?}: faster than bcrypt, so \
             the user's hash (and name) shows"
        );
    }
    let (status, took) = timed("alice", "cheap").await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(100), "{took:?}");
}

#[tokio::test]
async fn transfer_encoding_beside_content_length_is_refused_in_either_order() {
    let backend = Backend::recording_bodies().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let heads = [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ];
    for framing in heads {
        // A clean chunked request first, on the same connection: no false alarm.
        let request = format!(
            "POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nabc\r\n0\r\n\r\n\
             POST /api HTTP/1.1\r\nHost: x\r\nX-API-Key: {PROD_KEY}\r\n{framing}\r\n0\r\n\r\n"
        );
        let text = raw(proxy.addr, request.as_bytes()).await;
        let statuses: Vec<u16> = text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text[i + 9..].get(..3)?.parse().ok())
            .collect();
        assert_eq!(statuses, vec![200, 400], "{framing:?}\n{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        let seen = backend.take();
        assert_eq!(seen.len(), 1, "only the clean request reached the backend");
        assert_eq!(seen[0].body, "abc");
    }
}
