//! Validation of the policy sections of `proxy.toml`: `[auth]` (and the keys and htpasswd
//! files it names), `[headers]`, `[rate_limit]`, `[ban]`.

use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use crate::auth::api_key::KeySet;
use crate::auth::htpasswd::Htpasswd;
use crate::auth::AuthConfig;
use crate::authz::PathPattern;
use crate::ban::BanConfig;
use crate::headers::HeadersConfig;

use super::raw::*;
use super::*;

impl Validator<'_> {
    pub(super) fn auth(
        &mut self,
        a: Option<Spanned<RawAuth>>,
        tls: Option<&Tls>,
        mcp: Option<&crate::mcp::McpConfig>,
    ) -> Option<AuthConfig> {
        let span_holder = a.as_ref().map(|a| Spanned::new(a.span(), ()));
        let mut a = a.map(|a| a.into_inner()).unwrap_or_default();
        let jwt = self.jwt(a.jwt.take(), mcp);
        let anonymous = a.anonymous.unwrap_or(false);

        let htpasswd_plaintext = a.htpasswd_plaintext.unwrap_or(false);
        let (keys_file, keys) = self.keys_file(&a.keys_file);
        let (htpasswd_file, htpasswd) = self.htpasswd_file(&a.htpasswd_file, htpasswd_plaintext);
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
        if keys_file.is_none()
            && htpasswd_file.is_none()
            && jwt.is_none()
            && !client_cert_identity
            && !anonymous
        {
            let message = "no credential source: set [auth] keys_file = \"keys.toml\" (create keys with `portcullis keygen`), htpasswd_file = \"htpasswd\" or [auth.jwt], or set anonymous = true to let every request through unauthenticated";
            match &span_holder {
                Some(s) => self.err(s, message),
                None => self.err_top(message),
            }
        }

        let (api_key_headers, identity_header, realm) = self.auth_headers(&a, keys_file.is_some());

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
            jwt,
        })
    }

    /// The file `key` names, read: its path, and its text unless it could not be read (which
    /// is reported at the key's position).
    fn read_named(&mut self, raw: &Spanned<String>, key: &str) -> (PathBuf, Option<String>) {
        let path = self.path(raw.get_ref());
        match std::fs::read_to_string(&path) {
            Ok(text) => (path, Some(text)),
            Err(e) => {
                self.err(raw, format!("{key}: cannot read {}: {e}", path.display()));
                (path, None)
            }
        }
    }

    /// `keys_file`, read and parsed: its path and keys.
    fn keys_file(&mut self, raw: &S<String>) -> (Option<PathBuf>, KeySet) {
        let Some(raw) = raw else {
            return (None, KeySet::default());
        };
        let (path, text) = self.read_named(raw, "keys_file");
        let keys = match text.map(|t| KeySet::parse(&path, &t)) {
            Some(Ok(keys)) => keys,
            Some(Err(mut e)) => {
                self.errors.append(&mut e);
                KeySet::default()
            }
            None => KeySet::default(),
        };
        (Some(path), keys)
    }

    /// `htpasswd_file`, read and parsed: its path and users; weak hashes become warnings.
    fn htpasswd_file(
        &mut self,
        raw: &S<String>,
        plaintext: bool,
    ) -> (Option<PathBuf>, Option<Arc<Htpasswd>>) {
        let Some(raw) = raw else {
            return (None, None);
        };
        let (path, text) = self.read_named(raw, "htpasswd_file");
        let users = match text.map(|t| Htpasswd::parse(&path, &t, plaintext)) {
            Some(Ok((file, warnings))) => {
                self.warnings.extend(warnings.into_iter().map(|w| w.0));
                Some(Arc::new(file))
            }
            Some(Err(mut e)) => {
                self.errors.append(&mut e);
                None
            }
            None => None,
        };
        (Some(path), users)
    }

    /// `api_key_headers`, `identity_header` and `realm`.
    fn auth_headers(
        &mut self,
        a: &RawAuth,
        has_keys: bool,
    ) -> (Vec<http::HeaderName>, http::HeaderName, String) {
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
                if names.is_empty() && has_keys {
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
        (api_key_headers, identity_header, realm)
    }

    /// A header value from the config; "" means "do not send".
    pub(super) fn header_value(
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

    pub(super) fn headers(&mut self, h: RawHeaders) -> HeadersConfig {
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
            None => crate::headers::NameSet::from_iter([
                http::header::SERVER,
                http::HeaderName::from_static("x-powered-by"),
            ]),
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

    pub(super) fn rate_limit(&mut self, r: RawRateLimit) -> crate::ratelimit::RateLimitConfig {
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

    pub(super) fn ban(&mut self, b: RawBan) -> BanConfig {
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
}
