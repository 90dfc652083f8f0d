//! Validation of `[upstream]` (DESIGN.md §11): one backend (`url`) or several (`urls`), how
//! requests are shared among them, their health checks, and MCP session affinity.

use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::Uri;
use toml::Spanned;

use crate::upstream::affinity::Sealer;
use crate::upstream::{HealthCheck, Target, MAX_INSTANCES};

use super::raw::*;
use super::validate::Validator;
use super::UpstreamConfig;

impl Validator<'_> {
    pub(super) fn upstream(&mut self, u: Spanned<RawUpstream>) -> Option<UpstreamConfig> {
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
        let urls: Vec<&Spanned<String>> = match (&r.url, &r.urls) {
            (Some(_), Some(list)) => {
                self.err(
                    list,
                    "[upstream] takes url (one backend) or urls (several), not both; keep one",
                );
                return None;
            }
            (Some(url), None) => vec![url],
            (None, Some(list)) if list.get_ref().is_empty() => {
                self.err(list, "urls is empty; list the backend instances, e.g. urls = [\"http://10.0.0.11:4298\", \"http://10.0.0.12:4298\"]");
                return None;
            }
            (None, Some(list)) if list.get_ref().len() > MAX_INSTANCES => {
                self.err(
                    list,
                    format!(
                        "urls lists {} instances; at most {MAX_INSTANCES} are supported",
                        list.get_ref().len()
                    ),
                );
                return None;
            }
            (None, Some(list)) => list.get_ref().iter().collect(),
            (None, None) => {
                self.err(
                    &u,
                    "[upstream] needs url = \"http://HOST:PORT\" (the backend to protect), or urls = [...] for several instances",
                );
                return None;
            }
        };
        let mut targets: Vec<Target> = Vec::with_capacity(urls.len());
        let key = if r.url.is_some() { "url" } else { "urls entry" };
        for url in &urls {
            let Some(t) = self.target(url, key) else {
                continue;
            };
            if let Some(first) = targets.first() {
                if first.scheme != t.scheme {
                    self.err(*url, "every instance in urls must use the same scheme (all http:// or all https://)");
                    continue;
                }
            }
            if targets.iter().any(|o| o.label == t.label) {
                self.err(*url, format!("\"{}\" is listed twice in urls", t.label));
                continue;
            }
            targets.push(t);
        }
        if targets.len() != urls.len() {
            return None;
        }
        let scheme = targets[0].scheme.clone();
        let ca = r.ca.as_ref().map(|c| (self.path(c.get_ref()), c));
        let tls_roots = if scheme == Scheme::HTTPS {
            match crate::tls::upstream_roots(ca.as_ref().map(|(p, _)| p.as_path())) {
                Ok(roots) => Some(Arc::new(roots)),
                Err(e) => {
                    match &ca {
                        Some((_, raw)) => self.err(raw, e),
                        None => self.err(urls[0], e),
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
        let health = self.health(r, response_timeout);
        let eject_for = self.duration(&r.eject_duration, "eject_duration", Duration::from_secs(10));
        let affinity = self.affinity(r, targets.len());
        Some(UpstreamConfig {
            targets,
            balance: r.balance.unwrap_or_default(),
            health,
            eject_for,
            session_affinity: affinity,
            ca: ca.map(|(p, _)| p),
            tls_roots,
            connect_timeout,
            response_timeout,
            pass_credentials: r.pass_credentials.unwrap_or(false),
            protocol: r.protocol.unwrap_or_default(),
            host_header: r.host_header.unwrap_or_default(),
        })
    }

    /// One instance's URL: http(s)://HOST[:PORT][/base], no credentials, no query.
    fn target(&mut self, url: &Spanned<String>, key: &str) -> Option<Target> {
        let named = match key {
            "url" => format!("url = \"{}\"", url.get_ref()),
            _ => format!("{key} \"{}\"", url.get_ref()),
        };
        let parsed = match url.get_ref().parse::<Uri>() {
            Ok(p) => p,
            Err(e) => {
                self.err(url, format!("{named} is not a URL: {e}"));
                return None;
            }
        };
        let scheme = match parsed.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                self.err(
                    url,
                    format!("{named}: the upstream must be http://HOST:PORT or https://HOST:PORT"),
                );
                return None;
            }
        };
        let Some(authority) = parsed.authority().cloned() else {
            self.err(
                url,
                "the upstream URL needs a host, e.g. \"http://127.0.0.1:4298\"",
            );
            return None;
        };
        if authority.as_str().contains('@') {
            self.err(url, format!("{named} must not carry user:password@; the backend sees no credentials unless pass_credentials = true"));
            return None;
        }
        if parsed.query().is_some() {
            self.err(url, format!("{named} must not have a query string"));
            return None;
        }
        Some(Target::new(scheme, authority, parsed.path()))
    }

    /// Active health checks: on with `health_path`; the other keys need it.
    fn health(&mut self, r: &RawUpstream, response_timeout: Duration) -> Option<HealthCheck> {
        let interval = self.duration(
            &r.health_interval,
            "health_interval",
            Duration::from_secs(5),
        );
        let timeout = self.duration(
            &r.health_timeout,
            "health_timeout",
            Duration::from_secs(2).min(response_timeout),
        );
        let mut threshold = |v: &S<i64>, key: &str| match v {
            None => 2,
            Some(n) if (1..=100).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                self.err(
                    n,
                    format!("{key} must be between 1 and 100 (consecutive checks)"),
                );
                2
            }
        };
        let unhealthy = threshold(&r.unhealthy_threshold, "unhealthy_threshold");
        let healthy = threshold(&r.healthy_threshold, "healthy_threshold");
        let Some(path) = &r.health_path else {
            let stray = [&r.health_interval, &r.health_timeout]
                .into_iter()
                .flatten()
                .map(|s| s.span())
                .chain(
                    [&r.unhealthy_threshold, &r.healthy_threshold]
                        .into_iter()
                        .flatten()
                        .map(|s| s.span()),
                )
                .next();
            if let Some(at) = stray {
                self.err(&Spanned::new(at, ()), "health checks need health_path = \"/health\" (the backend path that answers 2xx when the instance is ready); set it, or remove this key");
            }
            return None;
        };
        let p = path.get_ref();
        if !p.starts_with('/') || p.contains(['?', '#']) || p.bytes().any(|b| !b.is_ascii_graphic())
        {
            self.err(
                path,
                format!(
                    "health_path = \"{p}\" must be a plain path starting with /, e.g. \"/health\""
                ),
            );
            return None;
        }
        if timeout > interval {
            if let Some(t) = &r.health_timeout {
                self.err(t, "health_timeout must not be longer than health_interval");
            }
        }
        Some(HealthCheck {
            path: p.clone(),
            interval,
            timeout: timeout.min(interval),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        })
    }

    /// MCP session affinity: on by default with several instances. The key comes from
    /// `session_key_file` (shared by replicas), or is drawn at start (this process only).
    fn affinity(&mut self, r: &RawUpstream, instances: usize) -> Option<Arc<Sealer>> {
        let on = r
            .mcp_session_affinity
            .as_ref()
            .map_or(instances > 1, |v| *v.get_ref());
        if !on {
            if let Some(f) = &r.session_key_file {
                self.err(f, "session_key_file is used only with mcp_session_affinity; set mcp_session_affinity = true, or remove it");
            }
            return None;
        }
        let sealer = match &r.session_key_file {
            Some(f) => {
                let path = self.path(f.get_ref());
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) => {
                        self.err(
                            f,
                            format!("cannot read the session key file {}: {e}", path.display()),
                        );
                        return None;
                    }
                };
                match Sealer::new(&bytes, instances) {
                    Ok(s) => s,
                    Err(e) => {
                        self.err(f, format!("{}: {e}", path.display()));
                        return None;
                    }
                }
            }
            None => {
                self.warnings.push("[upstream] mcp_session_affinity is on without session_key_file: MCP sessions are sealed with a key drawn at start, so they end when portcullis restarts and do not carry over to other replicas; give every replica the same key file (`openssl rand -base64 48 > session.key`)".into());
                Sealer::random(instances)
            }
        };
        Some(Arc::new(sealer))
    }
}
