//! The real peers `.ci/run` installs (tests/peers): an OAuth / OIDC server that signs JWTs
//! (npm oauth2-mock-server, idp.mjs), a real MCP server (the Python SDK's, mcp_server.py) and
//! the official MCP Python and TypeScript SDK clients (mcp_client.py, mcp_client.mjs). Missing,
//! each says so loudly, and fails under CI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

pub fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A peer that `.ci/run` installs: present, or loud (and a failure under CI).
pub fn installed(what: &str, path: &Path) -> bool {
    if path.exists() {
        return true;
    }
    let message = format!(
        "{} is missing ({what}); run `.ci/run`, or `cd tests/peers && npm ci && python3 -m venv .venv && .venv/bin/pip install -r requirements.txt`",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// A child process that printed `listening <url>` on stdout; killed on drop.
pub struct Peer {
    pub child: Child,
    pub url: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn spawn(mut cmd: Command) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the peer starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the peer printed `listening <url>` within 30 s");
        Peer { child, url }
    }
}

/// The OAuth / OIDC server (tests/peers/idp.mjs).
pub struct Idp(pub Peer);

impl Idp {
    pub fn start() -> Option<Idp> {
        find_tool("node", "nodejs")?;
        if !installed(
            "npm ci in tests/peers",
            &peers().join("node_modules/oauth2-mock-server"),
        ) {
            return None;
        }
        let mut cmd = Command::new("node");
        cmd.arg(peers().join("idp.mjs"));
        Some(Idp(Peer::spawn(cmd)))
    }

    pub fn issuer(&self) -> &str {
        &self.0.url
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r = send(
            "POST",
            &format!("{}{path}", self.0.url),
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.body.escape_ascii());
        r.json()
    }

    /// A token signed by the issuer's current key; `claims` override the defaults (`sub`
    /// alice, `iss` the issuer, an hour's validity).
    pub async fn token(&self, claims: serde_json::Value) -> String {
        self.token_with(serde_json::json!({ "claims": claims }))
            .await
    }

    pub async fn token_with(&self, spec: serde_json::Value) -> String {
        self.post("/test/token", spec).await["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.post("/test/stats", serde_json::json!({})).await
    }
}

/// The real MCP server (tests/peers/mcp_server.py), recording what reaches it.
pub struct McpServer {
    pub peer: Peer,
    pub record: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn python() -> Option<PathBuf> {
    let python = peers().join(".venv/bin/python");
    installed("a venv with tests/peers/requirements.txt", &python).then_some(python)
}

impl McpServer {
    pub fn start(json: bool) -> Option<McpServer> {
        let python = python()?;
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("record.jsonl");
        let mut cmd = Command::new(python);
        cmd.arg(peers().join("mcp_server.py"))
            .env("MCP_RECORD", &record);
        if json {
            cmd.arg("--json");
        }
        Some(McpServer {
            peer: Peer::spawn(cmd),
            record,
            _dir: dir,
        })
    }

    /// The upstream URL (the server's origin).
    pub fn origin(&self) -> String {
        self.peer.url.trim_end_matches("/mcp").to_string()
    }

    pub fn seen(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Run the official MCP Python SDK client (tests/peers/mcp_client.py); its JSON line.
pub async fn mcp_client(args: &[&str]) -> serde_json::Value {
    let python = python().expect("checked by the caller");
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(peers().join("mcp_client.py")).args(args);
    client_line(cmd).await
}

/// Run the official MCP TypeScript SDK client (tests/peers/mcp_client.mjs); its JSON line.
pub async fn ts_client(args: &[&str]) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(peers().join("mcp_client.mjs")).args(args);
    client_line(cmd).await
}

/// A client's last line of output, as JSON (90 s at most).
pub async fn client_line(mut cmd: tokio::process::Command) -> serde_json::Value {
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.kill_on_drop(true).output())
        .await
        .expect("the MCP client finishes within 90 s")
        .expect("the MCP client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap()
}

/// The official MCP TypeScript SDK, installed by `npm ci` in tests/peers (loud when missing).
pub fn ts_sdk_installed() -> bool {
    installed(
        "npm ci in tests/peers",
        &peers().join("node_modules/@modelcontextprotocol/sdk"),
    )
}
