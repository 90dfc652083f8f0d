//! Header rewriting on the way to the backend and back (DESIGN.md §5).
//!
//! Pure functions over header maps. What a client could use to impersonate someone
//! (the identity header, `X-Forwarded-*`, `Forwarded`, `X-Real-IP`) is deleted before the
//! proxy's own values are set.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{header, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Remove hop-by-hop headers: RFC 9110 §7.6.1's list, the legacy `Keep-Alive` and
/// `Proxy-Connection`, and every name the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
}

/// Whether the request's `TE` lists `trailers` (RFC 9110 §10.1.4).
pub fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
}

/// Remove every header a client could send to pose as someone or somewhere else.
pub fn strip_spoofable(headers: &mut HeaderMap, identity_header: &HeaderName) {
    for name in [
        identity_header,
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &X_REAL_IP,
        &FORWARDED,
    ] {
        headers.remove(name);
    }
}

/// What the proxy tells the backend about the request.
pub struct Forwarded<'a> {
    /// The client (`X-Real-IP`).
    pub client_ip: IpAddr,
    /// The socket peer, appended to `X-Forwarded-For`.
    pub peer: IpAddr,
    /// The chain a trusted proxy sent, kept in front of the peer.
    pub chain: Option<&'a str>,
    pub proto: &'static str,
    /// The Host the client asked for, if any.
    pub client_host: Option<&'a HeaderValue>,
}

pub fn set_forwarded(headers: &mut HeaderMap, f: &Forwarded<'_>) {
    let value =
        |ip: IpAddr| HeaderValue::from_str(&ip.to_string()).expect("an IP is a header value");
    let ip = value(f.client_ip);
    let xff = match f.chain {
        Some(chain) => {
            HeaderValue::from_str(&format!("{chain}, {}", f.peer)).unwrap_or_else(|_| value(f.peer))
        }
        // The common case: no proxy in front, the client is the peer.
        None if f.peer == f.client_ip => ip.clone(),
        None => value(f.peer),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_REAL_IP.clone(), ip);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(f.proto));
    if let Some(host) = f.client_host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
}

/// Apply `[headers]` to a response: drop what `remove` names (the backend's `Server`,
/// `X-Powered-By`), add the security headers, HSTS only over TLS (RFC 6797 §7.2: never over
/// plain HTTP). A header the backend set is kept unless `override` is on.
pub fn secure_response(headers: &mut HeaderMap, cfg: &crate::config::HeadersConfig, tls: bool) {
    for name in &cfg.remove {
        headers.remove(name);
    }
    let hsts = tls
        .then_some(cfg.hsts.as_ref())
        .flatten()
        .map(|v| (&header::STRICT_TRANSPORT_SECURITY, v));
    for (name, value) in cfg.add.iter().map(|(n, v)| (n, v)).chain(hsts) {
        if cfg.override_backend || !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A client's `X-Request-Id` is kept when it is short and plain; anything else is replaced.
pub fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Unique request ids (32 hex digits, like nginx's `$request_id`): a random per-process seed
/// mixed with a counter. Unique, not secret; no system call per request.
pub struct RequestIds {
    seed: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        let mut seed = [0u8; 8];
        // A fixed seed only risks ids repeating across restarts, never a failed request.
        let _ = getrandom::fill(&mut seed);
        RequestIds {
            seed: u64::from_le_bytes(seed),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = splitmix64(self.seed ^ n);
        let b = splitmix64(a ^ n.rotate_left(32));
        let s = format!("{a:016x}{b:016x}");
        HeaderValue::from_str(&s).expect("hex is a header value")
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds::new()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn spoofed_identity_and_forwarding_headers_are_replaced() {
        let ident = HeaderName::from_static("x-authenticated-user");
        let mut h = HeaderMap::new();
        h.insert(ident.clone(), HeaderValue::from_static("admin"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        strip_spoofable(&mut h, &ident);
        let host = HeaderValue::from_static("example.test");
        set_forwarded(
            &mut h,
            &Forwarded {
                client_ip: "127.0.0.9".parse().unwrap(),
                peer: "127.0.0.9".parse().unwrap(),
                chain: None,
                proto: "http",
                client_host: Some(&host),
            },
        );
        assert!(!h.contains_key(&ident));
        assert!(!h.contains_key("forwarded"));
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert_eq!(h["x-real-ip"], "127.0.0.9");
        assert_eq!(h["x-forwarded-host"], "example.test");
        assert_eq!(h["x-forwarded-proto"], "http");

        // Behind a trusted proxy: its chain is kept and the peer appended; X-Real-IP is the
        // client it named.
        set_forwarded(
            &mut h,
            &Forwarded {
                client_ip: "203.0.113.5".parse().unwrap(),
                peer: "10.0.0.2".parse().unwrap(),
                chain: Some("203.0.113.5"),
                proto: "https",
                client_host: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.5, 10.0.0.2");
        assert_eq!(h["x-real-ip"], "203.0.113.5");
    }

    fn headers_config(override_backend: bool) -> crate::config::HeadersConfig {
        crate::config::HeadersConfig {
            hsts: Some(HeaderValue::from_static("max-age=60")),
            add: vec![(
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            )],
            remove: vec![header::SERVER],
            override_backend,
        }
    }

    #[test]
    fn security_headers_are_added_and_hsts_only_over_tls() {
        let mut h = HeaderMap::new();
        h.insert("server", HeaderValue::from_static("backend/1.0"));
        secure_response(&mut h, &headers_config(false), false);
        assert!(!h.contains_key("server"));
        assert_eq!(h["x-frame-options"], "DENY");
        assert!(!h.contains_key("strict-transport-security"));
        secure_response(&mut h, &headers_config(false), true);
        assert_eq!(h["strict-transport-security"], "max-age=60");
    }

    #[test]
    fn the_backends_header_is_kept_unless_override() {
        let mut h = HeaderMap::new();
        h.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
        secure_response(&mut h, &headers_config(false), false);
        assert_eq!(
            h.get_all("x-frame-options").iter().collect::<Vec<_>>(),
            ["SAMEORIGIN"]
        );
        secure_response(&mut h, &headers_config(true), false);
        assert_eq!(
            h.get_all("x-frame-options").iter().collect::<Vec<_>>(),
            ["DENY"]
        );
    }

    #[test]
    fn request_ids_are_unique_and_plain() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(acceptable_request_id(&a));
        assert!(!acceptable_request_id(&HeaderValue::from_static("a b")));
    }
}
