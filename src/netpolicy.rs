//! Who may connect, and who the client is: `allow_cidrs`, `trusted_proxies` with
//! `X-Forwarded-For`, and `max_connections_per_ip`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http::HeaderMap;
use ipnet::IpNet;

use crate::ban::ClientKey;
use crate::headers::X_FORWARDED_FOR;

#[derive(Debug, Clone, Default)]
pub struct NetPolicy {
    /// Empty: any network.
    pub allow: Vec<IpNet>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted: Vec<IpNet>,
}

/// An IPv4 client that reached an IPv6 socket is shown and matched as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl NetPolicy {
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client a request is for: the socket peer, unless the peer is a trusted proxy; then
    /// `X-Forwarded-For` is walked from the right past trusted hops, and the first address that
    /// is not a trusted proxy is the client. Entries may carry a port (`192.0.2.7:51234`,
    /// `[2001:db8::7]:443`, as some load balancers write them). A malformed entry stops the
    /// walk at the last address known good, so a forged header can never name an arbitrary
    /// client; when that address is a trusted proxy's, callers must not key a ban or an
    /// address limit on it ([`NetPolicy::is_trusted`]).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let hops: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                return client;
            };
            client = canonical(ip);
            if !self.is_trusted(client) {
                return client;
            }
        }
        client
    }

    /// The `X-Forwarded-For` chain a trusted peer sent, to be kept and extended.
    pub fn incoming_chain(&self, peer: IpAddr, headers: &HeaderMap) -> Option<String> {
        if !self.is_trusted(peer) {
            return None;
        }
        let parts: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// One `X-Forwarded-For` entry: an address, with or without a port, possibly quoted.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Open connections per client (an IPv4 address, or an IPv6 /64 as bans and limits count it:
/// one host rotating addresses inside its /64 is one client), with a limit.
#[derive(Debug)]
pub struct PerIp {
    limit: u32,
    open: Mutex<HashMap<ClientKey, u32>>,
}

/// One connection's place in its address's count; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<PerIp>,
    client: ClientKey,
}

impl PerIp {
    pub fn new(limit: u32) -> Arc<PerIp> {
        Arc::new(PerIp {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it already has `limit`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let client = ClientKey::of(canonical(ip));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(client).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: self.clone(),
            client,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], trusted: &[&str]) -> NetPolicy {
        NetPolicy {
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
            trusted: trusted.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, v.parse().unwrap());
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_cidrs_match_v4_v6_and_mapped_addresses() {
        let p = policy(&["10.0.0.0/8", "fd00::/8"], &[]);
        assert!(p.allows(ip("10.1.2.3")));
        assert!(p.allows(ip("::ffff:10.1.2.3")));
        assert!(p.allows(ip("fd12::1")));
        assert!(!p.allows(ip("192.168.1.1")));
        assert!(policy(&[], &[]).allows(ip("203.0.113.9")));
    }

    #[test]
    fn x_forwarded_for_is_believed_only_from_trusted_peers_and_walked_from_the_right() {
        let p = policy(&[], &["10.0.0.0/8"]);
        let h = xff("198.51.100.7, 203.0.113.5, 10.0.0.9");
        // An untrusted peer's header changes nothing.
        assert_eq!(p.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        // From a trusted peer: the rightmost address that is not a trusted proxy.
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("203.0.113.5"));
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            p.client_ip(ip("10.0.0.2"), &xff("junk, 10.0.0.9")),
            ip("10.0.0.9")
        );
        assert_eq!(
            p.client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
        assert_eq!(p.incoming_chain(ip("192.0.2.1"), &h), None);
        assert_eq!(
            p.incoming_chain(ip("10.0.0.2"), &h).as_deref(),
            Some("198.51.100.7, 203.0.113.5, 10.0.0.9")
        );
    }

    #[test]
    fn per_ip_slots_are_released_on_drop() {
        let per_ip = PerIp::new(2);
        let a = per_ip.take(ip("127.0.0.2")).unwrap();
        let _b = per_ip.take(ip("127.0.0.2")).unwrap();
        assert!(per_ip.take(ip("127.0.0.2")).is_none());
        assert!(per_ip.take(ip("127.0.0.3")).is_some());
        drop(a);
        assert!(per_ip.take(ip("127.0.0.2")).is_some());
    }

    #[test]
    fn forwarded_entries_with_a_port_are_read_and_never_stop_at_the_trusted_proxy() {
        let p = policy(&[], &["127.0.0.1/32"]);
        let peer = ip("127.0.0.1");
        assert_eq!(p.client_ip(peer, &xff("192.0.2.7:51234")), ip("192.0.2.7"));
        assert_eq!(
            p.client_ip(peer, &xff("[2001:db8::7]:443")),
            ip("2001:db8::7")
        );
        assert_eq!(
            p.client_ip(peer, &xff("\"[2001:db8::8]\"")),
            ip("2001:db8::8")
        );
        assert_eq!(
            p.client_ip(peer, &xff("198.51.100.1, 192.0.2.9:80")),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn connections_are_counted_per_ipv6_slash_64_as_bans_and_limits_count_them() {
        let per_ip = PerIp::new(1);
        let first = per_ip
            .take(ip("2001:db8:1:2::1"))
            .expect("the first connection");
        assert!(
            per_ip.take(ip("2001:db8:1:2::99")).is_none(),
            "another address in the same /64 is the same client"
        );
        assert!(
            per_ip.take(ip("2001:db8:1:3::1")).is_some(),
            "another /64 is not"
        );
        drop(first);
        assert!(per_ip.take(ip("2001:db8:1:2::99")).is_some());
    }
}
