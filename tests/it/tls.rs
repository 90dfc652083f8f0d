//! TLS termination, certificate hot swap, mTLS, the redirect listener and security headers.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Response;

use crate::support::pki::*;
use crate::support::*;

/// Write `leaf` as tls.crt / tls.key into `dir`.
fn write_pair(dir: &Path, leaf: &Leaf) {
    std::fs::write(dir.join("tls.crt"), &leaf.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &leaf.key).unwrap();
}

async fn tls_proxy(backend: &Backend, certs: &Path, tls_extra: &str, rest: &str) -> Proxy {
    Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [tls]\ncert = \"{c}/tls.crt\"\nkey = \"{c}/tls.key\"\n{tls_extra}\n\
         [upstream]\nurl = \"{}\"\n{rest}\n",
        backend.url(),
        c = certs.display()
    ))
    .await
}

#[tokio::test]
async fn tls_1_2_and_1_3_handshakes_succeed_and_requests_are_proxied() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, certs.path(), "", "").await;
    let ca = pki.ca_pem();
    static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    for versions in [TLS12, TLS13] {
        let opts = ClientOpts {
            versions,
            ..ClientOpts::new(&ca)
        };
        let r = tls_get(proxy.addr, &opts, "/api", &[("x-api-key", PROD_KEY)])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ok");
        assert_eq!(r.version.unwrap(), versions[0].version);
        assert_eq!(
            r.headers["strict-transport-security"],
            "max-age=31536000; includeSubDomains"
        );
    }
    let seen = backend.take();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn alpn_negotiates_h2_and_an_http2_request_is_proxied() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, certs.path(), "", "").await;
    let ca = pki.ca_pem();
    let opts = ClientOpts {
        alpn: &[b"h2", b"http/1.1"],
        ..ClientOpts::new(&ca)
    };
    let r = tls_get(proxy.addr, &opts, "/h2", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    assert_eq!(r.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(r.status, 200);
    assert_eq!(backend.take()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn tls_1_1_is_refused() {
    let Some(openssl) = find_tool("openssl", "openssl") else {
        return;
    };
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, certs.path(), "", "").await;
    let handshake = |flag: &'static str| {
        let openssl = openssl.clone();
        let addr = proxy.addr.to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(openssl)
                .args([
                    "s_client",
                    "-connect",
                    &addr,
                    flag,
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let ok = handshake("-tls1_2").await.unwrap();
    assert!(
        ok.status.success(),
        "openssl cannot do TLS 1.2 here: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let old = handshake("-tls1_1").await.unwrap();
    assert!(!old.status.success(), "a TLS 1.1 handshake succeeded");
}

#[tokio::test]
async fn a_renamed_certificate_is_served_to_the_next_handshake_and_open_connections_keep_working() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let first = pki.server();
    write_pair(certs.path(), &first);
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, certs.path(), "", "").await;
    let ca = pki.ca_pem();
    let opts = ClientOpts::new(&ca);

    // A connection opened before the swap.
    let stream = connect(proxy.addr, &opts).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);

    let second = pki.server();
    let staging = certs.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    write_pair(&staging, &second);
    std::fs::rename(staging.join("tls.key"), certs.path().join("tls.key")).unwrap();
    std::fs::rename(staging.join("tls.crt"), certs.path().join("tls.crt")).unwrap();
    let swapped = wait_for_cert(&proxy, &opts, &second).await;
    assert!(swapped, "the new certificate was not served");

    let req = http::Request::get("/still-open")
        .header("host", "localhost")
        .header("x-api-key", PROD_KEY)
        .body(full(""))
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("the connection opened before the swap still works");
    assert_eq!(resp.status(), 200);
}

/// Poll new handshakes until `leaf` is served (10 s at most).
async fn wait_for_cert(proxy: &Proxy, opts: &ClientOpts<'_>, leaf: &Leaf) -> bool {
    let want = leaf.der();
    eventually(Duration::from_secs(10), async || {
        let r = tls_get(proxy.addr, opts, "/", &[("x-api-key", PROD_KEY)]).await;
        r.is_ok_and(|r| r.server_cert == want).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn a_kubernetes_style_symlink_swap_is_picked_up() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let first = pki.server();
    // The layout of a Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..2026_11_22_v1
    std::fs::create_dir(dir.join("..v1")).unwrap();
    write_pair(&dir.join("..v1"), &first);
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, dir, "", "").await;
    let ca = pki.ca_pem();
    let opts = ClientOpts::new(&ca);
    assert!(wait_for_cert(&proxy, &opts, &first).await);

    for version in ["..v2", "..v3"] {
        let next = pki.server();
        std::fs::create_dir(dir.join(version)).unwrap();
        write_pair(&dir.join(version), &next);
        std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        assert!(
            wait_for_cert(&proxy, &opts, &next).await,
            "swap to {version} not served"
        );
    }
}

#[tokio::test]
async fn a_broken_certificate_keeps_the_last_good_one() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let first = pki.server();
    write_pair(certs.path(), &first);
    let backend = Backend::ok().await;
    let proxy = tls_proxy(&backend, certs.path(), "", "").await;
    let resolver = proxy.server.as_ref().unwrap().tls().unwrap().clone();
    let ca = pki.ca_pem();
    let opts = ClientOpts::new(&ca);

    // A key that does not match the certificate.
    std::fs::write(certs.path().join("tls.key"), pki.server().key).unwrap();
    let failed = eventually(Duration::from_secs(10), async || {
        (resolver.reloads_failed.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert!(failed.is_some(), "the mismatched pair was not noticed");
    let r = tls_get(proxy.addr, &opts, "/", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    assert_eq!(
        r.server_cert,
        first.der(),
        "a broken pair replaced the good one"
    );
    let ready = get(&format!("http://{}/readyz", proxy.admin), &[])
        .await
        .json();
    assert_eq!(ready["tls"]["subject"], "CN=localhost");
    assert!(ready["tls"]["reloads_failed"].as_u64().unwrap() >= 1);
    let left = ready["tls"]["expires_in_seconds"].as_u64().unwrap();
    assert!(
        left > 300 * 86_400,
        "rcgen's default validity is years: {left}"
    );

    // Fixing the files recovers without a restart.
    let fixed = pki.server();
    write_pair(certs.path(), &fixed);
    assert!(wait_for_cert(&proxy, &opts, &fixed).await);
}

/// A TLS proxy whose clients may authenticate by certificate (`client_auth = mode`).
async fn mtls_proxy(mode: &str) -> (Pki, tempfile::TempDir, Backend, Proxy) {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    std::fs::write(certs.path().join("ca.crt"), pki.ca_pem()).unwrap();
    let backend = Backend::ok().await;
    let proxy = tls_proxy(
        &backend,
        certs.path(),
        &format!(
            "client_ca = \"{}/ca.crt\"\nclient_auth = \"{mode}\"",
            certs.path().display()
        ),
        "[auth]\nkeys_file = \"keys.toml\"\nclient_cert_identity = true",
    )
    .await;
    (pki, certs, backend, proxy)
}

#[tokio::test]
async fn mtls_required_refuses_clients_without_a_certificate_and_names_those_with_one() {
    let (pki, _certs, backend, proxy) = mtls_proxy("required").await;
    let ca = pki.ca_pem();
    let anonymous = tls_get(proxy.addr, &ClientOpts::new(&ca), "/", &[]).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate got through"
    );

    let other_ca = Pki::new();
    let stranger = other_ca.client("stranger");
    let r = tls_get(
        proxy.addr,
        &ClientOpts {
            client_cert: Some(&stranger),
            ..ClientOpts::new(&ca)
        },
        "/",
        &[],
    )
    .await;
    assert!(r.is_err(), "a certificate from another CA was accepted");

    let billing = pki.client("billing-service");
    let r = tls_get(
        proxy.addr,
        &ClientOpts {
            client_cert: Some(&billing),
            ..ClientOpts::new(&ca)
        },
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let seen = backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-authenticated-user"], "billing-service");
}

#[tokio::test]
async fn mtls_optional_lets_clients_without_a_certificate_authenticate_otherwise() {
    let (pki, _certs, backend, proxy) = mtls_proxy("optional").await;
    let ca = pki.ca_pem();
    let r = tls_get(proxy.addr, &ClientOpts::new(&ca), "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = tls_get(
        proxy.addr,
        &ClientOpts::new(&ca),
        "/",
        &[("x-api-key", PROD_KEY)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let svc = pki.client("svc");
    let r = tls_get(
        proxy.addr,
        &ClientOpts {
            client_cert: Some(&svc),
            ..ClientOpts::new(&ca)
        },
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let names: Vec<_> = backend
        .take()
        .iter()
        .map(|s| s.headers["x-authenticated-user"].clone())
        .collect();
    assert_eq!(names, ["production-backend", "svc"]);
}

/// A TLS proxy with a redirect listener: the proxy, its backend, the redirect's address, and
/// the certificate directory (kept for the proxy's lifetime).
async fn redirecting_proxy() -> (Proxy, Backend, std::net::SocketAddr, tempfile::TempDir) {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nredirect_http = \"127.0.0.1:0\"\n\
         [tls]\ncert = \"{c}/tls.crt\"\nkey = \"{c}/tls.key\"\n[upstream]\nurl = \"{}\"\n",
        backend.url(),
        c = certs.path().display()
    ))
    .await;
    let redirect = proxy.server.as_ref().unwrap().redirect_addr().unwrap();
    (proxy, backend, redirect, certs)
}

#[tokio::test]
async fn the_redirect_listener_answers_308_to_https() {
    let (proxy, backend, redirect, _certs) = redirecting_proxy().await;
    let r = get(
        &format!("http://{redirect}/api/x?a=1"),
        &[("host", "mcp.example:8080")],
    )
    .await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers["location"],
        format!("https://mcp.example:{}/api/x?a=1", proxy.addr.port()).as_str()
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn the_redirect_carries_the_security_headers_but_never_hsts() {
    let (_proxy, _backend, redirect, _certs) = redirecting_proxy().await;
    let r = get(&format!("http://{redirect}/x"), &[("host", "mcp.example")]).await;
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert!(
        !r.headers.contains_key("strict-transport-security"),
        "HSTS is for TLS answers only (RFC 6797 §7.2)"
    );
}

#[tokio::test]
async fn security_headers_are_on_every_response_and_hsts_only_over_tls() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &pki.server());
    let backend = Backend::with(|_req| async {
        Response::builder()
            .header("server", "gunicorn")
            .header("x-powered-by", "python")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let dead = dead_addr();
    let headers_section = "[headers]\ncontent_security_policy = \"default-src 'none'\"\n[headers.set]\n\"X-Robots-Tag\" = \"noindex\"\n[ban]\nfailures = 2";
    let tls = tls_proxy(&backend, certs.path(), "", headers_section).await;
    let ca = pki.ca_pem();
    let opts = ClientOpts::new(&ca);
    let check = |h: &http::HeaderMap, tls: bool, what: &str| {
        assert_eq!(h["x-frame-options"], "DENY", "{what}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
        assert_eq!(h["content-security-policy"], "default-src 'none'", "{what}");
        assert_eq!(h["x-robots-tag"], "noindex", "{what}");
        assert!(
            !h.contains_key("server") && !h.contains_key("x-powered-by"),
            "{what}"
        );
        assert!(!h.contains_key("x-xss-protection"), "{what}");
        assert_eq!(h.contains_key("strict-transport-security"), tls, "{what}");
    };
    let ok = tls_get(tls.addr, &opts, "/", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    check(&ok.headers, true, "200");
    for _ in 0..2 {
        let r = tls_get(tls.addr, &opts, "/", &[("x-api-key", DISABLED_KEY)])
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        check(&r.headers, true, "401");
    }
    let r = tls_get(tls.addr, &opts, "/", &[("x-api-key", PROD_KEY)])
        .await
        .unwrap();
    assert_eq!(r.status, 429);
    check(&r.headers, true, "429");

    let plain = Proxy::start(&format!("http://{dead}"), headers_section).await;
    let r = get(&plain.url("/"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 502);
    check(&r.headers, false, "502 over plain HTTP");
}

#[test]
fn check_refuses_a_mismatched_key_and_warns_of_expiry() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n[auth]\nkeys_file = \"keys.toml\"\n").unwrap();
    let check = || check_config(&config);
    let server = pki.server();
    std::fs::write(dir.path().join("tls.crt"), &server.cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), pki.server().key).unwrap();
    let out = check();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("proxy.toml:2:8: ")
            && stdout.contains("does not belong to the certificate"),
        "{stdout}"
    );

    let soon = time_in_days(7);
    let expiring = pki.server_until(soon.0, soon.1, soon.2);
    write_pair(dir.path(), &expiring);
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: ") && stderr.contains("the certificate expires at"),
        "{stderr}"
    );
}

/// (year, month, day) about `days` from now, in UTC.
fn time_in_days(days: u64) -> (i32, u8, u8) {
    let t = std::time::SystemTime::now() + Duration::from_secs(days * 86_400);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    (
        s[0..4].parse().unwrap(),
        s[5..7].parse().unwrap(),
        s[8..10].parse().unwrap(),
    )
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_upstream_ca() {
    let pki = Pki::new();
    let leaf = pki.server();
    let backend = Backend::tls(&leaf.cert, &leaf.key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.crt");
    std::fs::write(&ca, pki.ca_pem()).unwrap();

    for (host, protocol, version) in [
        ("localhost", "http1", "HTTP/1.1"),
        ("127.0.0.1", "http2", "HTTP/2.0"),
    ] {
        let url = format!("https://{host}:{}", backend.addr.port());
        let proxy = Proxy::start(
            &url,
            &format!("ca = \"{}\"\nprotocol = \"{protocol}\"", ca.display()),
        )
        .await;
        let r = get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)]).await;
        assert_eq!(r.status, 200, "{host} {protocol}: {:?}", r.body);
        assert_eq!(r.body, version.as_bytes());
        let seen = backend.take();
        assert_eq!(
            seen[0].headers["host"],
            format!("{host}:{}", backend.addr.port())
        );
    }
}

#[tokio::test]
async fn an_https_upstream_with_an_untrusted_or_misnamed_certificate_gets_502() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.crt");
    std::fs::write(&ca, pki.ca_pem()).unwrap();

    // Signed by the test CA, which the system store does not hold.
    let leaf = pki.server();
    let trusted_nowhere = Backend::tls(&leaf.cert, &leaf.key).await;
    let proxy = Proxy::start(
        &format!("https://localhost:{}", trusted_nowhere.addr.port()),
        "",
    )
    .await;
    let r = get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_unavailable");

    // Trusted CA, but the certificate names another host.
    let other = pki.server_for("backend.internal");
    let misnamed = Backend::tls(&other.cert, &other.key).await;
    let proxy = Proxy::start(
        &format!("https://localhost:{}", misnamed.addr.port()),
        &format!("ca = \"{}\"", ca.display()),
    )
    .await;
    let r = get(&proxy.url("/api"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 502);
    assert_eq!(trusted_nowhere.count() + misnamed.count(), 0);
}

#[test]
fn check_names_a_bad_upstream_ca() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    std::fs::write(dir.path().join("not-a-ca.pem"), "hello\n").unwrap();
    let load = |upstream: &str| {
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            format!("[upstream]\n{upstream}\n[auth]\nkeys_file = \"keys.toml\"\n"),
        )
        .unwrap();
        portcullis::Config::load(&path).unwrap_err().to_string()
    };
    let e = load("url = \"https://backend:8443\"\nca = \"missing-ca.crt\"");
    assert!(e.contains("proxy.toml:3:6"), "{e}");
    assert!(
        e.contains("missing-ca.crt: cannot read the upstream CA"),
        "{e}"
    );
    let e = load("url = \"https://backend:8443\"\nca = \"not-a-ca.pem\"");
    assert!(
        e.contains("not-a-ca.pem: no CERTIFICATE block found"),
        "{e}"
    );
    let e = load("url = \"http://backend:8080\"\nca = \"not-a-ca.pem\"");
    assert!(e.contains("only used for an https:// upstream"), "{e}");
}
