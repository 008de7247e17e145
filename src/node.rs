//! The node: wires the store, the provider manager, the heads, the stream dispatcher and the
//! HTTP server together, and shuts them down in a fixed order.
//!
//! Start order: store (with migrations) → provider manager → heads (bound and listening; each
//! learns its siblings) → dispatcher → head tasks → HTTP. Shutdown order: stop intake (heads,
//! dispatcher, stream tasks, HTTP) → wait for those tasks (bounded) → flush every buffered write
//! → close the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::head::{self, HeadShared};
use crate::kad_server::Intake;
use crate::load::{LoadControl, SignalSource, Tier};
use crate::metrics::Metrics;
use crate::providers::ProviderManager;
use crate::server::{self, Service};
use crate::store::Store;

/// How long shutdown waits for stream and head tasks before flushing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    heads: Arc<Vec<Arc<HeadShared>>>,
    http_addr: SocketAddr,
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
}

impl Node {
    /// Start everything described by `cfg`. Returns once every head listens and HTTP is bound.
    pub async fn start(cfg: Config) -> anyhow::Result<Node> {
        let http_listener = crate::http::listen(cfg.http_listen).await?;
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
        let intake = Intake::new(tx, cfg.limits.max_streams_per_peer, metrics.kad.clone());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();

        // Identities: lease them in the datastore, then derive their keys off the async workers.
        let seed = Arc::new(
            crate::identity::Seed::load_or_create(cfg.identity_seed_file.as_deref(), &cfg.data_dir)
                .context("load the identity seed")?,
        );
        // Progress lines every 10 % when starting 100 heads or more.
        let n = cfg.heads;
        let token = format!("{:016x}", rand::random::<u64>());
        let leased = match lease_heads(&store, &cfg, &token, seed.clone()).await {
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
        for (h, key) in keys {
            let slot = h.slot as usize;
            match head::bind(slot, h.index, key, &cfg, intake.clone(), metrics.heads.clone()).await {
                Ok(h) => starting.push(h),
                Err(e) => {
                    providers.shutdown().await;
                    return Err(e);
                }
            }
            if n >= 100 && (slot + 1).is_multiple_of(n / 10) {
                tracing::info!("started {}/{n} heads", slot + 1);
            }
        }
        // Every head answers with its siblings (DHT servers spread over the keyspace) from one
        // shared list; they stay out of kad's routing tables, so heads never dial each other.
        let siblings = crate::routing::Siblings::new(
            starting.iter().map(|h| (h.shared.peer_id, h.shared.listen_addrs.clone())),
            cfg.address_filter,
        );
        for h in &mut starting {
            h.set_siblings(siblings.clone());
            for (peer, addr) in &cfg.bootstrap {
                h.add_peer(*peer, std::slice::from_ref(addr));
            }
        }
        let heads: Arc<Vec<Arc<HeadShared>>> = Arc::new(starting.iter().map(|h| h.shared.clone()).collect());

        let svc = Arc::new(Service::new(
            heads.clone(),
            providers.clone(),
            metrics.kad.clone(),
            cfg.limits.clone(),
            load.clone(),
        ));
        // The load controller: the tier from measured signals; `peak` closes the intake.
        intake.set_accepting(load.tier() < Tier::Peak);
        load.on_tier({
            let intake = intake.clone();
            move |tier| intake.set_accepting(tier < Tier::Peak)
        });
        tasks.spawn(load.clone().run(
            metrics.datastore.clone(),
            Arc::new(NodeSignals { providers: providers.clone(), intake: intake.clone() }),
            cancel.clone(),
        ));
        tasks.spawn(server::dispatch(svc, rx, cancel.clone(), tasks.clone()));
        let bootstrap = !cfg.bootstrap.is_empty();
        for h in starting {
            tasks.spawn(h.run(bootstrap, cancel.clone()));
        }
        // Record the heads' addresses in their leases now, then keep the leases alive.
        let heartbeat = Heartbeat {
            store: store.clone(),
            node: cfg.node_name.clone(),
            token: token.clone(),
            ttl: cfg.lease_ttl,
            heads: heads.clone(),
        };
        heartbeat.beat().await;
        tasks.spawn(heartbeat.run(cancel.clone()));

        let on_scrape: crate::http::ScrapeHook = {
            let (providers, kad) = (providers.clone(), metrics.kad.clone());
            Arc::new(move || {
                providers.refresh_gauges();
                kad.unique_peers.set(kad.unique.estimate());
            })
        };
        let reloader =
            Reloader { file: cfg.config_file.clone(), load: load.clone(), metrics: metrics.load.clone() };
        let (http_addr, http) = crate::http::serve(
            http_listener,
            crate::http::AppState {
                heads: heads.clone(),
                store: store.clone(),
                registry: registry.clone(),
                on_scrape,
                load: load.clone(),
                reloader: reloader.clone(),
            },
            cancel.clone(),
        )?;
        tasks.spawn(http);
        tracing::info!(heads = heads.len(), http = %http_addr, "node started");
        Ok(Node {
            heads,
            http_addr,
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

/// Lease the configured heads. Live leases of this node name held by another run are either a
/// crashed previous run's (they expire within `lease_ttl`) or another live process with the same
/// name: wait up to one lease lifetime, then give up with the conflict error.
async fn lease_heads(
    store: &Store,
    cfg: &Config,
    token: &str,
    seed: Arc<crate::identity::Seed>,
) -> Result<Vec<crate::store::LeasedHead>, crate::store::StoreError> {
    let deadline = tokio::time::Instant::now() + cfg.lease_ttl + Duration::from_secs(1);
    loop {
        match store.acquire_heads(&cfg.node_name, token, cfg.heads as u32, cfg.lease_ttl, seed.clone()).await
        {
            Err(crate::store::StoreError::LeaseConflict { leases, .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(
                    node = %cfg.node_name,
                    leases,
                    "head leases of this node name are still live (a crashed previous run, or another \
                     process with the same name); waiting for them to expire"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            res => return res,
        }
    }
}

/// Renews this process's head leases every third of their lifetime, recording head addresses.
struct Heartbeat {
    store: Store,
    node: String,
    /// This run's lease token.
    token: String,
    ttl: Duration,
    heads: Arc<Vec<Arc<HeadShared>>>,
}

impl Heartbeat {
    async fn beat(&self) {
        let rows: Vec<(u32, String)> = self
            .heads
            .iter()
            .map(|h| {
                let addrs: Vec<String> = h.listen_addrs.load().iter().map(|a| a.to_string()).collect();
                (h.identity, addrs.join(" "))
            })
            .collect();
        match self.store.renew_leases(&self.node, &self.token, self.ttl, &rows).await {
            Ok(held) if held as usize == rows.len() => {}
            Ok(held) => tracing::error!(
                held,
                expected = rows.len(),
                "lost head leases: another process took over identities this one still runs \
                 (was this process paused longer than identity.lease_ttl?); restart it"
            ),
            Err(e) => tracing::warn!(error = %e, "renewing head leases failed; retrying"),
        }
    }

    async fn run(self, cancel: CancellationToken) {
        // A fixed cadence, not "sleep after each renewal": slow renewals must not stretch it.
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; `start` renewed just now
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.beat().await,
            }
        }
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
}

/// Reloads `[load]` from the config file: validated first, applied only when valid.
#[derive(Clone)]
pub struct Reloader {
    file: Option<std::path::PathBuf>,
    load: Arc<LoadControl>,
    metrics: crate::metrics::LoadMetrics,
}

impl Reloader {
    pub fn reload(&self) -> Result<crate::config::LoadSection, String> {
        let res = self.read();
        match &res {
            Ok(section) => {
                self.load.reload(section.clone());
                self.metrics.reloads.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, "config reload rejected; the previous [load] settings stay");
                self.metrics.reloads.with_label_values(&["error"]).inc();
            }
        }
        res
    }

    fn read(&self) -> Result<crate::config::LoadSection, String> {
        let Some(path) = &self.file else {
            return Err("the node was started without --config: there is no file to reload".into());
        };
        let file = crate::config::ConfigFile::from_file(path).map_err(|e| e.to_string())?;
        // The whole file must be valid (a typo elsewhere is reported now, not at the next
        // restart), but only `[load]` takes effect without a restart.
        file.validate().map_err(|e| e.to_string())?;
        Ok(file.load)
    }
}
