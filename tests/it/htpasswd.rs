//! HTTP Basic against htpasswd files written by the real tools, the verification cache, bans
//! and throttling, through a real proxy.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture_passwords() -> Vec<(String, String)> {
    std::fs::read_to_string(format!("{FIXTURES}/passwords.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect()
}

/// A proxy with `htpasswd` (file contents) beside the standard keys file.
async fn with_htpasswd(backend: &Backend, htpasswd: &str, extra_auth: &str, ban: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.htpasswd");
    std::fs::write(&path, htpasswd).unwrap();
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n\
         [auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"{}\"\nrealm = \"mcp\"\n{extra_auth}\n{ban}\n",
        backend.url(),
        path.display()
    ))
    .await;
    // Keep the file's directory alive as long as the proxy's.
    std::mem::forget(dir);
    proxy
}

#[tokio::test]
async fn every_format_the_tools_write_authenticates_its_user() {
    let backend = Backend::ok().await;
    let text = std::fs::read_to_string(format!("{FIXTURES}/htpasswd.formats")).unwrap();
    let proxy = with_htpasswd(&backend, &text, "", "").await;
    let mut checked = 0;
    for (user, password) in fixture_passwords() {
        if !text.contains(&format!("\n{user}:")) {
            continue;
        }
        let r = get(
            &proxy.url("/mcp"),
            &[("authorization", &basic_auth(&user, &password))],
        )
        .await;
        assert_eq!(r.status, 200, "{user}");
        let seen = backend.take().remove(0);
        assert_eq!(seen.headers["x-authenticated-user"], user.as_str());
        assert!(
            !seen.headers.contains_key("authorization"),
            "the password reached the backend"
        );
        let r = get(
            &proxy.url("/mcp"),
            &[("authorization", &basic_auth(&user, "not it"))],
        )
        .await;
        assert_eq!(r.status, 401, "{user}");
        checked += 1;
    }
    assert_eq!(checked, 9);
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn the_real_htpasswd_tool_writes_files_portcullis_accepts() {
    let Some(htpasswd) = find_tool("htpasswd", "apache2-utils") else {
        return;
    };
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("h");
    let mut contents = String::new();
    for (flag, user) in [
        ("-B", "bcrypt-user"),
        ("-m", "apr1-user"),
        ("-s", "sha-user"),
        ("-d", "des-user"),
    ] {
        let out = Command::new(&htpasswd)
            .args(["-nb", flag, user, "pa55word"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "htpasswd {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        contents.push_str(String::from_utf8(out.stdout).unwrap().trim_end());
        contents.push('\n');
    }
    std::fs::write(&file, &contents).unwrap();
    let proxy = with_htpasswd(&backend, &contents, "", "").await;
    for user in ["bcrypt-user", "apr1-user", "sha-user", "des-user"] {
        let r = get(
            &proxy.url("/"),
            &[("authorization", &basic_auth(user, "pa55word"))],
        )
        .await;
        assert_eq!(r.status, 200, "{user}");
    }
}

#[tokio::test]
async fn basic_refusals_follow_the_design_table() {
    let backend = Backend::ok().await;
    let text = std::fs::read_to_string(format!("{FIXTURES}/htpasswd.formats")).unwrap();
    let proxy = with_htpasswd(&backend, &text, "", "").await;
    let url = proxy.url("/mcp");
    let challenge = "Basic realm=\"mcp\", charset=\"UTF-8\"";

    let r = get(&url, &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "unauthorized")
    );
    assert_eq!(r.headers["www-authenticate"], challenge);

    for auth in [
        basic_auth("alice-bcrypt", "wrong"),
        basic_auth("nobody", "correct horse"),
    ] {
        let r = get(&url, &[("authorization", &auth)]).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code().as_str()),
            (401, "unauthorized"),
            "{auth}"
        );
        assert_eq!(r.headers["www-authenticate"], challenge);
    }
    // Malformed base64, and a decoded value without a colon.
    for auth in ["Basic %%%notbase64", "Basic YWxpY2UtYmNyeXB0"] {
        let r = get(&url, &[("authorization", auth)]).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code().as_str()),
            (403, "invalid_authorization"),
            "{auth}"
        );
    }
    let r = get(&url, &[("authorization", "Digest username=\"a\"")]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "invalid_scheme")
    );
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn api_keys_and_basic_work_side_by_side() {
    let backend = Backend::ok().await;
    let text = std::fs::read_to_string(format!("{FIXTURES}/htpasswd.formats")).unwrap();
    let proxy = with_htpasswd(&backend, &text, "", "").await;
    let url = proxy.url("/mcp");
    assert_eq!(
        get(&url, &[("authorization", &bearer(PROD_KEY))])
            .await
            .status,
        200
    );
    assert_eq!(get(&url, &[("x-api-key", WEB_KEY)]).await.status, 200);
    assert_eq!(
        get(
            &url,
            &[("authorization", &basic_auth("bob-apr1", "apr1 pass"))]
        )
        .await
        .status,
        200
    );
    let r = get(&url, &[("authorization", &bearer(DISABLED_KEY))]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "invalid_token");
    let names: Vec<_> = backend
        .take()
        .iter()
        .map(|s| s.headers["x-authenticated-user"].clone())
        .collect();
    assert_eq!(names, ["production-backend", "web-application", "bob-apr1"]);
}

#[tokio::test]
async fn a_repeated_login_is_served_from_the_cache() {
    let backend = Backend::ok().await;
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    let proxy = with_htpasswd(&backend, &format!("cached:{hash}\n"), "", "").await;
    let verifier = &proxy.inner().auth.basic;
    let auth = basic_auth("cached", "s3cret");
    for _ in 0..5 {
        assert_eq!(
            get(&proxy.url("/"), &[("authorization", &auth)])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        verifier.computed.load(Ordering::Relaxed),
        1,
        "bcrypt ran more than once"
    );
}

#[tokio::test]
async fn repeated_failures_ban_the_client_before_any_hash_is_computed_and_the_ban_expires() {
    let backend = Backend::ok().await;
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let proxy = with_htpasswd(
        &backend,
        &format!("victim:{hash}\n"),
        "",
        "[ban]\nfailures = 3\nwindow = \"1m\"\nduration = \"2s\"",
    )
    .await;
    let verifier = &proxy.inner().auth.basic;
    let url = proxy.url("/");
    for i in 0..3 {
        let r = get(
            &url,
            &[("authorization", &basic_auth("victim", &format!("guess{i}")))],
        )
        .await;
        assert_eq!(r.status, 401, "failure {i}");
    }
    let computed = verifier.computed.load(Ordering::Relaxed);
    // Banned: even the right password and a valid key are refused, and nothing is hashed.
    for auth in [
        basic_auth("victim", "s3cret"),
        bearer(PROD_KEY),
        basic_auth("victim", "guess9"),
    ] {
        let r = get(&url, &[("authorization", &auth)]).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.error_code(), "banned");
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
    }
    assert_eq!(
        verifier.computed.load(Ordering::Relaxed),
        computed,
        "a hash was computed during the ban"
    );
    let ok = eventually(Duration::from_secs(10), async || {
        let auth = basic_auth("victim", "s3cret");
        (get(&url, &[("authorization", &auth)]).await.status == 200).then_some(())
    })
    .await
    .is_some();
    assert!(ok, "the ban did not expire");
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn requests_without_credentials_never_ban() {
    let backend = Backend::ok().await;
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let proxy = with_htpasswd(&backend, &format!("u:{hash}\n"), "", "[ban]\nfailures = 2").await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/"), &[]).await.status, 401);
    }
    assert_eq!(
        get(
            &proxy.url("/"),
            &[("authorization", &basic_auth("u", "s3cret"))]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn a_bcrypt_in_progress_does_not_delay_an_api_key_request() {
    let backend = Backend::ok().await;
    // Cost 12: long enough (a few hundred ms in a debug build) that the key request surely
    // overlaps it, short enough for a hashing thread at the lowest priority on a busy machine.
    let hash = bcrypt::hash("slow", 12).unwrap();
    let proxy = with_htpasswd(&backend, &format!("slow:{hash}\n"), "", "").await;
    let url = proxy.url("/");
    let slow = {
        let url = url.clone();
        tokio::spawn(
            async move { get(&url, &[("authorization", &basic_auth("slow", "slow"))]).await },
        )
    };
    // Wait until the bcrypt verification has started.
    let started = eventually(Duration::from_secs(10), async || {
        (proxy.inner().auth.basic.computed.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert!(started.is_some(), "the bcrypt verification never started");
    let r = get(&url, &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 200);
    assert!(!slow.is_finished(), "the key request waited for bcrypt");
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn one_client_cannot_flood_the_hasher() {
    let backend = Backend::ok().await;
    let hash = bcrypt::hash("x", 12).unwrap();
    let proxy = with_htpasswd(
        &backend,
        &format!("u:{hash}\n"),
        "",
        "[ban]\nenabled = false",
    )
    .await;
    let url = proxy.url("/");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                get(
                    &url,
                    &[("authorization", &basic_auth("u", &format!("guess{i}")))],
                )
                .await
            })
        })
        .collect();
    let mut throttled = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            401 => {}
            429 => {
                assert_eq!(r.error_code(), "rate_limited");
                assert_eq!(r.headers["retry-after"], "1");
                throttled += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        throttled >= 1,
        "eight concurrent guesses from one client were all hashed"
    );
}

#[tokio::test]
async fn slow_hashes_wait_in_a_bounded_queue_and_beyond_it_are_refused_at_once() {
    // As many hashing threads as CPUs but one (at least one), each with 16 places to wait.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1);
    let capacity = threads * (1 + 16);
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.htpasswd");
    std::fs::write(&path, format!("u:{}\n", bcrypt::hash("x", 8).unwrap())).unwrap();
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         trusted_proxies = [\"127.0.0.1/32\"]\n\
         [upstream]\nurl = \"{}\"\n\
         [auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"{}\"\n[ban]\nenabled = false\n",
        backend.url(),
        path.display()
    ))
    .await;
    // Distinct wrong passwords from many clients (four each: the per-client bound), all at
    // once: more than the threads and the queue hold.
    let total = capacity + 12;
    let url = proxy.url("/");
    let tasks: Vec<_> = (0..total)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = format!("192.0.2.{}", i / 4 + 1);
                get(
                    &url,
                    &[
                        ("authorization", &basic_auth("u", &format!("guess{i}"))),
                        ("x-forwarded-for", &client),
                    ],
                )
                .await
            })
        })
        .collect();
    // A request that needs no hash is answered meanwhile.
    let r = get(&url, &[("authorization", &bearer(PROD_KEY))]).await;
    assert_eq!(r.status, 200);
    let (mut refused, mut wrong) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            401 => wrong += 1,
            429 => {
                assert_eq!(r.error_code(), "rate_limited");
                assert_eq!(r.headers["retry-after"], "1");
                refused += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let verifier = &proxy.inner().auth.basic;
    assert!(
        refused >= 1,
        "{total} concurrent verifications were all queued"
    );
    assert!(wrong <= capacity, "{wrong} hashed with room for {capacity}");
    assert_eq!(
        verifier
            .refused_busy
            .load(std::sync::atomic::Ordering::Relaxed),
        refused as u64
    );
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "portcullis_password_verifications_refused_total", &[]),
        refused as f64
    );
    // The queue drains: a right password is verified again.
    let r = get(&url, &[("authorization", &basic_auth("u", "x"))]).await;
    assert_eq!(r.status, 200);
}
