//! Header rewriting on the way to the backend and back (DESIGN.md §5).
//!
//! Pure functions over header maps. What a client could use to impersonate someone
//! (the identity header, `X-Forwarded-*`, `Forwarded`, `X-Real-IP`) is deleted before the
//! proxy's own values are set.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Response headers added to every response, the backend's and the proxy's own.
#[derive(Debug, Clone, Default)]
pub struct HeadersConfig {
    /// Sent only on responses over TLS.
    pub hsts: Option<http::HeaderValue>,
    /// Sent on every response, in this order.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Removed from every backend response.
    pub remove: NameSet,
    /// Replace a header the backend already set (default: keep the backend's).
    pub override_backend: bool,
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// RFC 9110 §7.6.1's hop-by-hop headers, with the legacy `Keep-Alive` and `Proxy-Connection`.
static HOP_BY_HOP: std::sync::LazyLock<NameSet> = std::sync::LazyLock::new(|| {
    NameSet::from_iter([
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ])
});

/// A set of header names to remove from maps, built once: a name present in a map is looked up
/// by its length first (few names of a list share one), so each header costs about one
/// comparison however long the list.
#[derive(Debug, Clone, Default)]
pub struct NameSet {
    /// Indexed by a name's length: the names of that length.
    by_len: Vec<Vec<HeaderName>>,
}

impl NameSet {
    /// Whether `name` is in the set.
    pub fn contains(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        self.by_len
            .get(name.len())
            .is_some_and(|same| same.iter().any(|n| n.as_str() == name))
    }
}

impl FromIterator<HeaderName> for NameSet {
    fn from_iter<I: IntoIterator<Item = HeaderName>>(names: I) -> NameSet {
        let mut set = NameSet::default();
        for name in names {
            let len = name.as_str().len();
            if set.by_len.len() <= len {
                set.by_len.resize_with(len + 1, Vec::new);
            }
            if !set.by_len[len].contains(&name) {
                set.by_len[len].push(name);
            }
        }
        set
    }
}

/// A header sent more than once where one value is expected (which copy would the next hop
/// read?).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

/// The one value of `name`, if any. Fails closed: two copies are `Err(Repeated)`, never the
/// first of them.
pub fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a HeaderValue>, Repeated> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (v, None) => Ok(v),
        (_, Some(_)) => Err(Repeated),
    }
}

/// Remove every header of `names` that the map holds: a pass over the names present (a request
/// carries a handful) for each one found, and nothing allocated.
pub fn remove_all(headers: &mut HeaderMap, names: &NameSet) {
    while let Some(name) = headers.keys().find(|n| names.contains(n)).cloned() {
        headers.remove(name);
    }
}

/// Remove hop-by-hop headers: [`HOP_BY_HOP`] and every name the `Connection` header lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // The values are copied (cheap: shared bytes) so the names they list can be removed;
        // a name that is not a valid header name is not present.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&rest) {
            for name in value.to_str().unwrap_or("").split(',') {
                let name = name.trim();
                if !name.is_empty() {
                    headers.remove(name);
                }
            }
        }
    }
    remove_all(headers, &HOP_BY_HOP);
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

/// Headers a backend may believe about where a request came from, how it arrived, or what it
/// really asks for, beyond the ones portcullis sets: proxies and frameworks read them
/// (`X-Forwarded-Port/-Prefix/-Server/-Scheme/-Ssl/-User`, `True-Client-IP`, `X-Client-IP`),
/// rewrite the path by them (`X-Original-URL`, `X-Rewrite-URL`), or take them as the method
/// (`X-HTTP-Method-Override` and kin: an allowed `POST` would become a `DELETE` the allow rules
/// never saw). A client never sets them.
static SPOOFABLE_MORE: [HeaderName; 13] = [
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-user"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Every header a client could send to pose as someone or somewhere else: removed from
/// requests (with [`remove_all`]) before the proxy sets its own.
pub fn spoofable(identity_header: &HeaderName) -> Vec<HeaderName> {
    let mut names = vec![
        identity_header.clone(),
        X_FORWARDED_FOR.clone(),
        X_FORWARDED_PROTO.clone(),
        X_FORWARDED_HOST.clone(),
        X_REAL_IP.clone(),
        FORWARDED.clone(),
    ];
    names.extend(SPOOFABLE_MORE.iter().cloned());
    names
}

/// Remove every header whose name has an underscore. CGI, WSGI, PHP and many frameworks file
/// `X_Authenticated_User` under the same `HTTP_X_AUTHENTICATED_USER` key as
/// `X-Authenticated-User`, so such a spelling could pose as any header portcullis protects;
/// nginx ignores these names by default (`underscores_in_headers off`) for the same reason.
/// Fails closed: every underscored name goes, whatever it is.
pub fn remove_underscored(headers: &mut HeaderMap) {
    if !headers.keys().any(|n| n.as_str().contains('_')) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// HTTP/2 may split `Cookie` into one field per cookie; an HTTP/1.1 backend must get them as
/// one line, joined with "; " (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// What the proxy tells the backend about the request.
pub struct Forwarded<'a> {
    /// The client (`X-Real-IP`).
    pub client_ip: IpAddr,
    /// The socket peer, appended to `X-Forwarded-For`.
    pub peer: IpAddr,
    /// The peer as a header value, made once per connection.
    pub peer_value: &'a HeaderValue,
    /// The chain a trusted proxy sent, kept in front of the peer.
    pub chain: Option<&'a str>,
    pub proto: &'static str,
    /// The Host the client asked for, if any.
    pub client_host: Option<&'a HeaderValue>,
}

/// An IP address as a header value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP is a header value")
}

pub fn set_forwarded(headers: &mut HeaderMap, f: &Forwarded<'_>) {
    let (xff, ip) = match f.chain {
        Some(chain) => (
            HeaderValue::from_str(&format!("{chain}, {}", f.peer))
                .unwrap_or_else(|_| f.peer_value.clone()),
            ip_value(f.client_ip),
        ),
        // The common case: no proxy in front, the client is the peer.
        None if f.peer == f.client_ip => (f.peer_value.clone(), f.peer_value.clone()),
        None => (f.peer_value.clone(), ip_value(f.client_ip)),
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
pub fn secure_response(headers: &mut HeaderMap, cfg: &HeadersConfig, tls: bool) {
    remove_all(headers, &cfg.remove);
    let hsts = tls
        .then_some(cfg.hsts.as_ref())
        .flatten()
        .map(|v| (&header::STRICT_TRANSPORT_SECURITY, v));
    for (name, value) in cfg.add.iter().map(|(n, v)| (n, v)).chain(hsts) {
        match headers.entry(name) {
            header::Entry::Occupied(mut e) if cfg.override_backend => {
                e.insert(value.clone());
            }
            header::Entry::Occupied(_) => {}
            header::Entry::Vacant(e) => {
                e.insert(value.clone());
            }
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
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&a.to_be_bytes());
        raw[8..].copy_from_slice(&b.to_be_bytes());
        let mut hex = [0u8; 32];
        crate::auth::api_key::hex_into(&raw, &mut hex);
        HeaderValue::from_bytes(&hex).expect("hex is a header value")
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
        remove_all(&mut h, &spoofable(&ident).into_iter().collect());
        let host = HeaderValue::from_static("example.test");
        set_forwarded(
            &mut h,
            &Forwarded {
                client_ip: "127.0.0.9".parse().unwrap(),
                peer: "127.0.0.9".parse().unwrap(),
                peer_value: &HeaderValue::from_static("127.0.0.9"),
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
                peer_value: &HeaderValue::from_static("10.0.0.2"),
                chain: Some("203.0.113.5"),
                proto: "https",
                client_host: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.5, 10.0.0.2");
        assert_eq!(h["x-real-ip"], "203.0.113.5");
    }

    fn headers_config(override_backend: bool) -> HeadersConfig {
        HeadersConfig {
            hsts: Some(HeaderValue::from_static("max-age=60")),
            add: vec![(
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            )],
            remove: NameSet::from_iter([header::SERVER]),
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
        // Both halves of the id, in lowercase hex, as `{a:016x}{b:016x}` would write them.
        let n = ids.counter.load(Ordering::Relaxed);
        let c = ids.next();
        let x = splitmix64(ids.seed ^ n);
        let y = splitmix64(x ^ n.rotate_left(32));
        assert_eq!(c.to_str().unwrap(), format!("{x:016x}{y:016x}"));
        assert!(!acceptable_request_id(&HeaderValue::from_static("a b")));
    }
}
