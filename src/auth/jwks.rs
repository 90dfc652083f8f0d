//! The issuer's key set, kept current: [`Jwks`] holds the last good [`JwkKeys`] and, for a
//! `jwks_url` or a discovered one, a task that refetches it (every `refresh_interval` at most,
//! sooner when the server's `Cache-Control: max-age` says so, never more often than
//! `min_refresh_interval`), and on a token whose `kid` it does not know, at most once per
//! `min_refresh_interval` however many such tokens arrive: forged `kid`s never make
//! portcullis hammer the identity provider.
//!
//! Fails safe for availability and closed for access: a fetch that fails (unreachable, not
//! 200, not a key set, no usable key) keeps the last good set; with no set ever loaded every
//! token is refused and `/readyz` says why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::jwt::{JwkKeys, JwksSource, Jwt, JwtConfig, TokenIdentity};
use crate::error::{Reject, TokenRefusal};

/// The largest JWKS or metadata document read.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// What `/readyz` and the metrics show of the key set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JwksStatus {
    /// The URL fetched (after discovery), or the file.
    pub source: String,
    /// Keys in the set in force.
    pub keys: usize,
    /// A set has been loaded since start.
    pub loaded: bool,
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_success: Option<SystemTime>,
    /// Why the last fetch failed, when it did (cleared by a success).
    pub last_error: Option<String>,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    /// Fetches asked for by a token with an unknown `kid`.
    pub unknown_kid_refetches: u64,
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

type Fetcher = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Verified tokens remembered at most (the oldest half is dropped when full).
const CACHE_ENTRIES: usize = 10_000;

/// A token verified under one key set, by the SHA-256 of the token.
struct Remembered {
    identity: Arc<TokenIdentity>,
    /// The key set version it was verified under: any change of the set forgets it.
    version: u64,
    /// When it was verified: the oldest are dropped first.
    at: Instant,
}

/// Token verification with its key set.
pub struct Jwks {
    pub jwt: Jwt,
    keys: ArcSwap<JwkKeys>,
    /// Bumped by every key set swapped in.
    version: std::sync::atomic::AtomicU64,
    /// Tokens that verified: a client presents the same token many times, and a signature
    /// check costs 30 µs (RS256) to 95 µs (ES256) here. Only successes are remembered, each
    /// until its `exp` (with the leeway) and only under the key set it was verified with.
    verified: Mutex<HashMap<[u8; 32], Remembered>>,
    status: Mutex<JwksStatus>,
    /// Asks the fetch task for a fetch now.
    wake: Notify,
    /// Counts finished fetch attempts; waiters for a refetch watch it move.
    fetched: watch::Sender<u64>,
    /// When a token with an unknown `kid` last asked for a fetch, and how many fetches had
    /// finished then (`fetched`): more now means that fetch is done.
    kid_refetch_at: Mutex<Option<(Instant, u64)>>,
}

impl Jwks {
    pub fn new(config: JwtConfig) -> Jwks {
        let (source, keys) = match &config.source {
            JwksSource::File(p) => (p.display().to_string(), config.file_keys.clone()),
            JwksSource::Url(u) => (u.to_string(), None),
            JwksSource::Discover => (format!("{} (discovery)", config.issuer), None),
        };
        let status = JwksStatus {
            source,
            keys: keys.as_ref().map_or(0, JwkKeys::len),
            loaded: keys.is_some(),
            last_success: keys.as_ref().map(|_| SystemTime::now()),
            ..JwksStatus::default()
        };
        Jwks {
            jwt: Jwt::new(config),
            keys: ArcSwap::from_pointee(keys.unwrap_or_default()),
            version: std::sync::atomic::AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
            status: Mutex::new(status),
            wake: Notify::new(),
            fetched: watch::channel(0).0,
            kid_refetch_at: Mutex::new(None),
        }
    }

    pub fn status(&self) -> JwksStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swap in a key set (a fetch, or the file reloaded).
    pub fn install(&self, keys: JwkKeys) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.keys = keys.len();
        st.loaded = true;
        st.last_success = Some(SystemTime::now());
        st.last_error = None;
        self.keys.store(Arc::new(keys));
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn failed(&self, error: String) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.fetches_failed += 1;
        tracing::error!(event = "jwks", result = "error", source = %st.source, error = %error, keys_in_force = st.keys, "JWKS not refreshed; the last good key set stays in force");
        st.last_error = Some(error);
    }

    /// Verify a token, or find it verified under the key set in force and not expired. A
    /// `kid` the set does not know asks for one refetch (at most once per
    /// `min_refresh_interval`, shared by every request that waits for it) before the token is
    /// refused. Fails closed: no key set, no key, no verification.
    pub async fn verify(&self, token: &str) -> Result<Arc<TokenIdentity>, Reject> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.remembered(&digest) {
            return Ok(identity);
        }
        let version = || self.version.load(std::sync::atomic::Ordering::SeqCst);
        let mut verified_under = version();
        let result = match self.jwt.verify(token, &digest, &self.keys.load()) {
            Err(Reject::InvalidJwt(TokenRefusal::UnknownKey))
                if !matches!(self.jwt.config.source, JwksSource::File(_))
                    && self.refetch_for_unknown_kid().await =>
            {
                verified_under = version();
                self.jwt.verify(token, &digest, &self.keys.load())
            }
            other => other,
        };
        let identity = Arc::new(result?);
        self.remember(digest, identity.clone(), verified_under);
        Ok(identity)
    }

    /// A token verified before under the key set in force, and not expired.
    fn remembered(&self, digest: &[u8; 32]) -> Option<Arc<TokenIdentity>> {
        let version = self.version.load(std::sync::atomic::Ordering::SeqCst);
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let hit = cache.get(digest)?;
        (hit.version == version && SystemTime::now() < hit.identity.expires)
            .then(|| hit.identity.clone())
    }

    /// Remember a verified token; a full cache first loses what no longer counts, then its
    /// older half.
    fn remember(&self, digest: [u8; 32], identity: Arc<TokenIdentity>, version: u64) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            let now = SystemTime::now();
            let current = self.version.load(std::sync::atomic::Ordering::SeqCst);
            cache.retain(|_, r| r.version == current && now < r.identity.expires);
            if cache.len() >= CACHE_ENTRIES {
                let mut ages: Vec<Instant> = cache.values().map(|r| r.at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                cache.retain(|_, r| r.at > cut);
            }
        }
        cache.insert(
            digest,
            Remembered {
                identity,
                version,
                at: Instant::now(),
            },
        );
    }

    /// Ask for a fetch because of an unknown `kid` and wait for it (up to `fetch_timeout`);
    /// `true` when a fetch finished meanwhile (the token is worth checking again). Within
    /// `min_refresh_interval` of the last such fetch nothing new is asked: a request waits for
    /// that fetch while it runs, and is refused at once once it has finished (the set is as
    /// fresh as the pace allows).
    async fn refetch_for_unknown_kid(&self) -> bool {
        let cfg = &self.jwt.config;
        // Subscribed first, so that a fetch finishing from here on is seen.
        let mut rx = self.fetched.subscribe();
        let finished = *rx.borrow_and_update();
        let now = Instant::now();
        {
            let mut at = self
                .kid_refetch_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match *at {
                Some((t, before)) if now.duration_since(t) < cfg.min_refresh_interval => {
                    if finished != before {
                        return false;
                    }
                }
                _ => {
                    *at = Some((now, finished));
                    self.status
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .unknown_kid_refetches += 1;
                    self.wake.notify_one();
                }
            }
        }
        tokio::time::timeout(cfg.fetch_timeout, rx.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Keep the key set fresh until `stop` (for `jwks_url` and discovery; a `jwks_file` is
    /// the reloader's). The first fetch starts at once.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let cfg = &self.jwt.config;
        let client = fetcher(cfg);
        let mut jwks_uri = match &cfg.source {
            JwksSource::Url(u) => Some(u.clone()),
            JwksSource::Discover => None,
            JwksSource::File(_) => return,
        };
        loop {
            let next = match self.fetch_once(&client, &mut jwks_uri).await {
                Ok(max_age) => max_age
                    .unwrap_or(cfg.refresh_interval)
                    .clamp(cfg.min_refresh_interval, cfg.refresh_interval),
                Err(e) => {
                    self.failed(e);
                    cfg.min_refresh_interval
                }
            };
            self.fetched.send_modify(|n| *n += 1);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
                // A token with an unknown kid (paced by refetch_for_unknown_kid).
                _ = self.wake.notified() => {}
            }
        }
    }

    /// One fetch: discovery first when the JWKS URL is not known yet. `Ok(max-age)` on a
    /// success.
    async fn fetch_once(
        &self,
        client: &Fetcher,
        jwks_uri: &mut Option<Uri>,
    ) -> Result<Option<Duration>, String> {
        let cfg = &self.jwt.config;
        let uri = match jwks_uri {
            Some(u) => u.clone(),
            None => {
                let u = discover(client, cfg).await?;
                self.status.lock().unwrap_or_else(|p| p.into_inner()).source = u.to_string();
                *jwks_uri = Some(u.clone());
                u
            }
        };
        let (text, max_age) = get(client, &uri, cfg.fetch_timeout).await?;
        let (keys, notes) = JwkKeys::parse(&text).map_err(|e| format!("{uri}: {e}"))?;
        for n in notes {
            tracing::warn!(source = %uri, "JWKS: {n}");
        }
        let before = self.keys.load();
        let added = keys.len();
        tracing::info!(
            event = "jwks",
            result = "ok",
            source = %uri,
            keys = added,
            previous_keys = before.len(),
            "JWKS fetched"
        );
        self.install(keys);
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fetches_ok += 1;
        Ok(max_age)
    }
}

/// The client for the identity provider: the system's trust store or `ca`, HTTP/1.1, no
/// pooling beyond a short idle time (fetches are minutes apart).
fn fetcher(cfg: &JwtConfig) -> Fetcher {
    let tls = crate::tls::upstream_client_config(cfg.roots.clone())
        .expect("TLS 1.2 and 1.3 are supported by the built-in provider");
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.fetch_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The JWKS URL from the issuer's metadata: OpenID Connect discovery
/// (`{issuer}/.well-known/openid-configuration`), then RFC 8414
/// (`/.well-known/oauth-authorization-server{issuer path}`). The document's `issuer` must be
/// the configured one (RFC 8414 §3.3), and its `jwks_uri` an absolute http(s) URL.
async fn discover(client: &Fetcher, cfg: &JwtConfig) -> Result<Uri, String> {
    let issuer = cfg.issuer.trim_end_matches('/');
    let parsed: Uri = cfg
        .issuer
        .parse()
        .map_err(|_| format!("issuer {:?} is not a URL", cfg.issuer))?;
    let origin = format!(
        "{}://{}",
        parsed.scheme_str().unwrap_or("https"),
        parsed.authority().map_or("", |a| a.as_str())
    );
    let path = parsed.path().trim_end_matches('/');
    let candidates = [
        format!("{issuer}/.well-known/openid-configuration"),
        format!("{origin}/.well-known/oauth-authorization-server{path}"),
    ];
    let mut errors = Vec::new();
    for url in candidates {
        let Ok(uri) = url.parse::<Uri>() else {
            continue;
        };
        match get(client, &uri, cfg.fetch_timeout).await {
            Ok((text, _)) => {
                let doc: serde_json::Value = match serde_json::from_str(&text) {
                    Ok(d) => d,
                    Err(e) => {
                        errors.push(format!("{uri}: not JSON: {e}"));
                        continue;
                    }
                };
                if doc.get("issuer").and_then(|i| i.as_str()) != Some(cfg.issuer.as_str()) {
                    errors.push(format!(
                        "{uri}: its \"issuer\" is not {:?}; set [auth.jwt] issuer to the issuer exactly as the provider writes it",
                        cfg.issuer
                    ));
                    continue;
                }
                let jwks = doc
                    .get("jwks_uri")
                    .and_then(|j| j.as_str())
                    .ok_or_else(|| format!("{uri}: no \"jwks_uri\"; set [auth.jwt] jwks_url"))?;
                let jwks: Uri = jwks
                    .parse()
                    .ok()
                    .filter(|u: &Uri| matches!(u.scheme_str(), Some("https" | "http")))
                    .ok_or_else(|| format!("{uri}: \"jwks_uri\" {jwks:?} is not an http(s) URL"))?;
                return Ok(jwks);
            }
            Err(e) => errors.push(e),
        }
    }
    Err(format!("discovery failed: {}", errors.join("; ")))
}

/// GET a document: 200, at most [`MAX_DOCUMENT`] bytes, within `timeout`. Also returns the
/// `Cache-Control: max-age`, when there is one.
async fn get(
    client: &Fetcher,
    uri: &Uri,
    timeout: Duration,
) -> Result<(String, Option<Duration>), String> {
    let req = Request::get(uri.clone())
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("{uri}: {e}"))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{uri}: {}", crate::error::chain(&e)))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("{uri}: answered {}", resp.status()));
        }
        let max_age = resp
            .headers()
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|d| d.trim().strip_prefix("max-age=")?.parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("{uri}: body: {e}"))?
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).map_err(|_| format!("{uri}: not UTF-8"))?;
        Ok((text, max_age))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{uri}: no answer within {timeout:?}"))?
}
