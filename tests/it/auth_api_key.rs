//! API-key authentication and authorization, DESIGN.md §3-§4, through a real proxy.

use crate::support::*;

async fn setup() -> (Backend, Proxy) {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    (backend, proxy)
}

#[tokio::test]
async fn enabled_keys_reach_the_backend_with_their_identity() {
    let (backend, proxy) = setup().await;
    let url = proxy.url("/api/v1/invoke");
    let r = send("POST", &url, &[("authorization", &bearer(PROD_KEY))], "{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok");
    // The key stored only as sha256, presented in X-API-Key.
    let r = send("POST", &url, &[("x-api-key", WEB_KEY)], "{}").await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers["x-authenticated-user"],
        "production-backend"
    );
    assert_eq!(seen[1].headers["x-authenticated-user"], "web-application");
}

#[tokio::test]
async fn the_design_table_of_refusals_holds_and_nothing_reaches_the_backend() {
    let (backend, proxy) = setup().await;
    let url = proxy.url("/api/v1/invoke");
    type Case = (Vec<(&'static str, String)>, u16, &'static str);
    let cases: Vec<Case> = vec![
        (vec![], 403, "invalid_authorization"),
        (
            vec![("authorization", "Bearer".into())],
            403,
            "invalid_authorization",
        ),
        (
            vec![("authorization", "Bearer    ".into())],
            403,
            "invalid_authorization",
        ),
        (vec![("x-api-key", "".into())], 403, "invalid_authorization"),
        (
            vec![("authorization", "Basic dXNlcjpwYXNz".into())],
            403,
            "invalid_scheme",
        ),
        (
            vec![("authorization", "Digest username=\"x\"".into())],
            403,
            "invalid_scheme",
        ),
        (
            vec![("authorization", bearer(DISABLED_KEY))],
            401,
            "invalid_token",
        ),
        (
            vec![("x-api-key", DISABLED_KEY.into())],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer(EXPIRED_KEY))],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer("mas_unknown_000000000000000000000"))],
            401,
            "invalid_token",
        ),
        (
            vec![
                ("x-api-key", PROD_KEY.into()),
                ("x-api-key", WEB_KEY.into()),
            ],
            403,
            "invalid_authorization",
        ),
    ];
    for (headers, status, code) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send("GET", &url, &h, "").await;
        assert_eq!(r.status, status, "{headers:?}");
        assert_eq!(r.error_code(), code, "{headers:?}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.headers.contains_key("x-request-id"));
        if status == 401 {
            assert_eq!(
                r.headers["www-authenticate"],
                "Bearer error=\"invalid_token\""
            );
        }
        // The body never echoes what was presented.
        for (_, v) in &headers {
            if v.len() > 8 {
                assert!(!String::from_utf8_lossy(&r.body).contains(v.trim_start_matches("Bearer ")));
            }
        }
    }
    assert_eq!(backend.count(), 0, "a refused request reached the backend");
}

#[tokio::test]
async fn allow_rules_limit_a_key_to_its_methods_and_paths() {
    let (backend, proxy) = setup().await;
    let auth = bearer(RESTRICTED_KEY);
    let h = [("authorization", auth.as_str())];
    assert_eq!(
        send("GET", &proxy.url("/api/models"), &h, "").await.status,
        200
    );
    assert_eq!(
        send("POST", &proxy.url("/api/v1/invoke"), &h, "x")
            .await
            .status,
        200
    );
    assert_eq!(send("DELETE", &proxy.url("/mcp"), &h, "").await.status, 200);
    let methods: Vec<String> = backend.take().into_iter().map(|s| s.method).collect();
    assert_eq!(methods, ["GET", "POST", "DELETE"]);
    for (method, path) in [
        ("DELETE", "/api/models"),
        ("GET", "/admin"),
        ("POST", "/api/v1/invoke/x"),
        ("GET", "/api"),
    ] {
        let r = send(method, &proxy.url(path), &h, "").await;
        assert_eq!(r.status, 403, "{method} {path}");
        assert_eq!(r.error_code(), "forbidden");
    }
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn credentials_are_stripped_unless_pass_credentials() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let auth = bearer(PROD_KEY);
    get(&proxy.url("/a"), &[("authorization", &auth)]).await;
    get(&proxy.url("/a"), &[("x-api-key", PROD_KEY)]).await;
    for seen in backend.take() {
        assert!(!seen.headers.contains_key("authorization"));
        assert!(!seen.headers.contains_key("x-api-key"));
    }

    let passing = Proxy::start(&backend.url(), "pass_credentials = true").await;
    get(&passing.url("/a"), &[("authorization", &auth)]).await;
    let seen = backend.take();
    assert_eq!(seen[0].headers["authorization"], auth.as_str());
}

#[tokio::test]
async fn a_spoofed_identity_header_never_reaches_the_backend() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(
        &backend.url(),
        "[auth]\nkeys_file = \"keys.toml\"\npublic_paths = [\"/health\"]",
    )
    .await;
    get(&proxy.url("/health"), &[("x-authenticated-user", "admin")]).await;
    get(
        &proxy.url("/x"),
        &[("x-api-key", PROD_KEY), ("x-authenticated-user", "admin")],
    )
    .await;
    let seen = backend.take();
    assert_eq!(seen.len(), 2);
    assert!(
        !seen[0].headers.contains_key("x-authenticated-user"),
        "public path kept a spoofed identity"
    );
    let idents: Vec<_> = seen[1]
        .headers
        .get_all("x-authenticated-user")
        .iter()
        .collect();
    assert_eq!(idents, ["production-backend"]);
}

#[tokio::test]
async fn public_paths_need_no_key_and_only_they() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(
        &backend.url(),
        "[auth]\nkeys_file = \"keys.toml\"\npublic_paths = [\"/health\", \"/docs/*\"]",
    )
    .await;
    assert_eq!(get(&proxy.url("/health"), &[]).await.status, 200);
    assert_eq!(get(&proxy.url("/docs/index.html"), &[]).await.status, 200);
    assert_eq!(get(&proxy.url("/health/x"), &[]).await.status, 403);
    assert_eq!(get(&proxy.url("/docs"), &[]).await.status, 403);
    assert_eq!(backend.take().len(), 2);
}

#[tokio::test]
async fn anonymous_mode_is_explicit_and_still_refuses_bad_keys() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[auth]\nanonymous = true\n",
        backend.url()
    ))
    .await;
    assert_eq!(get(&proxy.url("/x"), &[]).await.status, 200);
    assert_eq!(
        get(
            &proxy.url("/x"),
            &[("x-api-key", "mas_unknown_000000000000000000000")]
        )
        .await
        .status,
        401
    );
}

#[tokio::test]
async fn the_access_log_names_the_key_by_fingerprint_never_the_key() {
    let (_backend, proxy) = setup().await;
    get(
        &proxy.url("/api/x?token=secret-in-query"),
        &[("authorization", &bearer(PROD_KEY))],
    )
    .await;
    get(
        &proxy.url("/api/x"),
        &[("authorization", &bearer(DISABLED_KEY))],
    )
    .await;
    let lines = proxy.access_lines(2).await;
    assert_eq!(lines[0]["identity"], "production-backend");
    assert_eq!(lines[0]["key_fp"], &sha256_hex(PROD_KEY)[..12]);
    assert_eq!(lines[0]["path"], "/api/x");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[1]["status"], 401);
    assert_eq!(lines[1]["outcome"], "unauthenticated");
    let text = std::fs::read_to_string(proxy.access_log_path()).unwrap();
    for secret in [PROD_KEY, DISABLED_KEY, "secret-in-query"] {
        assert!(!text.contains(secret), "the access log holds {secret}");
    }
}

#[tokio::test]
async fn guessing_api_keys_gets_the_client_banned() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "[ban]\nfailures = 3\nduration = \"1h\"").await;
    let url = proxy.url("/api/x");
    for i in 0..3 {
        let guess = format!("mas_guess_{i:0>30}");
        assert_eq!(get(&url, &[("x-api-key", &guess)]).await.status, 401);
    }
    let r = get(&url, &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "banned");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(backend.count(), 0);
    let lines = proxy.access_lines(4).await;
    assert_eq!(lines[3]["outcome"], "banned");
}
