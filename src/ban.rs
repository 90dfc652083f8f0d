//! Brute-force bans (`[ban]`, DESIGN.md §4): after `failures` failed authentications from one
//! client within `window`, the client gets 429 `banned` for `duration`, before any credential
//! is looked at or any hash computed.
//!
//! Clients are keyed by IPv4 address, or by IPv6 /64 (one host usually owns a whole /64).
//! Memory is bounded: at most [`MAX_TRACKED`] clients are tracked; when the table is full,
//! clients that are not banned make room, oldest first. Active bans are never evicted.
//! The table ([`LocalBans`]) is pure: the caller passes the time and runs
//! [`Bans::housekeep`] periodically. With Redis (`[rate_limit] backend = "redis"`), [`Bans`]
//! also keeps the counters and bans there, so a client banned by one replica is banned by all;
//! while Redis cannot be reached, the local table still bans (fails closed to this replica's
//! own view, never open).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::redis::RedisLink;

/// Clients tracked at most (failure counters and bans together).
pub const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanConfig {
    pub enabled: bool,
    pub failures: u32,
    pub window: Duration,
    pub duration: Duration,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            enabled: true,
            failures: 10,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(15 * 60),
        }
    }
}

/// The part of an address a ban applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }

    /// How Redis keys name the client: the address itself (IPv6 by its /64).
    pub fn redis_id(&self) -> String {
        match self {
            ClientKey::V4(a) => format!("ip:{}", std::net::Ipv4Addr::from(*a)),
            ClientKey::V6Prefix(p) => format!("ip6:{p:016x}"),
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// Times of recent failures, oldest first, at most `failures` of them.
    failures: VecDeque<Instant>,
    banned_until: Option<Instant>,
    last_seen: Option<Instant>,
}

/// This replica's own table of failure counters and bans.
#[derive(Debug)]
pub struct LocalBans {
    config: BanConfig,
    table: Mutex<HashMap<ClientKey, Entry>>,
    /// Active bans, so that the common case (none) takes no lock.
    active: AtomicUsize,
}

/// What [`LocalBans::record_failure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// This failure started a ban for that long.
    BanStarted(Duration),
    Disabled,
}

impl LocalBans {
    pub fn new(config: BanConfig) -> LocalBans {
        LocalBans {
            config,
            table: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> &BanConfig {
        &self.config
    }

    /// How much longer `ip` is banned, if it is.
    pub fn banned_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if !self.config.enabled || self.active.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&ClientKey::of(ip))
            .and_then(|e| e.banned_until)
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Count a failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Recorded {
        if !self.config.enabled {
            return Recorded::Disabled;
        }
        let key = ClientKey::of(ip);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !table.contains_key(&key) && table.len() >= MAX_TRACKED {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(key).or_default();
        entry.last_seen = Some(now);
        if entry.banned_until.is_some_and(|u| u > now) {
            return Recorded::Counted;
        }
        if entry.banned_until.take().is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        while entry
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.config.window)
        {
            entry.failures.pop_front();
        }
        entry.failures.push_back(now);
        if entry.failures.len() >= self.config.failures as usize {
            entry.failures.clear();
            entry.banned_until = Some(now + self.config.duration);
            self.active.fetch_add(1, Ordering::Relaxed);
            return Recorded::BanStarted(self.config.duration);
        }
        Recorded::Counted
    }

    /// Ban `ip` until `now + left` (a ban another replica started, learned through Redis).
    pub fn mirror(&self, ip: IpAddr, now: Instant, left: Duration) {
        if !self.config.enabled {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_TRACKED {
            self.make_room(&mut table, now);
        }
        let entry = table.entry(ClientKey::of(ip)).or_default();
        entry.last_seen = Some(now);
        if entry.banned_until.is_none() {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        entry.banned_until = Some(now + left);
    }

    /// Forget expired bans and stale counters. Returns how many bans ended.
    pub fn housekeep(&self, now: Instant) -> usize {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = 0;
        let window = self.config.window;
        table.retain(|_, e| {
            if let Some(until) = e.banned_until {
                if until > now {
                    return true;
                }
                ended += 1;
                e.banned_until = None;
            }
            e.failures.retain(|t| now.duration_since(*t) < window);
            !e.failures.is_empty()
        });
        self.active.fetch_sub(ended, Ordering::Relaxed);
        ended
    }

    /// Clients banned right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Clients tracked (banned or counting).
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn make_room(&self, table: &mut HashMap<ClientKey, Entry>, now: Instant) {
        drop_stale(table, now, self.config.window);
        if table.len() < MAX_TRACKED {
            return;
        }
        // Still full of live counters: drop the least recently seen tenth that is not banned.
        let mut unbanned: Vec<(Instant, ClientKey)> = table
            .iter()
            .filter(|(_, e)| e.banned_until.is_none_or(|u| u <= now))
            .map(|(k, e)| (e.last_seen.unwrap_or(now), *k))
            .collect();
        unbanned.sort_unstable_by_key(|(t, _)| *t);
        for (_, k) in unbanned.iter().take(MAX_TRACKED / 10 + 1) {
            table.remove(k);
        }
    }
}

fn drop_stale(table: &mut HashMap<ClientKey, Entry>, now: Instant, window: Duration) {
    table.retain(|_, e| {
        e.banned_until.is_some_and(|u| u > now)
            || e.failures
                .back()
                .is_some_and(|t| now.duration_since(*t) < window)
    });
}

/// Failure counters and bans kept in Redis, shared by every replica.
struct SharedBans {
    link: Arc<RedisLink>,
    config: BanConfig,
    record: redis::Script,
    check: redis::Script,
}

/// KEYS[1]: the ban key. Returns the ban's remaining milliseconds, or 0.
const BAN_CHECK_LUA: &str = r#"
local left = redis.call('PTTL', KEYS[1])
if left > 0 then return left end
return 0
"#;

/// KEYS[1]: the client's key prefix. ARGV: failures, window ms, duration ms. Returns the ban's
/// duration in ms when this failure started one, else 0.
const BAN_RECORD_LUA: &str = r#"
local fails = KEYS[1] .. ':fail'
local ban = KEYS[1] .. ':ban'
if redis.call('PTTL', ban) > 0 then return 0 end
local n = redis.call('INCR', fails)
if n == 1 then redis.call('PEXPIRE', fails, ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('DEL', fails)
  redis.call('SET', ban, '1', 'PX', ARGV[3])
  return tonumber(ARGV[3])
end
return 0
"#;

impl SharedBans {
    fn new(link: Arc<RedisLink>, config: BanConfig) -> SharedBans {
        SharedBans {
            link,
            config,
            record: redis::Script::new(BAN_RECORD_LUA),
            check: redis::Script::new(BAN_CHECK_LUA),
        }
    }

    fn prefix(ip: IpAddr) -> String {
        format!("portcullis:ban:{}", ClientKey::of(ip).redis_id())
    }

    /// How much longer `ip` is banned by any replica (`None` also when Redis cannot say).
    async fn banned_for(&self, ip: IpAddr) -> Option<Duration> {
        let key = format!("{}:ban", SharedBans::prefix(ip));
        match self.link.invoke::<i64>(&self.check, &key, &[]).await {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        }
    }

    /// Count a failure everywhere; `Some(duration)` when it started a ban.
    async fn record_failure(&self, ip: IpAddr) -> Option<Duration> {
        let args = [
            self.config.failures.to_string(),
            self.config.window.as_millis().to_string(),
            self.config.duration.as_millis().to_string(),
        ];
        match self
            .link
            .invoke::<i64>(&self.record, &SharedBans::prefix(ip), &args)
            .await
        {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        }
    }
}

/// Bans as the request path sees them: this replica's table, and Redis's when shared.
pub struct Bans {
    local: LocalBans,
    shared: Option<SharedBans>,
}

impl Bans {
    /// `link`: the shared Redis, when `[rate_limit] backend = "redis"` (ignored when bans are
    /// disabled).
    pub fn new(config: BanConfig, link: Option<Arc<RedisLink>>) -> Bans {
        Bans {
            local: LocalBans::new(config),
            shared: link
                .filter(|_| config.enabled)
                .map(|l| SharedBans::new(l, config)),
        }
    }

    pub fn config(&self) -> &BanConfig {
        self.local.config()
    }

    /// How much longer `ip` is banned, here or (when shared) by any replica.
    pub async fn banned_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if let Some(left) = self.local.banned_for(ip, now) {
            return Some(left);
        }
        let left = self.shared.as_ref()?.banned_for(ip).await?;
        // Banned by another replica: remember it here too.
        self.local.mirror(ip, now, left);
        Some(left)
    }

    /// Count a failed authentication from `ip`; logs `ban_start` when this one starts a ban.
    pub async fn record_failure(&self, ip: IpAddr, now: Instant) {
        let local = self.local.record_failure(ip, now);
        let shared = match &self.shared {
            Some(shared) => shared.record_failure(ip).await,
            None => None,
        };
        let started = match (local, shared) {
            (_, Some(d)) => {
                self.local.mirror(ip, now, d);
                Some(d)
            }
            (Recorded::BanStarted(d), None) => Some(d),
            (Recorded::Counted | Recorded::Disabled, None) => None,
        };
        if let Some(d) = started {
            tracing::warn!(event = "ban_start", client = %ip, duration = ?d, failures = self.config().failures, shared = self.shared.is_some(), "client banned after repeated authentication failures");
        }
    }

    /// Clients banned right now on this replica.
    pub fn active(&self) -> usize {
        self.local.active()
    }

    /// Drop expired bans and stale failure counters; returns how many bans ended.
    pub fn housekeep(&self, now: Instant) -> usize {
        self.local.housekeep(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bans(failures: u32) -> LocalBans {
        LocalBans::new(BanConfig {
            failures,
            ..BanConfig::default()
        })
    }

    #[test]
    fn the_nth_failure_within_the_window_starts_a_ban_that_expires() {
        let b = bans(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(b.record_failure(ip, t0), Recorded::Counted);
        assert_eq!(b.record_failure(ip, t0), Recorded::Counted);
        assert!(b.banned_for(ip, t0).is_none());
        assert_eq!(
            b.record_failure(ip, t0),
            Recorded::BanStarted(Duration::from_secs(900))
        );
        assert_eq!(
            b.banned_for(ip, t0 + Duration::from_secs(60)),
            Some(Duration::from_secs(840))
        );
        assert_eq!(b.active(), 1);
        let later = t0 + Duration::from_secs(901);
        assert!(b.banned_for(ip, later).is_none());
        assert_eq!(b.housekeep(later), 1);
        assert_eq!(b.active(), 0);
        assert_eq!(b.tracked(), 0);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let b = bans(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        b.record_failure(ip, t0);
        b.record_failure(ip, t0 + Duration::from_secs(30));
        assert_eq!(
            b.record_failure(ip, t0 + Duration::from_secs(61)),
            Recorded::Counted
        );
        assert!(b.banned_for(ip, t0 + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn an_ipv6_client_is_banned_by_its_slash_64() {
        let b = bans(2);
        let t0 = Instant::now();
        b.record_failure("2001:db8:1:2::1".parse().unwrap(), t0);
        b.record_failure("2001:db8:1:2::ffff".parse().unwrap(), t0);
        assert!(b
            .banned_for("2001:db8:1:2:abcd::9".parse().unwrap(), t0)
            .is_some());
        assert!(b
            .banned_for("2001:db8:1:3::1".parse().unwrap(), t0)
            .is_none());
        // An IPv4-mapped address is the IPv4 client.
        b.record_failure("::ffff:192.0.2.7".parse().unwrap(), t0);
        b.record_failure("192.0.2.7".parse().unwrap(), t0);
        assert!(b.banned_for("192.0.2.7".parse().unwrap(), t0).is_some());
    }

    #[test]
    fn a_full_table_makes_room_without_lifting_bans() {
        let b = bans(2);
        let t0 = Instant::now();
        let banned: IpAddr = "10.255.255.255".parse().unwrap();
        b.record_failure(banned, t0);
        b.record_failure(banned, t0);
        for i in 0..(MAX_TRACKED as u32 + 10) {
            b.record_failure(IpAddr::V4(i.into()), t0 + Duration::from_millis(1));
        }
        assert!(b.tracked() <= MAX_TRACKED);
        assert!(b.banned_for(banned, t0).is_some());
    }

    #[test]
    fn disabled_bans_count_nothing() {
        let b = LocalBans::new(BanConfig {
            enabled: false,
            failures: 1,
            ..BanConfig::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(b.record_failure(ip, Instant::now()), Recorded::Disabled);
        assert!(b.banned_for(ip, Instant::now()).is_none());
    }
}
