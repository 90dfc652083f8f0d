//! OAuth bearer tokens and the MCP endpoint, against real peers: an OAuth 2.1 / OIDC server
//! that signs JWTs (npm oauth2-mock-server, tests/peers/idp.mjs), a real MCP server and the
//! official MCP Python and TypeScript SDK clients (tests/peers/mcp_server.py, mcp_client.py,
//! mcp_client.mjs). `.ci/run`
//! installs them (`npm ci`, a venv from requirements.txt); missing, each test says so loudly,
//! and fails under CI.

use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::BodyExt;

use crate::support::*;

const RESOURCE_PATH: &str = "/mcp";

/// A proxy config: keys, `[auth.jwt]` for `idp` with `jwt_extra` lines, `[mcp]` whose resource
/// is the proxy's own URL (the port is known once bound, so the resource is set with a fixed
/// free port).
fn config(upstream: &str, idp: &str, jwt_extra: &str, mcp_extra: &str) -> (String, u16) {
    let port = dead_addr().port();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{upstream}\"\n\
         [auth]\nkeys_file = \"keys.toml\"\n\
         [auth.jwt]\nissuer = \"{idp}\"\n{jwt_extra}\n\
         [mcp]\nresource = \"http://127.0.0.1:{port}{RESOURCE_PATH}\"\nscopes_supported = [\"mcp:tools\"]\n{mcp_extra}\n"
    );
    (text, port)
}

fn audience(port: u16) -> String {
    format!("http://127.0.0.1:{port}{RESOURCE_PATH}")
}

/// A proxy started from [`config`] whose key set has loaded (ready), and its port.
async fn running(upstream: &str, idp: &str, jwt_extra: &str, mcp_extra: &str) -> (Proxy, u16) {
    let (text, port) = config(upstream, idp, jwt_extra, mcp_extra);
    let proxy = Proxy::start_with(&text).await;
    until_ready(&proxy).await;
    (proxy, port)
}

async fn until_ready(proxy: &Proxy) {
    eventually(Duration::from_secs(20), async || {
        let r = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
        (r.status == 200).then_some(())
    })
    .await
    .expect("ready (the key set fetched) within 20 s");
}

/// Wait (20 s at most) until the JWKS file's reloads with `result` reach `n`.
async fn reloads_reach(proxy: &Proxy, result: &str, n: f64, what: &str) {
    eventually(Duration::from_secs(20), async || {
        let s = scrape(proxy).await;
        let labels = [("file", "jwks"), ("result", result)];
        (value(&s, "portcullis_reloads_total", &labels) >= n).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{what}"));
}

/// GET `path` with `Authorization: Bearer <token>`.
async fn with_token(proxy: &Proxy, path: &str, token: &str) -> Reply {
    get(&proxy.url(path), &[("authorization", &bearer(token))]).await
}

fn www_authenticate(r: &Reply) -> Vec<String> {
    r.headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// A token's header replaced (the signature no longer matches, which is the point).
fn with_header(token: &str, header: serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.splitn(2, '.');
    let _ = parts.next();
    format!(
        "{}.{}",
        b64.encode(header.to_string()),
        parts.next().unwrap()
    )
}

#[tokio::test]
async fn tokens_from_a_real_issuer_are_checked_claim_by_claim() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    // Bans off: this sends more refused tokens than a ban allows (bans are tested below).
    let (proxy, port) = running(
        &backend.url(),
        idp.issuer(),
        "required_scopes = [\"mcp:tools\"]",
        "[ban]\nenabled = false",
    )
    .await;
    let aud = audience(port);
    let now = unix_now();
    let call = async |token: &str| with_token(&proxy, "/api/v1/invoke", token).await;

    // Right audience and scope: through, with the identity and without the token.
    let good = idp
        .token(serde_json::json!({"aud": aud, "scope": "mcp:tools openid"}))
        .await;
    let r = call(&good).await;
    assert_eq!(r.status, 200, "{}", r.body.escape_ascii());
    let seen = backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-authenticated-user"], "alice");
    assert!(
        seen[0].headers.get("authorization").is_none(),
        "the token never reaches the backend"
    );

    // ES256 from the same issuer; scp as an array (Entra ID, Okta).
    let stats = idp.stats().await;
    let es_kid = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["alg"] == "ES256")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let es = idp
        .token_with(
            serde_json::json!({"kid": es_kid, "claims": {"aud": aud, "scp": ["mcp:tools"]}}),
        )
        .await;
    assert_eq!(call(&es).await.status, 200);

    let refused = [
        ("wrong audience", idp.token(serde_json::json!({"aud": "https://other.example/mcp", "scope": "mcp:tools"})).await, "jwt_audience"),
        ("no audience", idp.token_with(serde_json::json!({"claims": {"scope": "mcp:tools"}, "remove": ["aud"]})).await, "jwt_audience"),
        ("expired", idp.token(serde_json::json!({"aud": aud, "scope": "mcp:tools", "exp": now - 3600})).await, "jwt_expired"),
        ("not yet valid", idp.token(serde_json::json!({"aud": aud, "scope": "mcp:tools", "nbf": now + 3600})).await, "jwt_not_yet_valid"),
        ("wrong issuer", idp.token(serde_json::json!({"aud": aud, "scope": "mcp:tools", "iss": "https://evil.example"})).await, "jwt_issuer"),
        ("alg none", idp.post("/test/forge", serde_json::json!({"alg": "none", "aud": aud, "scope": "mcp:tools"})).await["token"].as_str().unwrap().to_string(), "jwt_malformed"),
        ("HS256 with the public key", idp.post("/test/forge", serde_json::json!({"alg": "HS256", "aud": aud, "scope": "mcp:tools"})).await["token"].as_str().unwrap().to_string(), "jwt_algorithm"),
        ("RS256 header on the ES256 key", with_header(&es, serde_json::json!({"alg": "RS256", "kid": es_kid})), "jwt_algorithm"),
        ("tampered claims", {
            let (head, rest) = good.split_once('.').unwrap();
            let sig = rest.split_once('.').unwrap().1;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let claims = serde_json::json!({"iss": idp.issuer(), "aud": aud, "sub": "root", "scope": "mcp:tools", "exp": now + 600});
            format!("{head}.{}.{sig}", b64.encode(claims.to_string()))
        }, "jwt_signature"),
    ];
    for (what, token, reason) in &refused {
        let r = call(token).await;
        assert_eq!(r.status, 401, "{what}: {}", r.body.escape_ascii());
        assert_eq!(r.error_code(), "invalid_token", "{what}");
        assert!(
            www_authenticate(&r)[0].starts_with("Bearer error=\"invalid_token\""),
            "{what}: {:?}",
            www_authenticate(&r)
        );
        let s = scrape(&proxy).await;
        assert!(
            value(&s, "portcullis_auth_failures_total", &[("reason", reason)]) >= 1.0,
            "{what}: reason {reason}"
        );
    }

    // A valid token without the required scope: 403 naming it.
    let r = call(
        &idp.token(serde_json::json!({"aud": aud, "scope": "openid"}))
            .await,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body.escape_ascii());
    assert_eq!(r.error_code(), "insufficient_scope");
    assert!(
        www_authenticate(&r)[0].contains("error=\"insufficient_scope\", scope=\"mcp:tools\""),
        "{:?}",
        www_authenticate(&r)
    );
    // On the MCP path the same refusal points at the metadata, for the client's step-up.
    let narrow = idp
        .token(serde_json::json!({"aud": aud, "scope": "openid"}))
        .await;
    let r = get(
        &proxy.url("/mcp"),
        &[("authorization", &format!("Bearer {narrow}"))],
    )
    .await;
    assert_eq!(r.status, 403);
    let v = &www_authenticate(&r)[0];
    assert!(v.starts_with("Bearer error=\"insufficient_scope\", scope=\"mcp:tools\", resource_metadata=\"http://127.0.0.1:"), "{v}");

    assert!(
        backend.take().len() == 1,
        "only the ES256 token reached the backend since"
    );
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart_and_forged_kids_do_not_hammer_the_issuer() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    let (proxy, port) = running(
        &backend.url(),
        idp.issuer(),
        "min_refresh_interval = \"1h\"\nrefresh_interval = \"2h\"",
        "[ban]\nenabled = false",
    )
    .await;
    let aud = audience(port);
    let call = async |token: &str| with_token(&proxy, "/x", token).await;
    assert_eq!(
        call(&idp.token(serde_json::json!({"aud": aud})).await)
            .await
            .status,
        200
    );

    // The issuer rotates: the new kid is unknown, fetched once, and the token goes through.
    let kid = idp.post("/test/rotate", serde_json::json!({})).await["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = idp.token(serde_json::json!({"aud": aud})).await;
    let r = call(&rotated).await;
    assert_eq!(
        r.status,
        200,
        "a token signed with the new key ({kid}): {}",
        r.body.escape_ascii()
    );
    let fetches = idp.stats().await["jwks_requests"].as_u64().unwrap();

    // Fifty tokens with made-up kids: all refused, and not one more fetch.
    for i in 0..50 {
        let forged = with_header(
            &rotated,
            serde_json::json!({"alg": "RS256", "kid": format!("forged-{i}")}),
        );
        let r = call(&forged).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(
        idp.stats().await["jwks_requests"].as_u64().unwrap(),
        fetches,
        "forged kids fetched the JWKS"
    );
    let s = scrape(&proxy).await;
    assert!(
        value(
            &s,
            "portcullis_auth_failures_total",
            &[("reason", "jwt_unknown_key")]
        ) >= 50.0
    );
    assert_eq!(
        value(&s, "portcullis_jwks_unknown_kid_refetches_total", &[]),
        1.0
    );
}

#[tokio::test]
async fn refused_tokens_count_toward_a_ban_like_refused_keys() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    let (proxy, port) = running(
        &backend.url(),
        idp.issuer(),
        "",
        "[ban]\nfailures = 3\nwindow = \"1m\"\nduration = \"1m\"",
    )
    .await;
    let call = async |token: &str| with_token(&proxy, "/x", token).await;
    let foreign = idp
        .token(serde_json::json!({"aud": "https://other.example/mcp"}))
        .await;
    for _ in 0..3 {
        assert_eq!(call(&foreign).await.status, 401);
    }
    let good = idp.token(serde_json::json!({"aud": audience(port)})).await;
    let r = call(&good).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (429, "banned")
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn an_issuer_that_fails_keeps_the_last_good_keys() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    let (proxy, port) = running(
        &backend.url(),
        idp.issuer(),
        "min_refresh_interval = \"1s\"\nrefresh_interval = \"1s\"",
        "",
    )
    .await;
    let token = idp.token(serde_json::json!({"aud": audience(port)})).await;
    let call = async || {
        get(
            &proxy.url("/x"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
    };
    assert_eq!(call().await.status, 200);

    idp.post("/test/jwks-fail", serde_json::json!({"fail": true}))
        .await;
    eventually(Duration::from_secs(20), async || {
        let s = scrape(&proxy).await;
        (value(&s, "portcullis_jwks_fetches_total", &[("result", "error")]) >= 2.0).then_some(())
    })
    .await
    .expect("failed fetches are counted");
    assert_eq!(
        call().await.status,
        200,
        "the last good key set stays in force"
    );
    let ready = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    assert_eq!(ready.status, 200);
    let jwks = &ready.json()["credentials"]["jwks"];
    assert!(
        jwks["last_error"].as_str().unwrap().contains("503"),
        "{jwks}"
    );
    assert_eq!(jwks["keys"], 2);

    // The issuer gone altogether: fetches keep failing, the last good keys stay.
    let failed = value(
        &scrape(&proxy).await,
        "portcullis_jwks_fetches_total",
        &[("result", "error")],
    );
    drop(idp);
    eventually(Duration::from_secs(20), async || {
        let s = scrape(&proxy).await;
        (value(&s, "portcullis_jwks_fetches_total", &[("result", "error")]) >= failed + 2.0)
            .then_some(())
    })
    .await
    .expect("fetches from a dead issuer fail and are counted");
    assert_eq!(call().await.status, 200);
}

#[tokio::test]
async fn a_jwks_file_is_watched_and_a_broken_one_keeps_the_last_good_keys() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    let jwks = idp
        .post("/test/jwks", serde_json::json!({}))
        .await
        .to_string();
    let (text, port) = config(
        &backend.url(),
        "https://idp.example.com/realms/acme",
        "jwks_file = \"jwks.json\"",
        "",
    );
    let proxy =
        Proxy::start_with_files(&text, &[("keys.toml", &keys_file()), ("jwks.json", &jwks)]).await;
    let aud = audience(port);
    // Tokens from the test issuer, as if issued by the configured one.
    let iss = "https://idp.example.com/realms/acme";
    let call = async |token: &str| with_token(&proxy, "/x", token).await;
    let first = idp.token(serde_json::json!({"aud": aud, "iss": iss})).await;
    assert_eq!(call(&first).await.status, 200);

    let new_kid = idp.post("/test/rotate", serde_json::json!({})).await["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = idp.token(serde_json::json!({"aud": aud, "iss": iss})).await;
    assert_eq!(
        call(&rotated).await.status,
        401,
        "not in the file yet (and a file is never fetched)"
    );

    let path = proxy.dir.path().join("jwks.json");
    let replace = |text: &str| {
        let tmp = proxy.dir.path().join("jwks.json.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    replace("{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}");
    reloads_reach(&proxy, "error", 1.0, "the broken file is seen and refused").await;
    assert_eq!(
        call(&first).await.status,
        200,
        "the last good key set stays in force"
    );

    let rotated_jwks = idp
        .post("/test/jwks", serde_json::json!({}))
        .await
        .to_string();
    replace(&rotated_jwks);
    // Polled on the reload counter, not with the token: failed tokens count toward a ban.
    reloads_reach(&proxy, "ok", 1.0, "the rotated file is loaded").await;
    assert_eq!(
        call(&rotated).await.status,
        200,
        "the rotated key is accepted once the file has it"
    );
    assert_eq!(call(&first).await.status, 200);

    // The old key retired from the file: a token it signed, verified and remembered before,
    // is refused now.
    let mut only_new: serde_json::Value = serde_json::from_str(&rotated_jwks).unwrap();
    only_new["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] == new_kid.as_str());
    replace(&only_new.to_string());
    reloads_reach(&proxy, "ok", 2.0, "the file without the old key is loaded").await;
    assert_eq!(
        call(&first).await.status,
        401,
        "a remembered token outlived its key"
    );
    assert_eq!(call(&rotated).await.status, 200);
}

#[tokio::test]
async fn the_mcp_endpoint_challenges_serves_metadata_and_guards_origins() {
    let Some(idp) = Idp::start() else { return };
    let backend = Backend::ok().await;
    let (mut text, port) = config(
        &backend.url(),
        idp.issuer(),
        "",
        "allowed_origins = [\"https://claude.ai\"]\nresource_name = \"Marcus MCP\"",
    );
    text = text.replace(
        "[auth]\nkeys_file = \"keys.toml\"\n",
        "[auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\n",
    );
    let proxy = Proxy::start_with_files(
        &text,
        &[
            ("keys.toml", &keys_file()),
            ("htpasswd", "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"),
        ],
    )
    .await;
    let metadata_url = format!("http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp");

    // Every method on the MCP path: 401, Bearer first with absolute metadata, Basic after it.
    for method in ["POST", "GET", "DELETE", "PUT", "PATCH"] {
        let r = send(method, &proxy.url("/mcp"), &[], "").await;
        assert_eq!(r.status, 401, "{method}");
        let challenges = www_authenticate(&r);
        assert_eq!(
            challenges[0],
            format!("Bearer resource_metadata=\"{metadata_url}\", scope=\"mcp:tools\""),
            "{method}"
        );
        assert!(
            challenges[1].starts_with("Basic realm="),
            "{method}: {challenges:?}"
        );
        assert_eq!(
            r.headers["access-control-expose-headers"],
            "WWW-Authenticate, Mcp-Session-Id, MCP-Protocol-Version"
        );
    }
    // An unknown scheme and a bad key on the MCP path: 401 too, never a 403 without a challenge.
    let r = get(&proxy.url("/mcp"), &[("authorization", "Digest x")]).await;
    assert_eq!(r.status, 401);
    let r = get(
        &proxy.url("/mcp"),
        &[("authorization", "Bearer mas_wrong_0000000000000000")],
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        www_authenticate(&r)[0].starts_with("Bearer error=\"invalid_token\", resource_metadata=")
    );
    // Off the MCP path, the DESIGN.md §4 table holds.
    assert_eq!(
        get(&proxy.url("/api/v1/invoke"), &[]).await.status,
        401,
        "Basic is on: its challenge"
    );

    // Protected Resource Metadata, at the path-suffixed URL and at the root.
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let r = get(&proxy.url(path), &[("origin", "https://anything.example")]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["access-control-allow-origin"], "*");
        let m = r.json();
        assert_eq!(m["resource"], audience(port));
        assert_eq!(
            m["authorization_servers"],
            serde_json::json!([idp.issuer()])
        );
        assert_eq!(m["scopes_supported"], serde_json::json!(["mcp:tools"]));
        assert_eq!(m["resource_name"], "Marcus MCP");
    }
    let r = get(
        &proxy.url("/.well-known/oauth-protected-resource/other"),
        &[],
    )
    .await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.headers["content-type"].to_str().unwrap()
        ),
        (404, "application/json")
    );

    // A browser-style preflight from an allowed origin: answered without credentials.
    let r = send(
        "OPTIONS",
        &proxy.url("/mcp"),
        &[
            ("origin", "https://claude.ai"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type, mcp-protocol-version",
            ),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://claude.ai"
    );
    assert!(r.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(
        r.headers["access-control-allow-headers"],
        "authorization, content-type, mcp-protocol-version"
    );
    // ... and from any other origin: 403, as every request from it.
    let r = send(
        "OPTIONS",
        &proxy.url("/mcp"),
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = send(
        "POST",
        &proxy.url("/mcp"),
        &[
            ("origin", "https://evil.example"),
            ("authorization", &bearer(PROD_KEY)),
        ],
        "{}",
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "forbidden_origin")
    );
    assert_eq!(
        backend.count(),
        0,
        "nothing from a foreign origin reached the backend"
    );

    // An allowed origin with a key: through, CORS on the answer, Origin gone toward the
    // backend, the MCP headers untouched.
    let r = send(
        "POST",
        &proxy.url("/mcp"),
        &[
            ("origin", "https://claude.ai"),
            ("authorization", &bearer(PROD_KEY)),
            ("mcp-session-id", "s-1"),
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "add"),
            ("mcp-param-region", "eu"),
            ("last-event-id", "7"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body.escape_ascii());
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://claude.ai"
    );
    let seen = backend.take();
    assert!(seen[0].headers.get("origin").is_none());
    for (name, v) in [
        ("mcp-session-id", "s-1"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "add"),
        ("mcp-param-region", "eu"),
        ("last-event-id", "7"),
    ] {
        assert_eq!(seen[0].headers[name], v, "{name}");
    }
    // Basic keeps working on the MCP path beside tokens and keys.
    assert_eq!(
        get(
            &proxy.url("/mcp"),
            &[("authorization", &basic_auth("alice", "password"))]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn keys_only_on_the_mcp_path_challenges_without_advertising_a_sign_in() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "[mcp]\npath = \"/mcp\"\n").await;
    let r = get(&proxy.url("/mcp"), &[]).await;
    assert_eq!(r.status, 401, "a client is told to send a token, not 403");
    assert_eq!(www_authenticate(&r), ["Bearer realm=\"portcullis\""]);
    let r = get(&proxy.url("/.well-known/oauth-protected-resource/mcp"), &[]).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.headers["content-type"].to_str().unwrap()
        ),
        (404, "application/json")
    );
    assert_eq!(
        get(&proxy.url("/mcp"), &[("authorization", &bearer(PROD_KEY))])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&proxy.url("/other"), &[]).await.status,
        403,
        "the §4 table off the MCP path"
    );
}

#[tokio::test]
async fn a_stream_opened_with_a_token_ends_when_the_token_expires() {
    let Some(idp) = Idp::start() else { return };
    let sse = SseBackend::start().await;
    let (proxy, port) = running(&sse.backend.url(), idp.issuer(), "leeway = \"0s\"", "").await;
    let token = idp
        .token_with(serde_json::json!({"expiresIn": 3, "claims": {"aud": audience(port)}}))
        .await;
    let started = Instant::now();
    let resp = open_stream(&proxy, &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let tx = sse.sender(0).await;
    event(&tx, "one").await;
    assert!(next_chunk(&mut body).await.unwrap().is_ok());
    // The stream ends at expiry, without a byte from either side.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(15), body.frame())
            .await
            .expect("the stream ends within 15 s")
        {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(!matches!(end, Some(Ok(_))));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the token expired"
    );
    let lines = proxy.access_lines(1).await;
    assert_eq!(lines[0]["outcome"], "token_expired", "{lines:?}");
    assert_eq!(lines[0]["identity"], "alice");
}

/// An SDK client's report of an OAuth sign-in through the proxy on `port`: it listed the tools
/// and called one, after asking for the resource and the advertised scope, with PKCE.
fn signed_in_and_called(out: &serde_json::Value, port: u16) {
    assert_eq!(
        out["tools"],
        serde_json::json!(["add", "delete_all", "echo", "get_time", "search_docs"]),
        "{out}"
    );
    assert_eq!(out["result"], serde_json::json!(["5"]), "{out}");
    let authorize = out["authorize_url"].as_str().unwrap();
    assert!(
        authorize.contains("code_challenge_method=S256"),
        "{authorize}"
    );
    let resource = format!("resource=http%3A%2F%2F127.0.0.1%3A{port}%2Fmcp");
    assert!(authorize.contains(&resource), "{authorize}");
    assert!(authorize.contains("scope=mcp%3Atools"), "{authorize}");
}

/// Neither a credential nor an `Origin` ever reached the MCP server.
fn no_credential_reached(seen: &[serde_json::Value]) {
    for s in seen {
        assert!(
            s["headers"]["authorization"].is_null(),
            "a credential reached the MCP server: {s}"
        );
        assert!(s["headers"]["origin"].is_null(), "{s}");
    }
}

#[tokio::test]
async fn the_official_mcp_python_client_signs_in_knowing_only_the_url() {
    let Some(idp) = Idp::start() else { return };
    let Some(server) = McpServer::start(false) else {
        return;
    };
    let (proxy, port) = running(
        &server.origin(),
        idp.issuer(),
        "required_scopes = [\"mcp:tools\"]",
        "",
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/mcp");

    signed_in_and_called(&mcp_client(&["oauth", &url]).await, port);
    assert_eq!(
        idp.stats().await["clients"],
        1,
        "the client registered itself"
    );

    // The same server through an API key, as clients with static headers connect.
    let out = mcp_client(&["key", &url, PROD_KEY]).await;
    assert_eq!(out["result"], serde_json::json!(["5"]), "{out}");

    let seen = server.seen();
    assert!(seen.len() >= 6, "{seen:?}");
    no_credential_reached(&seen);
    let identities: std::collections::BTreeSet<_> = seen
        .iter()
        .map(|s| {
            s["headers"]["x-authenticated-user"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        identities,
        ["johndoe".to_string(), "production-backend".to_string()]
            .into_iter()
            .collect()
    );
    let lines = proxy.access_lines(seen.len()).await;
    assert!(lines
        .iter()
        .any(|l| l["identity"] == "johndoe" && l["outcome"] == "ok"));
}

#[tokio::test]
async fn the_official_mcp_typescript_client_signs_in_knowing_only_the_url() {
    let Some(idp) = Idp::start() else { return };
    if !ts_sdk_installed() {
        return;
    }
    let Some(server) = McpServer::start(false) else {
        return;
    };
    let (_proxy, port) = running(
        &server.origin(),
        idp.issuer(),
        "required_scopes = [\"mcp:tools\"]",
        "",
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/mcp");
    signed_in_and_called(&ts_client(&["oauth", &url]).await, port);
    let out = ts_client(&["key", &url, PROD_KEY]).await;
    assert_eq!(out["result"], serde_json::json!(["5"]), "{out}");
    no_credential_reached(&server.seen());
}

#[tokio::test]
async fn the_python_client_works_against_json_answers_too() {
    let Some(idp) = Idp::start() else { return };
    let Some(server) = McpServer::start(true) else {
        return;
    };
    let (_proxy, port) = running(&server.origin(), idp.issuer(), "", "").await;
    let out = mcp_client(&["oauth", &format!("http://127.0.0.1:{port}/mcp")]).await;
    assert_eq!(out["result"], serde_json::json!(["5"]), "{out}");
}

#[test]
fn check_names_every_oauth_mistake_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        "{\"keys\": [\n  {\"kty\": \"RSA\",}\n]}",
    )
    .unwrap();
    let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n\
        [auth]\nkeys_file = \"keys.toml\"\n\
        [auth.jwt]\nissuer = \"http://idp.example.com\"\njwks_file = \"bad.json\"\n\
        algorithms = [\"RS256\", \"none\", \"HS256\", \"XX1\"]\nleeway = \"1h\"\n\
        [mcp]\nresource = \"http://mcp.example.com/mcp\"\npath = \"/mcp/\"\n\
        allowed_origins = [\"claude.ai\"]\nscopes_supported = [\"offline_access\"]\n";
    let err = portcullis::Config::from_toml(&dir.path().join("proxy.toml"), text)
        .unwrap_err()
        .to_string();
    for expected in [
        "proxy.toml:6:10: issuer = \"http://idp.example.com\": plain http is accepted on loopback only",
        "bad.json:2:",
        "proxy.toml:8:24: algorithms: \"none\" is never accepted",
        "proxy.toml:8:32: algorithms: HS256 is never accepted",
        "proxy.toml:8:41: algorithms: \"XX1\" is not a JWS algorithm",
        "proxy.toml:9:10: leeway is over 5 minutes",
        "proxy.toml:11:12: resource = \"http://mcp.example.com/mcp\": plain http is accepted on loopback only",
        "proxy.toml:12:8: path = \"/mcp/\" must be a normalised absolute path",
        "proxy.toml:13:20: allowed_origins: \"claude.ai\" is not an origin",
        "proxy.toml:14:21: scopes_supported must not list offline_access",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }

    // [auth.jwt] without an audience to check.
    let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[auth.jwt]\nissuer = \"https://idp.example.com\"\njwks_file = \"nowhere.json\"\n";
    let err = portcullis::Config::from_toml(&dir.path().join("proxy.toml"), text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs the audience its tokens are issued for"),
        "{err}"
    );
    assert!(err.contains("jwks_file: cannot read"), "{err}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn an_https_issuer_with_a_private_ca_is_discovered_and_trusted_only_with_its_ca() {
    let pki = pki::Pki::new();
    let leaf = pki.server();
    let signer = std::sync::Arc::new(Es256Issuer::new());
    let served = signer.clone();
    // Discovery and keys over https; the issuer is the backend's own origin (from Host).
    let idp = Backend::tls_with(
        &leaf.cert,
        &leaf.key,
        move |r: http::Request<hyper::body::Incoming>| {
            let served = served.clone();
            async move {
                let host = r.headers()["host"].to_str().unwrap().to_string();
                let body = match r.uri().path() {
                    "/.well-known/openid-configuration" => serde_json::json!({
                        "issuer": format!("https://{host}"),
                        "jwks_uri": format!("https://{host}/keys"),
                    })
                    .to_string(),
                    "/keys" => served.jwks.clone(),
                    _ => "{}".to_string(),
                };
                http::Response::new(full(body))
            }
        },
    )
    .await;
    let issuer = format!("https://127.0.0.1:{}", idp.addr.port());
    let backend = Backend::ok().await;
    let token = signer.sign(
        "at+jwt",
        serde_json::json!({
            "iss": issuer, "aud": "portcullis", "sub": "svc", "client_id": "reports-job",
            "exp": unix_now() + 600,
        }),
    );
    let config = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\n[auth.jwt]\nissuer = \"{issuer}\"\naudiences = [\"portcullis\"]\n{extra}\n",
            backend.url()
        )
    };

    // Without the CA: discovery fails on the certificate, /readyz says so, tokens are refused.
    let untrusted = Proxy::start_with_files(&config(""), &[]).await;
    let why = eventually(Duration::from_secs(20), async || {
        let r = get(&format!("http://{}/readyz", untrusted.admin), &[]).await;
        let e = r.json()["credentials"]["jwks"]["last_error"]
            .as_str()
            .map(str::to_owned);
        (r.status == 503).then_some(e).flatten()
    })
    .await
    .expect("not ready, with the fetch error");
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    let r = get(&untrusted.url("/x"), &[("authorization", &bearer(&token))]).await;
    assert_eq!(r.status, 401);

    // With it: discovered over https, and `typ` and `identity_claim` checked.
    let ca = pki.ca_pem();
    let trusted = Proxy::start_with_files(
        &config("ca = \"ca.pem\"\ntyp = \"at+jwt\"\nidentity_claim = \"client_id\""),
        &[("ca.pem", &ca)],
    )
    .await;
    until_ready(&trusted).await;
    let r = get(&trusted.url("/x"), &[("authorization", &bearer(&token))]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        backend.take()[0].headers["x-authenticated-user"],
        "reports-job"
    );
    // An ID token (typ JWT) is not an access token.
    let id_token = signer.sign(
        "JWT",
        serde_json::json!({
            "iss": issuer, "aud": "portcullis", "sub": "svc", "client_id": "reports-job",
            "exp": unix_now() + 600,
        }),
    );
    let r = get(&trusted.url("/x"), &[("authorization", &bearer(&id_token))]).await;
    assert_eq!(r.status, 401);
    let s = scrape(&trusted).await;
    assert_eq!(
        value(
            &s,
            "portcullis_auth_failures_total",
            &[("reason", "jwt_type")]
        ),
        1.0
    );
    // No identity claim: refused, never an anonymous pass.
    let nameless = signer.sign(
        "at+jwt",
        serde_json::json!({
            "iss": issuer, "aud": "portcullis", "sub": "svc", "exp": unix_now() + 600,
        }),
    );
    assert_eq!(
        get(&trusted.url("/x"), &[("authorization", &bearer(&nameless))])
            .await
            .status,
        401
    );
}

/// An issuer on plain loopback HTTP that serves discovery and its key set with `cache_control`,
/// recording every request.
async fn cached_issuer(
    signer: std::sync::Arc<Es256Issuer>,
    cache_control: &'static str,
) -> Backend {
    Backend::with(move |r: http::Request<hyper::body::Incoming>| {
        let signer = signer.clone();
        async move {
            let host = r.headers()["host"].to_str().unwrap().to_string();
            let mut resp = match r.uri().path() {
                "/.well-known/openid-configuration" => http::Response::new(full(
                    serde_json::json!({
                        "issuer": format!("http://{host}"),
                        "jwks_uri": format!("http://{host}/jwks"),
                    })
                    .to_string(),
                )),
                _ => http::Response::new(full(signer.jwks.clone())),
            };
            resp.headers_mut().insert(
                "cache-control",
                http::HeaderValue::from_static(cache_control),
            );
            resp
        }
    })
    .await
}

fn jwks_fetches(issuer: &Backend, seen: &mut usize) -> usize {
    *seen += issuer.take().iter().filter(|s| s.target == "/jwks").count();
    *seen
}

#[tokio::test]
async fn the_key_set_is_refreshed_as_its_cache_headers_say_within_the_bounds() {
    let signer = std::sync::Arc::new(Es256Issuer::new());
    let backend = Backend::ok().await;
    let config = |issuer: &Backend, bounds: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\n[auth.jwt]\nissuer = \"{}\"\naudiences = [\"portcullis\"]\n{bounds}\n",
            backend.url(),
            issuer.url()
        )
    };
    for (cache_control, bounds, why) in [
        // Under a refresh_interval of an hour: refetched about every second.
        (
            "public, max-age=1",
            "refresh_interval = \"1h\"\nmin_refresh_interval = \"1s\"",
            "max-age is honoured",
        ),
        // A day's max-age over a refresh_interval of 1 s: the interval bounds it.
        (
            "public, max-age=86400",
            "refresh_interval = \"1s\"\nmin_refresh_interval = \"1s\"",
            "refresh_interval bounds max-age",
        ),
    ] {
        let issuer = cached_issuer(signer.clone(), cache_control).await;
        let _proxy = Proxy::start_with_files(&config(&issuer, bounds), &[]).await;
        let mut seen = 0;
        eventually(Duration::from_secs(15), async || {
            (jwks_fetches(&issuer, &mut seen) >= 3).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{why}: three fetches within 15 s"));
    }

    // max-age=0 never makes it fetch more often than min_refresh_interval.
    let zero = cached_issuer(signer, "no-cache, max-age=0").await;
    let proxy = Proxy::start_with_files(
        &config(
            &zero,
            "refresh_interval = \"1h\"\nmin_refresh_interval = \"1h\"",
        ),
        &[],
    )
    .await;
    until_ready(&proxy).await;
    // The first fetch has happened (ready); without the floor a refresh would follow at once.
    let mut seen = 0;
    assert_eq!(jwks_fetches(&zero, &mut seen), 1);
    let again = eventually(Duration::from_secs(3), async || {
        (jwks_fetches(&zero, &mut seen) > 1).then_some(())
    })
    .await;
    assert!(
        again.is_none(),
        "max-age=0 fetched again before min_refresh_interval"
    );
    let r = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    assert_eq!(r.json()["credentials"]["jwks"]["fetches_ok"], 1);
}

#[tokio::test]
async fn pass_credentials_never_passes_a_token_on() {
    let signer = Es256Issuer::new();
    let backend = Backend::ok().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\npass_credentials = true\n\
         [auth]\nkeys_file = \"keys.toml\"\n[auth.jwt]\nissuer = \"https://idp.example.com\"\njwks_file = \"jwks.json\"\naudiences = [\"portcullis\"]\n",
        backend.url()
    );
    let proxy = Proxy::start_with_files(
        &text,
        &[("keys.toml", &keys_file()), ("jwks.json", &signer.jwks)],
    )
    .await;
    let token = signer.sign("JWT", serde_json::json!({
        "iss": "https://idp.example.com", "aud": "portcullis", "sub": "svc", "exp": unix_now() + 600
    }));
    assert_eq!(
        get(&proxy.url("/x"), &[("authorization", &bearer(&token))])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&proxy.url("/x"), &[("authorization", &bearer(PROD_KEY))])
            .await
            .status,
        200
    );
    let seen = backend.take();
    assert!(
        seen[0].headers.get("authorization").is_none(),
        "the token was passed on"
    );
    assert_eq!(seen[0].headers["x-authenticated-user"], "svc");
    assert_eq!(
        seen[1].headers["authorization"],
        bearer(PROD_KEY).as_str(),
        "a key is, with pass_credentials"
    );
}

#[tokio::test]
async fn a_tool_a_scope_would_grant_asks_for_that_scope_and_the_python_client_steps_up() {
    let Some(idp) = Idp::start() else { return };
    let Some(server) = McpServer::start(false) else {
        return;
    };
    let grants = "tool_policy = true\n\
        [[mcp.grants]]\nscopes = [\"mcp:tools\"]\ntools = [\"add\", \"echo\", \"get_time\", \"search_docs\"]\n\
        [[mcp.grants]]\nscopes = [\"mcp:admin\"]\ntools = [\"delete_all\"]\n";
    let (_proxy, port) = running(&server.origin(), idp.issuer(), "", grants).await;
    let url = format!("http://127.0.0.1:{port}/mcp");

    // By hand: a token with mcp:tools calling delete_all gets 403 naming the scope to ask
    // for, with those it holds, and where the metadata is.
    let token = idp
        .token(serde_json::json!({"aud": audience(port), "scope": "mcp:tools"}))
        .await;
    let r = send(
        "POST",
        &url,
        &[("authorization", &bearer(&token))],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}}"#,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        www_authenticate(&r),
        [format!(
            "Bearer error=\"insufficient_scope\", scope=\"mcp:tools mcp:admin\", resource_metadata=\"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp\", error_description=\"The token lacks a scope this needs.\""
        )]
    );

    // The official client: signs in with mcp:tools, sees the four tools that scope grants,
    // is refused delete_all with 403 insufficient_scope, signs in again asking for
    // mcp:admin too, and the call goes through.
    let out = mcp_client(&["oauth-calls", &url, "add", "delete_all"]).await;
    assert_eq!(
        out["tools"],
        serde_json::json!(["add", "echo", "get_time", "search_docs"]),
        "{out}"
    );
    let calls = &out["calls"];
    assert_eq!(calls[0]["result"], serde_json::json!(["5"]), "{out}");
    assert_eq!(
        calls[1]["result"],
        serde_json::json!(["deleted"]),
        "stepped up: {out}"
    );
    let asked = &idp.stats().await["scopes_asked"];
    assert_eq!(asked.as_array().map(Vec::len), Some(2), "{asked}");
    let second = asked[1].as_str().unwrap();
    assert!(
        second.contains("mcp:admin") && second.contains("mcp:tools"),
        "the second sign-in asked for both: {asked}"
    );
    no_credential_reached(&server.seen());
}
