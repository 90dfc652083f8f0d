//! HTTP Basic verification against an htpasswd file, made cheap and safe to expose.
//!
//! - Slow hashes (bcrypt, SHA-crypt, MD5-crypt) run on a pool of one thread per CPU but one (at
//!   least one) at the lowest scheduling priority (`SCHED_IDLE`), so the event loop always
//!   wins a core: a flood of wrong passwords never stalls requests that need no hash. At most
//!   [`QUEUE_PER_THREAD`] verifications per thread wait; one more is refused at once (429)
//!   rather than waited for.
//! - A success is remembered for `ttl`: the cache key is a keyed SHA-256 of user, password and
//!   the stored hash (with a per-process random key, so the cache holds nothing a dump could
//!   brute-force offline). A changed entry therefore never matches an old cache line. Failures
//!   are never cached. The cache is bounded; the oldest entries go first.
//! - Concurrent verifications of the same credentials compute once.
//! - An unknown user is verified against a decoy of the file's costliest scheme, and every
//!   uncached verification answers no sooner than that scheme takes here (measured once per
//!   file, padded with an async wait that costs no CPU), so response time tells neither which
//!   names exist nor which hash a user has.
//! - One client may have at most [`MAX_SLOW_PER_CLIENT`] slow verifications of distinct
//!   credentials in flight; more are refused with 429 before any hash is computed. Requests
//!   that join a verification already running do not count.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::htpasswd::Htpasswd;
use crate::ban::ClientKey;
use crate::cpu::IdlePool;

/// Slow verifications one client may have in flight.
pub const MAX_SLOW_PER_CLIENT: u32 = 4;

/// Slow verifications that may wait, per hashing thread (bcrypt cost 10 takes about 50 ms
/// here: about 0.8 s of waiting at most).
pub const QUEUE_PER_THREAD: usize = 16;

/// What a verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid,
    /// Too many slow verifications in flight for this client, or waiting for a hashing thread.
    Throttled,
}

pub struct BasicVerifier {
    secret: [u8; 32],
    ttl: Duration,
    capacity: usize,
    cache: Mutex<Cache>,
    /// A verification running or queued, by cache key.
    inflight: Mutex<HashMap<[u8; 32], Arc<Outcome>>>,
    per_client: Mutex<HashMap<ClientKey, u32>>,
    /// Where slow hashes run.
    hashers: IdlePool,
    /// Verifications refused because every hashing thread was busy and the queue full.
    pub refused_busy: AtomicU64,
    /// Hash computations so far (slow and fast), for tests and metrics.
    pub computed: AtomicU64,
}

/// A slow verification's result, shared by the requests that wait for it: whether the
/// password matched, or `None` when it was refused (every hashing thread busy, the queue full).
type Outcome = OnceCell<Option<bool>>;

#[derive(Default)]
struct Cache {
    until: HashMap<[u8; 32], Instant>,
    order: VecDeque<[u8; 32]>,
}

impl BasicVerifier {
    pub fn new(ttl: Duration, capacity: usize) -> BasicVerifier {
        let mut secret = [0u8; 32];
        // Without randomness the cache key is still a digest, only not a keyed one.
        let _ = getrandom::fill(&mut secret);
        let threads = IdlePool::cores_but_one();
        BasicVerifier {
            secret,
            ttl,
            capacity,
            cache: Mutex::default(),
            inflight: Mutex::default(),
            per_client: Mutex::default(),
            hashers: IdlePool::new("portcullis-hash", threads, threads * QUEUE_PER_THREAD),
            refused_busy: AtomicU64::new(0),
            computed: AtomicU64::new(0),
        }
    }

    fn cache_key(&self, user: &str, password: &[u8], stored: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.secret);
        for part in [user.as_bytes(), password, stored.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    /// Check `user`'s `password` against `file`.
    pub async fn verify(
        &self,
        file: &Arc<Htpasswd>,
        user: &str,
        password: &[u8],
        client: IpAddr,
        now: Instant,
    ) -> Verdict {
        let started = Instant::now();
        let Some((entry, known)) = file.user_or_decoy(user) else {
            return Verdict::Invalid;
        };
        if !entry.hash.is_slow() {
            self.computed.fetch_add(1, Ordering::Relaxed);
            let verdict = if entry.hash.verify(password) && known {
                Verdict::Valid
            } else {
                Verdict::Invalid
            };
            return self
                .no_sooner_than_the_costliest(file, started, verdict)
                .await;
        }
        let key = self.cache_key(user, password, &entry.stored);
        if known && self.cached(&key, now) {
            return Verdict::Valid;
        }
        let verdict = self
            .compute(&entry, known, key, password, client, now)
            .await;
        match verdict {
            Verdict::Throttled => verdict,
            Verdict::Valid | Verdict::Invalid => {
                self.no_sooner_than_the_costliest(file, started, verdict)
                    .await
            }
        }
    }

    /// Hold an uncached verdict until the file's costliest scheme would have taken since
    /// `started` (a cheap hash beside bcrypt must not answer faster than an unknown name).
    /// The cost is measured once per file, on the blocking pool.
    async fn no_sooner_than_the_costliest(
        &self,
        file: &Arc<Htpasswd>,
        started: Instant,
        verdict: Verdict,
    ) -> Verdict {
        let cost = match file.cost() {
            Some(cost) => cost,
            None => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || file.measure_cost())
                    .await
                    .unwrap_or_default()
            }
        };
        tokio::time::sleep_until((started + cost).into()).await;
        verdict
    }

    /// A slow verification: computed once for concurrent identical credentials, within the
    /// client's slots and the CPU budget; a success is remembered.
    async fn compute(
        &self,
        entry: &super::htpasswd::User,
        known: bool,
        key: [u8; 32],
        password: &[u8],
        client: IpAddr,
        now: Instant,
    ) -> Verdict {
        // Joining a verification of the same credentials already running costs no CPU: only
        // a new computation takes one of the client's slots. (A client whose connection pool
        // opens with a burst of identical requests is served, not refused.)
        let (cell, _slot) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(cell) => (cell.clone(), None),
                None => {
                    let Some(slot) = ClientSlot::take(&self.per_client, ClientKey::of(client))
                    else {
                        return Verdict::Throttled;
                    };
                    let cell = Arc::<Outcome>::default();
                    inflight.insert(key, cell.clone());
                    (cell, Some(slot))
                }
            }
        };
        let matched = *cell
            .get_or_init(|| async {
                let hash = entry.hash.clone();
                let password = password.to_vec();
                let queued = self.hashers.try_run(move || hash.verify(&password));
                let Some(result) = queued else {
                    self.refused_busy.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                self.computed.fetch_add(1, Ordering::Relaxed);
                // A thread that died mid-hash verified nothing.
                Some(result.await.unwrap_or(false))
            })
            .await;
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        match matched {
            None => Verdict::Throttled,
            Some(true) if known => {
                self.remember(key, now);
                Verdict::Valid
            }
            Some(_) => Verdict::Invalid,
        }
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.until.get(key).is_some_and(|until| *until > now)
    }

    fn remember(&self, key: [u8; 32], now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        while cache.until.len() >= self.capacity {
            let Some(old) = cache.order.pop_front() else {
                break;
            };
            cache.until.remove(&old);
        }
        if cache.until.insert(key, now + self.ttl).is_none() {
            cache.order.push_back(key);
        }
    }

    /// Entries in the cache.
    pub fn cached_entries(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .until
            .len()
    }
}

/// One client's place among its slow verifications in flight; released on drop.
struct ClientSlot<'a> {
    table: &'a Mutex<HashMap<ClientKey, u32>>,
    key: ClientKey,
}

impl<'a> ClientSlot<'a> {
    fn take(table: &'a Mutex<HashMap<ClientKey, u32>>, key: ClientKey) -> Option<ClientSlot<'a>> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(key).or_insert(0);
        if *n >= MAX_SLOW_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot { table, key })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file(text: &str) -> Arc<Htpasswd> {
        Arc::new(Htpasswd::parse(Path::new("h"), text, false).unwrap().0)
    }

    /// A user "kim" with password "right", freshly salted each call.
    fn bcrypt_file() -> Arc<Htpasswd> {
        file(&format!("kim:{}\n", bcrypt::hash("right", 4).unwrap()))
    }

    fn ip() -> IpAddr {
        "192.0.2.1".parse().unwrap()
    }

    #[tokio::test]
    async fn a_success_is_cached_and_a_failure_is_not() {
        let v = BasicVerifier::new(Duration::from_secs(60), 100);
        let f = bcrypt_file();
        let now = Instant::now();
        assert_eq!(
            v.verify(&f, "kim", b"right", ip(), now).await,
            Verdict::Valid
        );
        assert_eq!(
            v.verify(&f, "kim", b"right", ip(), now).await,
            Verdict::Valid
        );
        assert_eq!(
            v.computed.load(Ordering::Relaxed),
            1,
            "the second success came from the cache"
        );
        assert_eq!(
            v.verify(&f, "kim", b"wrong", ip(), now).await,
            Verdict::Invalid
        );
        assert_eq!(
            v.verify(&f, "kim", b"wrong", ip(), now).await,
            Verdict::Invalid
        );
        assert_eq!(
            v.computed.load(Ordering::Relaxed),
            3,
            "failures are computed every time"
        );
        // After the TTL the hash is computed again.
        assert_eq!(
            v.verify(&f, "kim", b"right", ip(), now + Duration::from_secs(61))
                .await,
            Verdict::Valid
        );
        assert_eq!(v.computed.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_changed_entry_does_not_match_the_old_cache_line() {
        let v = BasicVerifier::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        assert_eq!(
            v.verify(&bcrypt_file(), "kim", b"right", ip(), now).await,
            Verdict::Valid
        );
        // Same user and password, new salt: a new entry in the file.
        assert_eq!(
            v.verify(&bcrypt_file(), "kim", b"right", ip(), now).await,
            Verdict::Valid
        );
        assert_eq!(v.computed.load(Ordering::Relaxed), 2);
        // The password changed: the old one no longer works, cache or not.
        let changed = file(&format!("kim:{}\n", bcrypt::hash("new", 4).unwrap()));
        assert_eq!(
            v.verify(&changed, "kim", b"right", ip(), now).await,
            Verdict::Invalid
        );
    }

    #[tokio::test]
    async fn concurrent_identical_verifications_compute_once_and_none_is_throttled() {
        let v = Arc::new(BasicVerifier::new(Duration::from_secs(60), 100));
        let f = Arc::new(file(&format!(
            "kim:{}\n",
            bcrypt::hash("right", 8).unwrap()
        )));
        let now = Instant::now();
        // More than one client's share of slow verifications: joining costs nothing, so
        // none is throttled.
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (v, f) = (v.clone(), f.clone());
                tokio::spawn(async move { v.verify(&f, "kim", b"right", ip(), now).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Verdict::Valid);
        }
        assert_eq!(v.computed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn unknown_users_are_checked_against_a_decoy_and_never_valid() {
        let v = BasicVerifier::new(Duration::from_secs(60), 100);
        let f = bcrypt_file();
        assert_eq!(
            v.verify(&f, "nobody", b"right", ip(), Instant::now()).await,
            Verdict::Invalid
        );
        assert_eq!(
            v.computed.load(Ordering::Relaxed),
            1,
            "the decoy was verified"
        );
    }

    #[tokio::test]
    async fn one_client_cannot_run_more_than_its_share_of_slow_verifications() {
        let table = Mutex::new(HashMap::new());
        let key = ClientKey::of(ip());
        let slots: Vec<_> = (0..MAX_SLOW_PER_CLIENT)
            .map(|_| ClientSlot::take(&table, key).unwrap())
            .collect();
        assert!(ClientSlot::take(&table, key).is_none());
        assert!(ClientSlot::take(&table, ClientKey::of("192.0.2.2".parse().unwrap())).is_some());
        drop(slots);
        assert!(table.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let v = BasicVerifier::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        for _ in 0..3 {
            v.remember(rand_key(), now);
        }
        assert_eq!(v.cached_entries(), 2);
    }

    fn rand_key() -> [u8; 32] {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).unwrap();
        k
    }
}
