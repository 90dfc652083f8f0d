//! The command line: check, keygen, hash-key, and the binary's signal handling.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

#[test]
fn check_reports_every_mistake_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.toml"),
        "[[keys]]\nname = \"a\"\napi_key = \"short\"\n[[keys]]\nname = \"b\"\nsha256 = \"nothex\"\nenabled = true\n",
    )
    .unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"0.0.0.0\"\nidle_timout = \"5s\"\n\n[upstream]\nurl = \"http://127.0.0.1:9\"\nresponse_timeout = \"forever\"\n\n[auth]\nkeys_file = \"keys.toml\"\npublic_paths = [\"health\"]\n",
    )
    .unwrap();
    let out = check_config(&config);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let cfg = config.display().to_string();
    let keys = dir.path().join("keys.toml").display().to_string();
    let expect = [
        format!("{cfg}:2:10: listen"),
        format!("{cfg}:3:1: unknown key `idle_timout`; did you mean `idle_timeout`?"),
        format!("{cfg}:7:20: response_timeout"),
        format!("{cfg}:11:17: public_paths"),
        format!("{keys}:3:11: api_key of \"a\""),
        format!("{keys}:6:10: sha256 of \"b\""),
    ];
    for e in &expect {
        assert!(
            lines.iter().any(|l| l.starts_with(e.as_str())),
            "missing {e:?} in\n{stdout}"
        );
    }
    assert_eq!(lines.len(), expect.len(), "{stdout}");
}

#[test]
fn check_prints_ok_for_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[auth]\nkeys_file = \"keys.toml\"\n",
    )
    .unwrap();
    let out = check_config(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn the_example_config_is_valid() {
    // proxy.toml.example documents every key; with a keys file beside it, it must pass check.
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example"))
            .unwrap();
    std::fs::write(dir.path().join("proxy.toml"), example).unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let out = check_config(dir.path().join("proxy.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_shipped_example_passes_check() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let config = entry.unwrap().path().join("proxy.toml");
        if !config.exists() {
            continue;
        }
        let out = check_config(&config);
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        checked += 1;
    }
    assert!(checked >= 2, "examples were not found");
}

#[test]
fn keygen_prints_a_58_character_key_and_its_entry() {
    for (args, prefix) in [(vec!["keygen"], "mas_"), (vec!["keygen", "--user"], "mau_")] {
        let out = bin().args(&args).output().unwrap();
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let key = lines.next().unwrap();
        assert_eq!(key.len(), 58);
        assert!(key.starts_with(prefix));
        assert!(key[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(
            lines.next().unwrap(),
            format!("sha256 = \"{}\"", sha256_hex(key))
        );
    }
}

#[test]
fn keygen_into_a_closed_pipe_does_not_panic() {
    let mut child = bin()
        .arg("keygen")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hash_key_reads_one_key_from_stdin() {
    let mut child = bin()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("  {PROD_KEY}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("sha256 = \"{}\"\n", sha256_hex(PROD_KEY))
    );
}

#[test]
fn run_refuses_to_start_without_a_credential_source() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[upstream]\nurl = \"http://127.0.0.1:9\"\n").unwrap();
    let out = bin().arg("--config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credential source"));
}

#[tokio::test]
async fn sigterm_stops_the_binary_cleanly() {
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys_file()).unwrap();
    let Running {
        mut child, addr, ..
    } = run_binary(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n[log]\nformat = \"json\"\naccess_log = \"off\"\n",
            backend.url()
        ),
    );
    let r = get(&format!("http://{addr}/x"), &[("x-api-key", PROD_KEY)]).await;
    assert_eq!(r.status, 200);

    let code = stop(&mut child, "-TERM").await;
    assert!(code.success(), "exit status {code}");
}

#[tokio::test]
async fn sighup_reloads_a_keys_file_the_watcher_cannot_see_change() {
    if find_tool("kill", "procps").is_none() {
        return;
    }
    let backend = Backend::ok().await;
    let dir = tempfile::tempdir().unwrap();
    // keys.toml is a symlink into a directory nobody watches: editing the target there makes
    // no event in the watched directory; SIGHUP is how the operator says "re-read".
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("real-keys.toml");
    let entry =
        |name: &str, key: &str| format!("[[keys]]\nname = \"{name}\"\napi_key = \"{key}\"\n");
    std::fs::write(&target, entry("first", PROD_KEY)).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("keys.toml")).unwrap();
    let Running {
        mut child, addr, ..
    } = run_binary(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n[ban]\nenabled = false\n[log]\nformat = \"json\"\naccess_log = \"off\"\n",
            backend.url()
        ),
    );
    let url = format!("http://{addr}/x");
    assert_eq!(get(&url, &[("x-api-key", PROD_KEY)]).await.status, 200);

    std::fs::write(&target, entry("second", WEB_KEY)).unwrap();
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    eventually(Duration::from_secs(10), async || {
        (get(&url, &[("x-api-key", WEB_KEY)]).await.status == 200).then_some(())
    })
    .await
    .expect("SIGHUP did not reload the keys");
    assert_eq!(get(&url, &[("x-api-key", PROD_KEY)]).await.status, 401);
    let code = stop(&mut child, "-TERM").await;
    assert!(code.success(), "exit status {code}");
}

#[tokio::test]
async fn the_demo_serves_its_key_and_refuses_requests_without_it() {
    let mut child = bin()
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stdout.take().unwrap());
    let mut proxy_addr = None;
    let mut key = None;
    let mut admin = None;
    let mut password = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the demo prints its instructions");
        if let Some(rest) = line.split("protected by portcullis on ").nth(1) {
            proxy_addr = Some(rest.trim_end_matches('.').to_string());
        }
        if line.trim_start().starts_with("mas_") {
            key = Some(line.trim().to_string());
        }
        if let Some(url) = line
            .trim()
            .strip_prefix("curl -i http://")
            .and_then(|u| u.strip_suffix("/readyz"))
        {
            admin = Some(url.to_string());
        }
        if let Some(rest) = line.trim().strip_prefix("curl -i -u 'demo-user:") {
            let p = rest.split('\'').next().unwrap();
            if p != "wrong" {
                password = Some(p.to_string());
            }
        }
        if line.contains("Ctrl-C stops the demo") {
            break;
        }
    }
    let (addr, key, admin) = (proxy_addr.unwrap(), key.unwrap(), admin.unwrap());
    assert_eq!(key.len(), 58);
    let r = get(
        &format!("http://{addr}/api/v1/invoke"),
        &[("authorization", &bearer(&key))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-authenticated-user"], "demo-client");
    assert!(r.json()["headers"].get("authorization").is_none());
    assert_eq!(
        get(&format!("http://{addr}/api/v1/invoke"), &[])
            .await
            .status,
        401
    );
    let basic = basic_auth("demo-user", &password.expect("a Basic example"));
    let r = get(
        &format!("http://{addr}/api/v1/invoke"),
        &[("authorization", &basic)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-authenticated-user"], "demo-user");
    assert_eq!(
        get(&format!("http://{admin}/readyz"), &[]).await.status,
        200
    );
    // Combined access log lines, the first for the 200 with the key.
    let logged: Vec<String> = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(2)).ok())
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect();
    assert!(
        logged[0].starts_with("127.0.0.1 - demo-client ["),
        "{logged:?}"
    );
    assert!(
        logged[2].starts_with("127.0.0.1 - demo-user ["),
        "{logged:?}"
    );
    assert!(!logged.iter().any(|l| l.contains(&key)));

    let code = stop(&mut child, "-INT").await;
    assert!(code.success(), "exit status {code}");
}

/// A proxy.toml embedded in a shipped example (YAML): the block indented by `indent` under the
/// line that ends with `marker`.
fn embedded_config(example: &str, marker: &str, indent: &str) -> String {
    let path = format!("{}/examples/{example}", env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(&path).unwrap();
    yaml.lines()
        .skip_while(|l| !l.trim_start().starts_with(marker))
        .skip(1)
        .take_while(|l| l.starts_with(indent) || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix(indent).unwrap_or(l)))
        .collect()
}

#[test]
fn the_kubernetes_example_config_passes_check_with_its_secrets_mounted() {
    // The ConfigMap's proxy.toml.
    let config = embedded_config("kubernetes/sidecar.yaml", "proxy.toml: |", "    ");
    assert!(config.contains("[upstream]"), "{config}");
    // Mount the Secrets where the pod would.
    let root = tempfile::tempdir().unwrap();
    let mount = |dir: &str| {
        let d = root.path().join(dir);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    std::fs::write(mount("keys").join("keys.toml"), keys_file()).unwrap();
    let pki = crate::support::pki::Pki::new();
    let leaf = pki.server();
    std::fs::write(mount("tls").join("tls.crt"), &leaf.cert).unwrap();
    std::fs::write(mount("tls").join("tls.key"), &leaf.key).unwrap();
    let path = mount("config").join("proxy.toml");
    let prefix = format!("{}/", root.path().display());
    std::fs::write(&path, config.replace("/etc/portcullis/", &prefix)).unwrap();
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_several_instances_example_config_passes_check_with_its_secrets_mounted() {
    // The Compose config's inline proxy.toml.
    let config = embedded_config("several-instances/compose.yaml", "content: |", "      ");
    assert!(config.contains("urls = ["), "{config}");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("keys")).unwrap();
    std::fs::write(root.path().join("keys/keys.toml"), keys_file()).unwrap();
    std::fs::write(
        root.path().join("session_key"),
        "kXv1H8mRrZ8q0m4bqg4vV9a0yHppGd0r1r3YzW1nq9bXy0k7c2lq8w3A5dPzQ1e\n",
    )
    .unwrap();
    let prefix = format!("{}/", root.path().display());
    let config = config
        .replace("/etc/portcullis/", &prefix)
        .replace("/run/secrets/", &prefix);
    let path = root.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
