//! `proxy.toml`: the raw serde shape and the validated [`Config`].
//!
//! Every problem in the config and in the files it names is reported at once, each as
//! `file:line:col: message`. Unknown keys are errors: a typo in an auth section must never
//! quietly turn a check off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;
use toml::Spanned;

use std::sync::Arc;

use crate::auth::api_key::KeySet;
use crate::auth::htpasswd::Htpasswd;
use crate::authz::PathPattern;
use crate::ban::BanConfig;
use crate::diag::{parse_toml, Diagnostic, Diagnostics, Source};
use crate::tls::{ClientAuth, LoadedCert, TlsConfig};

type S<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    tls: Option<Spanned<RawTls>>,
    upstream: Option<Spanned<RawUpstream>>,
    auth: Option<Spanned<RawAuth>>,
    ban: Option<RawBan>,
    rate_limit: Option<RawRateLimit>,
    headers: Option<RawHeaders>,
    log: Option<RawLog>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    enabled: Option<bool>,
    requests_per_second: S<i64>,
    burst: S<i64>,
    backend: Option<Spanned<RateLimitBackend>>,
    redis_url: S<String>,
    redis_url_file: S<String>,
    redis_failure: Option<crate::ratelimit::RedisFailure>,
    redis_timeout: S<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RateLimitBackend {
    Memory,
    Redis,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: S<String>,
    key: S<String>,
    client_ca: S<String>,
    client_auth: Option<ClientAuth>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaders {
    hsts: S<String>,
    frame_options: S<String>,
    content_type_options: S<String>,
    referrer_policy: S<String>,
    content_security_policy: S<String>,
    remove: Option<Vec<Spanned<String>>>,
    #[serde(rename = "override")]
    override_backend: Option<bool>,
    set: Option<std::collections::BTreeMap<String, Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBan {
    enabled: Option<bool>,
    failures: S<i64>,
    window: S<String>,
    duration: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: S<String>,
    admin_listen: S<String>,
    max_connections: S<i64>,
    header_read_timeout: S<String>,
    max_header_bytes: S<String>,
    idle_timeout: S<String>,
    max_body_bytes: S<String>,
    shutdown_grace: S<String>,
    redirect_http: S<String>,
    stream_idle_timeout: S<String>,
    max_stream_lifetime: S<String>,
    max_connections_per_ip: S<i64>,
    allow_cidrs: Option<Vec<Spanned<String>>>,
    trusted_proxies: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: S<String>,
    connect_timeout: S<String>,
    response_timeout: S<String>,
    pass_credentials: Option<bool>,
    protocol: Option<UpstreamProtocol>,
    host_header: Option<HostHeader>,
    ca: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    keys_file: S<String>,
    htpasswd_file: S<String>,
    htpasswd_plaintext: Option<bool>,
    htpasswd_cache_ttl: S<String>,
    htpasswd_cache_entries: S<i64>,
    api_key_headers: S<Vec<String>>,
    realm: S<String>,
    identity_header: S<String>,
    public_paths: Option<Vec<Spanned<String>>>,
    anonymous: Option<bool>,
    client_cert_identity: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<LogLevel>,
    format: Option<LogFormat>,
    access_log: S<String>,
    access_format: Option<AccessFormat>,
}

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

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Json,
    /// Apache combined, client IP first: fail2ban's `^<HOST> .* 401 .*$` matches it.
    Combined,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
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
}

/// `[tls]`, with the certificate it names loaded and checked.
#[derive(Debug, Clone)]
pub struct Tls {
    pub files: TlsConfig,
    pub cert: LoadedCert,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: Uri,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of `url` without its trailing slash ("" for `http://host:port/`).
    pub base_path: String,
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

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub keys_file: Option<PathBuf>,
    /// The keys loaded from `keys_file` at validation time.
    pub keys: KeySet,
    pub htpasswd_file: Option<PathBuf>,
    /// The users loaded from `htpasswd_file` at validation time.
    pub htpasswd: Option<Arc<Htpasswd>>,
    pub htpasswd_plaintext: bool,
    /// How long a successful slow-hash verification is remembered.
    pub htpasswd_cache_ttl: Duration,
    /// Remembered verifications at most.
    pub htpasswd_cache_entries: usize,
    /// Lower-case header names that may carry an API key, in the order they are tried.
    pub api_key_headers: Vec<http::HeaderName>,
    pub realm: String,
    pub identity_header: http::HeaderName,
    pub public_paths: Vec<PathPattern>,
    pub anonymous: bool,
    /// With mTLS, a verified client certificate is a credential (its CN or first SAN).
    pub client_cert_identity: bool,
}

/// Response headers added to every response, the backend's and the proxy's own.
#[derive(Debug, Clone, Default)]
pub struct HeadersConfig {
    /// Sent only on responses over TLS.
    pub hsts: Option<http::HeaderValue>,
    /// Sent on every response, in this order.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Removed from every backend response.
    pub remove: Vec<http::HeaderName>,
    /// Replace a header the backend already set (default: keep the backend's).
    pub override_backend: bool,
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

struct Validator<'a> {
    src: &'a Source<'a>,
    dir: PathBuf,
    errors: Vec<Diagnostic>,
    warnings: Vec<String>,
}

impl Validator<'_> {
    fn err<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let d = self.src.at(at.span().start, message);
        self.errors.push(d);
    }

    fn err_top(&mut self, message: impl Into<String>) {
        let d = self.src.at(0, message);
        self.errors.push(d);
    }

    fn addr(&mut self, v: &S<String>, key: &str, default: &str) -> SocketAddr {
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

    fn duration(&mut self, v: &S<String>, key: &str, default: Duration) -> Duration {
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

    fn size(&mut self, v: &S<String>, key: &str, default: u64) -> u64 {
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

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let server = self.server(raw.server.unwrap_or_default());
        let tls = raw.tls.and_then(|t| self.tls(t));
        let upstream = match raw.upstream {
            Some(u) => self.upstream(u),
            None => {
                self.err_top("missing [upstream] section; add [upstream] with url = \"http://127.0.0.1:PORT\"");
                None
            }
        };
        let auth = self.auth(raw.auth, tls.as_ref());
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
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn server(&mut self, r: RawServer) -> ServerConfig {
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
            redirect_http: r
                .redirect_http
                .as_ref()
                .map(|_| self.addr(&r.redirect_http, "redirect_http", "0.0.0.0:8080")),
        }
    }

    fn tls(&mut self, t: Spanned<RawTls>) -> Option<Tls> {
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

    fn upstream(&mut self, u: Spanned<RawUpstream>) -> Option<UpstreamConfig> {
        let connect_timeout = self.duration(
            &u.get_ref().connect_timeout,
            "connect_timeout",
            Duration::from_secs(5),
        );
        let response_timeout = self.duration(
            &u.get_ref().response_timeout,
            "response_timeout",
            Duration::from_secs(60),
        );
        let r = u.get_ref();
        let Some(url) = &r.url else {
            self.err(
                &u,
                "[upstream] needs url = \"http://HOST:PORT\" (the backend to protect)",
            );
            return None;
        };
        let parsed = match url.get_ref().parse::<Uri>() {
            Ok(p) => p,
            Err(e) => {
                self.err(
                    url,
                    format!("url = \"{}\" is not a URL: {e}", url.get_ref()),
                );
                return None;
            }
        };
        let scheme = match parsed.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                self.err(
                    url,
                    format!(
                        "url = \"{}\": the upstream must be http://HOST:PORT or https://HOST:PORT",
                        url.get_ref()
                    ),
                );
                return None;
            }
        };
        let ca = r.ca.as_ref().map(|c| (self.path(c.get_ref()), c));
        let tls_roots = if scheme == Scheme::HTTPS {
            match crate::tls::upstream_roots(ca.as_ref().map(|(p, _)| p.as_path())) {
                Ok(roots) => Some(Arc::new(roots)),
                Err(e) => {
                    match &ca {
                        Some((_, raw)) => self.err(raw, e),
                        None => self.err(url, e),
                    }
                    return None;
                }
            }
        } else {
            if let Some((_, raw)) = &ca {
                self.err(
                    raw,
                    "ca is only used for an https:// upstream; remove it or change url to https://",
                );
            }
            None
        };
        let Some(authority) = parsed.authority().cloned() else {
            self.err(url, "url needs a host, e.g. \"http://127.0.0.1:4298\"");
            return None;
        };
        if authority.as_str().contains('@') {
            self.err(url, "url must not carry user:password@; the backend sees no credentials unless pass_credentials = true");
            return None;
        }
        if parsed.query().is_some() {
            self.err(url, "url must not have a query string");
            return None;
        }
        let base_path = parsed.path().trim_end_matches('/').to_string();
        Some(UpstreamConfig {
            scheme,
            ca: ca.map(|(p, _)| p),
            tls_roots,
            authority,
            base_path,
            url: parsed,
            connect_timeout,
            response_timeout,
            pass_credentials: r.pass_credentials.unwrap_or(false),
            protocol: r.protocol.unwrap_or_default(),
            host_header: r.host_header.unwrap_or_default(),
        })
    }

    fn header_name(&mut self, v: &Spanned<String>, key: &str) -> Option<http::HeaderName> {
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

    fn auth(&mut self, a: Option<Spanned<RawAuth>>, tls: Option<&Tls>) -> Option<AuthConfig> {
        let span_holder = a.as_ref().map(|a| Spanned::new(a.span(), ()));
        let a = a.map(|a| a.into_inner()).unwrap_or_default();
        let anonymous = a.anonymous.unwrap_or(false);

        let mut keys = KeySet::default();
        let keys_file = a.keys_file.as_ref().map(|f| self.path(f.get_ref()));
        if let (Some(path), Some(raw)) = (&keys_file, &a.keys_file) {
            match std::fs::read_to_string(path) {
                Ok(text) => match KeySet::parse(path, &text) {
                    Ok(k) => keys = k,
                    Err(mut e) => self.errors.append(&mut e),
                },
                Err(e) => self.err(
                    raw,
                    format!("keys_file: cannot read {}: {e}", path.display()),
                ),
            }
        }
        let htpasswd_plaintext = a.htpasswd_plaintext.unwrap_or(false);
        let htpasswd_file = a.htpasswd_file.as_ref().map(|f| self.path(f.get_ref()));
        let mut htpasswd = None;
        if let (Some(path), Some(raw)) = (&htpasswd_file, &a.htpasswd_file) {
            match std::fs::read_to_string(path) {
                Ok(text) => match Htpasswd::parse(path, &text, htpasswd_plaintext) {
                    Ok((file, warnings)) => {
                        htpasswd = Some(Arc::new(file));
                        self.warnings.extend(warnings.into_iter().map(|w| w.0));
                    }
                    Err(mut e) => self.errors.append(&mut e),
                },
                Err(e) => self.err(
                    raw,
                    format!("htpasswd_file: cannot read {}: {e}", path.display()),
                ),
            }
        }
        let htpasswd_cache_ttl = self.duration(
            &a.htpasswd_cache_ttl,
            "htpasswd_cache_ttl",
            Duration::from_secs(300),
        );
        let htpasswd_cache_entries = match &a.htpasswd_cache_entries {
            None => 10_000,
            Some(v) if (0..=1_000_000).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                self.err(
                    v,
                    "htpasswd_cache_entries must be between 0 (no cache) and 1000000",
                );
                10_000
            }
        };
        let client_cert_identity = a.client_cert_identity.unwrap_or(false);
        if client_cert_identity && tls.is_none_or(|t| t.files.client_ca.is_none()) {
            let message = "client_cert_identity needs [tls] with client_ca (mTLS)";
            match &span_holder {
                Some(s) => self.err(s, message),
                None => self.err_top(message),
            }
        }
        if keys_file.is_none() && htpasswd_file.is_none() && !client_cert_identity && !anonymous {
            let message = "no credential source: set [auth] keys_file = \"keys.toml\" (create keys with `portcullis keygen`) or htpasswd_file = \"htpasswd\", or set anonymous = true to let every request through unauthenticated";
            match &span_holder {
                Some(s) => self.err(s, message),
                None => self.err_top(message),
            }
        }

        let api_key_headers = match &a.api_key_headers {
            None => vec![
                http::header::AUTHORIZATION,
                http::HeaderName::from_static("x-api-key"),
            ],
            Some(list) => {
                let names: Vec<_> = list
                    .get_ref()
                    .iter()
                    .map(|n| Spanned::new(list.span(), n.clone()))
                    .filter_map(|n| self.header_name(&n, "api_key_headers"))
                    .collect();
                if names.is_empty() && keys_file.is_some() {
                    self.err(list, "api_key_headers is empty: no request could present a key; remove it to use [\"authorization\", \"x-api-key\"]");
                }
                names
            }
        };

        let identity_header = match &a.identity_header {
            None => http::HeaderName::from_static("x-authenticated-user"),
            Some(v) => self
                .header_name(v, "identity_header")
                .unwrap_or(http::HeaderName::from_static("x-authenticated-user")),
        };
        if api_key_headers.contains(&identity_header) {
            if let Some(v) = &a.identity_header {
                self.err(
                    v,
                    "identity_header must differ from every api_key_headers entry",
                );
            }
        }

        let realm = match &a.realm {
            None => "portcullis".to_string(),
            Some(v) => {
                let ok = !v.get_ref().is_empty()
                    && v.get_ref()
                        .chars()
                        .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ');
                if !ok {
                    self.err(
                        v,
                        "realm must be printable ASCII without quotes or backslashes",
                    );
                }
                v.get_ref().clone()
            }
        };

        let mut public_paths = Vec::new();
        for p in a.public_paths.iter().flatten() {
            match PathPattern::parse(p.get_ref()) {
                Ok(pat) => public_paths.push(pat),
                Err(e) => self.err(p, format!("public_paths: {e}")),
            }
        }

        Some(AuthConfig {
            keys_file,
            keys,
            htpasswd_file,
            htpasswd,
            htpasswd_plaintext,
            htpasswd_cache_ttl,
            htpasswd_cache_entries,
            api_key_headers,
            realm,
            identity_header,
            public_paths,
            anonymous,
            client_cert_identity,
        })
    }

    /// A header value from the config; "" means "do not send".
    fn header_value(
        &mut self,
        v: &S<String>,
        key: &str,
        default: Option<&'static str>,
    ) -> Option<http::HeaderValue> {
        match v {
            None => default.map(http::HeaderValue::from_static),
            Some(v) if v.get_ref().is_empty() => None,
            Some(v) => match http::HeaderValue::from_str(v.get_ref()) {
                Ok(h) => Some(h),
                Err(_) => {
                    self.err(
                        v,
                        format!("{key}: not a valid header value (printable characters only)"),
                    );
                    None
                }
            },
        }
    }

    fn headers(&mut self, h: RawHeaders) -> HeadersConfig {
        let hsts = self.header_value(&h.hsts, "hsts", Some("max-age=31536000; includeSubDomains"));
        let mut add = Vec::new();
        for (name, key, value, default) in [
            (
                "x-frame-options",
                "frame_options",
                &h.frame_options,
                Some("DENY"),
            ),
            (
                "x-content-type-options",
                "content_type_options",
                &h.content_type_options,
                Some("nosniff"),
            ),
            (
                "referrer-policy",
                "referrer_policy",
                &h.referrer_policy,
                Some("no-referrer"),
            ),
            (
                "content-security-policy",
                "content_security_policy",
                &h.content_security_policy,
                None,
            ),
        ] {
            if let Some(v) = self.header_value(value, key, default) {
                add.push((http::HeaderName::from_static(name), v));
            }
        }
        for (name, value) in h.set.iter().flatten() {
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                self.err(
                    value,
                    format!("[headers.set]: \"{name}\" is not a valid header name"),
                );
                continue;
            };
            if let Some(v) = self.header_value(&Some(value.clone()), name, None) {
                add.retain(|(n, _)| *n != header);
                add.push((header, v));
            }
        }
        let remove = match &h.remove {
            None => vec![
                http::header::SERVER,
                http::HeaderName::from_static("x-powered-by"),
            ],
            Some(list) => list
                .iter()
                .filter_map(|n| self.header_name(n, "remove"))
                .collect(),
        };
        HeadersConfig {
            hsts,
            add,
            remove,
            override_backend: h.override_backend.unwrap_or(false),
        }
    }

    fn cidrs(&mut self, list: &Option<Vec<Spanned<String>>>, key: &str) -> Vec<ipnet::IpNet> {
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

    fn rate_limit(&mut self, r: RawRateLimit) -> crate::ratelimit::RateLimitConfig {
        let d = crate::ratelimit::RateLimitConfig::default();
        let mut count = |v: &S<i64>, key: &str| match v {
            None => None,
            Some(n) if (1..=1_000_000).contains(n.get_ref()) => Some(*n.get_ref() as u32),
            Some(n) => {
                self.err(n, format!("{key} must be between 1 and 1000000"));
                None
            }
        };
        let per_second = count(&r.requests_per_second, "requests_per_second");
        let burst = count(&r.burst, "burst");
        let default = match (per_second, burst) {
            (None, None) => d.default,
            (Some(rps), b) => crate::ratelimit::Quota {
                per_second: rps,
                burst: b.unwrap_or(rps.saturating_mul(2)),
            },
            (None, Some(b)) => crate::ratelimit::Quota {
                per_second: d.default.per_second,
                burst: b,
            },
        };
        let timeout = self.duration(
            &r.redis_timeout,
            "redis_timeout",
            Duration::from_millis(100),
        );
        // The URL may carry a password: it can come from a file (a Docker or Kubernetes
        // secret) or an environment variable instead of this file, and is never echoed.
        let url_source = match (&r.redis_url, &r.redis_url_file) {
            (Some(_), Some(f)) => {
                self.err(f, "set redis_url or redis_url_file, not both");
                None
            }
            (Some(u), None) => Some(u.clone()),
            (None, Some(f)) => {
                let path = self.path(f.get_ref());
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(Spanned::new(f.span(), text.trim().to_string())),
                    Err(e) => {
                        self.err(
                            f,
                            format!("redis_url_file: cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        };
        let url_source = match url_source {
            Some(u) => match secret_from_env(u.get_ref()) {
                Ok(v) => Some(Spanned::new(u.span(), v)),
                Err(e) => {
                    self.err(&u, e);
                    None
                }
            },
            None => None,
        };
        let backend = r.backend.as_ref().map(|b| *b.get_ref());
        let redis = match (backend, &url_source) {
            (Some(RateLimitBackend::Redis), Some(url)) => {
                if redis::Client::open(url.get_ref().as_str()).is_err() {
                    self.err(
                        url,
                        "redis_url is not a Redis URL; write redis://[:PASSWORD@]HOST:6379/",
                    );
                }
                Some(crate::ratelimit::RedisConfig {
                    url: url.get_ref().clone(),
                    failure: r.redis_failure.unwrap_or_default(),
                    timeout,
                })
            }
            (Some(RateLimitBackend::Redis), None) => {
                if r.redis_url.is_none() && r.redis_url_file.is_none() {
                    let b = r.backend.as_ref().expect("matched");
                    self.err(
                        b,
                        "backend = \"redis\" needs redis_url = \"redis://HOST:6379/\" (or redis_url_file)",
                    );
                }
                None
            }
            (_, Some(url)) => {
                self.err(
                    url,
                    "redis_url is used only with backend = \"redis\"; add it or remove redis_url",
                );
                None
            }
            _ => None,
        };
        crate::ratelimit::RateLimitConfig {
            enabled: r.enabled.unwrap_or(d.enabled),
            default,
            redis,
        }
    }

    fn ban(&mut self, b: RawBan) -> BanConfig {
        let d = BanConfig::default();
        let failures = match &b.failures {
            None => d.failures,
            Some(v) if (1..=1_000_000).contains(v.get_ref()) => *v.get_ref() as u32,
            Some(v) => {
                self.err(v, "failures must be between 1 and 1000000");
                d.failures
            }
        };
        BanConfig {
            enabled: b.enabled.unwrap_or(d.enabled),
            failures,
            window: self.duration(&b.window, "window", d.window),
            duration: self.duration(&b.duration, "duration", d.duration),
        }
    }

    fn log(&mut self, l: RawLog) -> LogConfig {
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
