//! The raw serde shape of `proxy.toml`: every value with its position, for messages.

use serde::Deserialize;
use toml::Spanned;

use super::*;

pub(super) type S<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: Option<RawServer>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) upstream: Option<Spanned<RawUpstream>>,
    pub(super) auth: Option<Spanned<RawAuth>>,
    pub(super) ban: Option<RawBan>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) headers: Option<RawHeaders>,
    pub(super) log: Option<RawLog>,
    pub(super) mcp: Option<Spanned<RawMcp>>,
    pub(super) forward_auth: Option<Spanned<RawForwardAuth>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForwardAuth {
    pub(super) listen: S<String>,
    pub(super) path: S<String>,
    pub(super) convention: Option<crate::forward_auth::Convention>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    pub(super) issuer: S<String>,
    pub(super) jwks_url: S<String>,
    pub(super) jwks_file: S<String>,
    pub(super) audiences: Option<Vec<Spanned<String>>>,
    pub(super) algorithms: Option<Vec<Spanned<String>>>,
    pub(super) leeway: S<String>,
    pub(super) identity_claim: S<String>,
    pub(super) required_scopes: Option<Vec<Spanned<String>>>,
    pub(super) typ: S<String>,
    pub(super) refresh_interval: S<String>,
    pub(super) min_refresh_interval: S<String>,
    pub(super) fetch_timeout: S<String>,
    pub(super) ca: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    pub(super) path: S<String>,
    pub(super) resource: S<String>,
    pub(super) resource_name: S<String>,
    pub(super) authorization_servers: Option<Vec<Spanned<String>>>,
    pub(super) scopes_supported: Option<Vec<Spanned<String>>>,
    pub(super) allowed_origins: Option<Vec<Spanned<String>>>,
    pub(super) tool_policy: Option<Spanned<bool>>,
    pub(super) max_inspect_bytes: S<String>,
    pub(super) audit_arguments: Option<bool>,
    pub(super) grants: Option<Vec<Spanned<RawGrant>>>,
    pub(super) tool_limits: Option<Vec<Spanned<RawToolLimit>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrant {
    pub(super) users: Option<Vec<Spanned<String>>>,
    pub(super) subjects: Option<Vec<Spanned<String>>>,
    pub(super) scopes: Option<Vec<Spanned<String>>>,
    pub(super) tools: Option<Spanned<Vec<String>>>,
    pub(super) prompts: Option<Spanned<Vec<String>>>,
    pub(super) resources: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToolLimit {
    pub(super) tools: Option<Spanned<Vec<String>>>,
    pub(super) requests_per_second: S<i64>,
    pub(super) burst: S<i64>,
    pub(super) concurrency: S<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) enabled: Option<bool>,
    pub(super) requests_per_second: S<i64>,
    pub(super) burst: S<i64>,
    pub(super) backend: Option<Spanned<RateLimitBackend>>,
    pub(super) redis_url: S<String>,
    pub(super) redis_url_file: S<String>,
    pub(super) redis_failure: Option<crate::ratelimit::RedisFailure>,
    pub(super) redis_timeout: S<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RateLimitBackend {
    Memory,
    Redis,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: S<String>,
    pub(super) key: S<String>,
    pub(super) client_ca: S<String>,
    pub(super) client_auth: Option<ClientAuth>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeaders {
    pub(super) hsts: S<String>,
    pub(super) frame_options: S<String>,
    pub(super) content_type_options: S<String>,
    pub(super) referrer_policy: S<String>,
    pub(super) content_security_policy: S<String>,
    pub(super) remove: Option<Vec<Spanned<String>>>,
    #[serde(rename = "override")]
    pub(super) override_backend: Option<bool>,
    pub(super) set: Option<std::collections::BTreeMap<String, Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBan {
    pub(super) enabled: Option<bool>,
    pub(super) failures: S<i64>,
    pub(super) window: S<String>,
    pub(super) duration: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: S<String>,
    pub(super) admin_listen: S<String>,
    pub(super) max_connections: S<i64>,
    pub(super) header_read_timeout: S<String>,
    pub(super) max_header_bytes: S<String>,
    pub(super) idle_timeout: S<String>,
    pub(super) max_body_bytes: S<String>,
    pub(super) shutdown_grace: S<String>,
    pub(super) redirect_http: S<String>,
    pub(super) stream_idle_timeout: S<String>,
    pub(super) max_stream_lifetime: S<String>,
    pub(super) max_connections_per_ip: S<i64>,
    pub(super) allow_cidrs: Option<Vec<Spanned<String>>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) admin_hosts: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: S<String>,
    pub(super) urls: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) balance: Option<crate::upstream::Balance>,
    pub(super) health_path: S<String>,
    pub(super) health_interval: S<String>,
    pub(super) health_timeout: S<String>,
    pub(super) unhealthy_threshold: S<i64>,
    pub(super) healthy_threshold: S<i64>,
    pub(super) eject_duration: S<String>,
    pub(super) mcp_session_affinity: S<bool>,
    pub(super) session_key_file: S<String>,
    pub(super) connect_timeout: S<String>,
    pub(super) response_timeout: S<String>,
    pub(super) pass_credentials: Option<bool>,
    pub(super) protocol: Option<UpstreamProtocol>,
    pub(super) host_header: Option<HostHeader>,
    pub(super) ca: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) keys_file: S<String>,
    pub(super) htpasswd_file: S<String>,
    pub(super) htpasswd_plaintext: Option<bool>,
    pub(super) htpasswd_cache_ttl: S<String>,
    pub(super) htpasswd_cache_entries: S<i64>,
    pub(super) api_key_headers: S<Vec<String>>,
    pub(super) realm: S<String>,
    pub(super) identity_header: S<String>,
    pub(super) public_paths: Option<Vec<Spanned<String>>>,
    pub(super) anonymous: Option<bool>,
    pub(super) client_cert_identity: Option<bool>,
    pub(super) jwt: Option<Spanned<RawJwt>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<LogLevel>,
    pub(super) format: Option<LogFormat>,
    pub(super) access_log: S<String>,
    pub(super) access_format: Option<AccessFormat>,
}
