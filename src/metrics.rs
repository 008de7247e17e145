//! Prometheus metrics. One struct per subsystem, registered into a [`Registry`] passed by handle
//! (no global statics). Names follow `hydra_<subsystem>_<thing>_<unit>`; label values come only from
//! fixed enums or the head index, never from a peer ID or a key. Every label series is created up
//! front so dashboards show zeros rather than gaps.
//!
//! Label enums are in `metrics/labels.rs`, the HyperLogLog of distinct peers in
//! `metrics/unique.rs`. Metrics depend only on configuration and [`crate::types`]; every other
//! subsystem records into the struct it is handed.

mod labels;
mod unique;

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub use labels::{
    CacheResult, DbOp, Outcome, ShedReason, StreamEvent, DISCOVERY_REQUESTS, LOOKUP_ENDS, TABLE_CHANGES,
};
pub use unique::UniquePeers;

use crate::config::LoadSection;
use crate::types::{MessageType, Signals, Tier};

/// All of the node's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub kad: KadMetrics,
    pub datastore: DatastoreMetrics,
    pub providers: ProviderMetrics,
    pub heads: HeadMetrics,
    pub routing_table: RoutingTableMetrics,
    pub discovery: DiscoveryMetrics,
    pub load: LoadMetrics,
    pub routing_api: RoutingApiMetrics,
    /// Heap profiles written because memory ran high (`profiles.rs`).
    pub heap_profiles: IntCounter,
    /// The allocator's own accounting (jemalloc `stats.*`), set on each scrape.
    pub allocator: IntGaugeVec,
}

/// The Delegated Routing V1 listener (`routing_listen`).
#[derive(Clone)]
pub struct RoutingApiMetrics {
    /// Answered requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Requests (or connections) refused by a limit, by reason: `rate`, `concurrency`,
    /// `connections`, `timeout`, `body_too_large`, `shed` (the load tier, a read deadline or a
    /// failing datastore: also in `hydra_load_shed_total`).
    pub refused: IntCounterVec,
    /// Time to answer, by endpoint.
    pub duration: HistogramVec,
    /// Open connections.
    pub connections: IntGauge,
}

impl RoutingApiMetrics {
    /// The endpoints, as labels.
    pub const ENDPOINTS: [&'static str; 6] =
        ["providers", "peers", "closest_peers", "ipns_get", "ipns_put", "other"];
    pub const REFUSALS: [&'static str; 6] =
        ["rate", "concurrency", "connections", "timeout", "body_too_large", "shed"];

    fn new(registry: &Registry) -> Self {
        let m = Self {
            requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "hydra_routing_api_requests_total",
                        "Delegated Routing V1 answers by endpoint and status code",
                    ),
                    &["endpoint", "code"],
                )
                .unwrap(),
            ),
            refused: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "hydra_routing_api_refused_total",
                        "Delegated Routing V1 requests or connections refused by a limit, by reason",
                    ),
                    &["reason"],
                )
                .unwrap(),
            ),
            duration: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "hydra_routing_api_request_duration_seconds",
                        "Time to answer one Delegated Routing V1 request, by endpoint",
                    )
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
                    &["endpoint"],
                )
                .unwrap(),
            ),
            connections: reg(
                registry,
                IntGauge::new("hydra_routing_api_connections", "Open Delegated Routing V1 connections")
                    .unwrap(),
            ),
        };
        for e in Self::ENDPOINTS {
            for code in ["200", "400", "503"] {
                m.requests.with_label_values(&[e, code]);
            }
            m.duration.with_label_values(&[e]);
        }
        for r in Self::REFUSALS {
            m.refused.with_label_values(&[r]);
        }
        m
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.with_label_values(&[reason]).inc();
    }
}

#[derive(Clone)]
pub struct LoadMetrics {
    /// The current tier (0 normal, 1 degrade, 2 refuse, 3 peak).
    pub tier: IntGauge,
    /// Tier changes, by the tier entered.
    pub transitions: IntCounterVec,
    /// Every shed request by tier and reason, pre-created: `[tier][reason]`.
    shed_series: Arc<Vec<Vec<IntCounter>>>,
    pub signals: GaugeVec,
    pub thresholds: GaugeVec,
    pub tracked_peers: IntGauge,
    /// The per-peer fair share of the datastore, statements/s (-1: no limit in force).
    pub peer_share: Gauge,
    /// Time statements waited for the datastore statement budget.
    pub budget_wait: Histogram,
    /// `[load]` reloads by result.
    pub reloads: IntCounterVec,
    /// The lag probe: how much later than due a 5 ms timer's task ran.
    pub runtime_lag: Histogram,
    /// New inbound streams admitted per second while admission limits them; -1 while every
    /// stream is admitted.
    pub admission_rate: IntGauge,
    /// New inbound connections admitted per second while the CPU is short (0 while shedding
    /// connections); -1 while every connection is admitted.
    pub admission_connection_rate: IntGauge,
    /// 1 while the node sheds connections.
    pub shedding_connections: IntGauge,
    /// The process's CPU used ÷ allowed over the last second, and the allowance (cores).
    pub cpu_busy: Gauge,
    pub cpu_allowance: Gauge,
}

impl LoadMetrics {
    pub fn shed(&self, tier: Tier, reason: ShedReason) {
        let r = ShedReason::ALL.iter().position(|x| *x == reason).unwrap_or(0);
        if let Some(c) = self.shed_series.get(tier as usize).and_then(|t| t.get(r)) {
            c.inc();
        }
    }

    pub fn set_signals(&self, s: &Signals) {
        for (name, v) in s.values() {
            self.signals.with_label_values(&[name]).set(v);
        }
    }

    pub fn set_thresholds(&self, cfg: &LoadSection) {
        for (tier, t) in [("degrade", &cfg.degrade), ("refuse", &cfg.refuse), ("peak", &cfg.peak)] {
            for (name, v) in t.values() {
                self.thresholds.with_label_values(&[tier, name]).set(v);
            }
        }
    }
}

#[derive(Clone)]
pub struct KadMetrics {
    /// Requests by message type and outcome (all heads: per-head series would be ~30 per head,
    /// 300,000 at 10,000 heads).
    pub requests: IntCounterVec,
    /// The `requests` series by message type × outcome (see [`KadMetrics::request`]).
    request_series: Arc<Vec<IntCounter>>,
    /// Requests per head (one series per head: which head serves, which is cut off).
    head_requests: Arc<Vec<IntCounter>>,
    /// Time from a decoded request to its reply written, by message type.
    pub request_duration: HistogramVec,
    /// Time from a stream's arrival in the intake to its first reply written, by message type:
    /// the queueing a request meets inside the node (dispatch, request slot, read, serve, write).
    pub stream_sojourn: HistogramVec,
    /// Inbound stream events.
    pub streams: IntCounterVec,
    /// Inbound kad streams open now (idle or serving a request).
    pub active_streams: IntGauge,
    /// Requests holding a request slot now (`limits.max_concurrent_requests`).
    pub requests_in_flight: IntGauge,
    /// Inbound connections refused at `limits.max_connections_per_ip`.
    pub connections_denied: IntCounter,
    /// Inbound connections closed by connection shedding (the CPU is short).
    pub connections_shed: IntCounter,
    /// New inbound connections refused before their handshake because the CPU is short
    /// (shedding, or over the admitted connection rate).
    pub connections_refused: IntCounter,
    /// TCP listeners closed now, and times one was closed, because no new inbound connection is
    /// admitted (the kernel refuses dials meanwhile: `load.admission_close_listeners`).
    pub listeners_closed: IntGauge,
    pub listener_closes: IntCounter,
    /// Times a closed listener could not be bound again (its port taken; retried every second).
    pub listener_reopen_failures: IntCounter,
    /// Peers (providers or closer peers) left out of replies to keep them within
    /// `limits.max_reply_bytes`.
    pub reply_peers_trimmed: IntCounter,
    /// Distinct peers that opened a kad stream (estimate), and its gauge.
    pub unique: Arc<UniquePeers>,
    pub unique_peers: Gauge,
}

#[derive(Clone)]
pub struct DatastoreMetrics {
    pub duration: HistogramVec,
    pub errors: IntCounterVec,
    /// Time spent waiting for a pooled connection.
    pub pool_wait: Histogram,
    pub pool_connections: IntGauge,
    pub pool_in_use: IntGauge,
    pub pool_waiting: IntGauge,
}

#[derive(Clone)]
pub struct ProviderMetrics {
    pub write_buffer_entries: IntGauge,
    pub flush_rows: Histogram,
    pub flushes_failed: IntCounter,
    pub shed: IntCounterVec,
    pub reads_in_flight: IntGauge,
    pub gc_deleted_rows: IntCounter,
    /// 1 while this process holds the fleet's garbage-collection lease.
    pub gc_leader: IntGauge,
    /// Unix time of this process's last completed GC round.
    pub gc_last_run: Gauge,
    pub cache: IntCounterVec,
    pub records_estimate: Gauge,
    pub peers_estimate: Gauge,
    /// `degrade`: ADD_PROVIDER refreshes acknowledged without a write.
    pub refreshes_skipped: IntCounter,
    /// Bytes held by each byte-budgeted part (`provider_cache`, `write_buffer`, `address_book`,
    /// `recent_writes`), set on each scrape, and each part's budget, set at start.
    pub memory: IntGaugeVec,
    pub memory_limit: IntGaugeVec,
}

#[derive(Clone)]
pub struct HeadMetrics {
    pub connections: IntGaugeVec,
    /// 1 while the head's swarm task runs.
    pub up: IntGaugeVec,
}

/// The process-wide routing table (`net/table.rs`), which every head answers from.
#[derive(Clone)]
pub struct RoutingTableMetrics {
    pub peers: IntGauge,
    /// Bytes charged for the table's entries, and `routing.max_bytes`.
    pub bytes: IntGauge,
    pub max_bytes: IntGauge,
    /// Updates by what they did: inserted, updated, evicted (at a bound, for a peer closer to a
    /// head), refused (at a bound, farther than every kept peer), expired, unreachable, ignored,
    /// dropped_update (the feed was full).
    pub changes: IntCounterVec,
}

impl RoutingTableMetrics {
    fn new(registry: &Registry) -> Self {
        let changes = reg(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "hydra_routing_table_changes_total",
                    "Updates of the process-wide routing table, by what they did",
                ),
                &["change"],
            )
            .unwrap(),
        );
        for c in TABLE_CHANGES {
            changes.with_label_values(&[c]);
        }
        Self {
            peers: reg(
                registry,
                IntGauge::new(
                    "hydra_routing_table_peers",
                    "Peers in the process-wide routing table (all heads)",
                )
                .unwrap(),
            ),
            bytes: reg(
                registry,
                IntGauge::new("hydra_routing_table_bytes", "Bytes charged for the routing table's entries")
                    .unwrap(),
            ),
            max_bytes: reg(
                registry,
                IntGauge::new("hydra_routing_table_max_bytes", "routing.max_bytes").unwrap(),
            ),
            changes,
        }
    }
}

/// The process's own lookups (`net/discovery.rs`).
#[derive(Clone)]
pub struct DiscoveryMetrics {
    /// Lookups by how they ended ([`LOOKUP_ENDS`]).
    pub lookups: IntCounterVec,
    /// FIND_NODE requests the lookups sent, by result ([`DISCOVERY_REQUESTS`]).
    pub requests: IntCounterVec,
    /// Lookups running now.
    pub in_flight: IntGauge,
    /// Lookups not started because `routing.max_lookups_in_flight` were running.
    pub skipped: IntCounter,
}

impl DiscoveryMetrics {
    fn new(registry: &Registry) -> Self {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = reg(registry, IntCounterVec::new(Opts::new(name, help), &["result"]).unwrap());
            for l in labels {
                c.with_label_values(&[l]);
            }
            c
        };
        Self {
            lookups: counter_vec(
                "hydra_discovery_lookups_total",
                "Lookups of a head's own ID, from its identity, by how they ended",
                &LOOKUP_ENDS,
            ),
            requests: counter_vec(
                "hydra_discovery_requests_total",
                "FIND_NODE requests sent by the process's lookups, by result",
                &DISCOVERY_REQUESTS,
            ),
            in_flight: reg(
                registry,
                IntGauge::new("hydra_discovery_lookups_in_flight", "Lookups running now").unwrap(),
            ),
            skipped: reg(
                registry,
                IntCounter::new(
                    "hydra_discovery_lookups_skipped_total",
                    "Lookups not started because routing.max_lookups_in_flight were running",
                )
                .unwrap(),
            ),
        }
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    /// Create and register every metric, with label series for `heads` heads.
    pub fn new(registry: &Registry, heads: usize) -> Self {
        let requests = reg(
            registry,
            IntCounterVec::new(
                Opts::new("hydra_kad_requests_total", "Inbound DHT requests by type and outcome (all heads)"),
                &["type", "outcome"],
            )
            .unwrap(),
        );
        let request_duration = reg(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "hydra_kad_request_duration_seconds",
                    "Time to serve one inbound DHT request, by message type",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                &["type"],
            )
            .unwrap(),
        );
        let stream_sojourn = reg(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "hydra_kad_stream_sojourn_seconds",
                    "Time from an inbound stream's arrival in the intake to its first reply written, by message type",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                &["type"],
            )
            .unwrap(),
        );
        let streams = reg(
            registry,
            IntCounterVec::new(Opts::new("hydra_kad_streams_total", "Inbound kad stream events"), &["event"])
                .unwrap(),
        );
        let active_streams = reg(
            registry,
            IntGauge::new(
                "hydra_kad_active_streams",
                "Inbound kad streams open now, idle or serving a request",
            )
            .unwrap(),
        );
        let reply_peers_trimmed = reg(
            registry,
            IntCounter::new(
                "hydra_kad_reply_peers_trimmed_total",
                "Providers and closer peers left out of replies to keep them within limits.max_reply_bytes",
            )
            .unwrap(),
        );
        let connections_denied = reg(
            registry,
            IntCounter::new(
                "hydra_kad_connections_denied_total",
                "Inbound connections refused because their IP address had limits.max_connections_per_ip",
            )
            .unwrap(),
        );
        let connections_shed = reg(
            registry,
            IntCounter::new(
                "hydra_kad_connections_shed_total",
                "Inbound connections closed because the node sheds connections while its CPU is short",
            )
            .unwrap(),
        );
        let connections_refused = reg(
            registry,
            IntCounter::new(
                "hydra_kad_connections_refused_total",
                "New inbound connections refused before their handshake because the CPU is short",
            )
            .unwrap(),
        );
        let listeners_closed = reg(
            registry,
            IntGauge::new(
                "hydra_kad_listeners_closed",
                "TCP listeners closed now because no new inbound connection is admitted (the kernel refuses dials)",
            )
            .unwrap(),
        );
        let listener_closes = reg(
            registry,
            IntCounter::new(
                "hydra_kad_listener_closes_total",
                "Times a TCP listener was closed because no new inbound connection was admitted",
            )
            .unwrap(),
        );
        let listener_reopen_failures = reg(
            registry,
            IntCounter::new(
                "hydra_kad_listener_reopen_failures_total",
                "Times a closed TCP listener could not be bound again on its address (retried every second)",
            )
            .unwrap(),
        );
        let requests_in_flight = reg(
            registry,
            IntGauge::new(
                "hydra_kad_requests_in_flight",
                "Inbound kad requests holding one of limits.max_concurrent_requests slots now",
            )
            .unwrap(),
        );
        // Every (type, outcome) series and every head's series, created up front and kept, so
        // counting a request is an index, not a label lookup.
        let request_series: Vec<IntCounter> = MessageType::ALL
            .iter()
            .flat_map(|t| Outcome::ALL.map(|o| requests.with_label_values(&[t.as_str(), o.as_str()])))
            .collect();
        let head_requests_vec = reg(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "hydra_head_requests_total",
                    "Inbound DHT requests per head (every type and outcome)",
                ),
                &["head"],
            )
            .unwrap(),
        );
        let head_requests: Vec<IntCounter> =
            (0..heads).map(|h| head_requests_vec.with_label_values(&[&h.to_string()])).collect();
        for t in MessageType::ALL {
            request_duration.with_label_values(&[t.as_str()]);
            stream_sojourn.with_label_values(&[t.as_str()]);
        }
        for e in StreamEvent::ALL {
            streams.with_label_values(&[e.as_str()]);
        }

        let duration = reg(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "hydra_datastore_operation_duration_seconds",
                    "Duration of datastore calls by operation",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
                &["op"],
            )
            .unwrap(),
        );
        let errors = reg(
            registry,
            IntCounterVec::new(
                Opts::new("hydra_datastore_errors_total", "Failed datastore calls by operation"),
                &["op"],
            )
            .unwrap(),
        );
        for op in DbOp::ALL {
            duration.with_label_values(&[op.as_str()]);
            errors.with_label_values(&[op.as_str()]);
        }
        let pool_wait = reg(
            registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "hydra_datastore_pool_wait_seconds",
                    "Time spent waiting for a pooled datastore connection",
                )
                .buckets(vec![0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
            )
            .unwrap(),
        );
        let gauge = |name: &str, help: &str| reg(registry, IntGauge::new(name, help).unwrap());
        let pool_connections = gauge("hydra_datastore_pool_connections", "Open datastore connections");
        let pool_in_use = gauge("hydra_datastore_pool_in_use", "Datastore connections in use");
        let pool_waiting = gauge("hydra_datastore_pool_waiting", "Tasks waiting for a datastore connection");

        let shed = reg(
            registry,
            IntCounterVec::new(
                Opts::new("hydra_providers_shed_total", "Provider operations shed, by reason"),
                &["reason"],
            )
            .unwrap(),
        );
        for r in ShedReason::MANAGER {
            shed.with_label_values(&[r.as_str()]);
        }
        let cache = reg(
            registry,
            IntCounterVec::new(
                Opts::new("hydra_providers_cache_lookups_total", "Provider cache lookups by result"),
                &["result"],
            )
            .unwrap(),
        );
        for r in CacheResult::ALL {
            cache.with_label_values(&[r.as_str()]);
        }
        let providers = ProviderMetrics {
            write_buffer_entries: reg(
                registry,
                IntGauge::new(
                    "hydra_providers_write_buffer_entries",
                    "Provider records buffered and not yet written",
                )
                .unwrap(),
            ),
            flush_rows: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("hydra_providers_flush_rows", "Rows per batched provider write")
                        .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]),
                )
                .unwrap(),
            ),
            flushes_failed: reg(
                registry,
                IntCounter::new(
                    "hydra_providers_flush_failures_total",
                    "Batched provider writes that failed (their rows stay buffered for a retry)",
                )
                .unwrap(),
            ),
            shed,
            reads_in_flight: reg(
                registry,
                IntGauge::new(
                    "hydra_providers_reads_in_flight",
                    "Distinct keys queued for or in a datastore lookup",
                )
                .unwrap(),
            ),
            gc_deleted_rows: reg(
                registry,
                IntCounter::new("hydra_providers_gc_deleted_rows_total", "Expired rows deleted").unwrap(),
            ),
            gc_leader: reg(
                registry,
                IntGauge::new("hydra_providers_gc_leader", "1 while this process holds the fleet's GC lease")
                    .unwrap(),
            ),
            gc_last_run: reg(
                registry,
                Gauge::new(
                    "hydra_providers_gc_last_run_timestamp_seconds",
                    "Unix time of this process's last completed garbage-collection round",
                )
                .unwrap(),
            ),
            cache,
            records_estimate: reg(
                registry,
                Gauge::new(
                    "hydra_providers_records_estimate",
                    "Provider records in the datastore (catalogue estimate, not count(*))",
                )
                .unwrap(),
            ),
            peers_estimate: reg(
                registry,
                Gauge::new(
                    "hydra_providers_peers_estimate",
                    "Peers with stored addresses (catalogue estimate)",
                )
                .unwrap(),
            ),
            refreshes_skipped: reg(
                registry,
                IntCounter::new(
                    "hydra_providers_refreshes_skipped_total",
                    "ADD_PROVIDER refreshes acknowledged without a write (degrade tier, record far from expiry)",
                )
                .unwrap(),
            ),
            memory: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new("hydra_memory_bytes", "Bytes held by each byte-budgeted part of the node"),
                    &["part"],
                )
                .unwrap(),
            ),
            memory_limit: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new("hydra_memory_limit_bytes", "The byte budget of each byte-budgeted part of the node"),
                    &["part"],
                )
                .unwrap(),
            ),
        };
        let load = LoadMetrics::new(registry);

        let up = reg(
            registry,
            IntGaugeVec::new(Opts::new("hydra_head_up", "1 while the head's swarm task runs"), &["head"])
                .unwrap(),
        );
        let connections = reg(
            registry,
            IntGaugeVec::new(
                Opts::new("hydra_head_connections", "Established connections per head"),
                &["head"],
            )
            .unwrap(),
        );
        for h in 0..heads {
            connections.with_label_values(&[&h.to_string()]);
            up.with_label_values(&[&h.to_string()]);
        }

        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            registry.register(Box::new(pc)).expect("process collector registers once");
        }

        let unique_peers = reg(
            registry,
            Gauge::new(
                "hydra_kad_unique_peers_estimate",
                "Distinct remote peers that opened a kad stream since start (HyperLogLog estimate)",
            )
            .unwrap(),
        );
        Metrics {
            kad: KadMetrics {
                requests,
                request_series: Arc::new(request_series),
                head_requests: Arc::new(head_requests),
                request_duration,
                stream_sojourn,
                streams,
                active_streams,
                requests_in_flight,
                connections_denied,
                connections_shed,
                connections_refused,
                listeners_closed,
                listener_closes,
                listener_reopen_failures,
                reply_peers_trimmed,
                unique: Arc::new(UniquePeers::default()),
                unique_peers,
            },
            datastore: DatastoreMetrics {
                duration,
                errors,
                pool_wait,
                pool_connections,
                pool_in_use,
                pool_waiting,
            },
            providers,
            heads: HeadMetrics { connections, up },
            routing_table: RoutingTableMetrics::new(registry),
            discovery: DiscoveryMetrics::new(registry),
            load,
            routing_api: RoutingApiMetrics::new(registry),
            heap_profiles: reg(
                registry,
                IntCounter::new(
                    "hydra_profiles_heap_dumps_total",
                    "Heap profiles written because RSS reached profiles.heap_dump_at_memory_fraction of the memory limit",
                )
                .unwrap(),
            ),
            allocator: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "hydra_allocator_bytes",
                        "jemalloc's accounting: allocated (live objects), active (their pages), resident, mapped, retained (unmapped but kept), metadata",
                    ),
                    &["stat"],
                )
                .unwrap(),
            ),
        }
    }
}

impl LoadMetrics {
    fn new(registry: &Registry) -> Self {
        let shed = reg(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "hydra_load_shed_total",
                    "Requests shed (not served in full), by load tier and reason",
                ),
                &["tier", "reason"],
            )
            .unwrap(),
        );
        let shed_series = Tier::ALL
            .iter()
            .map(|t| {
                ShedReason::ALL.iter().map(|r| shed.with_label_values(&[t.as_str(), r.as_str()])).collect()
            })
            .collect();
        let transitions = reg(
            registry,
            IntCounterVec::new(
                Opts::new("hydra_load_tier_transitions_total", "Load tier changes, by the tier entered"),
                &["to"],
            )
            .unwrap(),
        );
        for t in Tier::ALL {
            transitions.with_label_values(&[t.as_str()]);
        }
        let signals = reg(
            registry,
            GaugeVec::new(
                Opts::new("hydra_load_signal", "Signals the load tier is computed from (unit in the name)"),
                &["signal"],
            )
            .unwrap(),
        );
        let thresholds = reg(
            registry,
            GaugeVec::new(
                Opts::new(
                    "hydra_load_threshold",
                    "Threshold at which each tier is entered, per signal (0: off)",
                ),
                &["tier", "signal"],
            )
            .unwrap(),
        );
        for (name, _) in Signals::default().values() {
            signals.with_label_values(&[name]);
        }
        let reloads = reg(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "hydra_load_config_reloads_total",
                    "Reloads of the [load] config section by result",
                ),
                &["result"],
            )
            .unwrap(),
        );
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        let m = LoadMetrics {
            tier: reg(
                registry,
                IntGauge::new("hydra_load_tier", "Current load tier: 0 normal, 1 degrade, 2 refuse, 3 peak")
                    .unwrap(),
            ),
            transitions,
            shed_series: Arc::new(shed_series),
            signals,
            thresholds,
            tracked_peers: reg(
                registry,
                IntGauge::new("hydra_load_tracked_peers", "Peers with their own per-peer rate bucket")
                    .unwrap(),
            ),
            peer_share: reg(
                registry,
                Gauge::new(
                    "hydra_load_peer_share_statements_per_second",
                    "Each peer's fair share of datastore statements per second while the node is short of capacity (-1: no per-peer limit in force)",
                )
                .unwrap(),
            ),
            budget_wait: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "hydra_load_statement_budget_wait_seconds",
                        "Time datastore statements waited for the statements-per-second budget",
                    )
                    .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
                )
                .unwrap(),
            ),
            reloads,
            runtime_lag: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "hydra_runtime_lag_seconds",
                        "Scheduling delay of the runtime: how much later than due a 5 ms timer's task ran",
                    )
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]),
                )
                .unwrap(),
            ),
            admission_rate: reg(
                registry,
                IntGauge::new(
                    "hydra_load_admission_streams_per_second",
                    "New inbound kad streams admitted per second while the CPU is short (-1: all admitted)",
                )
                .unwrap(),
            ),
            admission_connection_rate: reg(
                registry,
                IntGauge::new(
                    "hydra_load_admission_connections_per_second",
                    "New inbound connections admitted per second while the CPU is short (0: shedding; -1: all admitted)",
                )
                .unwrap(),
            ),
            shedding_connections: reg(
                registry,
                IntGauge::new(
                    "hydra_load_shedding_connections",
                    "1 while the node closes inbound connections and refuses new ones (CPU short, most new streams reset)",
                )
                .unwrap(),
            ),
            cpu_busy: reg(
                registry,
                Gauge::new(
                    "hydra_cpu_busy_ratio",
                    "CPU time of the process over the last second ÷ the CPU it is allowed (its cgroup's quota, else its CPUs)",
                )
                .unwrap(),
            ),
            cpu_allowance: reg(
                registry,
                Gauge::new(
                    "hydra_cpu_allowance_cores",
                    "The CPU the process is allowed, cores: its cgroup's CFS quota, else the CPUs it may run on",
                )
                .unwrap(),
            ),
        };
        m.admission_rate.set(-1);
        m.admission_connection_rate.set(-1);
        m.peer_share.set(-1.0);
        m.set_thresholds(&LoadSection::default());
        m
    }
}

impl KadMetrics {
    /// Count one request of head `head`.
    pub fn request(&self, head: usize, ty: MessageType, outcome: Outcome) {
        let t = MessageType::ALL.iter().position(|x| *x == ty).unwrap_or(0);
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(0);
        if let Some(c) = self.request_series.get(t * Outcome::ALL.len() + o) {
            c.inc();
        }
        if let Some(c) = self.head_requests.get(head) {
            c.inc();
        }
    }

    pub fn stream(&self, e: StreamEvent) {
        self.streams.with_label_values(&[e.as_str()]).inc();
    }
}

impl DatastoreMetrics {
    /// The one wrapper through which every datastore call is timed and its errors counted.
    pub async fn time<T, E, F>(&self, op: DbOp, fut: F) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        let start = Instant::now();
        let res = fut.await;
        self.duration.with_label_values(&[op.as_str()]).observe(start.elapsed().as_secs_f64());
        if res.is_err() {
            self.errors.with_label_values(&[op.as_str()]).inc();
        }
        res
    }
}
