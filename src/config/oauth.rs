//! Validation of `[auth.jwt]` and `[mcp]` (DESIGN.md §9): URLs that must be absolute (https,
//! or http on loopback), the JWKS file read and parsed, an algorithm allow-list without
//! `none` or HMAC, and the audience a token must carry.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::Spanned;

use crate::auth::jwt::{JwkKeys, JwksSource, JwtConfig};
use crate::mcp::McpConfig;

use super::raw::*;
use super::validate::Validator;

/// The algorithms accepted when `algorithms` is not set: every asymmetric one JWT access
/// tokens are signed with in practice.
const DEFAULT_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Whether a URL's host is a loopback name or address (where plain http is acceptable).
fn loopback(uri: &http::Uri) -> bool {
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Validator<'_> {
    /// An absolute `https://` URL (or `http://` on loopback) without a fragment.
    fn public_url(&mut self, raw: &Spanned<String>, key: &str) -> Option<http::Uri> {
        let v = raw.get_ref().trim();
        let parsed = v
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.authority().is_some());
        let Some(uri) = parsed else {
            self.err(raw, format!("{key} = {v:?} is not an absolute URL; write e.g. \"https://mcp.example.com/mcp\""));
            return None;
        };
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback(&uri) => {}
            Some("http") => {
                self.err(
                    raw,
                    format!("{key} = {v:?}: plain http is accepted on loopback only; use https://"),
                );
                return None;
            }
            _ => {
                self.err(raw, format!("{key} = {v:?} must be an https:// URL"));
                return None;
            }
        }
        if v.contains('#') || uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            self.err(
                raw,
                format!("{key} = {v:?} must not carry a fragment or user:password@"),
            );
            return None;
        }
        Some(uri)
    }

    /// Space-free, quote-free names (scopes): they go into challenges and metadata.
    fn scope_list(&mut self, raw: &Option<Vec<Spanned<String>>>, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for s in raw.iter().flatten() {
            let v = s.get_ref();
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                self.err(
                    s,
                    format!("{key}: {v:?} is not a scope (printable ASCII, no spaces or quotes)"),
                );
            } else {
                out.push(v.clone());
            }
        }
        out
    }

    pub(super) fn mcp(&mut self, raw: Option<Spanned<RawMcp>>) -> Option<McpConfig> {
        let raw = raw?;
        let r = raw.into_inner();
        let path = match &r.path {
            None => "/mcp".to_string(),
            Some(p) => {
                let v = p.get_ref();
                match crate::path::normalize(v) {
                    Ok(n) if n == *v && v.starts_with('/') && v.len() > 1 && !v.ends_with('/') => {
                        v.clone()
                    }
                    _ => {
                        self.err(p, format!("path = {v:?} must be a normalised absolute path such as \"/mcp\" (no trailing slash, no dot segments)"));
                        "/mcp".to_string()
                    }
                }
            }
        };
        let resource = r.resource.as_ref().and_then(|u| {
            let uri = self.public_url(u, "resource")?;
            if uri.query().is_some() {
                self.err(u, "resource must not have a query string");
                return None;
            }
            Some(uri)
        });
        let mut authorization_servers = Vec::new();
        for a in r.authorization_servers.iter().flatten() {
            if self.public_url(a, "authorization_servers").is_some() {
                authorization_servers.push(a.get_ref().trim().to_string());
            }
        }
        let scopes_supported = self.scope_list(&r.scopes_supported, "scopes_supported");
        for (s, raw_s) in scopes_supported
            .iter()
            .zip(r.scopes_supported.iter().flatten())
        {
            if s == "offline_access" {
                self.err(raw_s, "scopes_supported must not list offline_access: clients would ask every user for a refresh token the resource does not need");
            }
        }
        let mut allowed_origins = Vec::new();
        for o in r.allowed_origins.iter().flatten() {
            match crate::mcp::normalize_origin(o.get_ref()) {
                Some(n) => allowed_origins.push(n),
                None => self.err(o, format!("allowed_origins: {:?} is not an origin; write scheme://host[:port], e.g. \"https://claude.ai\"", o.get_ref())),
            }
        }
        if let Some(name) = &r.resource_name {
            if name.get_ref().chars().any(char::is_control) {
                self.err(name, "resource_name must be one line of text");
            }
        }
        let policy = self.tool_policy(&r);
        Some(McpConfig {
            policy,
            path,
            resource,
            resource_name: r.resource_name.map(|n| n.into_inner()),
            authorization_servers,
            scopes_supported,
            allowed_origins,
        })
    }

    /// `[auth.jwt]`; `mcp` gives the default audience.
    pub(super) fn jwt(
        &mut self,
        raw: Option<Spanned<RawJwt>>,
        mcp: Option<&McpConfig>,
    ) -> Option<JwtConfig> {
        let raw = raw?;
        let at = Spanned::new(raw.span(), ());
        let r = raw.into_inner();
        let issuer = match &r.issuer {
            None => {
                self.err(&at, "[auth.jwt] needs issuer = \"https://idp.example.com/realms/acme\" (the `iss` its tokens carry, exactly)");
                None
            }
            Some(i) => self
                .public_url(i, "issuer")
                .map(|_| i.get_ref().trim().to_string()),
        };
        let source = match (&r.jwks_url, &r.jwks_file) {
            (Some(u), Some(_)) => {
                self.err(u, "set jwks_url or jwks_file, not both");
                None
            }
            (Some(u), None) => self.public_url(u, "jwks_url").map(JwksSource::Url),
            (None, Some(f)) => Some(JwksSource::File(self.path(f.get_ref()))),
            (None, None) => Some(JwksSource::Discover),
        };
        let file_keys = match (&source, &r.jwks_file) {
            (Some(JwksSource::File(path)), Some(raw_file)) => match std::fs::read_to_string(path) {
                Ok(text) => match JwkKeys::parse_file(path, &text) {
                    Ok(keys) => Some(keys),
                    Err(mut e) => {
                        self.errors.append(&mut e);
                        None
                    }
                },
                Err(e) => {
                    self.err(
                        raw_file,
                        format!("jwks_file: cannot read {}: {e}", path.display()),
                    );
                    None
                }
            },
            _ => None,
        };
        let mut algorithms = Vec::new();
        match &r.algorithms {
            None => algorithms.extend(DEFAULT_ALGORITHMS),
            Some(list) if list.is_empty() => self.err(&at, "algorithms is empty: no token could ever be accepted; remove it for the default (RS256, PS256, ES256, ES384, EdDSA)"),
            Some(list) => {
                for a in list {
                    let v = a.get_ref();
                    match v.parse::<Algorithm>() {
                        _ if v.eq_ignore_ascii_case("none") => self.err(a, "algorithms: \"none\" is never accepted (an unsigned token proves nothing)"),
                        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => self.err(a, format!("algorithms: {v} is never accepted: an HMAC key is a shared secret, and a public key used as one is the classic forgery")),
                        Ok(alg) => algorithms.push(alg),
                        Err(_) => self.err(a, format!("algorithms: {v:?} is not a JWS algorithm; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA")),
                    }
                }
            }
        }
        let audiences: Vec<String> = match &r.audiences {
            Some(list) => {
                let mut out = Vec::new();
                for a in list {
                    if a.get_ref().trim().is_empty() {
                        self.err(a, "audiences: an empty audience");
                    } else {
                        out.push(a.get_ref().clone());
                    }
                }
                out
            }
            None => mcp
                .and_then(|m| m.resource.as_ref())
                .map(|r| vec![r.to_string().trim_end_matches('/').to_string()])
                .unwrap_or_default(),
        };
        if audiences.is_empty() && r.audiences.is_none() {
            self.err(&at, "[auth.jwt] needs the audience its tokens are issued for: set [mcp] resource = \"https://mcp.example.com/mcp\" (the default audience) or [auth.jwt] audiences = [\"…\"]");
        } else if audiences.is_empty() {
            self.err(&at, "audiences is empty: no token could ever be accepted");
        }
        let leeway = match &r.leeway {
            Some(v) if v.get_ref().trim() == "0s" || v.get_ref().trim() == "0" => Duration::ZERO,
            _ => self.duration(&r.leeway, "leeway", Duration::from_secs(60)),
        };
        if leeway > Duration::from_secs(300) {
            if let Some(v) = &r.leeway {
                self.err(v, "leeway is over 5 minutes: fix the clocks instead (an expired token would stay usable that long)");
            }
        }
        let identity_claim = match &r.identity_claim {
            None => "sub".to_string(),
            Some(c) if c.get_ref().trim().is_empty() => {
                self.err(c, "identity_claim is empty; the usual claims are \"sub\", \"email\", \"preferred_username\", \"client_id\"");
                "sub".to_string()
            }
            Some(c) => c.get_ref().trim().to_string(),
        };
        let required_scopes = self.scope_list(&r.required_scopes, "required_scopes");
        let typ = r.typ.as_ref().map(|t| t.get_ref().trim().to_string());
        let refresh_interval = self.duration(
            &r.refresh_interval,
            "refresh_interval",
            Duration::from_secs(300),
        );
        let min_refresh_interval = self.duration(
            &r.min_refresh_interval,
            "min_refresh_interval",
            Duration::from_secs(30),
        );
        if min_refresh_interval > refresh_interval {
            if let Some(v) = r
                .min_refresh_interval
                .as_ref()
                .or(r.refresh_interval.as_ref())
            {
                self.err(
                    v,
                    "min_refresh_interval must not be longer than refresh_interval",
                );
            }
        }
        let fetch_timeout =
            self.duration(&r.fetch_timeout, "fetch_timeout", Duration::from_secs(5));
        let needs_tls = [&r.issuer, &r.jwks_url]
            .into_iter()
            .flatten()
            .any(|u| u.get_ref().trim().starts_with("https://"));
        let roots = match &r.ca {
            Some(ca) => {
                match crate::tls::load_roots(&self.path(ca.get_ref()), "identity provider CA") {
                    Ok(roots) => roots,
                    Err(e) => {
                        self.err(ca, format!("ca: {e}"));
                        rustls::RootCertStore::empty()
                    }
                }
            }
            None if needs_tls => match crate::tls::upstream_roots(None) {
                Ok(roots) => roots,
                Err(e) => {
                    self.err(&at, format!("{e} (or set [auth.jwt] ca = \"idp-ca.crt\")"));
                    rustls::RootCertStore::empty()
                }
            },
            None => rustls::RootCertStore::empty(),
        };
        Some(JwtConfig {
            issuer: issuer?,
            source: source?,
            audiences,
            algorithms,
            leeway,
            identity_claim,
            required_scopes,
            typ,
            refresh_interval,
            min_refresh_interval,
            fetch_timeout,
            roots: Arc::new(roots),
            file_keys,
        })
    }
}
