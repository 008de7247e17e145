//! The load controller: the shared [`LoadControl`] (the tier every request reads, the limits, the
//! live `[load]` settings) and the task that samples signals, decides and publishes the tier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use libp2p::PeerId;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, RateControl, RateInput, Reading, ShedControl, ShedInput};
use super::budget::StatementBudget;
use super::cpu::BusyWindow;
use super::peers::PeerLimiter;
use super::policy::Policy;
use super::signals::{rss_bytes, LagWindow, RatioWindow, SampleWindow, SignalSource, Window};
use super::tier::decide_with_lag;
use crate::config::LoadSection;
use crate::metrics::{DatastoreMetrics, DbOp, LoadMetrics, ShedReason};
use crate::types::{Signals, Tier};

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
    /// The statement budget in force (0: none): `load.datastore_statements_per_second`, or this
    /// process's share of `load.fleet_datastore_statements_per_second` if lower.
    pub statement_budget_per_second: u32,
    /// Processes with live head leases on this datastore, as last counted (1 until counted).
    pub fleet_processes: u32,
    /// New inbound streams admitted per second while the CPU is short (absent: all admitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_streams_per_second: Option<u32>,
    /// New inbound connections admitted per second while the CPU is short (0 while shedding;
    /// absent: all admitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_connections_per_second: Option<u32>,
    /// Whether the node is shedding connections.
    pub shedding_connections: bool,
    /// Whether the heads' TCP listeners are closed now (no new connection admitted: the kernel
    /// refuses dials; `load.admission_close_listeners`).
    pub listeners_closed: bool,
    /// The process's CPU used ÷ the CPU it is allowed, over the last second (`load::cpu`).
    pub cpu_busy_ratio: f64,
    /// The CPU it is allowed, cores: its cgroup's CFS quota, else the CPUs it may run on.
    pub cpu_allowance_cores: f64,
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
    /// The gate of new inbound streams, set by the controller from the runtime lag.
    admission: Arc<Admission>,
    /// Processes sharing the datastore's fleet budget (live lease holders; 1 until counted).
    fleet_processes: AtomicU32,
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
            admission: Arc::new(Admission::default()),
            fleet_processes: AtomicU32::new(1),
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

    /// The gate of new inbound streams (the muxers ask it once per stream).
    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    pub fn config(&self) -> Arc<LoadSection> {
        self.cfg.load_full()
    }

    /// Count one shed request.
    pub fn shed(&self, tier: Tier, reason: ShedReason) {
        self.metrics.shed(tier, reason);
    }

    /// What the current tier does (one atomic load).
    pub fn policy(&self) -> Policy {
        Policy::of(self.tier())
    }

    /// Whether per-peer rates apply now: only when the node is short of capacity — a tier whose
    /// policy says so, or statements waiting for the datastore budget.
    pub fn peer_limits_active(&self, tier: Tier) -> bool {
        Policy::of(tier).per_peer_limits || self.budget.is_exhausted()
    }

    /// Whether `peer` may spend `statements` more of the datastore now. Always, unless
    /// [`Self::peer_limits_active`]; then the peer is held to its fair share ([`super::peers`]).
    pub fn allow_peer(&self, peer: &PeerId, tier: Tier, statements: f64) -> bool {
        if !self.peer_limits_active(tier) {
            return true;
        }
        let Some(limiter) = &*self.peers.load() else { return true };
        limiter.check(peer, statements, limiter.now())
    }

    /// What peers share now, statements per second: the statement budget, divided by
    /// `degrade_per_peer_cost` where the tier raises the cost. Without a budget there is
    /// nothing to share and every peer gets the least share, `per_peer_requests_per_second`.
    fn available_to_peers(&self, cfg: &LoadSection, tier: Tier) -> f64 {
        let budget = self.budget_for(cfg);
        if budget == 0 {
            return f64::from(cfg.per_peer_requests_per_second);
        }
        let cost = if Policy::of(tier).raised_peer_cost { cfg.degrade_per_peer_cost.max(1) } else { 1 };
        f64::from(budget) / f64::from(cost)
    }

    /// The per-peer share in force, statements per second (None: limits not active or off).
    pub fn peer_share(&self) -> Option<f64> {
        let share = self.peers.load().as_ref()?.share();
        share.is_finite().then_some(share)
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

    /// This process's statement budget under `cfg`: its own ceiling, or its share of the
    /// fleet's if lower (0: unlimited).
    fn budget_for(&self, cfg: &LoadSection) -> u32 {
        let own = cfg.datastore_statements_per_second;
        let fleet = cfg.fleet_datastore_statements_per_second;
        if fleet == 0 {
            return own;
        }
        let share = (fleet / self.fleet_processes.load(Ordering::Relaxed).max(1)).max(1);
        if own == 0 {
            share
        } else {
            own.min(share)
        }
    }

    /// `n` processes hold live head leases on this datastore (counted by the lease heartbeat):
    /// re-split the fleet's statement budget.
    pub fn set_fleet_processes(&self, n: u32) {
        let n = n.max(1);
        if self.fleet_processes.swap(n, Ordering::Relaxed) != n {
            let cfg = self.config();
            let budget = self.budget_for(&cfg);
            tracing::info!(processes = n, statements_per_second = budget, "fleet statement budget re-split");
            self.budget.set(budget);
        }
    }

    fn apply(&self, cfg: LoadSection) {
        self.budget.set(self.budget_for(&cfg));
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
            statement_budget_per_second: self.budget_for(&load),
            fleet_processes: self.fleet_processes.load(Ordering::Relaxed),
            admission_streams_per_second: self.admission.limit(),
            admission_connections_per_second: self.admission.connection_limit(),
            // Not a connection limit of 0: that is also a limited node without room yet.
            shedding_connections: self.metrics.shedding_connections.get() == 1,
            listeners_closed: !self.admission.listeners_open(),
            cpu_busy_ratio: self.metrics.cpu_busy.get(),
            cpu_allowance_cores: self.metrics.cpu_allowance.get(),
            load,
        })
    }

    /// Set the admitted rate of new streams from this sample (or the forced rate), then what
    /// connections are shed and admitted.
    fn set_admission_rate(
        &self,
        control: &mut (RateControl, ShedControl),
        last: &mut (Instant, (u64, u64, u64, u64)),
        (served, late): (u64, u64),
        s: &Signals,
        cfg: &LoadSection,
    ) {
        let (rate, shed) = control;
        let now = Instant::now();
        let (offered, admitted) = self.admission.counts();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let per_s = |n: u64, before: u64| n.saturating_sub(before) as f64 / secs;
        let reading = Reading {
            lag_ms: s.runtime_lag_ms,
            target_ms: cfg.admission_lag_ms,
            exit_ratio: cfg.exit_ratio,
            offered_per_s: per_s(offered, last.1 .0),
            samples_per_s: 1.0 / cfg.sample_interval.as_secs_f64(),
        };
        let input = RateInput {
            reading,
            admitted_per_s: per_s(admitted, last.1 .1),
            served_per_s: per_s(served, last.1 .2),
            late_per_s: per_s(late, last.1 .3),
            floor: f64::from(cfg.admission_min_streams_per_second),
        };
        *last = (now, (offered, admitted, served, late));
        let limit = match cfg.force_admission_per_second {
            Some(r) => {
                *rate = RateControl::default(); // computed afresh once unpinned
                Some(r)
            }
            None => rate.step(&input),
        };
        match (self.admission.limit(), limit) {
            (None, Some(r)) => tracing::warn!(
                lag_ms = s.runtime_lag_ms,
                "CPU short: new inbound streams admitted at {r}/s, the rest reset"
            ),
            (Some(_), None) => tracing::info!("admission open: every new inbound stream admitted"),
            _ => {}
        }
        self.admission.set(limit);
        self.metrics.admission_rate.set(limit.map(i64::from).unwrap_or(-1));

        let was_shedding = shed.shedding();
        let step = shed.step(&ShedInput {
            reading,
            rate: limit.map(f64::from),
            capacity: rate.capacity(),
            shed_ratio: cfg.admission_shed_ratio,
            connections_per_s: cfg.admission_connections_per_second,
        });
        if let Some(keep) = step.cut {
            tracing::warn!(
                offered_per_s = reading.offered_per_s.round(),
                admitted_per_s = limit.unwrap_or(0),
                "CPU short and most new streams reset: shedding connections, each inbound connection \
                 kept with probability {keep:.2}, new ones refused"
            );
            self.admission.cut_connections(keep);
        }
        if was_shedding && !shed.shedding() {
            self.admission.end_cut();
            tracing::info!("connection shedding over: no more connections closed; new ones admitted by rate once there is room");
        }
        self.admission.set_connections(step.connections);
        self.admission.set_listeners(!(cfg.admission_close_listeners && step.connections == Some(0)));
        self.metrics.admission_connection_rate.set(step.connections.map(i64::from).unwrap_or(-1));
        self.metrics.shedding_connections.set(i64::from(shed.shedding()));
    }

    /// The controller: sample, decide, publish, until cancelled.
    pub async fn run(
        self: Arc<Self>,
        datastore: DatastoreMetrics,
        source: Arc<dyn SignalSource>,
        cancel: CancellationToken,
    ) {
        const LATENCY_OPS: [DbOp; 4] =
            [DbOp::GetProviders, DbOp::PutProviders, DbOp::GetValue, DbOp::PutValue];
        let mut cfg = self.config();
        let slots =
            |c: &LoadSection| (c.window.as_secs_f64() / c.sample_interval.as_secs_f64()).ceil() as usize + 1;
        let mut windows: Vec<Window> = LATENCY_OPS.iter().map(|_| Window::new(slots(&cfg))).collect();
        // Sample intervals a latency signal leaves out (`load.latency_stall_tolerance`).
        let stall = |c: &LoadSection| {
            (c.latency_stall_tolerance.as_secs_f64() / c.sample_interval.as_secs_f64()).ceil() as usize
        };
        let mut pool_wait = Window::new(slots(&cfg));
        let mut errors = RatioWindow::new(slots(&cfg));
        // The lag signal reacts within a second: CPU overload builds up in seconds, not windows.
        let lag_slots = |c: &LoadSection| (1.0 / c.sample_interval.as_secs_f64()).ceil() as usize + 1;
        let mut lag = LagWindow::new(lag_slots(&cfg));
        // So does the CPU's busy share: the last second's.
        let mut busy = BusyWindow::new(lag_slots(&cfg));
        // The lag of each sample over the latency window: the tier asks whether the CPU was
        // short at any time the datastore latencies cover.
        let mut recent_lag = SampleWindow::new(slots(&cfg));
        // Queue fills count when held for that second too (`SampleWindow::lowest`): write buffer, reads
        // in flight, intake.
        let mut fills: [SampleWindow; 3] = std::array::from_fn(|_| SampleWindow::new(lag_slots(&cfg)));
        let mut rate = (RateControl::default(), ShedControl::default());
        let mut streams = {
            let (offered, admitted) = self.admission.counts();
            (Instant::now(), (offered, admitted, source.requests_served(), source.streams_reset_late()))
        };
        let mut since = Instant::now();
        let mut last = self.tier();
        let mut last_prune = Instant::now();
        loop {
            for (w, op) in windows.iter_mut().zip(LATENCY_OPS) {
                w.push(&datastore.duration.with_label_values(&[op.as_str()]));
            }
            pool_wait.push(&datastore.pool_wait);
            // Failed / all hot-path operations (every call is timed, failed ones too).
            let hot = [DbOp::GetProviders, DbOp::PutProviders].map(|op| op.as_str());
            errors.push(
                hot.iter().map(|op| datastore.errors.with_label_values(&[op]).get()).sum(),
                hot.iter().map(|op| datastore.duration.with_label_values(&[op]).get_sample_count()).sum(),
            );
            lag.push(self.metrics.runtime_lag.get_sample_count());
            busy.push();
            for (w, queue) in fills.iter_mut().zip([
                source.write_buffer(),
                source.reads_in_flight(),
                source.inbound_queue(),
            ]) {
                w.push_fill(queue);
            }
            let latency: HashMap<&'static str, LatencyPair> = windows
                .iter()
                .zip(LATENCY_OPS)
                .map(|(w, op)| {
                    (op.as_str(), LatencyPair { p95: w.quantile(0.95) * 1e3, p99: w.quantile(0.99) * 1e3 })
                })
                .collect();
            let stall_intervals = stall(&cfg);
            let s = Signals {
                // The tier follows the latency clients wait for: lookups. Writes are buffered
                // (nobody waits for a batch), so a slow one is no distress by itself — on the
                // embedded store every WAL checkpoint makes one batch slow, and that sent an idle
                // node into `degrade`; a write backlog shows as `write_buffer_fill_ratio`, failed
                // writes as `datastore_error_ratio`. Write and value latencies are shown in
                // `/v1/status`. Windows with too few operations to have a p99 signal nothing.
                datastore_p99_ms: windows[0].signal(0.99, cfg.min_latency_samples, stall_intervals) * 1e3,
                pool_wait_p99_ms: pool_wait.signal(0.99, cfg.min_latency_samples, stall_intervals) * 1e3,
                datastore_error_ratio: errors.ratio(cfg.min_latency_samples),
                write_buffer_fill_ratio: fills[0].lowest(),
                reads_in_flight_ratio: fills[1].lowest(),
                inbound_queue_fill_ratio: fills[2].lowest(),
                rss_mib: rss_bytes("self").map(|b| b as f64 / (1024.0 * 1024.0)).unwrap_or(0.0),
                runtime_lag_ms: lag.mean_lag_ms(),
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
                    errors.len = slots(&new_cfg).max(2);
                    recent_lag.len = slots(&new_cfg).max(1);
                    lag.len = lag_slots(&new_cfg).max(2);
                    busy.cpu.len = lag_slots(&new_cfg).max(2);
                    for w in &mut fills {
                        w.len = lag_slots(&new_cfg);
                    }
                }
                cfg = new_cfg;
            }
            if cur != last {
                since = now; // changed by a reload (force_tier)
            }
            recent_lag.push(s.runtime_lag_ms);
            let next = decide_with_lag(cur, since, now, &s, &cfg, recent_lag.highest());
            // Only from `cur`: a reload that moved the tier meanwhile wins, and is seen next time.
            if next != cur && self.transition(Some(cur), next, &s) {
                since = now;
            }
            last = next;
            let counts = (source.requests_served(), source.streams_reset_late());
            self.set_admission_rate(&mut rate, &mut streams, counts, &s, &cfg);
            self.metrics.set_signals(&s);
            self.metrics.cpu_busy.set(busy.busy());
            self.metrics.cpu_allowance.set(busy.allowance());
            if let Some(p) = &*self.peers.load() {
                let tier = self.tier();
                let share = p.update_share(
                    self.available_to_peers(&cfg, tier),
                    self.peer_limits_active(tier),
                    p.now(),
                );
                self.metrics.peer_share.set(if share.is_finite() { share } else { -1.0 });
                if now.duration_since(last_prune) >= Duration::from_secs(10) || p.store.is_full() {
                    p.prune();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_limits_apply_only_under_contention_and_memory_is_bounded() {
        let c = LoadSection {
            per_peer_requests_per_second: 1,
            per_peer_burst: 4,
            max_tracked_peers: 32,
            datastore_statements_per_second: 40,
            ..LoadSection::default()
        };
        let metrics = crate::metrics::Metrics::new(&prometheus::Registry::new(), 1).load;
        let load = LoadControl::new(c.clone(), Arc::new(StatementBudget::default()), metrics);
        let p = PeerId::random();
        let allowed = (0..1000).filter(|_| load.allow_peer(&p, Tier::Normal, 1.0)).count();
        assert_eq!(allowed, 1000, "normal tier, budget not exhausted: no peer is limited");
        assert_eq!(load.available_to_peers(&c, Tier::Normal), 40.0);
        assert_eq!(load.available_to_peers(&c, Tier::Degrade), 10.0, "÷ degrade_per_peer_cost");
        // Contention: the share is set; a flood of fresh peer IDs keeps the map bounded and the
        // overflow bucket limits them.
        let limiter = load.peers.load_full().unwrap();
        limiter.update_share(1.0, true, limiter.now());
        assert_eq!(load.peer_share(), Some(1.0));
        let flood: usize =
            (0..10_000).filter(|_| load.allow_peer(&PeerId::random(), Tier::Refuse, 1.0)).count();
        assert!(limiter.store.len() <= 32, "{} peers tracked", limiter.store.len());
        assert!(flood < 32 + 10, "{flood} requests of new peers allowed");
    }
}
