//! Forward auth (`[forward_auth]`): the decisions portcullis makes for a front proxy, asked
//! by hand in Traefik's and nginx's shapes, and through a real nginx with `auth_request` in
//! front of a test backend, configured as docs/forward-auth.md says.

use std::time::Duration;

use crate::support::*;

const PASSWORD: &str = "alice-password-1";

/// A proxy whose upstream is never used (forward auth only), with keys, alice in htpasswd,
/// `[forward_auth]` on a port of its own, 127.0.0.1 trusted as the front proxy, and `extra`.
async fn checker(extra: &str) -> Proxy {
    let htpasswd = format!("alice:{}\n", bcrypt::hash(PASSWORD, 4).unwrap());
    Proxy::start_with_files(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             trusted_proxies = [\"127.0.0.1/32\"]\n\
             [upstream]\nurl = \"http://{}\"\n\
             [auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\n\
             [forward_auth]\nlisten = \"127.0.0.1:0\"\n\
             {extra}\n",
            dead_addr()
        ),
        &[("keys.toml", &keys_file()), ("htpasswd", &htpasswd)],
    )
    .await
}

/// A check in Traefik's shape (`X-Forwarded-*`) for `method uri`, with `headers`.
async fn traefik(proxy: &Proxy, method: &str, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut h = vec![
        ("x-forwarded-method", method),
        ("x-forwarded-uri", uri),
        ("x-forwarded-host", "mcp.example.com"),
        ("x-forwarded-proto", "https"),
    ];
    h.extend_from_slice(headers);
    get(&proxy.forward_auth_url("/auth"), &h).await
}

#[tokio::test]
async fn checks_in_traefik_s_shape_get_the_proxy_s_own_decisions() {
    let proxy = checker("").await;
    let prod = bearer(PROD_KEY);
    let restricted = bearer(RESTRICTED_KEY);

    let r = traefik(
        &proxy,
        "POST",
        "/api/v1/invoke",
        &[("authorization", &prod)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-authenticated-user"], "production-backend");
    assert_eq!(
        r.headers["x-credential-fingerprint"],
        &sha256_hex(PROD_KEY)[..12]
    );
    assert!(r.headers.contains_key("x-request-id"));

    // The same refusals, statuses, bodies and challenges as the proxy's.
    let r = traefik(&proxy, "GET", "/api/models", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "unauthorized")
    );
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
    let r = traefik(&proxy, "GET", "/api/models", &[("x-api-key", DISABLED_KEY)]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "invalid_token")
    );
    let r = traefik(
        &proxy,
        "GET",
        "/api/models",
        &[("authorization", &restricted)],
    )
    .await;
    assert_eq!(r.status, 200, "allowed: GET /api/*");
    let r = traefik(
        &proxy,
        "DELETE",
        "/api/models",
        &[("authorization", &restricted)],
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "forbidden")
    );
    // Path tricks in the described URI are normalised as a proxied path is.
    let r = traefik(
        &proxy,
        "GET",
        "/api/../admin",
        &[("authorization", &restricted)],
    )
    .await;
    assert_eq!(r.status, 403, "judged as /admin");
    let r = traefik(
        &proxy,
        "GET",
        "/api/%2e%2e/admin",
        &[("authorization", &restricted)],
    )
    .await;
    assert_eq!(r.status, 403, "judged as /admin");
    let r = traefik(&proxy, "GET", "/api%2Fx", &[("authorization", &restricted)]).await;
    assert_eq!(r.status, 400, "refused as the proxy refuses it");
    let alice = basic_auth("alice", PASSWORD);
    let r = traefik(&proxy, "GET", "/x", &[("authorization", &alice)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-authenticated-user"], "alice");
    assert_eq!(r.headers["x-credential-fingerprint"], "", "always present");

    // Both conventions at once: a client's copy of the other could be the one read. Refused.
    let r = traefik(
        &proxy,
        "GET",
        "/api/models",
        &[("authorization", &restricted), ("x-original-uri", "/admin")],
    )
    .await;
    assert_eq!(r.status, 400);
    // Nothing but the check path: 404, nothing forwarded.
    let r = get(
        &proxy.forward_auth_url("/api/models"),
        &[("authorization", &prod)],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        get(&proxy.forward_auth_url("/healthz"), &[]).await.status,
        200
    );
    // Caddy 2.6 sends the client's query on the check path.
    let r = get(
        &proxy.forward_auth_url("/auth?page=2"),
        &[
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/models?page=2"),
            ("authorization", &prod),
        ],
    )
    .await;
    assert_eq!(r.status, 200);

    // Each decision is an access-log line with its outcome.
    let lines = proxy.access_lines(11).await;
    assert!(lines
        .iter()
        .any(|l| l["outcome"] == "forbidden" && l["path"] == "/admin" && l["method"] == "GET"));
    assert!(lines
        .iter()
        .any(|l| l["outcome"] == "ok" && l["identity"] == "production-backend"));
}

#[tokio::test]
async fn bans_follow_the_front_proxy_s_client() {
    let proxy = checker("[ban]\nfailures = 2\nwindow = \"1m\"\nduration = \"1m\"\n").await;
    let from = |ip: &'static str| ("x-forwarded-for", ip);
    for _ in 0..2 {
        let r = traefik(
            &proxy,
            "GET",
            "/x",
            &[
                ("x-api-key", "mas_wrong_key_000000000000"),
                from("198.51.100.7"),
            ],
        )
        .await;
        assert_eq!(r.status, 401);
    }
    let r = traefik(
        &proxy,
        "GET",
        "/x",
        &[("x-api-key", PROD_KEY), from("198.51.100.7")],
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (429, "banned")
    );
    assert!(r.headers.contains_key("retry-after"));
    let r = traefik(
        &proxy,
        "GET",
        "/x",
        &[("x-api-key", PROD_KEY), from("198.51.100.8")],
    )
    .await;
    assert_eq!(r.status, 200, "another client behind the same front proxy");
}

/// A real front proxy (nginx or Caddy) in front of a test backend, on `port`; killed on drop.
struct Front {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Front {
    /// Run `cmd` and wait (15 s at most) until it listens on `port`.
    fn spawn(mut cmd: std::process::Command, port: u16, dir: tempfile::TempDir) -> Front {
        let child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{cmd:?} did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Front {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// nginx with `auth_request` in front of `backend`, asking the forward-auth listener at
    /// `check` (a URL), as examples/forward-auth/nginx-locations.conf configures it (one
    /// process: a master killed would leave its worker behind).
    fn nginx(backend: &Backend, check: &str) -> Option<Front> {
        let nginx = find_tool("nginx", "nginx")?;
        let dir = tempfile::tempdir().unwrap();
        let port = dead_addr().port();
        let d = dir.path().display();
        let recipe = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/forward-auth/nginx-locations.conf"
        ))
        .unwrap()
        .replace("http://127.0.0.1:9902/auth", check)
        .replace("http://backend", &backend.url());
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n{recipe}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut cmd = std::process::Command::new(nginx);
        cmd.arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"));
        Some(Front::spawn(cmd, port, dir))
    }

    /// Caddy with `forward_auth` in front of `backend`, asking the forward-auth listener at
    /// `check`, as examples/forward-auth/Caddyfile configures it.
    fn caddy(backend: &Backend, check: std::net::SocketAddr) -> Option<Front> {
        let caddy = find_tool("caddy", "caddy")?;
        let dir = tempfile::tempdir().unwrap();
        let port = dead_addr().port();
        let site = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/forward-auth/Caddyfile"
        ))
        .unwrap()
        .replace("mcp.example.com", &format!("http://127.0.0.1:{port}"))
        .replace("127.0.0.1:9902", &check.to_string())
        .replace("127.0.0.1:8000", &backend.addr.to_string());
        let file = dir.path().join("Caddyfile");
        std::fs::write(&file, format!("{{\n\tadmin off\n}}\n{site}")).unwrap();
        let mut cmd = std::process::Command::new(caddy);
        cmd.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Some(Front::spawn(cmd, port, dir))
    }
}

#[tokio::test]
async fn nginx_with_auth_request_lets_through_exactly_what_portcullis_would() {
    let backend = Backend::ok().await;
    let proxy = checker("[ban]\nfailures = 3\n").await;
    let Some(nginx) = Front::nginx(&backend, &proxy.forward_auth_url("/auth")) else {
        return;
    };
    let restricted = bearer(RESTRICTED_KEY);
    let call = async |method: &str, path: &str, headers: &[(&str, &str)]| {
        send(method, &nginx.url(path), headers, "").await
    };

    // A good key: through, with the identity; a spoofed identity header never arrives.
    let r = call(
        "POST",
        "/api/v1/invoke",
        &[
            ("authorization", &restricted),
            ("x-authenticated-user", "admin"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-authenticated-user"], "restricted");
    assert_eq!(
        seen[0]
            .headers
            .get_all("x-authenticated-user")
            .iter()
            .count(),
        1
    );

    // Refusals keep their status and challenge through nginx; the backend sees none.
    let r = call("GET", "/api/models", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
    assert_eq!(
        call("DELETE", "/api/models", &[("authorization", &restricted)])
            .await
            .status,
        403
    );
    assert_eq!(
        call("GET", "/api/../admin", &[("authorization", &restricted)])
            .await
            .status,
        403
    );
    assert_eq!(
        call("GET", "/x", &[("x-api-key", DISABLED_KEY)])
            .await
            .status,
        401
    );
    let alice = basic_auth("alice", PASSWORD);
    assert_eq!(
        call("GET", "/x", &[("authorization", &alice)]).await.status,
        200
    );
    assert_eq!(backend.take().len(), 1, "only alice's request arrived");

    // Bans follow the client through nginx (which appends the address it sees to the chain
    // the client came with): 429 passes through nginx as the recipe maps it back.
    let from = |ip: &'static str| ("x-forwarded-for", ip);
    for _ in 0..3 {
        let wrong = [
            ("x-api-key", "mas_wrong_key_000000000000"),
            from("198.51.100.7"),
        ];
        assert_eq!(call("GET", "/api/models", &wrong).await.status, 401);
    }
    let r = call(
        "GET",
        "/api/models",
        &[("authorization", &restricted), from("198.51.100.7")],
    )
    .await;
    assert_eq!(r.status, 429);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(backend.count(), 0);
    let r = call(
        "GET",
        "/api/models",
        &[("authorization", &restricted), from("198.51.100.8")],
    )
    .await;
    assert_eq!(r.status, 200, "another client behind the same nginx");
}

#[tokio::test]
async fn caddy_with_forward_auth_lets_through_exactly_what_portcullis_would() {
    let backend = Backend::ok().await;
    let proxy = checker("").await;
    let check = proxy.server.as_ref().unwrap().forward_auth_addr().unwrap();
    let Some(caddy) = Front::caddy(&backend, check) else {
        return;
    };
    let restricted = bearer(RESTRICTED_KEY);
    let call = async |method: &str, path: &str, headers: &[(&str, &str)]| {
        send(method, &caddy.url(path), headers, "").await
    };

    let r = call(
        "GET",
        "/api/models?page=2",
        &[
            ("authorization", &restricted),
            ("x-authenticated-user", "admin"),
            ("x-credential-fingerprint", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = backend.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/api/models?page=2");
    assert_eq!(seen[0].headers["x-authenticated-user"], "restricted");
    assert_eq!(
        seen[0].headers["x-credential-fingerprint"],
        &sha256_hex(RESTRICTED_KEY)[..12]
    );

    // Refusals reach the client as portcullis wrote them: status, JSON body, challenge.
    let r = call("GET", "/api/models", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "unauthorized")
    );
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
    let r = call("DELETE", "/api/models", &[("authorization", &restricted)]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "forbidden")
    );
    let r = call("GET", "/x", &[("x-api-key", DISABLED_KEY)]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (401, "invalid_token")
    );
    // A client's own X-Original-URI, which Caddy passes on beside its X-Forwarded-Uri, is
    // never what is judged.
    let r = call(
        "GET",
        "/admin",
        &[
            ("authorization", &restricted),
            ("x-original-uri", "/api/models"),
        ],
    )
    .await;
    assert_eq!(r.status, 400);
    let alice = basic_auth("alice", PASSWORD);
    let r = call(
        "GET",
        "/x",
        &[
            ("authorization", &alice),
            ("x-credential-fingerprint", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = backend.take();
    assert_eq!(seen.len(), 1, "only alice's request arrived");
    assert_eq!(seen[0].headers["x-authenticated-user"], "alice");
    assert_ne!(
        seen[0]
            .headers
            .get("x-credential-fingerprint")
            .map(|v| v.as_bytes()),
        Some(&b"forged"[..]),
        "a password has no fingerprint, and the client's own never passes"
    );
}

#[tokio::test]
async fn on_the_mcp_path_a_check_gets_the_mcp_profile() {
    let proxy =
        checker("[mcp]\npath = \"/mcp\"\nallowed_origins = [\"https://claude.ai\"]\n").await;
    let r = traefik(&proxy, "POST", "/mcp", &[]).await;
    assert_eq!(r.status, 401);
    let challenges: Vec<_> = r
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        challenges[0], "Bearer realm=\"portcullis\"",
        "{challenges:?}"
    );
    assert!(challenges[1].starts_with("Basic realm="));
    assert!(r.headers.contains_key("access-control-expose-headers"));
    let r = traefik(
        &proxy,
        "POST",
        "/mcp",
        &[
            ("authorization", &bearer(PROD_KEY)),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (403, "forbidden_origin")
    );
    let r = traefik(
        &proxy,
        "POST",
        "/mcp",
        &[
            ("authorization", &bearer(PROD_KEY)),
            ("origin", "https://claude.ai"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://claude.ai"
    );
}
