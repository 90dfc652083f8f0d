//! The admin listener (loopback): `/healthz`, `/readyz`, `/keys`, `/metrics` (DESIGN.md §7).
//! Never on the public listener.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::auth::Snapshot;
use crate::config::Config;
use crate::reload::Reloader;
use crate::streams::{StreamKind, Streams};
use crate::tls::CertResolver;

/// What the admin listener serves from: explicit handles, each owned elsewhere.
pub struct Admin {
    pub config: Arc<Config>,
    pub credentials: Arc<ArcSwap<Snapshot>>,
    pub reloader: Arc<Reloader>,
    pub streams: Arc<Streams>,
    pub tls: Option<Arc<CertResolver>>,
    pub registry: prometheus_client::registry::Registry,
    /// The issuer's key set, with `[auth.jwt]`.
    pub jwks: Option<Arc<crate::auth::jwks::Jwks>>,
    /// The backend instances' state.
    pub upstream: Arc<crate::upstream::Instances>,
}

/// `/healthz`: the process answers. `/readyz`: credentials are loaded and at least one backend
/// instance is ready (passing its health checks, or without them accepting TCP connections);
/// 503 with the same JSON detail otherwise.
pub async fn handle(
    admin: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let mut resp = answer(&admin, &req).await;
    crate::headers::secure_response(resp.headers_mut(), &admin.config.headers, false);
    Ok(resp)
}

/// Whether a `Host` may reach the admin endpoints: none (HTTP/1.0), `localhost`, an IP
/// address, or one of `admin_hosts`. A DNS-rebinding page reaches the listener under its own
/// domain name, which is refused, so a browser can never read `/keys` for another site. Fails
/// closed: a Host that does not parse is refused.
fn admin_host(req: &Request<Incoming>, names: &[String]) -> bool {
    let allowed = |host: &str| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok()
            || names.iter().any(|n| n.eq_ignore_ascii_case(host))
    };
    let Some(host) = req.headers().get(header::HOST) else {
        return req.uri().host().is_none_or(allowed);
    };
    host.to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .is_some_and(|a| allowed(a.host()))
}

async fn answer(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if !admin_host(req, &admin.config.server.admin_hosts) {
        return text_response(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain",
            "the admin endpoints answer only Host: localhost, an IP address or one of [server] admin_hosts\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readiness(admin).await,
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
                Ok(()) => text_response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics could not be encoded\n".into(),
                ),
            }
        }
        "/keys" => keys_report(&admin.credentials.load()),
        _ => text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `/keys`: every key's name, fingerprint, state and use; never the key. What a rotation
/// runbook watches: the old key's requests stop growing once every client has moved.
fn keys_report(snapshot: &Snapshot) -> Response<Full<Bytes>> {
    let now = std::time::SystemTime::now();
    let mut keys: Vec<_> = snapshot.keys.keys().collect();
    keys.sort_by(|a, b| a.name.cmp(&b.name).then(a.fingerprint.cmp(&b.fingerprint)));
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let (requests, last_used) = k.stats.snapshot();
            serde_json::json!({
                "name": k.name,
                "fingerprint": k.fingerprint,
                "enabled": k.enabled,
                "usable": k.usable(now),
                "expires": k.expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "requests": requests,
                "last_used": last_used.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "rate_limit": {
                    "requests_per_second": k.requests_per_second,
                    "burst": k.burst,
                },
            })
        })
        .collect();
    let body = serde_json::json!({ "generation": snapshot.generation, "keys": rows });
    text_response(StatusCode::OK, "application/json", format!("{body:#}\n"))
}

async fn readiness(admin: &Admin) -> Response<Full<Bytes>> {
    let cfg = &admin.config;
    let snapshot = admin.credentials.load();
    let keys_loaded = snapshot.keys.enabled_count();
    let users_loaded = snapshot.htpasswd.as_ref().map_or(0, |h| h.len());
    let jwks = admin.jwks.as_ref().map(|j| j.status());
    let tokens_ok = jwks.as_ref().is_some_and(|j| j.loaded && j.keys > 0);
    let credentials_ok = cfg.auth.anonymous || keys_loaded > 0 || users_loaded > 0 || tokens_ok;
    let instances = upstream_readiness(admin).await;
    let upstream_ok = instances.iter().any(|i| i["ready"] == true);
    // With [auth.jwt], the issuer's key set must have loaded once: until then every token
    // is refused (the reason is in "jwks").
    let jwks_ok = jwks.as_ref().is_none_or(|j| j.loaded);
    let ready = credentials_ok && upstream_ok && jwks_ok;
    let body = serde_json::json!({
        "ready": ready,
        "credentials": {
            "ok": credentials_ok,
            "anonymous": cfg.auth.anonymous,
            "generation": snapshot.generation,
            "keys": {
                "file": cfg.auth.keys_file.as_ref().map(|p| p.display().to_string()),
                "loaded": snapshot.keys.len(),
                "enabled": keys_loaded,
                "reload": Reloader::status(&admin.reloader.keys),
            },
            "htpasswd": {
                "file": cfg.auth.htpasswd_file.as_ref().map(|p| p.display().to_string()),
                "users": users_loaded,
                "reload": Reloader::status(&admin.reloader.htpasswd),
            },
            "jwks": jwks.map(|j| {
                let mut v = serde_json::to_value(j).unwrap_or_default();
                // For a jwks_file: its reload status, as for the keys file.
                if let Some(status) = Reloader::status(&admin.reloader.jwks) {
                    v["reload"] = serde_json::to_value(status).unwrap_or_default();
                }
                v
            }),
        },
        "streams": {
            "websocket": admin.streams.active(StreamKind::WebSocket),
            "sse": admin.streams.active(StreamKind::Sse),
            "stream": admin.streams.active(StreamKind::Stream),
            "revoked_total": admin.streams.revoked_total(),
        },
        "upstream": {
            "url": cfg.upstream.describe(),
            "reachable": upstream_ok,
            "balance": cfg.upstream.balance,
            "health_checks": cfg.upstream.health.is_some(),
            "instances": instances,
        },
        "tls": admin.tls.as_ref().map(|t| {
            let cert = t.current();
            let not_after = humantime::format_rfc3339_seconds(cert.not_after).to_string();
            let left = cert
                .not_after
                .duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs());
            serde_json::json!({
                "subject": cert.subject,
                "not_after": not_after,
                "expires_in_seconds": left,
                "reloads_ok": t.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
                "reloads_failed": t.reloads_failed.load(std::sync::atomic::Ordering::Relaxed),
            })
        }),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text_response(status, "application/json", format!("{body}\n"))
}

/// Each backend instance's state, and whether requests may go there (`ready`): with health
/// checks, what they concluded; without, whether it accepts a TCP connection now (each probed
/// at the same time, for at most a second).
async fn upstream_readiness(admin: &Admin) -> Vec<serde_json::Value> {
    let cfg = &admin.config.upstream;
    let status = admin.upstream.status();
    let limit = Duration::from_secs(1).min(cfg.connect_timeout);
    // With health checks their verdict is the answer: nothing is probed.
    let probes: Vec<_> = cfg
        .targets
        .iter()
        .filter(|_| cfg.health.is_none())
        .map(|t| {
            let default_port = if t.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            };
            let port = t.authority.port_u16().unwrap_or(default_port);
            let host = t.authority.host().trim_matches(['[', ']']).to_string();
            tokio::spawn(async move {
                let connect = TcpStream::connect((host.as_str(), port));
                matches!(tokio::time::timeout(limit, connect).await, Ok(Ok(_)))
            })
        })
        .collect();
    let mut reachable = Vec::with_capacity(status.len());
    for p in probes {
        reachable.push(Some(p.await.unwrap_or(false)));
    }
    reachable.resize(status.len(), None);
    status
        .into_iter()
        .zip(reachable)
        .map(|(st, reachable)| {
            let ready = st.healthy && reachable.unwrap_or(true);
            let mut v = serde_json::to_value(&st).unwrap_or_default();
            v["ready"] = ready.into();
            if let Some(r) = reachable {
                v["reachable"] = r.into();
            }
            v
        })
        .collect()
}

/// A plain response from portcullis itself (admin endpoints, the redirect, the demo).
pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
