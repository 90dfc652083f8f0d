//! `proxy.toml`: the raw serde shape and the validated [`Config`].
//!
//! Every problem in the config and in the files it names is reported at once, each as
//! `file:line:col: message`. Unknown keys are errors: a typo in an auth section must never
//! quietly turn a check off.

mod oauth;
mod policy;
mod raw;
mod tools;
mod upstream;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::upstream::{HostHeader, UpstreamConfig, UpstreamProtocol};

use crate::access_log::{AccessFormat, AccessLog};
use crate::auth::AuthConfig;
use crate::ban::BanConfig;
use crate::diag::{parse_toml, Diagnostic, Diagnostics, Source};
use crate::headers::HeadersConfig;
use crate::tls::{ClientAuth, LoadedCert, TlsConfig};

use raw::*;
use validate::Validator;

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

/// A value written as `"${NAME}"` is read from the environment variable NAME; anything else is
/// taken as it is.
fn secret_from_env(v: &str) -> Result<String, String> {
    match v.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        None => Ok(v.to_string()),
        Some(name) => std::env::var(name).map_err(|_| {
            format!("environment variable {name} is not set (the value is \"${{{name}}}\")")
        }),
    }
}

/// A validated configuration. Every file it names has been read and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file this came from (for messages).
    pub path: PathBuf,
    pub server: ServerConfig,
    pub tls: Option<Tls>,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub ban: BanConfig,
    pub rate_limit: crate::ratelimit::RateLimitConfig,
    pub headers: HeadersConfig,
    pub log: LogConfig,
    /// `[mcp]`: the MCP endpoint, when configured.
    pub mcp: Option<crate::mcp::McpConfig>,
    /// `[forward_auth]`: the listener that answers front proxies' authentication checks.
    pub forward_auth: Option<crate::forward_auth::ForwardAuthConfig>,
    /// Things worth telling the operator that do not stop the proxy (weak password hashes).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub max_body_bytes: u64,
    pub shutdown_grace: Duration,
    /// A WebSocket tunnel or streaming response with no bytes either way for this long is closed.
    pub stream_idle_timeout: Duration,
    /// A WebSocket tunnel or streaming response is closed after this long, if set.
    pub max_stream_lifetime: Option<Duration>,
    /// Concurrent connections from one client address (trusted proxies are exempt).
    pub max_connections_per_ip: u32,
    /// `allow_cidrs` and `trusted_proxies`.
    pub net: crate::netpolicy::NetPolicy,
    /// A plain listener that answers 308 to https://.
    pub redirect_http: Option<SocketAddr>,
    /// Host names the admin listener answers besides `localhost` and IP addresses
    /// (lower-case, without port).
    pub admin_hosts: Vec<String>,
}

/// `[tls]`, with the certificate it names loaded and checked.
#[derive(Debug, Clone)]
pub struct Tls {
    pub files: TlsConfig,
    pub cert: LoadedCert,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: LogLevel,
    pub format: LogFormat,
    pub access_log: AccessLog,
    pub access_format: AccessFormat,
}

impl Config {
    /// Read and validate `path` and every file it names.
    pub fn load(path: &Path) -> Result<Config, Diagnostics> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics(vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Config::from_toml(path, &text)
    }

    /// Validate config text as if it had been read from `path` (relative paths in it are
    /// resolved against `path`'s directory).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, Diagnostics> {
        let src = Source { path, text };
        let (raw, errors) = parse_toml::<RawConfig>(&src);
        let Some(raw) = raw else {
            return Err(Diagnostics(errors));
        };
        let mut v = Validator {
            src: &src,
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            errors,
            warnings: Vec::new(),
        };
        let config = v.config(raw);
        match config {
            Some(c) if v.errors.is_empty() => Ok(c),
            _ => {
                crate::diag::sort(&mut v.errors);
                Err(Diagnostics(v.errors))
            }
        }
    }
}

/// Parse "64MiB", "32KiB", "10MB", "512" (bytes). Binary and decimal units, case-insensitive.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_secret_may_be_read_from_the_environment() {
        assert_eq!(secret_from_env("redis://x/").unwrap(), "redis://x/");
        assert_eq!(
            secret_from_env("${PATH}").unwrap(),
            std::env::var("PATH").unwrap()
        );
        let e = secret_from_env("${PORTCULLIS_TEST_SURELY_UNSET_42}").unwrap_err();
        assert!(
            e.contains("PORTCULLIS_TEST_SURELY_UNSET_42 is not set"),
            "{e}"
        );
    }

    use super::*;

    fn errors_of(toml: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            dir.path().join("keys.toml"),
            "[[keys]]\nname = \"a\"\napi_key = \"mas_0123456789abcdef0123\"\n",
        )
        .unwrap();
        match Config::from_toml(&path, toml) {
            Ok(_) => vec![],
            Err(d) => {
                d.0.iter()
                    .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
                    .collect()
            }
        }
    }

    #[test]
    fn redirect_http_needs_tls_and_the_admin_listener_its_own_address() {
        let e = errors_of(
            "[server]\nlisten = \"127.0.0.1:8443\"\nadmin_listen = \"127.0.0.1:8443\"\n\
             redirect_http = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
             [auth]\nkeys_file = \"keys.toml\"\n",
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("4:") && m.contains("there is no [tls]")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("3:") && m.contains("public listener's address")),
            "{e:?}"
        );
    }

    #[test]
    fn admin_hosts_are_names_only() {
        let e = errors_of(
            "[server]\nadmin_hosts = [\"ok.example\", \"10.0.0.1\", \"bad.example:9901\"]\n\
             [upstream]\nurl = \"http://127.0.0.1:1\"\n[auth]\nkeys_file = \"keys.toml\"\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().all(|m| m.contains("admin_hosts")), "{e:?}");
    }

    #[test]
    fn a_non_loopback_admin_listener_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let config = Config::from_toml(
            &path,
            "[server]\nadmin_listen = \"0.0.0.0:9901\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
             [auth]\nanonymous = true\n",
        )
        .unwrap();
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("not a loopback address")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn minimal_config_is_valid() {
        let e = errors_of(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[auth]\nkeys_file = \"keys.toml\"\n",
        );
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn no_credential_source_refuses_to_start() {
        let e = errors_of("[upstream]\nurl = \"http://127.0.0.1:1\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("no credential source"), "{e:?}");
        assert!(
            errors_of("[upstream]\nurl = \"http://127.0.0.1:1\"\n[auth]\nanonymous = true\n")
                .is_empty()
        );
    }

    #[test]
    fn every_mistake_is_reported_with_its_position() {
        let e = errors_of(
            "[server]\nlisten = \"nowhere\"\nidle_timeout = \"soon\"\nmax_body_bytes = \"lots\"\n\
             [upstream]\nurl = \"ftp://x\"\nprotocl = \"http2\"\n[auth]\nkeys_file = \"missing.toml\"\n",
        );
        assert_eq!(e.len(), 6, "{e:#?}");
        assert!(e.iter().any(|l| l.starts_with("2:10: listen")));
        assert!(e.iter().any(|l| l.starts_with("3:16: idle_timeout")));
        assert!(e.iter().any(|l| l.starts_with("4:18: max_body_bytes")));
        assert!(e.iter().any(|l| l.starts_with("6:7: url")));
        assert!(e
            .iter()
            .any(|l| l.starts_with("7:1: unknown key `protocl`; did you mean `protocol`?")));
        assert!(e
            .iter()
            .any(|l| l.starts_with("9:13: keys_file: cannot read")));
    }

    #[test]
    fn unknown_enum_values_list_the_choices() {
        let e = errors_of("[upstream]\nurl = \"http://127.0.0.1:1\"\nhost_header = \"client\"\n[auth]\nanonymous = true\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("\"upstream\", \"preserve\""), "{e:?}");
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("32 KiB"), Some(32 << 10));
        assert_eq!(parse_size("10kb"), Some(10_000));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
    }
}
