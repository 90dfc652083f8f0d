//! `[upstream]` as validated (config/upstream.rs reads it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::affinity::Sealer;
use super::{Balance, HealthCheck, Target};

/// HTTP version spoken to the backend.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (h2c), e.g. gRPC backends.
    Http2,
}

/// Which `Host` the backend receives.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HostHeader {
    /// The upstream's own authority, as nginx's `proxy_pass` does. Loopback-bound MCP servers
    /// reject any other Host as DNS rebinding.
    #[default]
    Upstream,
    /// The client's Host, unchanged.
    Preserve,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The backend instances (`url`, or `urls`), in the order written: an instance's index
    /// is its name in sealed MCP session ids.
    pub targets: Vec<Target>,
    pub balance: Balance,
    /// Active health checks, with `health_path`.
    pub health: Option<HealthCheck>,
    /// How long an instance whose connection failed is left out (passive ejection).
    pub eject_for: Duration,
    /// MCP session affinity: the key sessions are sealed with, when on.
    pub session_affinity: Option<Arc<Sealer>>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pass_credentials: bool,
    pub protocol: UpstreamProtocol,
    pub host_header: HostHeader,
    /// `upstream.ca`, when set.
    pub ca: Option<PathBuf>,
    /// Trust anchors for an `https://` upstream (`ca`, or the system store); `None` for http.
    pub tls_roots: Option<Arc<rustls::RootCertStore>>,
}

impl UpstreamConfig {
    /// The instances' URLs, comma-separated (for the startup line).
    pub fn describe(&self) -> String {
        let urls: Vec<&str> = self.targets.iter().map(|t| &*t.label).collect();
        urls.join(", ")
    }
}
