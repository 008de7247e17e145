//! The node: wires the store, the provider manager, the heads, the stream dispatcher and the
//! HTTP server together, and shuts them down in a fixed order.
//!
//! Start order: store (with migrations) → provider manager → heads (bound and listening; each
//! learns its siblings) → dispatcher → head tasks → HTTP. Shutdown order: stop intake (new
//! streams reset, the dispatcher stops) and let stream tasks finish the request they are serving
//! (idle streams close at once) → wait for them (bounded) → stop heads, HTTP and the rest → wait
//! for those (bounded) → flush every buffered write
//! → close the store.
//!
//! The node is the only module that knows every subsystem; none of them depends on it. Leasing
//! head identities at start and renewing the leases is in `node/leases.rs`.

mod leases;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use prometheus::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::leases::{lease_heads, Heartbeat};
use crate::config::Config;
use crate::load::{LoadControl, Policy, Reloader, SignalSource};
use crate::metrics::Metrics;
use crate::net::head::{self, HeadShared};
use crate::net::intake::Intake;
use crate::net::open_streams::StreamCaps;
use crate::net::routing::RoutingSnapshot;
use crate::net::streams::{self, Service};
use crate::providers::ProviderManager;
use crate::store::Store;

/// Heads binding their listeners at once during start-up.
const BIND_CONCURRENCY: usize = 32;

/// How long shutdown waits for stream and head tasks before flushing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    heads: Arc<Vec<Arc<HeadShared>>>,
    http_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    routing_addr: Option<SocketAddr>,
    providers: ProviderManager,
    store: Store,
    node_name: String,
    /// This run's lease token.
    token: String,
    intake: Intake,
    registry: Registry,
    load: Arc<LoadControl>,
    reloader: Reloader,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Stops intake and lets stream tasks finish their current request (first in shutdown).
    drain: CancellationToken,
    /// The dispatcher and every stream task, waited for before the heads stop.
    stream_tasks: TaskTracker,
}

impl Node {
    /// Start everything described by `cfg`. Returns once every head listens and HTTP is bound.
    pub async fn start(cfg: Config) -> anyhow::Result<Node> {
        let http_listener = crate::http::listen("http_listen", cfg.http_listen).await?;
        let metrics_listener = match cfg.metrics_listen {
            Some(a) => Some(crate::http::listen("metrics_listen", a).await?),
            None => None,
        };
        let routing_listener = match cfg.routing_listen {
            Some(a) => Some(crate::http::listen("routing_listen", a).await?),
            None => None,
        };
        let registry = Registry::new();
        let metrics = Metrics::new(&registry, cfg.heads);
        // The statement budget is set by the load controller from `[load]` (and on reload).
        let budget = Arc::new(crate::load::StatementBudget::new(metrics.load.budget_wait.clone()));
        let load = LoadControl::new(cfg.load.clone(), budget.clone(), metrics.load.clone());
        let store = Store::open(&cfg.store, &cfg.postgres, metrics.datastore.clone())
            .await
            .context("open datastore")?
            .with_budget(budget);
        let providers = ProviderManager::start(
            store.clone(),
            cfg.providers.clone(),
            cfg.limits.max_providers_per_reply,
            metrics.providers.clone(),
        );

        let (tx, rx) = mpsc::channel(cfg.limits.inbound_queue);
        let caps = StreamCaps {
            per_peer_per_head: cfg.limits.max_streams_per_peer_per_head,
            per_ip: cfg.limits.max_streams_per_ip,
            per_process: cfg.limits.max_open_streams,
        };
        let intake =
            Intake::new(tx, caps, cfg.limits.max_connections_per_ip, load.admission(), metrics.kad.clone());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let drain = CancellationToken::new();
        let stream_tasks = TaskTracker::new();

        // Identities: lease them in the datastore, then derive their keys off the async workers.
        let seed = Arc::new(
            crate::identity::Seed::load_or_create(cfg.identity_seed_file.as_deref(), &cfg.data_dir)
                .context("load the identity seed")?,
        );
        // Progress lines every 10 % when starting 100 heads or more.
        let n = cfg.heads;
        let token = format!("{:016x}", rand::random::<u64>());
        let (leased, lease_sent) = match lease_heads(&store, &cfg, &token, seed.clone()).await {
            Ok(l) => l,
            Err(e) => {
                providers.shutdown().await;
                return Err(e).context("lease head identities");
            }
        };
        tracing::info!(node = %cfg.node_name, heads = leased.len(), "leased head identities");
        let keys = tokio::task::spawn_blocking(move || {
            leased
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    if n >= 100 && (i + 1).is_multiple_of(n / 10) {
                        tracing::info!("derived keys of {}/{n} heads", i + 1);
                    }
                    (*h, crate::identity::derive(&seed, h.index, h.choice))
                })
                .collect::<Vec<_>>()
        })
        .await
        .context("derive head keys")?;
        let mut starting = Vec::with_capacity(n);
        // Heads bind a few at a time (each waits for its listeners to report), in slot order.
        let cfg_ref = &cfg;
        let binding = futures::stream::iter(keys.into_iter().map(|(h, key)| {
            let fence = head::LeaseFence::new(lease_sent, cfg_ref.lease_ttl);
            head::bind(h.slot as usize, h.index, key, cfg_ref, intake.clone(), metrics.heads.clone(), fence)
        }));
        let mut binding = futures::StreamExt::buffered(binding, BIND_CONCURRENCY);
        while let Some(bound) = futures::StreamExt::next(&mut binding).await {
            let slot = starting.len();
            match bound {
                Ok(h) => starting.push(h),
                Err(e) => {
                    // A failed start gives back what it leased: the next run (or another
                    // process) need not wait for the leases to expire.
                    if let Err(e) = store.release_leases(&cfg.node_name, &token).await {
                        tracing::warn!(error = %e, "releasing the leases of a failed start failed");
                    }
                    providers.shutdown().await;
                    return Err(e);
                }
            }
            if n >= 100 && (slot + 1).is_multiple_of(n / 10) {
                tracing::info!("started {}/{n} heads", slot + 1);
            }
        }
        drop(binding);
        // Every head answers from one process-wide routing table, with its siblings (DHT servers
        // spread over the keyspace) from one shared list; they stay out of every routing table,
        // so heads never dial each other.
        let siblings = crate::net::routing::Siblings::new(
            starting.iter().map(|h| (h.shared.peer_id, h.shared.advertised.clone())),
            cfg.address_filter,
        );
        let routing = Arc::new(ArcSwap::from_pointee(RoutingSnapshot::default()));
        let (feed, table_task) = crate::net::table::start(
            &cfg.routing,
            siblings,
            routing.clone(),
            metrics.routing_table.clone(),
            cancel.clone(),
        );
        tasks.spawn(table_task);
        for h in &mut starting {
            h.set_table(feed.clone());
        }
        let heads: Arc<Vec<Arc<HeadShared>>> = Arc::new(starting.iter().map(|h| h.shared.clone()).collect());
        // One lookup budget for every head: each looks up its own ID from its own identity.
        let discovery = Arc::new(crate::net::discovery::Discovery {
            heads: heads.clone(),
            routing: routing.clone(),
            table: feed.clone(),
            bootstrap: cfg
                .bootstrap
                .iter()
                .map(|(peer, addr)| crate::types::PeerRecord { peer: *peer, addrs: vec![addr.clone()] })
                .collect(),
            filter: cfg.address_filter,
            lookups_per_minute: cfg.routing.lookups_per_minute,
            max_in_flight: cfg.routing.max_lookups_in_flight,
            metrics: metrics.discovery.clone(),
        });

        let svc = Arc::new(Service::new(
            heads.clone(),
            routing.clone(),
            providers.clone(),
            metrics.kad.clone(),
            cfg.limits.clone(),
            load.clone(),
        ));
        // The load controller: the tier from measured signals; `peak` closes the intake.
        intake.set_accepting(load.policy().new_streams);
        load.on_tier({
            let intake = intake.clone();
            move |tier| intake.set_accepting(Policy::of(tier).new_streams)
        });
        tasks.spawn(crate::load::lag_probe(metrics.load.runtime_lag.clone(), cancel.clone()));
        let profile_dir = if cfg.profiles.dir.is_empty() {
            cfg.data_dir.join("profiles")
        } else {
            std::path::PathBuf::from(&cfg.profiles.dir)
        };
        tasks.spawn(crate::profiles::watch(
            cfg.profiles.clone(),
            profile_dir,
            metrics.heap_profiles.clone(),
            cancel.clone(),
        ));
        tasks.spawn(load.clone().run(
            metrics.datastore.clone(),
            Arc::new(NodeSignals { providers: providers.clone(), intake: intake.clone() }),
            cancel.clone(),
        ));
        stream_tasks.spawn(streams::dispatch(svc, rx, drain.clone(), stream_tasks.clone()));
        if cfg.bootstrap.is_empty() {
            tracing::info!(
                "no bootstrap peers configured: the heads look up their neighbourhoods from the \
                 peers that connect; to join the public Amino DHT, start with --config \
                 config/amino-bootstrap.toml"
            );
        }
        for h in starting {
            tasks.spawn(h.run(cancel.clone()));
        }
        tasks.spawn(discovery.run(cancel.clone()));
        // Record the heads' addresses in their leases now, then keep the leases alive.
        let heartbeat = Heartbeat {
            store: store.clone(),
            node: cfg.node_name.clone(),
            token: token.clone(),
            ttl: cfg.lease_ttl,
            heads: heads.clone(),
            load: load.clone(),
        };
        heartbeat.beat().await;
        tasks.spawn(heartbeat.run(cancel.clone()));

        let on_scrape: crate::http::ScrapeHook = {
            let (providers, kad, allocator) =
                (providers.clone(), metrics.kad.clone(), metrics.allocator.clone());
            Arc::new(move || {
                providers.refresh_gauges();
                kad.unique_peers.set(kad.unique.estimate());
                for (stat, bytes) in crate::profiles::allocator_stats() {
                    allocator.with_label_values(&[stat]).set(bytes as i64);
                }
            })
        };
        let reloader = Reloader::new(cfg.config_file.clone(), load.clone(), metrics.load.clone());
        let app_state = crate::http::AppState {
            heads: heads.clone(),
            store: store.clone(),
            providers: providers.clone(),
            registry: registry.clone(),
            on_scrape,
            load: load.clone(),
            reloader: reloader.clone(),
            probe: Default::default(),
        };
        let metrics_addr = match metrics_listener {
            Some(l) => {
                let (addr, fut) = crate::http::serve_metrics(l, app_state.clone(), cancel.clone())?;
                tasks.spawn(fut);
                Some(addr)
            }
            None => None,
        };
        let routing_addr = match routing_listener {
            Some(l) => {
                let state = crate::http::routing::RoutingState {
                    routing: routing.clone(),
                    providers: providers.clone(),
                    store: store.clone(),
                    load: load.clone(),
                    cfg: cfg.routing_api.clone(),
                };
                let (addr, fut) =
                    crate::http::routing::serve(l, state, metrics.routing_api.clone(), cancel.clone())?;
                tasks.spawn(fut);
                Some(addr)
            }
            None => None,
        };
        let (http_addr, http) = crate::http::serve(http_listener, app_state, cancel.clone())?;
        tasks.spawn(http);
        tracing::info!(
            heads = heads.len(),
            http = %http_addr,
            metrics = metrics_addr.map(|a| a.to_string()),
            routing = routing_addr.map(|a| a.to_string()),
            // `worker_threads`, or with 0 one per core allowed and at least two
            // (`config::runtime_workers`).
            runtime_workers = tokio::runtime::Handle::current().metrics().num_workers(),
            cpu_allowance_cores = crate::load::cpu::cpu_allowance(),
            "node started"
        );
        Ok(Node {
            heads,
            http_addr,
            metrics_addr,
            routing_addr,
            providers,
            store,
            node_name: cfg.node_name.clone(),
            token,
            intake,
            registry,
            load,
            reloader,
            cancel,
            tasks,
            drain,
            stream_tasks,
        })
    }

    /// The load controller (tier, limits, live `[load]` settings).
    pub fn load(&self) -> &Arc<LoadControl> {
        &self.load
    }

    /// Re-read the `[load]` section from the config file and apply it if valid (SIGHUP).
    pub fn reload_load_config(&self) -> Result<crate::config::LoadSection, String> {
        self.reloader.reload()
    }

    pub fn heads(&self) -> &[Arc<HeadShared>] {
        &self.heads
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The metrics-only listener's address, if `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The Delegated Routing V1 listener's address, if `routing_listen` is set.
    pub fn routing_addr(&self) -> Option<SocketAddr> {
        self.routing_addr
    }

    pub fn providers(&self) -> &ProviderManager {
        &self.providers
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stop (or resume) accepting new inbound kad streams on every head.
    pub fn set_accepting(&self, yes: bool) {
        self.intake.set_accepting(yes);
    }

    /// Graceful shutdown: stop intake, wait (bounded) for tasks, flush writes, close the store.
    pub async fn shutdown(self) {
        // Drain first: the heads keep driving their connections, so replies still get out.
        self.intake.set_accepting(false);
        self.drain.cancel();
        self.stream_tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.stream_tasks.wait()).await.is_err() {
            tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            tracing::warn!("tasks still running after {SHUTDOWN_GRACE:?}; flushing anyway");
        }
        // Leases stay with the node name (the next run reclaims them at once) but leave this run.
        if let Err(e) = self.store.release_leases(&self.node_name, &self.token).await {
            tracing::warn!(error = %e, "releasing head leases failed; they expire on their own");
        }
        let buffered = self.providers.buffered();
        self.providers.shutdown().await;
        tracing::info!(flushed = buffered, "node stopped");
    }
}

/// The node's parts the load controller samples.
struct NodeSignals {
    providers: ProviderManager,
    intake: Intake,
}

impl SignalSource for NodeSignals {
    fn write_buffer(&self) -> (usize, usize) {
        self.providers.write_buffer_fill()
    }

    fn reads_in_flight(&self) -> (usize, usize) {
        self.providers.reads_in_flight()
    }

    fn inbound_queue(&self) -> (usize, usize) {
        self.intake.queue_fill()
    }

    fn requests_served(&self) -> u64 {
        self.intake.requests_served()
    }

    fn streams_reset_late(&self) -> u64 {
        self.intake.streams_reset_late()
    }
}
