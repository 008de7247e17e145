//! `[load]`: tiers, rate limits and the datastore statement budget — the one section reloaded
//! without a restart — with its defaults and its validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::{invalid, nonzero_duration, positive, ConfigError};
use crate::types::{Thresholds, Tier};

/// Load tiers, rate limits and the datastore statement budget (see `src/load.rs`). The only
/// section reloaded without a restart: on SIGHUP and `POST /v1/config/reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadSection {
    /// How often the signals are sampled and the tier recomputed.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Latency signals are percentiles over this recent window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A tier is held at least this long before the node steps down from it.
    #[serde(with = "humantime_serde")]
    pub min_dwell: Duration,
    /// A tier is left only when every signal is below `exit_ratio` × its threshold for that tier.
    pub exit_ratio: f64,
    /// Latency signals (datastore and pool-wait p99) and the datastore error ratio count only over windows holding at least
    /// this many operations: a p99 of a few is their maximum (one cold connection), and so few
    /// requests cannot overload the datastore. 0: every window counts.
    pub min_latency_samples: u64,
    /// Latency signals leave out the worst span of this length in their window: one stall of the
    /// datastore (a WAL checkpoint's fsync; every reader blocked for a moment) sheds nothing,
    /// latency lasting longer does. Less than half of `window`; 0: nothing left out.
    #[serde(with = "humantime_serde")]
    pub latency_stall_tolerance: Duration,
    /// Pin the tier ("normal", "degrade", "refuse", "peak") instead of computing it: for
    /// emergencies and drills. Absent: computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_tier: Option<Tier>,
    /// Hard ceiling on datastore statements per second issued by this process for requests
    /// (flushes: 2 per batch; lookups and value operations: 1). Statements wait for it; 0: no limit.
    pub datastore_statements_per_second: u32,
    /// Ceiling on datastore statements per second for the whole fleet sharing this datastore,
    /// split evenly among the processes holding live head leases (each process takes
    /// fleet / live processes, re-counted at every lease heartbeat; with
    /// `datastore_statements_per_second` also set, the lower of the two). 0: no fleet ceiling.
    /// Set it to the database's capacity once, the same in every process.
    pub fleet_datastore_statements_per_second: u32,
    /// Per-peer limits apply only while the node is short of capacity; then every peer gets a
    /// fair share of the datastore statements available (the statement budget, ÷
    /// `degrade_per_peer_cost` from `degrade` up), re-computed every sample so that a peer asking
    /// less leaves the rest to the others and a lone peer may take it all. This is the least
    /// share, statements per second over all heads, however many peers ask (and every peer's
    /// share when there is no statement budget); 0: no per-peer limits. A lookup (GET_PROVIDERS
    /// missing the cache, GET_VALUE, PUT_VALUE) costs 1 statement, an ADD_PROVIDER its part of
    /// a flush (2 / `providers.flush_batch`); cached answers are free.
    pub per_peer_requests_per_second: u32,
    /// Statements one peer may spend in a burst (at most one second of its share).
    pub per_peer_burst: u32,
    /// In `degrade` and above peers share the statement budget divided by this.
    pub degrade_per_peer_cost: u32,
    /// Peers with their own rate bucket (memory bound); beyond it new peers share one bucket.
    pub max_tracked_peers: usize,
    /// In `degrade`, an ADD_PROVIDER refreshing a record this process wrote that still has more
    /// than this long to live is acknowledged without a write.
    #[serde(with = "humantime_serde")]
    pub degrade_skip_refresh_if_remaining: Duration,
    /// An inbound kad stream that waited longer than this for a stream task is reset instead of
    /// served late; this bounds queueing delay whatever the offered load.
    #[serde(with = "humantime_serde")]
    pub stream_queue_max_wait: Duration,
    /// The runtime lag (ms, the mean delay of a 5 ms timer over the last second) that admission
    /// by rate holds the node at: at or above it new inbound streams are admitted by rate — the
    /// rate found by additive increase, multiplicative decrease on the lag — and the rest reset
    /// at once. Lower than `degrade.runtime_lag_ms`: every request waits about this long for a
    /// worker, so it bounds latency (measured under a CPU quota, `docs/benchmarks.md`: a mean lag
    /// of 4 ms went with a GET_PROVIDERS p99 of 30 ms, 10 ms with 150 ms). 0: no admission by
    /// rate.
    pub admission_lag_ms: f64,
    /// Admission by rate never admits fewer new streams than this per second.
    pub admission_min_streams_per_second: u32,
    /// Pin the admitted rate of new inbound streams (streams/s; 0 resets every new stream)
    /// instead of computing it: for drills and measurements. Absent: computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_admission_per_second: Option<u32>,
    /// While the CPU is short and more than this many new streams are offered per admitted one
    /// (2: more than half are reset), the node sheds connections: it closes a share of its
    /// inbound connections and refuses new ones before their handshake, so that a reset stream's
    /// transport work does not eat the CPU. 0: never.
    pub admission_shed_ratio: f64,
    /// While the CPU is short (new streams admitted by rate) but not shedding, new inbound
    /// connections are admitted at this rate and the rest refused before their handshake
    /// (without room, a tenth of it; 0: none while the CPU is short).
    pub admission_connections_per_second: u32,
    /// While no new inbound connection is admitted at all (shedding, or the CPU short without
    /// room), each head closes its TCP listeners, so the kernel refuses a new dial at once (a
    /// reset: one round trip, nothing spent by the node), and binds them again on the same
    /// address and port once connections are admitted again. A TCP probe of a head's port fails
    /// meanwhile: probe the operator API instead. false: such dials are accepted and closed before
    /// their handshake. QUIC is not affected (refused before its handshake either way).
    pub admission_close_listeners: bool,
    /// Thresholds to enter `degrade`, `refuse` and `peak` (0 disables a signal).
    pub degrade: Thresholds,
    pub refuse: Thresholds,
    pub peak: Thresholds,
}

impl Default for LoadSection {
    fn default() -> Self {
        let [degrade, refuse, peak] = default_thresholds();
        Self {
            sample_interval: Duration::from_millis(250),
            window: Duration::from_secs(10),
            min_dwell: Duration::from_secs(15),
            exit_ratio: 0.7,
            min_latency_samples: 100,
            latency_stall_tolerance: Duration::from_secs(2),
            force_tier: None,
            datastore_statements_per_second: 2000,
            fleet_datastore_statements_per_second: 0,
            per_peer_requests_per_second: 5,
            per_peer_burst: 400,
            degrade_per_peer_cost: 4,
            max_tracked_peers: 100_000,
            degrade_skip_refresh_if_remaining: Duration::from_secs(24 * 3600),
            stream_queue_max_wait: Duration::from_millis(25),
            admission_lag_ms: 6.0,
            admission_min_streams_per_second: 100,
            force_admission_per_second: None,
            admission_shed_ratio: 2.0,
            admission_connections_per_second: 20,
            admission_close_listeners: true,
            degrade,
            refuse,
            peak,
        }
    }
}

impl LoadSection {
    /// Check the section; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero_duration("load.sample_interval", self.sample_interval)?;
        nonzero_duration("load.min_dwell", self.min_dwell)?;
        nonzero_duration("load.stream_queue_max_wait", self.stream_queue_max_wait)?;
        if self.window < self.sample_interval * 2 {
            return Err(invalid("load.window", "must be at least two sample intervals"));
        }
        if self.latency_stall_tolerance * 2 >= self.window {
            return Err(invalid("load.latency_stall_tolerance", "must be less than half of load.window"));
        }
        if !(self.exit_ratio > 0.0 && self.exit_ratio < 1.0) {
            return Err(invalid(
                "load.exit_ratio",
                format!("must be between 0 and 1, got {}", self.exit_ratio),
            ));
        }
        if !(self.admission_lag_ms.is_finite() && self.admission_lag_ms >= 0.0) {
            return Err(invalid(
                "load.admission_lag_ms",
                format!("must be 0 (no admission by rate) or more, got {}", self.admission_lag_ms),
            ));
        }
        let r = self.admission_shed_ratio;
        if !(r == 0.0 || (r.is_finite() && r > 1.0)) {
            return Err(invalid(
                "load.admission_shed_ratio",
                format!("must be 0 (never shed connections) or above 1, got {r}"),
            ));
        }
        positive("load.max_tracked_peers", self.max_tracked_peers)?;
        positive("load.degrade_per_peer_cost", self.degrade_per_peer_cost as usize)?;
        positive("load.per_peer_burst", self.per_peer_burst as usize)?;
        let tiers = [("degrade", &self.degrade), ("refuse", &self.refuse), ("peak", &self.peak)];
        for (tier, t) in tiers {
            for (signal, v) in t.values() {
                let bad = !v.is_finite() || v < 0.0 || (signal.ends_with("_ratio") && v > 1.0);
                if bad {
                    return Err(ConfigError::Field {
                        field: format!("load.{tier}.{signal}"),
                        reason: format!(
                            "must be {}, got {v}",
                            if signal.ends_with("_ratio") { "between 0 and 1" } else { "0 or more" }
                        ),
                    });
                }
            }
        }
        // A higher tier must not be entered before a lower one on the same signal.
        for pair in tiers.windows(2) {
            let ((lo_name, lo), (hi_name, hi)) = (pair[0], pair[1]);
            for ((signal, l), (_, h)) in lo.values().into_iter().zip(hi.values()) {
                if l > 0.0 && h > 0.0 && h < l {
                    return Err(ConfigError::Field {
                        field: format!("load.{hi_name}.{signal}"),
                        reason: format!("{h} is below load.{lo_name}.{signal} = {l}"),
                    });
                }
            }
        }
        Ok(())
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
            // 5 % of lookups and writes failing: read less (cache first). Not a reason to
            // refuse: failed writes stay buffered and are retried, refused ones would be lost.
            datastore_error_ratio: 0.05,
            rss_mib: 0.0,
            // The CPU is short: every task waits this long (mean) for a worker (admission by rate
            // holds the lag lower, at `admission_lag_ms`, when it can). Not a reason to refuse:
            // answering with less costs the CPU about as much as a real answer.
            runtime_lag_ms: 20.0,
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
