//! Per-client rate limits (DESIGN.md §2, §4): GCRA per client, keyed by identity when the
//! request authenticated (one key's budget holds across all its source addresses) and by
//! client address otherwise (IPv6 by /64). In memory with governor, or shared by every
//! replica through Redis, one Lua script call (one round trip) per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use http::{HeaderName, HeaderValue};

use crate::auth::CredId;
use crate::ban::ClientKey;
use crate::redis::RedisLink;
pub use crate::redis::{RedisConfig, RedisFailure};

/// Requests per second and burst: one GCRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub per_second: u32,
    pub burst: u32,
}

impl Quota {
    fn governor(self) -> governor::Quota {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("at least 1");
        governor::Quota::per_second(nz(self.per_second)).allow_burst(nz(self.burst))
    }

    /// Seconds for an empty bucket to fill again: the policy's window.
    fn window_secs(self) -> u64 {
        u64::from(self.burst).div_ceil(u64::from(self.per_second.max(1)))
    }
}

/// Who a request is limited as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Credential(CredId),
    Address(ClientKey),
    /// One identity's use of one MCP tool (`[[mcp.tool_limits]]`): `"owner tool index"`.
    Tool(Arc<str>),
}

impl Subject {
    pub fn of(cred: Option<&CredId>, ip: IpAddr) -> Subject {
        match cred {
            Some(c) if *c != CredId::Anonymous => Subject::Credential(c.clone()),
            _ => Subject::Address(ClientKey::of(ip)),
        }
    }

    /// A Redis key part that names the subject without revealing a secret: a key by its
    /// fingerprint, a user or certificate by name, an address by itself (IPv6 by /64).
    fn redis_id(&self) -> String {
        match self {
            Subject::Credential(CredId::Key(d)) => {
                format!("k:{}", crate::auth::api_key::hex(&d[..6]))
            }
            Subject::Credential(CredId::User(u)) => format!("u:{u}"),
            Subject::Credential(CredId::ClientCert(c)) => format!("c:{c}"),
            Subject::Credential(CredId::Token(t)) => format!("t:{t}"),
            Subject::Credential(CredId::Anonymous) => "anon".into(),
            Subject::Address(client) => client.redis_id(),
            Subject::Tool(t) => format!("m:{t}"),
        }
    }
}

/// The verdict, with what the `RateLimit` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub quota: Quota,
    /// Requests that may still be made at once.
    pub remaining: u32,
    /// Whole seconds to wait before retrying (limited requests only; at least 1).
    pub retry_after: u64,
    /// Whole seconds until the bucket is full again.
    pub reset: u64,
}

impl Decision {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    pub fn headers(&self) -> [(&'static HeaderName, HeaderValue); 2] {
        // Written without the formatting machinery: this runs on every checked response.
        // Composed on the stack ("default" and two `;k=` with a u64 each: at most 55 bytes),
        // then copied once into the value.
        fn value(parts: [(&str, u64); 2]) -> HeaderValue {
            let mut v = [0u8; 64];
            let mut len = 0;
            let mut put = |piece: &[u8]| {
                v[len..len + piece.len()].copy_from_slice(piece);
                len += piece.len();
            };
            put(b"\"default\"");
            let mut num = itoa::Buffer::new();
            for (name, n) in parts {
                put(name.as_bytes());
                put(num.format(n).as_bytes());
            }
            HeaderValue::from_bytes(&v[..len]).expect("ASCII")
        }
        [
            (
                &RATELIMIT_POLICY,
                value([
                    (";q=", u64::from(self.quota.burst)),
                    (";w=", self.quota.window_secs()),
                ]),
            ),
            (
                &RATELIMIT,
                value([(";r=", u64::from(self.remaining)), (";t=", self.reset)]),
            ),
        ]
    }
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub default: Quota,
    pub redis: Option<RedisConfig>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            default: Quota {
                per_second: 100,
                burst: 200,
            },
            redis: None,
        }
    }
}

type Limiter<C> =
    governor::RateLimiter<Subject, DashMapStateStore<Subject>, C, StateInformationMiddleware>;

/// How many subjects the in-memory limiters track before they are cleaned at once rather than
/// at the next housekeeping tick.
pub const CLEAN_ABOVE: usize = 100_000;

/// In-memory limiters: one keyed limiter per distinct quota, so a key whose quota changes on
/// reload starts in a new limiter while unchanged keys keep their state.
pub struct Local<C: Clock = DefaultClock> {
    clock: C,
    limiters: Mutex<HashMap<Quota, Arc<Limiter<C>>>>,
    last_clean: AtomicU64,
}

impl<C: Clock + Clone> Local<C>
where
    C::Instant: governor::clock::Reference,
{
    pub fn with_clock(clock: C) -> Local<C> {
        Local {
            clock,
            limiters: Mutex::new(HashMap::new()),
            last_clean: AtomicU64::new(0),
        }
    }

    fn limiter(&self, quota: Quota) -> Arc<Limiter<C>> {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(quota)
            .or_insert_with(|| {
                Arc::new(
                    governor::RateLimiter::dashmap_with_clock(quota.governor(), self.clock.clone())
                        .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone()
    }

    pub fn check(&self, subject: &Subject, quota: Quota) -> Decision {
        let limiter = self.limiter(quota);
        let decision = match limiter.check_key(subject) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = quota.burst.saturating_sub(remaining);
                Decision {
                    allowed: true,
                    quota,
                    remaining,
                    retry_after: 0,
                    reset: u64::from(used).div_ceil(u64::from(quota.per_second.max(1))),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision {
                    allowed: false,
                    quota,
                    remaining: 0,
                    retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
                    reset: quota.window_secs(),
                }
            }
        };
        if limiter.len() > CLEAN_ABOVE {
            self.clean_soon(&limiter);
        }
        decision
    }

    /// Clean a crowded limiter, at most every 100 ms: under a flood of new addresses, memory
    /// is bounded by the addresses seen in the last fraction of a second.
    fn clean_soon(&self, limiter: &Limiter<C>) {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_clean.load(Ordering::Relaxed);
        if stamp.saturating_sub(last) >= 100
            && self
                .last_clean
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Forget every subject whose bucket is full again: they are indistinguishable from new
    /// ones, so no limited client ever gets a fresh bucket from this.
    pub fn housekeep(&self) {
        let limiters: Vec<_> = self
            .limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for l in limiters {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Subjects tracked, over every quota.
    pub fn tracked(&self) -> usize {
        self.limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| l.len())
            .sum()
    }
}

impl Local<DefaultClock> {
    pub fn new() -> Local<DefaultClock> {
        Local::with_clock(DefaultClock::default())
    }
}

impl Default for Local<DefaultClock> {
    fn default() -> Self {
        Local::new()
    }
}

/// GCRA in Redis, atomically, with Redis's own clock so replicas need not agree on time.
/// KEYS[1]: the subject's key. ARGV[1]: microseconds between requests; ARGV[2]: burst.
/// Returns {allowed, remaining, retry_after_us, reset_us}.
const GCRA_LUA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, 0, math.floor(allow_at - now), math.floor(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
local remaining = math.floor((now + tolerance - new_tat) / interval)
return {1, remaining, 0, math.floor(new_tat - now)}
"#;

/// Limits shared through Redis.
pub struct Shared {
    pub link: Arc<RedisLink>,
    script: redis::Script,
}

impl Shared {
    pub fn new(link: Arc<RedisLink>) -> Shared {
        Shared {
            link,
            script: redis::Script::new(GCRA_LUA),
        }
    }

    pub async fn check(&self, subject: &Subject, quota: Quota) -> Decision {
        let key = format!(
            "portcullis:rl:{}:{}:{}",
            subject.redis_id(),
            quota.per_second,
            quota.burst
        );
        let interval_us = 1_000_000f64 / f64::from(quota.per_second.max(1));
        let args = [interval_us.to_string(), quota.burst.to_string()];
        let result = self
            .link
            .invoke::<(i64, i64, i64, i64)>(&self.script, &key, &args)
            .await;
        let secs = |us: i64| (us.max(0) as u64).div_ceil(1_000_000);
        match result {
            Ok((allowed, remaining, retry_us, reset_us)) => Decision {
                allowed: allowed == 1,
                quota,
                remaining: remaining.clamp(0, i64::from(quota.burst)) as u32,
                retry_after: if allowed == 1 {
                    0
                } else {
                    secs(retry_us).max(1)
                },
                reset: secs(reset_us),
            },
            Err(_) => {
                let allowed = self.link.failure_policy() == RedisFailure::Allow;
                Decision {
                    allowed,
                    quota,
                    remaining: if allowed { quota.burst } else { 0 },
                    retry_after: if allowed { 0 } else { 1 },
                    reset: 0,
                }
            }
        }
    }
}

/// The configured limiter.
pub enum RateLimits {
    Off,
    Local { default: Quota, local: Local },
    Shared { default: Quota, shared: Box<Shared> },
}

impl RateLimits {
    /// `link`: the Redis server, when `backend = "redis"`.
    pub fn new(config: &RateLimitConfig, link: Option<Arc<RedisLink>>) -> RateLimits {
        if !config.enabled {
            return RateLimits::Off;
        }
        match link {
            None => RateLimits::Local {
                default: config.default,
                local: Local::new(),
            },
            Some(link) => RateLimits::Shared {
                default: config.default,
                shared: Box::new(Shared::new(link)),
            },
        }
    }

    /// Limit `subject`, with a key's own quota fields over the defaults. `None` when off.
    pub async fn check(
        &self,
        subject: &Subject,
        per_second: Option<u32>,
        burst: Option<u32>,
    ) -> Option<Decision> {
        let default = match self {
            RateLimits::Off => return None,
            RateLimits::Local { default, .. } | RateLimits::Shared { default, .. } => *default,
        };
        let quota = match (per_second, burst) {
            (None, None) => default,
            (Some(r), b) => Quota {
                per_second: r,
                burst: b.unwrap_or(r.saturating_mul(2)),
            },
            (None, Some(b)) => Quota {
                per_second: default.per_second,
                burst: b,
            },
        };
        Some(match self {
            RateLimits::Off => unreachable!(),
            RateLimits::Local { local, .. } => local.check(subject, quota),
            RateLimits::Shared { shared, .. } => shared.check(subject, quota).await,
        })
    }

    pub fn housekeep(&self) {
        if let RateLimits::Local { local, .. } = self {
            local.housekeep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    const Q: Quota = Quota {
        per_second: 2,
        burst: 3,
    };

    fn ip(n: u8) -> Subject {
        Subject::Address(ClientKey::of(IpAddr::from([10, 0, 0, n])))
    }

    #[test]
    fn a_burst_then_429_with_retry_after_and_refill_over_time() {
        let clock = FakeRelativeClock::default();
        let local = Local::with_clock(clock.clone());
        let got: Vec<u32> = (0..3).map(|_| local.check(&ip(1), Q).remaining).collect();
        assert_eq!(got, vec![2, 1, 0]);
        let limited = local.check(&ip(1), Q);
        assert!(!limited.allowed);
        assert_eq!(limited.retry_after, 1, "500 ms rounds up to a whole second");
        // Another client is not affected.
        assert!(local.check(&ip(2), Q).allowed);
        clock.advance(Duration::from_millis(500));
        assert!(local.check(&ip(1), Q).allowed);
        assert!(!local.check(&ip(1), Q).allowed);
    }

    #[test]
    fn a_quota_change_starts_a_new_bucket_and_unchanged_quotas_keep_theirs() {
        let clock = FakeRelativeClock::default();
        let local = Local::with_clock(clock.clone());
        let key = Subject::Credential(CredId::Key([1; 32]));
        for _ in 0..3 {
            assert!(local.check(&key, Q).allowed);
        }
        assert!(
            !local.check(&key, Q).allowed,
            "same quota: same spent bucket"
        );
        let bigger = Quota {
            per_second: 2,
            burst: 10,
        };
        assert!(local.check(&key, bigger).allowed, "new quota: new bucket");
    }

    #[test]
    fn housekeeping_forgets_only_clients_whose_bucket_is_full_again() {
        let clock = FakeRelativeClock::default();
        let local = Local::with_clock(clock.clone());
        for n in 0..100 {
            local.check(&ip(n), Q);
        }
        // Client 200 is limited right now.
        for _ in 0..4 {
            local.check(&ip(200), Q);
        }
        assert_eq!(local.tracked(), 101);
        // One second on, the one-request clients are full again (a cell refills in 500 ms,
        // and governor keeps a state one interval past that); client 200 is not.
        clock.advance(Duration::from_millis(1000));
        local.housekeep();
        assert_eq!(local.tracked(), 1, "only the client still draining is kept");
        // It kept its state: a fresh bucket would have 2 more cells after this request.
        assert_eq!(local.check(&ip(200), Q).remaining, 1);
    }

    #[test]
    fn headers_follow_the_ietf_draft() {
        let d = Decision {
            allowed: true,
            quota: Quota {
                per_second: 100,
                burst: 200,
            },
            remaining: 150,
            retry_after: 0,
            reset: 1,
        };
        let [(p, policy), (s, state)] = d.headers();
        assert_eq!(
            (p.as_str(), policy.to_str().unwrap()),
            ("ratelimit-policy", "\"default\";q=200;w=2")
        );
        assert_eq!(
            (s.as_str(), state.to_str().unwrap()),
            ("ratelimit", "\"default\";r=150;t=1")
        );
    }

    #[test]
    fn redis_ids_never_carry_a_key_digest_in_full() {
        let id = Subject::Credential(CredId::Key([0xab; 32])).redis_id();
        assert_eq!(id, "k:abababababab");
        assert_eq!(ip(7).redis_id(), "ip:10.0.0.7");
    }
}
