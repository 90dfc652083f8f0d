//! The real `portcullis` binary, run as an operator runs it: its output read line by line,
//! signals sent with kill(1).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::eventually;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
}

/// Every line `from` prints, as it is printed.
pub fn lines_of(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The binary, running `config` written as `dir/proxy.toml` (its `[log]` must say
/// `format = "json"`): the process, its stderr lines, and the address it listens on.
/// `portcullis check --config CONFIG`, run to its end.
pub fn check_config(config: impl AsRef<std::path::Path>) -> std::process::Output {
    bin()
        .arg("check")
        .arg("--config")
        .arg(config.as_ref())
        .output()
        .unwrap()
}

pub struct Running {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub lines: std::sync::mpsc::Receiver<String>,
}

pub fn run_binary(dir: &std::path::Path, config: &str) -> Running {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = bin()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stderr.take().unwrap());
    let (addr, admin) = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the startup line");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"] == "portcullis listening" {
                let addr = |field: &str| v[field].as_str().unwrap().parse().unwrap();
                break (addr("listen"), addr("admin"));
            }
        }
    };
    Running {
        child,
        addr,
        admin,
        lines,
    }
}

/// Send `signal` (as `kill` spells it) and wait up to 10 s for the process to exit.
pub async fn stop(child: &mut std::process::Child, signal: &str) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} failed");
    eventually(Duration::from_secs(10), async || child.try_wait().unwrap())
        .await
        .unwrap_or_else(|| panic!("still running 10 s after {signal}"))
}
