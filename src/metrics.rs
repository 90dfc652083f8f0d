//! Prometheus metrics on the admin listener (DESIGN.md §7), with prometheus-client.
//!
//! Events (requests, refusals, upstream errors) are counted where they happen; state (bans,
//! connections, streams, reloads, credentials, the certificate, the process) is read at scrape
//! time by a collector. Labels only ever take values from small fixed sets: never a key name,
//! a user, a path or an address.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use arc_swap::ArcSwap;

use crate::auth::Snapshot;
use crate::ban::Bans;
use crate::error::Reject;
use crate::redis::RedisLink;
use crate::streams::{StreamKind, Streams};
use crate::tls::CertResolver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub outcome: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct McpCallLabels {
    /// `tools/call`, `prompts/get` or `resources/read`.
    pub method: &'static str,
    /// `allowed`, `denied`, `step_up` or `rate_limited`.
    pub decision: &'static str,
}

type Histograms = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

/// The event metrics: cheap handles, shared with the registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub rate_limited: Counter,
    pub banned: Counter,
    pub upstream_errors: Family<KindLabels, Counter>,
    /// Requests sent again to another instance after a failed attempt.
    pub upstream_retries: Counter,
    /// MCP calls judged by the tool rules, by method and decision.
    pub mcp_calls: Family<McpCallLabels, Counter>,
    /// MCP POST bodies refused before judging, by reason.
    pub mcp_invalid: Family<ReasonLabels, Counter>,
    /// Entries removed from list answers, by list (`tools`, `prompts`, `resources`, …).
    pub mcp_hidden: Family<KindLabels, Counter>,
    /// The common case's series, resolved once: outcome ok, 2xx.
    ok_2xx: Counter,
    ok_duration: Histogram,
}

fn duration_histogram() -> Histogram {
    // 1 ms to 60 s: proxy overhead at the low end, slow backends and bcrypt at the high end.
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let requests: Family<RequestLabels, Counter> = Family::default();
        let duration: Histograms =
            Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let ok_2xx = requests
            .get_or_create(&RequestLabels {
                outcome: "ok",
                code: "2xx",
            })
            .clone();
        let ok_duration = duration
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .clone();
        Metrics {
            requests,
            duration,
            auth_failures: Family::default(),
            rate_limited: Counter::default(),
            banned: Counter::default(),
            upstream_errors: Family::default(),
            upstream_retries: Counter::default(),
            mcp_calls: Family::default(),
            mcp_invalid: Family::default(),
            mcp_hidden: Family::default(),
            ok_2xx,
            ok_duration,
        }
    }
}

impl Metrics {
    /// Count one finished request.
    pub fn request(&self, outcome: &'static str, status: u16, seconds: f64) {
        if outcome == "ok" && (200..300).contains(&status) {
            self.ok_2xx.inc();
            self.ok_duration.observe(seconds);
            return;
        }
        let code = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels { outcome, code })
            .inc();
        self.duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(seconds);
    }

    /// Count a refusal where it belongs: an authentication failure by reason, a rate limit,
    /// a ban.
    pub fn refused(&self, reject: &Reject) {
        if let Some(reason) = reject.auth_reason() {
            self.auth_failures
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
        match reject {
            Reject::RateLimited { .. } => {
                self.rate_limited.inc();
            }
            Reject::Banned { .. } => {
                self.banned.inc();
            }
            _ => {}
        }
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// A request is sent again to another instance.
    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }
}

/// One watched file's reload counters, as `portcullis_reloads_total` and
/// `portcullis_reload_last_success_timestamp_seconds` show them.
pub struct ReloadRow {
    /// `keys`, `htpasswd` or `tls`.
    pub file: &'static str,
    pub ok: u64,
    pub failed: u64,
    pub last_success: SystemTime,
}

/// What reloads files reports its counters through (the reloader implements it): the collector
/// reads them without depending on the reloader.
pub trait ReloadReport: Send + Sync {
    fn rows(&self) -> Vec<ReloadRow>;
}

/// One backend instance's state, as the `portcullis_upstream_instance_*` families show it.
pub struct InstanceRow {
    /// The URL as configured (the `instance` label: bounded by the config).
    pub url: String,
    /// Requests may go there (healthy, not left out).
    pub up: bool,
    pub in_flight: usize,
    pub requests: u64,
    /// Failed attempts by kind.
    pub failures: Vec<(&'static str, u64)>,
}

/// What reports the backend instances (the upstream implements it).
pub trait InstanceReport: Send + Sync {
    fn instance_rows(&self) -> Vec<InstanceRow>;
}

/// What the state collector reads at scrape time: explicit handles, each owned elsewhere.
pub struct Sources {
    /// The public listener's connection permits, and how many there are.
    pub connections: Arc<tokio::sync::Semaphore>,
    pub max_connections: usize,
    pub tls: Option<Arc<CertResolver>>,
    pub bans: Arc<Bans>,
    pub streams: Arc<Streams>,
    pub credentials: Arc<ArcSwap<Snapshot>>,
    /// The watched files' reload counters.
    pub reloads: Arc<dyn ReloadReport>,
    /// The shared Redis, when limits and bans are kept there.
    pub redis: Option<Arc<RedisLink>>,
    /// The issuer's key set, with `[auth.jwt]`.
    pub jwks: Option<Arc<crate::auth::jwks::Jwks>>,
    /// The backend instances' state.
    pub upstream: Arc<dyn InstanceReport>,
    /// Who verifies passwords (the hashing pool's refusals).
    pub auth: Arc<crate::auth::Auth>,
}

/// The registry served on `/metrics`: the event metrics and the state collector.
pub fn registry(metrics: &Metrics, sources: Sources) -> Registry {
    let mut r = Registry::default();
    r.register(
        "portcullis_requests",
        "Requests answered, by outcome and status class",
        metrics.requests.clone(),
    );
    r.register_with_unit(
        "portcullis_request_duration",
        "Time from the request's arrival to the end of its response",
        Unit::Seconds,
        metrics.duration.clone(),
    );
    r.register(
        "portcullis_auth_failures",
        "Failed authentications, by reason",
        metrics.auth_failures.clone(),
    );
    r.register(
        "portcullis_rate_limited",
        "Requests refused by a rate limit",
        metrics.rate_limited.clone(),
    );
    r.register(
        "portcullis_banned",
        "Requests refused because the client is banned",
        metrics.banned.clone(),
    );
    r.register(
        "portcullis_upstream_errors",
        "Failed exchanges with the backend, by kind (connect, timeout, reset, protocol, no_healthy_instance)",
        metrics.upstream_errors.clone(),
    );
    r.register(
        "portcullis_upstream_retries",
        "Requests sent again to another instance after an attempt failed (a failed connection, or an idempotent request without a body)",
        metrics.upstream_retries.clone(),
    );
    r.register(
        "portcullis_mcp_calls",
        "MCP tools/call, prompts/get and resources/read judged by the tool rules, by decision",
        metrics.mcp_calls.clone(),
    );
    r.register(
        "portcullis_mcp_invalid_requests",
        "MCP POST bodies refused before judging (batch, duplicate_key, header_mismatch, …)",
        metrics.mcp_invalid.clone(),
    );
    r.register(
        "portcullis_mcp_list_entries_hidden",
        "Entries removed from tools/list, prompts/list and resources/list answers",
        metrics.mcp_hidden.clone(),
    );
    r.register_collector(Box::new(State(sources)));
    r
}

/// State read at scrape time.
struct State(Sources);

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for State {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let open = s
            .max_connections
            .saturating_sub(s.connections.available_permits());
        gauge(
            &mut e,
            "portcullis_connections_active",
            "Open client connections on the public listener (WebSocket tunnels included)",
            open as f64,
        )?;
        if let Some(tls) = &s.tls {
            let cert = tls.current();
            gauge(
                &mut e,
                "portcullis_tls_cert_expiry_timestamp_seconds",
                "When the served certificate expires (Unix time)",
                unix_seconds(cert.not_after),
            )?;
        }
        process(&mut e)?;
        gauge(
            &mut e,
            "portcullis_bans_active",
            "Clients banned right now",
            s.bans.active() as f64,
        )?;
        {
            let mut m = e.encode_descriptor(
                "portcullis_streams_active",
                "Open WebSocket tunnels and streaming responses, by kind",
                None,
                MetricType::Gauge,
            )?;
            for kind in StreamKind::ALL {
                let labels = KindLabels { kind: kind.label() };
                ConstGauge::new(s.streams.active(kind) as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut e,
            "portcullis_streams_revoked",
            "Streams closed because their credential was revoked",
            s.streams.revoked_total(),
        )?;
        reloads(&mut e, &s.reloads.rows())?;
        let snapshot = s.credentials.load();
        {
            let mut m = e.encode_descriptor(
                "portcullis_credentials_loaded",
                "Usable credentials loaded, by kind",
                None,
                MetricType::Gauge,
            )?;
            let now = SystemTime::now();
            let keys = snapshot.keys.keys().filter(|k| k.usable(now)).count();
            let users = snapshot.htpasswd.as_ref().map_or(0, |h| h.len());
            for (kind, n) in [("api_key", keys), ("htpasswd_user", users)] {
                ConstGauge::new(n as f64).encode(m.encode_family(&KindLabels { kind })?)?;
            }
        }
        gauge(
            &mut e,
            "portcullis_credentials_generation",
            "Credential snapshot generation: 1 at start, one more per reload that changed something",
            snapshot.generation as f64,
        )?;
        if let Some(jwks) = &s.jwks {
            jwks_state(&mut e, &jwks.status())?;
        }
        instances(&mut e, &s.upstream.instance_rows())?;
        counter(
            &mut e,
            "portcullis_password_verifications_refused",
            "Slow password verifications refused at once (429) because every hashing thread was busy and the queue full",
            s.auth.basic.refused_busy.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        if let Some(link) = &s.redis {
            counter(
                &mut e,
                "portcullis_redis_errors",
                "Redis calls that failed (shared rate limits and bans)",
                link.errors.load(std::sync::atomic::Ordering::Relaxed),
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceKindLabels {
    instance: String,
    kind: &'static str,
}

/// Each backend instance (label: its URL as configured, so bounded by the config): healthy,
/// in flight, attempts, failed attempts by kind.
fn instances(e: &mut DescriptorEncoder, list: &[InstanceRow]) -> std::fmt::Result {
    per_instance(
        e,
        "portcullis_upstream_instance_up",
        "1 when requests may go to the instance (healthy, not left out after a failed connection)",
        MetricType::Gauge,
        list,
        |st| u64::from(st.up),
    )?;
    per_instance(
        e,
        "portcullis_upstream_instance_in_flight",
        "Requests and streams in flight to the instance",
        MetricType::Gauge,
        list,
        |st| st.in_flight as u64,
    )?;
    per_instance(
        e,
        "portcullis_upstream_instance_requests",
        "Attempts sent to the instance",
        MetricType::Counter,
        list,
        |st| st.requests,
    )?;
    let mut m = e.encode_descriptor(
        "portcullis_upstream_instance_failures",
        "Failed attempts on the instance, by kind (connect, timeout, reset, protocol)",
        None,
        MetricType::Counter,
    )?;
    for st in list {
        for (kind, n) in &st.failures {
            let labels = InstanceKindLabels {
                instance: st.url.clone(),
                kind,
            };
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// One family with a value per instance, a gauge or a counter.
fn per_instance(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    list: &[InstanceRow],
    value: impl Fn(&InstanceRow) -> u64,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for st in list {
        let labels = InstanceLabels {
            instance: st.url.clone(),
        };
        let family = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value(st)).encode(family)?,
            _ => ConstGauge::new(value(st) as f64).encode(family)?,
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The issuer's key set: how many keys are in force, fetches by result, when it last loaded.
fn jwks_state(e: &mut DescriptorEncoder, st: &crate::auth::jwks::JwksStatus) -> std::fmt::Result {
    gauge(
        e,
        "portcullis_jwks_keys",
        "Signing keys of the issuer's key set in force (0: every token is refused)",
        st.keys as f64,
    )?;
    {
        let mut m = e.encode_descriptor(
            "portcullis_jwks_fetches",
            "Fetches of the issuer's key set (jwks_url or discovered), by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("ok", st.fetches_ok), ("error", st.fetches_failed)] {
            ConstCounter::new(n).encode(m.encode_family(&ResultLabels { result })?)?;
        }
    }
    counter(
        e,
        "portcullis_jwks_unknown_kid_refetches",
        "Fetches asked for by a token whose kid was not in the key set (at most one per min_refresh_interval)",
        st.unknown_kid_refetches,
    )?;
    gauge(
        e,
        "portcullis_jwks_last_success_timestamp_seconds",
        "When the key set last loaded (Unix time; 0: never)",
        st.last_success.map_or(0.0, unix_seconds),
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    file: &'static str,
}

fn reloads(e: &mut DescriptorEncoder, rows: &[ReloadRow]) -> std::fmt::Result {
    {
        let mut m = e.encode_descriptor(
            "portcullis_reloads",
            "Reloads of the keys, htpasswd and TLS files, by result",
            None,
            MetricType::Counter,
        )?;
        for row in rows {
            for (result, n) in [("ok", row.ok), ("error", row.failed)] {
                let labels = ReloadLabels {
                    file: row.file,
                    result,
                };
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    let mut m = e.encode_descriptor(
        "portcullis_reload_last_success_timestamp_seconds",
        "When each file last loaded successfully (Unix time; start-up counts)",
        None,
        MetricType::Gauge,
    )?;
    for row in rows {
        let labels = FileLabels { file: row.file };
        ConstGauge::new(unix_seconds(row.last_success)).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The standard `process_*` metrics, from /proc (Linux).
fn process(e: &mut DescriptorEncoder) -> std::fmt::Result {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Ok(());
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Ok(());
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // /proc reports CPU time in USER_HZ, which is 100 on every Linux.
    const TICKS: f64 = 100.0;
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let c = ConstCounter::new((utime + stime) / TICKS);
        c.encode(e.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent",
            None,
            c.metric_type(),
        )?)?;
    }
    if let Some(threads) = field(20) {
        gauge(e, "process_threads", "Threads in the process", threads)?;
    }
    if let Some(vsize) = field(23) {
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size",
            vsize,
        )?;
    }
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(kb) = rss_kb {
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size",
            kb * 1024.0,
        )?;
    }
    if let Some(start_ticks) = field(22) {
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(boot) = boot {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process (Unix time)",
                boot + start_ticks / TICKS,
            )?;
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors",
            fds.count() as f64,
        )?;
    }
    Ok(())
}
