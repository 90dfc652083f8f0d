//! The backend instances and how a request picks one (DESIGN.md §11): round robin or fewest
//! requests in flight, among the instances active health checks call healthy and no failed
//! connection has left out.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use serde::Deserialize;

use crate::error::Reject;

/// The most instances `urls` may list (a request's tried set is one `u64`; metrics labels stay
/// bounded).
pub const MAX_INSTANCES: usize = 64;

/// How a request that is not pinned to an instance picks one.
#[derive(Deserialize, serde::Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The instance with the fewest requests in flight (open streams included); ties in turn.
    LeastRequests,
}

/// One instance's address, as `url`/`urls` wrote it.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the URL without its trailing slash ("" for `http://host:port/`).
    pub base_path: String,
    /// The URL as shown in logs, `/readyz` and the `instance` metrics label.
    pub label: std::sync::Arc<str>,
    /// The instance's authority as a `Host` value.
    pub host: HeaderValue,
}

impl Target {
    pub fn new(scheme: Scheme, authority: Authority, path: &str) -> Target {
        let base_path = path.trim_end_matches('/').to_string();
        Target {
            label: format!("{scheme}://{authority}{base_path}").into(),
            host: HeaderValue::from_str(authority.as_str())
                .expect("an authority is a header value"),
            scheme,
            authority,
            base_path,
        }
    }

    /// The instance's path and query for a (normalised) path and the client's query.
    pub fn path_and_query(&self, path: &str, query: Option<&str>) -> Result<PathAndQuery, Reject> {
        // The exact length: a String whose capacity is its length becomes the URI's bytes
        // without another allocation.
        let len = self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1);
        let mut pq = String::with_capacity(len);
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        PathAndQuery::try_from(pq).map_err(|_| Reject::BadRequest)
    }

    /// The instance's absolute URI for a path and query.
    pub fn absolute(&self, pq: PathAndQuery) -> Result<Uri, Reject> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| Reject::BadRequest)
    }

    /// The instance's URI for a (normalised) path and the client's query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, Reject> {
        self.absolute(self.path_and_query(path, query)?)
    }
}

/// `health_path` and its schedule.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed checks that take a healthy instance out.
    pub unhealthy_threshold: u32,
    /// Consecutive good checks that bring an instance back.
    pub healthy_threshold: u32,
}

/// What went wrong with an attempt, for `portcullis_upstream_instance_failures_total`.
pub const FAILURE_KINDS: [&str; 4] = ["connect", "timeout", "reset", "protocol"];

/// One instance's state: what health checks and failed connections say, and its counters.
pub struct Instance {
    pub target: Target,
    /// Active checks call it healthy (always, without them).
    healthy: AtomicBool,
    /// Left out after a failed connection until this many ms after the epoch; 0: not.
    ejected_until: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    failures: [AtomicU64; 4],
}

/// The instances, and the state a pick reads.
pub struct Instances {
    list: Box<[Instance]>,
    balance: Balance,
    next: AtomicUsize,
    epoch: Instant,
    eject_for: Duration,
}

/// One instance's state as `/readyz` and the metrics show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceStatus {
    pub url: String,
    pub healthy: bool,
    /// Left out after a failed connection, for this many more seconds.
    pub ejected_seconds: Option<f64>,
    pub in_flight: usize,
    pub requests: u64,
    /// Failed attempts by kind.
    pub failures: std::collections::BTreeMap<&'static str, u64>,
}

impl InstanceStatus {
    /// Requests may go there.
    pub fn available(&self) -> bool {
        self.healthy && self.ejected_seconds.is_none()
    }
}

/// An attempt's place in its instance's in-flight count, given back when dropped (when the
/// exchange ends: the response body finished, the tunnel closed).
pub struct InFlight {
    instances: Arc<Instances>,
    index: usize,
}

impl InFlight {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.instances.list[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instances {
    pub fn new(targets: &[Target], balance: Balance, eject_for: Duration) -> Instances {
        Instances {
            list: targets
                .iter()
                .map(|t| Instance {
                    target: t.clone(),
                    healthy: AtomicBool::new(true),
                    ejected_until: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    requests: AtomicU64::new(0),
                    failures: Default::default(),
                })
                .collect(),
            balance,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            eject_for,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn target(&self, i: usize) -> &Target {
        &self.list[i].target
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "not ejected".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn ejected(&self, i: usize, now: &mut Option<u64>) -> bool {
        let until = self.list[i].ejected_until.load(Ordering::Relaxed);
        until != 0 && *now.get_or_insert_with(|| self.now_ms()) < until
    }

    pub fn healthy(&self, i: usize) -> bool {
        self.list[i].healthy.load(Ordering::Relaxed)
    }

    /// The instance for a request, among those not in `tried` (a bit per instance): an
    /// available one (healthy, not left out) by the balance rule; failing that, a healthy one
    /// a failed connection left out, soonest back first (it may be up again, and a failed
    /// connection costs only another attempt). `None`: no instance is left to try (every one
    /// tried, or active checks call the rest down).
    pub fn pick(&self, tried: u64) -> Option<usize> {
        let n = self.list.len();
        if n == 1 {
            return (tried == 0 && self.healthy(0)).then_some(0);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut now = None;
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if tried & (1 << i) != 0 || !self.healthy(i) || self.ejected(i, &mut now) {
                continue;
            }
            match self.balance {
                Balance::RoundRobin => return Some(i),
                Balance::LeastRequests => {
                    let load = self.list[i].in_flight.load(Ordering::Relaxed);
                    if best.is_none_or(|(_, b)| load < b) {
                        best = Some((i, load));
                    }
                }
            }
        }
        if let Some((i, _)) = best {
            return Some(i);
        }
        (0..n)
            .filter(|i| tried & (1 << i) == 0 && self.healthy(*i))
            .min_by_key(|i| self.list[*i].ejected_until.load(Ordering::Relaxed))
    }

    /// An attempt on instance `i` starts: counted, and in flight until the guard drops.
    pub fn start(self: &Arc<Self>, i: usize) -> InFlight {
        let inst = &self.list[i];
        inst.in_flight.fetch_add(1, Ordering::Relaxed);
        inst.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            instances: self.clone(),
            index: i,
        }
    }

    /// An attempt on instance `i` failed (`kind` one of [`FAILURE_KINDS`]); a failed
    /// connection leaves the instance out for `eject_duration`.
    pub fn failed(&self, i: usize, kind: &'static str) {
        let inst = &self.list[i];
        if let Some(k) = FAILURE_KINDS.iter().position(|k| *k == kind) {
            inst.failures[k].fetch_add(1, Ordering::Relaxed);
        }
        if kind == "connect" && self.list.len() > 1 {
            let now = self.now_ms();
            let until = now + self.eject_for.as_millis() as u64;
            let was = inst.ejected_until.swap(until, Ordering::Relaxed);
            if was == 0 || was < now {
                tracing::warn!(event = "upstream_ejected", instance = %inst.target.label, seconds = self.eject_for.as_secs_f64(), "connection to an upstream instance failed: left out");
            }
        }
    }

    /// What an active check concluded: the instance is up (which also ends a passive
    /// ejection) or down.
    pub fn set_healthy(&self, i: usize, up: bool) {
        let inst = &self.list[i];
        inst.healthy.store(up, Ordering::Relaxed);
        if up {
            inst.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// Every instance's state, in the configured order.
    pub fn status(&self) -> Vec<InstanceStatus> {
        let now = self.now_ms();
        self.list
            .iter()
            .map(|inst| {
                let until = inst.ejected_until.load(Ordering::Relaxed);
                InstanceStatus {
                    url: inst.target.label.to_string(),
                    healthy: inst.healthy.load(Ordering::Relaxed),
                    ejected_seconds: (until != 0 && now < until)
                        .then(|| (until - now) as f64 / 1000.0),
                    in_flight: inst.in_flight.load(Ordering::Relaxed),
                    requests: inst.requests.load(Ordering::Relaxed),
                    failures: FAILURE_KINDS
                        .iter()
                        .zip(&inst.failures)
                        .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
                        .collect(),
                }
            })
            .collect()
    }
}

impl crate::metrics::InstanceReport for Instances {
    fn instance_rows(&self) -> Vec<crate::metrics::InstanceRow> {
        self.status()
            .into_iter()
            .map(|st| crate::metrics::InstanceRow {
                up: st.available(),
                url: st.url,
                in_flight: st.in_flight,
                requests: st.requests,
                failures: st.failures.into_iter().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(n: usize, balance: Balance) -> Arc<Instances> {
        let targets: Vec<Target> = (0..n)
            .map(|i| {
                Target::new(
                    Scheme::HTTP,
                    format!("127.0.0.1:{}", 4000 + i).parse().unwrap(),
                    "/",
                )
            })
            .collect();
        Arc::new(Instances::new(&targets, balance, Duration::from_secs(10)))
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_skips_the_unhealthy() {
        let s = instances(3, Balance::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| s.pick(0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        s.set_healthy(1, false);
        let picks: Vec<_> = (0..6).map(|_| s.pick(0).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // Tried ones are not picked again; with every healthy one tried, none is left.
        assert_eq!(s.pick(0b101), None);
    }

    #[test]
    fn least_requests_takes_the_least_loaded_and_a_failed_connection_leaves_one_out() {
        let s = instances(2, Balance::LeastRequests);
        let busy = s.start(0);
        assert_eq!(busy.index(), 0);
        for _ in 0..4 {
            assert_eq!(s.pick(0), Some(1));
        }
        drop(busy);
        let picks: Vec<_> = (0..4).map(|_| s.pick(0).unwrap()).collect();
        assert!(
            picks.contains(&0) && picks.contains(&1),
            "ties go in turn: {picks:?}"
        );
        s.failed(1, "connect");
        for _ in 0..4 {
            assert_eq!(s.pick(0), Some(0));
        }
        // Left out, still tried when nothing else is left (it may be back).
        assert_eq!(s.pick(0b01), Some(1));
        assert!(s.status()[1].ejected_seconds.is_some());
        // A good health check brings it back at once.
        s.set_healthy(1, true);
        assert!(s.status()[1].available());
        // Active checks calling both down: nothing to try.
        s.set_healthy(0, false);
        s.set_healthy(1, false);
        assert_eq!(s.pick(0), None);
    }

    #[test]
    fn one_instance_is_always_tried_unless_its_checks_say_it_is_down() {
        let s = instances(1, Balance::RoundRobin);
        s.failed(0, "connect");
        assert_eq!(s.pick(0), Some(0));
        assert_eq!(s.pick(1), None);
        s.set_healthy(0, false);
        assert_eq!(s.pick(0), None);
    }
}
