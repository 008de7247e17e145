//! Load tiers: the one place where the node decides how much work it accepts.
//!
//! A controller task samples [`Signals`] every `load.sample_interval` — datastore latency and pool
//! wait (percentiles over the recent `load.window`), write-buffer fill, reads in flight, inbound
//! stream queue fill, RSS — and computes the [`Tier`] with [`decide`]:
//!
//! - a tier is **entered** as soon as any signal reaches that tier's threshold (escalation is
//!   immediate: the datastore must be protected now, not after a dwell);
//! - a tier is **left** only when every signal is below `exit_ratio` × its threshold for that tier
//!   *and* the tier has been held for `min_dwell`; it then steps down one tier at a time, each step
//!   with its own dwell. Hysteresis plus dwell keep it from flapping around a threshold.
//!
//! What each tier does is decided by the stream tasks ([`crate::server`]) from [`LoadControl::tier`],
//! one atomic load per request:
//!
//! | tier | GET_PROVIDERS | ADD_PROVIDER | FIND_NODE, PING | new inbound streams |
//! |---|---|---|---|---|
//! | `normal` | cache, then datastore | buffered | served | accepted |
//! | `degrade` | datastore only for keys this head is among the k closest to, else cache only (miss → closer peers only) | buffered, but a refresh of a record with more than `degrade_skip_refresh_if_remaining` left is not rewritten; per-peer cost × `degrade_per_peer_cost` | served | accepted |
//! | `refuse` | closer peers only | dropped | served | accepted |
//! | `peak` | closer peers only | dropped | served | reset at the handler |
//!
//! Two rate limits (governor) apply in every tier: a per-process budget of datastore statements
//! per second ([`StatementBudget`], the hard ceiling), which makes flushes and lookups wait — so
//! batches grow and the buffer and lookup queue fill, which raises the tier — and a per-peer rate
//! of datastore-touching requests, kept in a map of at most `max_tracked_peers` peers (peers beyond
//! it share one bucket).
//!
//! The whole `[load]` section is reloaded without a restart ([`LoadControl::reload`]).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::LoadSection;
use crate::metrics::{DbOp, LoadMetrics, ShedReason};
use crate::sharded::Sharded;

/// How much work the node accepts, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Normal = 0,
    Degrade = 1,
    Refuse = 2,
    /// Refuse, and new inbound kad streams are reset at the handler.
    Peak = 3,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Normal, Tier::Degrade, Tier::Refuse, Tier::Peak];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Normal => "normal",
            Tier::Degrade => "degrade",
            Tier::Refuse => "refuse",
            Tier::Peak => "peak",
        }
    }

    fn from_u8(v: u8) -> Tier {
        Tier::ALL.get(usize::from(v)).copied().unwrap_or(Tier::Peak)
    }

    fn below(self) -> Tier {
        Tier::from_u8((self as u8).saturating_sub(1))
    }
}

/// One value per signal: the measured signals ([`Signals`]) and the thresholds at which a tier is
/// entered ([`Thresholds`]; 0 disables that signal for the tier) share this shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerSignal {
    /// p99 of datastore lookups and writes (`get_providers`, `put_providers`) over the window, ms.
    pub datastore_p99_ms: f64,
    /// p99 of the wait for a pooled datastore connection over the window, ms.
    pub pool_wait_p99_ms: f64,
    /// Write-behind buffer entries / `providers.write_buffer_entries` (0..1).
    pub write_buffer_fill_ratio: f64,
    /// Keys queued for or in a lookup / `providers.max_reads_in_flight` (0..1).
    pub reads_in_flight_ratio: f64,
    /// Inbound kad streams waiting for a stream task / `limits.inbound_queue` (0..1).
    pub inbound_queue_fill_ratio: f64,
    /// Resident memory of the process, MiB.
    pub rss_mib: f64,
}

/// Thresholds at which a tier is entered.
pub type Thresholds = PerSignal;
/// One sample of the measured signals.
pub type Signals = PerSignal;

impl PerSignal {
    /// Every signal off (as thresholds).
    const fn disabled() -> Self {
        Self {
            datastore_p99_ms: 0.0,
            pool_wait_p99_ms: 0.0,
            write_buffer_fill_ratio: 0.0,
            reads_in_flight_ratio: 0.0,
            inbound_queue_fill_ratio: 0.0,
            rss_mib: 0.0,
        }
    }

    /// (signal name, value), in a fixed order (metric label values and status keys).
    pub fn values(&self) -> [(&'static str, f64); 6] {
        [
            ("datastore_p99_ms", self.datastore_p99_ms),
            ("pool_wait_p99_ms", self.pool_wait_p99_ms),
            ("write_buffer_fill_ratio", self.write_buffer_fill_ratio),
            ("reads_in_flight_ratio", self.reads_in_flight_ratio),
            ("inbound_queue_fill_ratio", self.inbound_queue_fill_ratio),
            ("rss_mib", self.rss_mib),
        ]
    }

    /// Whether any enabled signal is at or above `factor` × its threshold.
    fn reached(&self, s: &Signals, factor: f64) -> bool {
        self.values().iter().zip(s.values()).any(|((_, t), (_, v))| *t > 0.0 && v >= t * factor)
    }
}

/// The tier thresholds shipped as defaults (see docs/benchmarks.md for how they were chosen).
pub fn default_thresholds() -> [Thresholds; 3] {
    [
        // degrade: the datastore is slowing or work is queueing; also when the intake is half
        // full (the CPU is busy: less datastore work frees some, PostgreSQL often shares it).
        Thresholds {
            datastore_p99_ms: 50.0,
            pool_wait_p99_ms: 20.0,
            write_buffer_fill_ratio: 0.5,
            reads_in_flight_ratio: 0.5,
            inbound_queue_fill_ratio: 0.5,
            rss_mib: 0.0,
        },
        // refuse: the datastore itself is in distress (latency, pool wait). Not on the bounded
        // queues (write buffer, lookups, intake): each sheds its own excess and keeps serving up
        // to its bound; measured (docs/benchmarks.md), refusing on them as well cut datastore
        // goodput to a fifth while PostgreSQL was below its budget.
        Thresholds { datastore_p99_ms: 250.0, pool_wait_p99_ms: 100.0, ..Thresholds::disabled() },
        // peak: off unless the operator sets it — typically `rss_mib` below the memory limit.
        // Not on the intake by default: measured (docs/benchmarks.md), refusing every new stream
        // while the CPU is saturated cut goodput to a fifth, because the transport work per
        // stream is paid either way; the bounded queue and its max wait already shed there.
        Thresholds::disabled(),
    ]
}

/// The next tier, given the current one, when it was entered, and a fresh sample.
pub fn decide(cur: Tier, since: Instant, now: Instant, s: &Signals, cfg: &LoadSection) -> Tier {
    if let Some(t) = cfg.force_tier {
        return t;
    }
    let thresholds = |t: Tier| match t {
        Tier::Normal => None,
        Tier::Degrade => Some(&cfg.degrade),
        Tier::Refuse => Some(&cfg.refuse),
        Tier::Peak => Some(&cfg.peak),
    };
    let highest = |factor: f64| {
        Tier::ALL
            .into_iter()
            .rev()
            .find(|t| thresholds(*t).is_none_or(|th| th.reached(s, factor)))
            .unwrap_or(Tier::Normal)
    };
    let up = highest(1.0);
    if up > cur {
        return up;
    }
    // Stay while any signal is still above the exit level of the current tier.
    if highest(cfg.exit_ratio) >= cur || now.duration_since(since) < cfg.min_dwell {
        return cur;
    }
    cur.below()
}

/// Recent percentiles of one histogram: cumulative bucket counts sampled over a sliding window.
struct Window {
    samples: VecDeque<Vec<u64>>,
    bounds: Vec<f64>,
    len: usize,
}

impl Window {
    fn new(len: usize) -> Self {
        Self { samples: VecDeque::new(), bounds: Vec::new(), len: len.max(2) }
    }

    fn push(&mut self, h: &prometheus::Histogram) {
        use prometheus::core::Metric as _;
        let m = h.metric();
        let hist = m.get_histogram();
        self.bounds = hist.get_bucket().iter().map(|b| b.upper_bound()).collect();
        let mut counts: Vec<u64> = hist.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        counts.push(hist.get_sample_count()); // +Inf
        self.samples.push_back(counts);
        while self.samples.len() > self.len {
            self.samples.pop_front();
        }
    }

    /// The `q` quantile (0..1) of the observations in the window, in the histogram's unit,
    /// interpolated within its bucket as Prometheus' `histogram_quantile` does; 0 without any.
    fn quantile(&self, q: f64) -> f64 {
        let (Some(old), Some(new)) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        let delta: Vec<u64> = new.iter().zip(old).map(|(n, o)| n.saturating_sub(*o)).collect();
        let total = *delta.last().unwrap_or(&0);
        if total == 0 {
            return 0.0;
        }
        let rank = q * total as f64;
        let mut prev_count = 0u64;
        let mut prev_bound = 0.0;
        for (i, &c) in delta.iter().enumerate() {
            if c as f64 >= rank {
                let Some(&bound) = self.bounds.get(i) else {
                    return prev_bound; // in the +Inf bucket: the largest finite bound
                };
                let in_bucket = (c - prev_count) as f64;
                let frac = if in_bucket > 0.0 { (rank - prev_count as f64) / in_bucket } else { 1.0 };
                return prev_bound + (bound - prev_bound) * frac;
            }
            prev_count = c;
            prev_bound = self.bounds.get(i).copied().unwrap_or(prev_bound);
        }
        prev_bound
    }
}

/// What the controller reads to compute [`Signals`]; the node implements it over its parts.
pub trait SignalSource: Send + Sync + 'static {
    /// (entries buffered, limit).
    fn write_buffer(&self) -> (usize, usize);
    /// (keys in flight, limit).
    fn reads_in_flight(&self) -> (usize, usize);
    /// (streams queued, queue capacity).
    fn inbound_queue(&self) -> (usize, usize);
}

/// The current tier and what it was computed from, as `GET /v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub tier: Tier,
    /// Set when `load.force_tier` pins the tier.
    pub forced: bool,
    /// Seconds since the tier last changed.
    pub tier_age_seconds: f64,
    pub signals: Signals,
    /// Recent datastore latency by operation (p95, p99), ms.
    pub datastore_latency_ms: HashMap<&'static str, LatencyPair>,
    pub load: LoadSection,
}

/// What the controller measured last.
struct Sample {
    signals: Signals,
    latency: HashMap<&'static str, LatencyPair>,
    /// When the tier last changed.
    since: Instant,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyPair {
    pub p95: f64,
    pub p99: f64,
}

type TierHook = Box<dyn Fn(Tier) + Send + Sync>;

/// Shared load state: the tier (read on every request), the limits and the live `[load]` config.
pub struct LoadControl {
    tier: AtomicU8,
    cfg: ArcSwap<LoadSection>,
    peers: ArcSwapOption<PeerLimiter>,
    budget: Arc<StatementBudget>,
    /// The controller's last sample; [`Self::status`] adds the live tier and settings.
    sample: ArcSwap<Option<Sample>>,
    metrics: LoadMetrics,
    /// Told every tier change (the node closes or opens its intake for `peak`).
    on_tier: Mutex<Option<TierHook>>,
}

impl LoadControl {
    pub fn new(cfg: LoadSection, budget: Arc<StatementBudget>, metrics: LoadMetrics) -> Arc<Self> {
        let this = Arc::new(Self {
            tier: AtomicU8::new(cfg.force_tier.unwrap_or(Tier::Normal) as u8),
            cfg: ArcSwap::from_pointee(cfg.clone()),
            peers: ArcSwapOption::empty(),
            budget,
            sample: ArcSwap::from_pointee(None),
            metrics,
            on_tier: Mutex::new(None),
        });
        this.apply(cfg);
        this
    }

    /// The current tier.
    pub fn tier(&self) -> Tier {
        Tier::from_u8(self.tier.load(Ordering::Relaxed))
    }

    pub fn config(&self) -> Arc<LoadSection> {
        self.cfg.load_full()
    }

    /// Count one shed request.
    pub fn shed(&self, tier: Tier, reason: ShedReason) {
        self.metrics.shed(tier, reason);
    }

    /// Whether `peer` may make one more datastore-touching request now. In `degrade` a request
    /// costs `degrade_per_peer_cost` cells, so the per-peer rate is divided by it.
    pub fn allow_peer(&self, peer: &PeerId, tier: Tier) -> bool {
        let Some(limiter) = &*self.peers.load() else { return true };
        let cost = if tier >= Tier::Degrade { limiter.degrade_cost } else { NonZeroU32::MIN };
        matches!(limiter.limiter.check_key_n(peer, cost), Ok(Ok(())))
    }

    /// Replace the `[load]` settings (already validated) without a restart.
    pub fn reload(&self, cfg: LoadSection) {
        tracing::info!(
            statements_per_second = cfg.datastore_statements_per_second,
            per_peer_requests_per_second = cfg.per_peer_requests_per_second,
            force_tier = cfg.force_tier.map(Tier::as_str).unwrap_or("computed"),
            "load settings reloaded"
        );
        self.apply(cfg);
    }

    fn apply(&self, cfg: LoadSection) {
        self.budget.set(cfg.datastore_statements_per_second);
        self.peers.store(PeerLimiter::new(&cfg).map(Arc::new));
        self.metrics.set_thresholds(&cfg);
        let forced = cfg.force_tier;
        self.cfg.store(Arc::new(cfg));
        if let Some(t) = forced {
            self.transition(None, t, &Signals::default());
        }
    }

    /// Call `f` on every tier change from now on.
    pub fn on_tier(&self, f: impl Fn(Tier) + Send + Sync + 'static) {
        *self.on_tier.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Move to `next` (if it differs) — only if the tier is still `from`, when given: the atomic,
    /// the gauge, a log line, the callback. False if nothing changed.
    fn transition(&self, from: Option<Tier>, next: Tier, s: &Signals) -> bool {
        let cur = match from {
            None => self.tier.swap(next as u8, Ordering::Relaxed),
            Some(f) => {
                match self.tier.compare_exchange(f as u8, next as u8, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(c) => c,
                    Err(_) => return false,
                }
            }
        };
        let cur = Tier::from_u8(cur);
        if cur == next {
            return false;
        }
        self.metrics.tier.set(next as i64);
        self.metrics.transitions.with_label_values(&[next.as_str()]).inc();
        if next > cur {
            tracing::warn!(signals = ?s, "load tier {} -> {}", cur.as_str(), next.as_str());
        } else {
            tracing::info!(signals = ?s, "load tier {} -> {}", cur.as_str(), next.as_str());
        }
        if let Some(f) = &*self.on_tier.lock().unwrap_or_else(|e| e.into_inner()) {
            f(next);
        }
        true
    }

    /// The last sample with the current tier and settings (None before the first sample).
    pub fn status(&self) -> Option<Status> {
        let sample = self.sample.load_full();
        let Sample { signals, latency, since } = (*sample).as_ref()?;
        let load = (*self.config()).clone();
        Some(Status {
            tier: self.tier(),
            forced: load.force_tier.is_some(),
            tier_age_seconds: since.elapsed().as_secs_f64(),
            signals: *signals,
            datastore_latency_ms: latency.clone(),
            load,
        })
    }

    /// The controller: sample, decide, publish, until cancelled.
    pub async fn run(
        self: Arc<Self>,
        datastore: crate::metrics::DatastoreMetrics,
        source: Arc<dyn SignalSource>,
        cancel: CancellationToken,
    ) {
        const LATENCY_OPS: [DbOp; 4] =
            [DbOp::GetProviders, DbOp::PutProviders, DbOp::GetValue, DbOp::PutValue];
        let mut cfg = self.config();
        let slots =
            |c: &LoadSection| (c.window.as_secs_f64() / c.sample_interval.as_secs_f64()).ceil() as usize + 1;
        let mut windows: Vec<Window> = LATENCY_OPS.iter().map(|_| Window::new(slots(&cfg))).collect();
        let mut pool_wait = Window::new(slots(&cfg));
        let mut since = Instant::now();
        let mut last = self.tier();
        let mut last_prune = Instant::now();
        loop {
            for (w, op) in windows.iter_mut().zip(LATENCY_OPS) {
                w.push(&datastore.duration.with_label_values(&[op.as_str()]));
            }
            pool_wait.push(&datastore.pool_wait);
            let latency: HashMap<&'static str, LatencyPair> = windows
                .iter()
                .zip(LATENCY_OPS)
                .map(|(w, op)| {
                    (op.as_str(), LatencyPair { p95: w.quantile(0.95) * 1e3, p99: w.quantile(0.99) * 1e3 })
                })
                .collect();
            let ratio = |(n, max): (usize, usize)| if max == 0 { 0.0 } else { n as f64 / max as f64 };
            let s = Signals {
                // The tier follows the hot-path operations; value ops are shown but rare.
                datastore_p99_ms: latency["get_providers"].p99.max(latency["put_providers"].p99),
                pool_wait_p99_ms: pool_wait.quantile(0.99) * 1e3,
                write_buffer_fill_ratio: ratio(source.write_buffer()),
                reads_in_flight_ratio: ratio(source.reads_in_flight()),
                inbound_queue_fill_ratio: ratio(source.inbound_queue()),
                rss_mib: rss_bytes("self").map(|b| b as f64 / (1024.0 * 1024.0)).unwrap_or(0.0),
            };
            let now = Instant::now();
            // The tier first, then the settings: a reload stores its settings before its tier,
            // so this pair is never older settings with a newer forced tier.
            let cur = self.tier();
            let new_cfg = self.config();
            if !Arc::ptr_eq(&new_cfg, &cfg) {
                if new_cfg.window != cfg.window || new_cfg.sample_interval != cfg.sample_interval {
                    for w in windows.iter_mut().chain(std::iter::once(&mut pool_wait)) {
                        w.len = slots(&new_cfg).max(2);
                    }
                }
                cfg = new_cfg;
            }
            if cur != last {
                since = now; // changed by a reload (force_tier)
            }
            let next = decide(cur, since, now, &s, &cfg);
            // Only from `cur`: a reload that moved the tier meanwhile wins, and is seen next time.
            if next != cur && self.transition(Some(cur), next, &s) {
                since = now;
            }
            last = next;
            self.metrics.set_signals(&s);
            if let Some(p) = &*self.peers.load() {
                if now.duration_since(last_prune) >= Duration::from_secs(10) || p.store.is_full() {
                    p.limiter.retain_recent();
                    last_prune = now;
                }
                self.metrics.tracked_peers.set(p.store.len() as i64);
            }
            self.sample.store(Arc::new(Some(Sample { signals: s, latency, since })));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(cfg.sample_interval) => {}
            }
        }
    }
}

/// Resident set size of process `pid` ("self" for this one), from /proc (Linux only).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// The per-process budget of datastore statements per second (governor GCRA). Statements wait
/// for it, they are never dropped by it. The burst is 1/20 of the rate (50 ms worth): any window
/// of T seconds holds at most rate × T + rate / 20 statements — 1.05 × the rate over one second,
/// 1.01 × over five.
#[derive(Default)]
pub struct StatementBudget {
    limiter: ArcSwapOption<DirectLimiter>,
    /// Observes how long statements waited (`hydra_load_statement_budget_wait_seconds`).
    wait: Option<prometheus::Histogram>,
}

impl StatementBudget {
    /// An unlimited budget (until [`Self::set`]) whose waits are observed in `wait`.
    pub fn new(wait: prometheus::Histogram) -> Self {
        Self { limiter: ArcSwapOption::empty(), wait: Some(wait) }
    }

    /// Budget `per_second` statements per second; 0 removes the limit.
    pub fn set(&self, per_second: u32) {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(per_second / 20).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)))
        });
        self.limiter.store(limiter);
    }

    /// Wait until `n` statements may run.
    pub async fn take(&self, n: u32) {
        let Some(limiter) = self.limiter.load_full() else { return };
        for _ in 0..n {
            if limiter.check().is_ok() {
                continue;
            }
            let start = std::time::Instant::now();
            limiter.until_ready().await;
            if let Some(h) = &self.wait {
                h.observe(start.elapsed().as_secs_f64());
            }
        }
    }
}

/// Per-peer rate limiting: a governor keyed limiter over a [`BoundedPeers`] store.
struct PeerLimiter {
    limiter: RateLimiter<PeerId, BoundedPeers, DefaultClock, NoOpMiddleware>,
    store: BoundedPeers,
    degrade_cost: NonZeroU32,
}

impl PeerLimiter {
    fn new(cfg: &LoadSection) -> Option<Self> {
        let rate = NonZeroU32::new(cfg.per_peer_requests_per_second)?;
        let burst = NonZeroU32::new(cfg.per_peer_burst).unwrap_or(rate);
        let store = BoundedPeers::new(cfg.max_tracked_peers);
        let limiter = RateLimiter::new(
            Quota::per_second(rate).allow_burst(burst),
            store.clone(),
            DefaultClock::default(),
        );
        let degrade_cost = NonZeroU32::new(cfg.degrade_per_peer_cost).unwrap_or(NonZeroU32::MIN);
        Some(Self { limiter, store, degrade_cost })
    }
}

const PEER_SHARDS: usize = 16;

/// A governor state store with a hard bound: at most `max` peers get their own bucket; while it
/// is full, peers without one share a single overflow bucket (so a flood of fresh peer IDs is
/// still rate limited, as one). Entries whose bucket is full again are pruned by `retain_recent`.
#[derive(Clone)]
struct BoundedPeers(Arc<PeerTable>);

struct PeerTable {
    shards: Sharded<HashMap<PeerId, u64>>,
    overflow: Mutex<u64>,
    len: AtomicUsize,
    per_shard: usize,
}

impl std::ops::Deref for BoundedPeers {
    type Target = PeerTable;
    fn deref(&self) -> &PeerTable {
        &self.0
    }
}

impl BoundedPeers {
    fn new(max: usize) -> Self {
        Self(Arc::new(PeerTable {
            shards: Sharded::new(PEER_SHARDS, HashMap::new),
            overflow: Mutex::new(0),
            len: AtomicUsize::new(0),
            per_shard: max.div_ceil(PEER_SHARDS).max(1),
        }))
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_full(&self) -> bool {
        self.len() >= self.per_shard * PEER_SHARDS * 9 / 10
    }
}

/// Apply a GCRA decision to one stored theoretical arrival time (0 = none yet).
fn measure<T, E>(slot: &mut u64, f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>) -> Result<T, E> {
    let prev = (*slot != 0).then(|| Nanos::from(*slot));
    let (t, next) = f(prev)?;
    *slot = u64::from(next).max(1);
    Ok(t)
}

impl StateStore for BoundedPeers {
    type Key = PeerId;

    fn measure_and_replace<T, F, E>(&self, key: &PeerId, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shards.lock_for(key);
        if let Some(slot) = shard.get_mut(key) {
            return measure(slot, f);
        }
        if shard.len() >= self.per_shard {
            drop(shard);
            return measure(&mut self.overflow.lock().unwrap_or_else(|e| e.into_inner()), f);
        }
        let mut slot = 0;
        let res = measure(&mut slot, f);
        if res.is_ok() {
            shard.insert(*key, slot);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl ShrinkableKeyedStateStore<PeerId> for BoundedPeers {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = u64::from(drop_below);
        for i in 0..PEER_SHARDS {
            let mut shard = self.shards.lock(i);
            let before = shard.len();
            shard.retain(|_, t| *t >= below);
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn len(&self) -> usize {
        BoundedPeers::len(self)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LoadSection {
        LoadSection { min_dwell: Duration::from_secs(10), exit_ratio: 0.5, ..LoadSection::default() }
    }

    fn latency(ms: f64) -> Signals {
        Signals { datastore_p99_ms: ms, ..Signals::default() }
    }

    // The controller's rule, stepped through a load episode under tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn tiers_escalate_at_once_and_step_down_with_hysteresis_and_dwell() {
        let c = cfg(); // degrade at 50 ms, refuse at 250 ms; exit at half of each
        let mut since = Instant::now();
        let mut tier = Tier::Normal;
        let step = |s: Signals, tier: &mut Tier, since: &mut Instant| {
            let next = decide(*tier, *since, Instant::now(), &s, &c);
            if next != *tier {
                *since = Instant::now();
            }
            *tier = next;
        };
        step(latency(10.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Normal);
        // A spike straight past refuse: entered at once, skipping nothing it should not.
        step(latency(300.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Refuse);
        // Back under the refuse threshold but above its exit level (125 ms): stays.
        tokio::time::advance(Duration::from_secs(60)).await;
        step(latency(200.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Refuse, "hysteresis: 200 ms is above the exit level of refuse");
        // Below the exit level, but the dwell started at the last change: one step down only
        // once the dwell has passed since entering refuse (60 s here).
        step(latency(100.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Degrade);
        // Just stepped down: even an idle datastore leaves degrade only after min_dwell.
        tokio::time::advance(Duration::from_secs(9)).await;
        step(latency(1.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Degrade, "dwell not over");
        tokio::time::advance(Duration::from_secs(1)).await;
        step(latency(1.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Normal);
        // Flapping around the degrade threshold does not flap the tier.
        for ms in [55.0, 45.0, 52.0, 30.0, 51.0, 26.0] {
            tokio::time::advance(Duration::from_secs(2)).await;
            step(latency(ms), &mut tier, &mut since);
            assert_eq!(tier, Tier::Degrade, "{ms} ms");
        }
    }

    #[test]
    fn any_signal_raises_the_tier_and_disabled_ones_never_do() {
        let c = cfg();
        let now = Instant::now();
        let full_queue = Signals { inbound_queue_fill_ratio: 0.95, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &full_queue, &c), Tier::Degrade);
        let with_peak =
            LoadSection { peak: Thresholds { rss_mib: 1000.0, ..Thresholds::default() }, ..c.clone() };
        let big = Signals { rss_mib: 1200.0, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &big, &with_peak), Tier::Peak);
        let buffer = Signals { write_buffer_fill_ratio: 0.85, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &buffer, &c), Tier::Degrade);
        let slow = Signals { pool_wait_p99_ms: 150.0, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &slow, &c), Tier::Refuse);
        // rss_mib is disabled (0) by default (and peak has no default trigger at all).
        let rss = Signals { rss_mib: 1e9, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &rss, &c), Tier::Normal);
        let forced = LoadSection { force_tier: Some(Tier::Refuse), ..c };
        assert_eq!(decide(Tier::Normal, now, now, &Signals::default(), &forced), Tier::Refuse);
    }

    #[test]
    fn window_quantiles_follow_recent_observations_only() {
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![0.001, 0.01, 0.1, 1.0]),
        )
        .unwrap();
        let mut w = Window::new(3);
        w.push(&h);
        for _ in 0..1000 {
            h.observe(0.5); // old, slow
        }
        w.push(&h);
        assert!(w.quantile(0.99) > 0.1);
        for _ in 0..100 {
            h.observe(0.005);
        }
        w.push(&h);
        w.push(&h); // the slow sample has left the 3-sample window
        let p99 = w.quantile(0.99);
        assert!(p99 > 0.001 && p99 <= 0.01, "{p99}");
        assert_eq!(Window::new(3).quantile(0.99), 0.0);
    }

    #[test]
    fn per_peer_limits_hold_and_memory_is_bounded() {
        let c = LoadSection {
            per_peer_requests_per_second: 1,
            per_peer_burst: 4,
            degrade_per_peer_cost: 4,
            max_tracked_peers: 32,
            ..LoadSection::default()
        };
        let metrics = crate::metrics::Metrics::new(&prometheus::Registry::new(), 1).load;
        let load = LoadControl::new(c, Arc::new(StatementBudget::default()), metrics);
        let p = PeerId::random();
        let allowed = (0..10).filter(|_| load.allow_peer(&p, Tier::Normal)).count();
        assert_eq!(allowed, 4, "the burst, then limited");
        let q = PeerId::random();
        assert!(load.allow_peer(&q, Tier::Degrade), "degrade: one request costs the whole burst…");
        assert!(!load.allow_peer(&q, Tier::Degrade), "…so the next one waits");
        // A flood of fresh peer IDs: the map stays bounded, the overflow bucket limits them.
        let flood: usize = (0..10_000).filter(|_| load.allow_peer(&PeerId::random(), Tier::Normal)).count();
        let store = &load.peers.load_full().unwrap().store;
        assert!(store.len() <= 32, "{} peers tracked", store.len());
        assert!(flood < 32 + 10, "{flood} requests of new peers allowed");
    }
}
