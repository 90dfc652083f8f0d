//! Path tricks against `allow` rules and `public_paths`: the decision is taken on exactly the
//! path that is forwarded, so no spelling reaches what a rule denies.

use crate::support::*;

#[tokio::test]
async fn dot_segments_and_encodings_cannot_escape_an_allow_rule() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let auth = bearer(RESTRICTED_KEY);
    // Normalised to /admin, which the key's rules do not cover.
    for trick in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api/.%2e/admin",
        "/api//..//admin",
        "/api/./../admin",
    ] {
        let r = get(&proxy.url(trick), &[("authorization", &auth)]).await;
        assert_eq!(r.status, 403, "{trick}");
        assert_eq!(r.error_code(), "forbidden", "{trick}");
    }
    // Spellings that backends disagree about are refused outright.
    for trick in [
        "/api/%2F../admin",
        "/api/..%2Fadmin",
        "/api/..%2fadmin",
        "/api/%5C..%5Cadmin",
        "/api/..;/admin",
        "/api/%c0%ae%c0%ae/admin",
        "/../admin",
        "/api/%00",
    ] {
        let r = get(&proxy.url(trick), &[("authorization", &auth)]).await;
        assert_eq!(r.status, 400, "{trick}");
        assert_eq!(r.error_code(), "bad_request", "{trick}");
        assert_eq!(r.headers["connection"], "close", "{trick}");
    }
    assert_eq!(backend.count(), 0, "a trick reached the backend");
}

#[tokio::test]
async fn a_literal_backslash_is_refused() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let req = format!("GET /api\\..\\admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {RESTRICTED_KEY}\r\nConnection: close\r\n\r\n");
    let text = raw(proxy.addr, req.as_bytes()).await;
    assert_eq!(raw_status(&text), 400, "{text}");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn the_backend_receives_the_normalised_path_that_was_authorised() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&backend.url(), "").await;
    let auth = bearer(RESTRICTED_KEY);
    for (sent, forwarded) in [
        ("/api/x/../models?q=1", "/api/models?q=1"),
        ("//api//models", "/api/models"),
        ("/%61pi/models", "/api/models"),
        ("/api/a%20b", "/api/a%20b"),
    ] {
        let r = get(&proxy.url(sent), &[("authorization", &auth)]).await;
        assert_eq!(r.status, 200, "{sent}");
        assert_eq!(backend.take()[0].target, forwarded, "{sent}");
    }
}

#[tokio::test]
async fn path_tricks_cannot_make_a_path_public() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(
        &backend.url(),
        "[auth]\nkeys_file = \"keys.toml\"\npublic_paths = [\"/public/*\"]",
    )
    .await;
    for trick in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public%2F..%2Fadmin",
    ] {
        let r = get(&proxy.url(trick), &[]).await;
        assert!(r.status == 403 || r.status == 400, "{trick}: {}", r.status);
    }
    assert_eq!(get(&proxy.url("/public/./ok"), &[]).await.status, 200);
    assert_eq!(backend.take()[0].target, "/public/ok");
}

#[tokio::test]
async fn an_upstream_base_path_prefixes_every_forwarded_path() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start(&format!("{}/base/", backend.url()), "").await;
    get(&proxy.url("/api/x?y=1"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(backend.take()[0].target, "/base/api/x?y=1");
}
