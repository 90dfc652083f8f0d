//! Validation of `proxy.toml`, section by section: each `Raw*` shape becomes its validated
//! type, and every mistake is recorded with its position instead of stopping at the first.
//! The auth, headers, rate-limit and ban sections are in `policy.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use crate::access_log::AccessLog;
use crate::diag::{Diagnostic, Source};
use crate::tls::TlsConfig;

use super::raw::*;
use super::*;

pub(super) struct Validator<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) dir: PathBuf,
    pub(super) errors: Vec<Diagnostic>,
    pub(super) warnings: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn err<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let d = self.src.at(at.span().start, message);
        self.errors.push(d);
    }

    pub(super) fn err_top(&mut self, message: impl Into<String>) {
        let d = self.src.at(0, message);
        self.errors.push(d);
    }

    pub(super) fn addr(&mut self, v: &S<String>, key: &str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().expect("default address parses");
        let Some(v) = v else { return fallback };
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "{key} = \"{}\" is not an address; write IP:port, e.g. \"{default}\" or \"[::]:8443\"",
                        v.get_ref()
                    ),
                );
                fallback
            }
        }
    }

    pub(super) fn duration(&mut self, v: &S<String>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(v, format!("{key} must be longer than zero"));
                default
            }
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "{key} = \"{}\" is not a duration; write e.g. \"500ms\", \"10s\", \"2m\", \"1h\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn size(&mut self, v: &S<String>, key: &str, default: u64) -> u64 {
        let Some(v) = v else { return default };
        match parse_size(v.get_ref()) {
            Some(n) if n > 0 => n,
            _ => {
                self.err(
                    v,
                    format!(
                        "{key} = \"{}\" is not a size; write e.g. \"32KiB\", \"64MiB\", \"1GiB\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let raw_server = raw.server.unwrap_or_default();
        let (admin_at, redirect_at) = (
            raw_server.admin_listen.clone(),
            raw_server.redirect_http.clone(),
        );
        let server = self.server(raw_server);
        let tls = raw.tls.and_then(|t| self.tls(t));
        self.listeners(&server, tls.is_some(), &admin_at, &redirect_at);
        let upstream = match raw.upstream {
            Some(u) => self.upstream(u),
            None => {
                self.err_top("missing [upstream] section; add [upstream] with url = \"http://127.0.0.1:PORT\"");
                None
            }
        };
        let mcp_at = raw.mcp.as_ref().map(|m| Spanned::new(m.span(), ()));
        let mut mcp = self.mcp(raw.mcp);
        let auth = self.auth(raw.auth, tls.as_ref(), mcp.as_ref());
        if let (Some(m), Some(jwt)) = (&mut mcp, auth.as_ref().and_then(|a| a.jwt.as_ref())) {
            if m.resource.is_none() {
                match &mcp_at {
                    Some(at) => self.err(at, "[mcp] needs resource = \"https://mcp.example.com/mcp\" (the endpoint's public URL) when [auth.jwt] is on: clients find the sign-in through it"),
                    None => self.err_top("[mcp] needs resource"),
                }
            }
            if m.authorization_servers.is_empty() {
                m.authorization_servers.push(jwt.issuer.clone());
            }
        }
        if let (Some(policy), Some(a)) = (mcp.as_ref().and_then(|m| m.policy.as_ref()), &auth) {
            let others = a.htpasswd_file.is_some() || a.jwt.is_some() || a.client_cert_identity;
            if policy.grants.is_empty() && others {
                self.warnings.push("[mcp] tool_policy is on and no [[mcp.grants]] is set: htpasswd users, client certificates and tokens may use no tool, prompt or resource (API keys follow their tools/prompts/resources in the keys file)".into());
            }
        }
        let forward_auth = raw.forward_auth.map(|f| self.forward_auth(f));
        let ban = self.ban(raw.ban.unwrap_or_default());
        let rate_limit = self.rate_limit(raw.rate_limit.unwrap_or_default());
        let headers = self.headers(raw.headers.unwrap_or_default());
        let log = self.log(raw.log.unwrap_or_default());
        Some(Config {
            path: self.src.path.to_path_buf(),
            server,
            tls,
            upstream: upstream?,
            auth: auth?,
            ban,
            rate_limit,
            headers,
            log,
            mcp,
            forward_auth,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// `[forward_auth]`: a listen address (required) and a check path.
    fn forward_auth(
        &mut self,
        raw: Spanned<RawForwardAuth>,
    ) -> crate::forward_auth::ForwardAuthConfig {
        let r = raw.get_ref();
        if r.listen.is_none() {
            self.err(&raw, "[forward_auth] needs listen = \"127.0.0.1:9902\" (where front proxies send their checks)");
        }
        let path = match &r.path {
            None => "/auth".to_string(),
            Some(p) => {
                let v = p.get_ref();
                match crate::path::normalize(v) {
                    Ok(n) if n == *v && v.len() > 1 && v != "/healthz" => v.clone(),
                    _ => {
                        self.err(p, format!("path = {v:?} must be a normalised absolute path other than /healthz, such as \"/auth\""));
                        "/auth".to_string()
                    }
                }
            }
        };
        crate::forward_auth::ForwardAuthConfig {
            listen: self.addr(&r.listen, "listen", "127.0.0.1:9902"),
            path,
            convention: r
                .convention
                .unwrap_or(crate::forward_auth::Convention::Auto),
        }
    }

    pub(super) fn server(&mut self, r: RawServer) -> ServerConfig {
        let max_connections = match &r.max_connections {
            None => 10_000,
            Some(v) if (1..=1_000_000).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                self.err(v, "max_connections must be between 1 and 1000000");
                10_000
            }
        };
        let max_header_bytes = self.size(&r.max_header_bytes, "max_header_bytes", 32 * 1024);
        if let Some(v) = &r.max_header_bytes {
            if !(1024..=16 * 1024 * 1024).contains(&max_header_bytes) {
                self.err(v, "max_header_bytes must be between 1KiB and 16MiB");
            }
        }
        ServerConfig {
            listen: self.addr(&r.listen, "listen", "0.0.0.0:8443"),
            admin_listen: self.addr(&r.admin_listen, "admin_listen", "127.0.0.1:9901"),
            max_connections,
            header_read_timeout: self.duration(
                &r.header_read_timeout,
                "header_read_timeout",
                Duration::from_secs(10),
            ),
            max_header_bytes: max_header_bytes as usize,
            idle_timeout: self.duration(&r.idle_timeout, "idle_timeout", Duration::from_secs(120)),
            max_body_bytes: self.size(&r.max_body_bytes, "max_body_bytes", 64 * 1024 * 1024),
            shutdown_grace: self.duration(
                &r.shutdown_grace,
                "shutdown_grace",
                Duration::from_secs(30),
            ),
            stream_idle_timeout: self.duration(
                &r.stream_idle_timeout,
                "stream_idle_timeout",
                Duration::from_secs(600),
            ),
            max_stream_lifetime: r.max_stream_lifetime.as_ref().map(|_| {
                self.duration(&r.max_stream_lifetime, "max_stream_lifetime", Duration::MAX)
            }),
            max_connections_per_ip: match &r.max_connections_per_ip {
                None => 64,
                Some(v) if (1..=1_000_000).contains(v.get_ref()) => *v.get_ref() as u32,
                Some(v) => {
                    self.err(v, "max_connections_per_ip must be between 1 and 1000000");
                    64
                }
            },
            net: crate::netpolicy::NetPolicy {
                allow: self.cidrs(&r.allow_cidrs, "allow_cidrs"),
                trusted: self.cidrs(&r.trusted_proxies, "trusted_proxies"),
            },
            admin_hosts: self.admin_hosts(&r.admin_hosts),
            redirect_http: r
                .redirect_http
                .as_ref()
                .map(|_| self.addr(&r.redirect_http, "redirect_http", "0.0.0.0:8080")),
        }
    }

    /// `admin_hosts`: plain host names (a port, a path or an address is a mistake: addresses
    /// are always answered).
    fn admin_hosts(&mut self, list: &Option<Vec<Spanned<String>>>) -> Vec<String> {
        let mut hosts = Vec::new();
        for h in list.iter().flatten() {
            let name = h.get_ref().trim().to_ascii_lowercase();
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !plain || name.parse::<std::net::IpAddr>().is_ok() {
                self.err(
                    h,
                    format!("admin_hosts: {name:?} is not a host name; write names only, such as \"metrics.internal\" (IP addresses and localhost are always answered)"),
                );
            } else {
                hosts.push(name);
            }
        }
        hosts
    }

    /// How the listeners fit together: the admin listener apart from the public one, and on
    /// loopback unless the operator means otherwise (warned: `/keys` and `/metrics` are then
    /// reachable from the network); `redirect_http` only where there is https to redirect to.
    fn listeners(
        &mut self,
        server: &ServerConfig,
        tls: bool,
        admin_at: &S<String>,
        redirect_at: &S<String>,
    ) {
        let admin = server.admin_listen;
        let same_port = |a: SocketAddr| {
            a.port() == admin.port()
                && (a.ip() == admin.ip() || a.ip().is_unspecified() || admin.ip().is_unspecified())
        };
        let refuse = |v: &mut Self, at: &S<String>, message: String| match at {
            Some(at) => v.err(at, message),
            None => v.err_top(message),
        };
        if admin.port() != 0 && same_port(server.listen) {
            refuse(
                self,
                admin_at,
                format!("admin_listen {admin} is the public listener's address: give the admin endpoints their own, e.g. \"127.0.0.1:9901\""),
            );
        }
        if !admin.ip().is_loopback() {
            self.warnings.push(format!(
                "{}: admin_listen {admin} is not a loopback address: /keys, /metrics and /readyz are reachable from the network (they answer only Hosts that are IP addresses, localhost or admin_hosts names); keep it on 127.0.0.1 unless probes need it",
                self.src.path.display()
            ));
        }
        if let Some(redirect) = server.redirect_http {
            if !tls {
                refuse(
                    self,
                    redirect_at,
                    "redirect_http sends clients to https, but there is no [tls]: the public listener speaks plain HTTP; add [tls] or remove redirect_http".into(),
                );
            } else if redirect.port() != 0 && same_port(server.listen) {
                refuse(
                    self,
                    redirect_at,
                    format!("redirect_http {redirect} is the public listener's address"),
                );
            }
        }
    }

    pub(super) fn tls(&mut self, t: Spanned<RawTls>) -> Option<Tls> {
        let r = t.get_ref();
        let (Some(cert), Some(key)) = (&r.cert, &r.key) else {
            self.err(
                &t,
                "[tls] needs cert = \"tls.crt\" and key = \"tls.key\" (PEM files)",
            );
            return None;
        };
        let files = TlsConfig {
            cert: self.path(cert.get_ref()),
            key: self.path(key.get_ref()),
            client_ca: r.client_ca.as_ref().map(|c| self.path(c.get_ref())),
            client_auth: r.client_auth.unwrap_or_default(),
        };
        if r.client_auth.is_some() && r.client_ca.is_none() {
            self.err(
                &t,
                "client_auth needs client_ca = \"ca.crt\" (the CA that signs client certificates)",
            );
        }
        if let (Some(path), Some(raw)) = (&files.client_ca, &r.client_ca) {
            if let Err(e) = crate::tls::load_client_roots(path) {
                self.err(raw, e);
            }
        }
        match crate::tls::load_cert(&files.cert, &files.key) {
            Ok(loaded) => {
                if let Some(w) =
                    crate::tls::expiry_warning(&loaded, &files.cert, std::time::SystemTime::now())
                {
                    self.warnings.push(w);
                }
                Some(Tls {
                    files,
                    cert: loaded,
                })
            }
            Err(e) => {
                self.err(cert, e);
                None
            }
        }
    }

    pub(super) fn header_name(
        &mut self,
        v: &Spanned<String>,
        key: &str,
    ) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(v.get_ref().trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(
                    v,
                    format!("{key}: \"{}\" is not a valid header name", v.get_ref()),
                );
                None
            }
        }
    }

    pub(super) fn cidrs(
        &mut self,
        list: &Option<Vec<Spanned<String>>>,
        key: &str,
    ) -> Vec<ipnet::IpNet> {
        let mut out = Vec::new();
        for v in list.iter().flatten() {
            let text = v.get_ref().trim();
            // A bare address is a /32 or /128.
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => out.push(net.trunc()),
                Err(_) => self.err(
                    v,
                    format!("{key}: \"{text}\" is not a CIDR; write e.g. \"10.0.0.0/8\", \"fd00::/8\" or an address"),
                ),
            }
        }
        out
    }

    pub(super) fn log(&mut self, l: RawLog) -> LogConfig {
        let access_log = match &l.access_log {
            None => AccessLog::Stdout,
            Some(v) => match v.get_ref().as_str() {
                "stdout" | "-" => AccessLog::Stdout,
                "off" => AccessLog::Off,
                "" => {
                    self.err(
                        v,
                        "access_log is empty; write \"stdout\", \"off\" or a file path",
                    );
                    AccessLog::Stdout
                }
                p => AccessLog::File(self.path(p)),
            },
        };
        LogConfig {
            level: l.level.unwrap_or_default(),
            format: l.format.unwrap_or_default(),
            access_log,
            access_format: l.access_format.unwrap_or_default(),
        }
    }
}
