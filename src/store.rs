//! The datastore behind the provider manager.
//!
//! [`Store`] is a cheap-to-clone handle over one backend. It owns the SQL and the schema
//! migrations; it does not own buffering, caching or admission (that is
//! [`crate::providers::ProviderManager`]). Every call goes through
//! [`crate::metrics::DatastoreMetrics::time`], so each datastore operation is timed and its errors
//! counted. Statements bind their parameters; no SQL is built from values.
//!
//! Invariants: reads never return expired rows; writes are batches (one statement per chunk);
//! garbage collection deletes in bounded chunks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};

use std::sync::Arc;

use crate::config::{PostgresSection, StoreKind};
use crate::load::StatementBudget;
use crate::metrics::{DatastoreMetrics, DbOp};
use crate::types::{PeerRecord, ProviderKey, ValueOrder, ValueRecord};

mod leases;
mod postgres;
mod sqlite;

pub use leases::{FleetHead, LeasedHead};

pub use postgres::{
    to_time as postgres_time, PgStore, LOOKUP as LOOKUP_SQL, UPSERT_PROVIDERS as UPSERT_PROVIDERS_SQL,
};
pub use sqlite::SqliteStore;

/// Milliseconds since the Unix epoch, the time unit of every stored expiry.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `now_ms() + d`, saturating.
pub fn ms_after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A new row's random sort key (`providers.sample_key`; docs/decisions/2026-12-01-fair-provider-sampling.md).
/// Never 0, which marks rows written before sampling existed (re-keyed by their next refresh).
pub(crate) fn new_sample_key() -> i32 {
    loop {
        let k: i32 = rand::random();
        if k != 0 {
            return k;
        }
    }
}

/// One provider record to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderWrite {
    pub key: ProviderKey,
    pub provider: PeerId,
    pub addrs: Vec<Multiaddr>,
    /// When the record expires (ms since epoch).
    pub expires_at: i64,
    /// When the provider's addresses expire (ms since epoch).
    pub addrs_expire_at: i64,
}

/// One stored provider record as an operator sees it (`hydra providers`, `GET /v1/providers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProvider {
    pub peer: PeerId,
    /// Unexpired addresses (empty when they expired before the record).
    pub addrs: Vec<Multiaddr>,
    /// When the record expires (ms since epoch).
    pub expires_at: i64,
    /// When its addresses expire (ms since epoch); `None` when none are stored.
    pub addrs_expire_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("postgres error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database unreachable: {0}")]
    Unreachable(String),
    #[error("head identities: {0}")]
    Identity(String),
    #[error(
        "{leases} head leases of node_name {node:?} are held by another live process; \
         give every process its own --node-name"
    )]
    LeaseConflict { node: String, leases: usize },
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
}

/// Handle to the configured datastore.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    metrics: DatastoreMetrics,
    /// The statements-per-second ceiling request-driven statements wait for.
    budget: Arc<StatementBudget>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(Arc<PgStore>),
}

/// Dispatch one call to the backend, timed and counted under `op`. With `budget = n`, the call
/// first waits for `n` statements of the statement budget (the wait is not part of its timing).
macro_rules! call {
    ($self:ident, $op:expr, budget = $n:expr, $($rest:tt)*) => {{
        $self.budget.take($n).await;
        call!($self, $op, $($rest)*)
    }};
    ($self:ident, $op:expr, |$s:ident| $body:expr) => {
        call!($self, $op, sqlite | $s | $body, postgres | $s | $body)
    };
    // The two backends called differently: the embedded store is given the host's clock (the
    // datastore's own, on the same host); PostgreSQL reads its own clock (`now()`).
    ($self:ident, $op:expr, sqlite |$s:ident| $lite:expr, postgres |$p:ident| $pg:expr) => {
        match &$self.backend {
            Backend::Sqlite($s) => $self.metrics.time($op, $lite).await,
            Backend::Postgres($p) => $self.metrics.time($op, $pg).await,
        }
    };
}

/// One identity with its lease as a backend lists it: (identity, peer ID, node name, slot,
/// space-separated addresses, lease expiry in ms, lease live by the datastore's clock).
pub(crate) type HeadRow = (u32, String, Option<String>, Option<u32>, String, Option<i64>, bool);

impl Store {
    /// Open the datastore and apply pending migrations.
    pub async fn open(
        kind: &StoreKind,
        pg: &PostgresSection,
        metrics: DatastoreMetrics,
    ) -> Result<Self, StoreError> {
        let backend = match kind {
            StoreKind::Sqlite(path) => {
                let store = SqliteStore::open(path, metrics.pool_wait.clone()).await?;
                metrics.time(DbOp::Migrate, store.migrate()).await?;
                Backend::Sqlite(store)
            }
            StoreKind::Postgres(url) => {
                let store = PgStore::connect(url, pg, metrics.pool_wait.clone()).await?;
                metrics.time(DbOp::Migrate, PgStore::migrate(url)).await?;
                Backend::Postgres(Arc::new(store))
            }
        };
        Ok(Self { backend, metrics, budget: Arc::default() })
    }

    /// Meter request-driven statements (provider writes and lookups, value operations) through
    /// `budget`. Background statements — leases, GC chunks, count estimates — run at intervals
    /// set in the config and are not metered.
    pub fn with_budget(mut self, budget: Arc<StatementBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Apply migrations only (`hydra migrate`).
    pub async fn migrate_only(kind: &StoreKind, pg: &PostgresSection) -> Result<(), StoreError> {
        let unused = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("unused", "unused"))
            .expect("valid histogram options");
        match kind {
            StoreKind::Sqlite(path) => {
                let s = SqliteStore::open(path, unused).await?;
                s.migrate().await?;
                s.close().await;
            }
            StoreKind::Postgres(url) => {
                let s = PgStore::connect(url, pg, unused).await?;
                PgStore::migrate(url).await?;
                s.close().await;
            }
        }
        Ok(())
    }

    /// The statement budget. Provider writes and lookups are metered by their callers, which
    /// take the budget *before* choosing what goes into the batch, so work arriving meanwhile
    /// joins it (the write buffer and the read batcher).
    pub fn budget(&self) -> &Arc<StatementBudget> {
        &self.budget
    }

    /// Write statements the backend can run at once, if it has such a limit: the embedded store
    /// has a single writer connection, so a second batch in flight would only queue on it — and
    /// its wait would read as connection-pool distress (`pool_wait_p99_ms`) to the load tiers
    /// while the datastore is idle. PostgreSQL writes in parallel (`providers.max_flushes_in_flight`).
    pub fn max_parallel_writes(&self) -> Option<usize> {
        match self.backend {
            Backend::Sqlite(_) => Some(1),
            Backend::Postgres(_) => None,
        }
    }

    /// Upsert a batch of provider records and their addresses: two statements, metered by the
    /// caller ([`Self::budget`]).
    pub async fn put_providers(&self, rows: &[ProviderWrite]) -> Result<(), StoreError> {
        call!(self, DbOp::PutProviders, |s| s.put_providers(rows))
    }

    /// Unexpired providers of each key (by the datastore's clock), at most `per_key` per key, a
    /// random window of them when there are more, with their unexpired addresses.
    pub async fn get_providers(
        &self,
        keys: &[ProviderKey],
        per_key: usize,
    ) -> Result<Vec<(ProviderKey, PeerRecord)>, StoreError> {
        // One statement, metered by the caller.
        call!(
            self,
            DbOp::GetProviders,
            sqlite | s | s.get_providers(keys, now_ms(), per_key),
            postgres | p | p.get_providers(keys, per_key)
        )
    }

    /// Upsert a value record. With an IPNS `order`, a stored record of the name replaces only
    /// if the new one wins (higher sequence, or the same and a later validity) or is the same
    /// record again (a republish extends its life) — decided in the statement, so concurrent
    /// writers of a fleet cannot regress a name. `Ok(false)`: the stored record stays. The record
    /// lives `ttl` from the datastore's clock, or until `eol_ms` (its own end of validity) if that
    /// comes first.
    pub async fn put_value(
        &self,
        record: &ValueRecord,
        ttl: Duration,
        eol_ms: Option<i64>,
        order: Option<ValueOrder>,
    ) -> Result<bool, StoreError> {
        // The u64 sequence as an order-preserving i64 (0 → i64::MIN), for a signed column.
        let order = order.map(|o| ((o.seq as i64).wrapping_add(i64::MIN), o.eol_ms));
        let local_expiry = || ms_after(now_ms(), ttl).min(eol_ms.unwrap_or(i64::MAX));
        call!(
            self,
            DbOp::PutValue,
            budget = 1,
            sqlite | s | s.put_value(record, local_expiry(), order),
            postgres | p | p.put_value(record, ttl, eol_ms, order)
        )
    }

    pub async fn get_value(&self, key: &[u8]) -> Result<Option<ValueRecord>, StoreError> {
        call!(
            self,
            DbOp::GetValue,
            budget = 1,
            sqlite | s | s.get_value(key, now_ms()),
            postgres | p | p.get_value(key)
        )
    }

    /// One garbage-collection round over every table, in bounded chunks (`chunk_rows` rows per
    /// statement on SQLite, `chunk_pages` heap pages on PostgreSQL). `Ok(None)` means another
    /// process of the fleet holds the GC lease.
    /// Expiry is judged by the datastore's clock.
    pub async fn gc_round(&self, chunk_rows: usize, chunk_pages: usize) -> Result<Option<u64>, StoreError> {
        call!(
            self,
            DbOp::Gc,
            sqlite | s | s.gc_round(now_ms(), chunk_rows),
            postgres | p | p.gc_round(chunk_pages)
        )
    }

    /// Unexpired records of `key` with their expiry, latest expiry first, at most `limit`: the
    /// operator's view, straight from the datastore (not the cache, not the budget: operator
    /// queries are rare and must show what is stored).
    pub async fn inspect_providers(
        &self,
        key: &ProviderKey,
        limit: usize,
    ) -> Result<Vec<StoredProvider>, StoreError> {
        call!(
            self,
            DbOp::Inspect,
            sqlite | s | s.inspect_providers(key, now_ms(), limit),
            postgres | p | p.inspect_providers(key, limit)
        )
    }

    /// A peer's unexpired stored addresses and their expiry (ms since epoch).
    pub async fn peer_addrs(&self, peer: &PeerId) -> Result<Option<(Vec<Multiaddr>, i64)>, StoreError> {
        call!(
            self,
            DbOp::Inspect,
            budget = 1,
            sqlite | s | s.peer_addrs(peer, now_ms()),
            postgres | p | p.peer_addrs(peer)
        )
    }

    /// Whether the datastore answers a trivial statement (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        call!(self, DbOp::Ping, |s| s.ping())
    }

    /// Estimated (provider records, peers with addresses), from catalogue statistics.
    pub async fn estimate_counts(&self) -> Result<(f64, f64), StoreError> {
        call!(self, DbOp::Estimate, |s| s.estimate_counts())
    }

    /// Lease `n` head identities for process `node` (its own first, then free ones, then new ones).
    pub async fn acquire_heads(
        &self,
        node: &str,
        token: &str,
        n: u32,
        ttl: std::time::Duration,
        seed: Arc<crate::identity::Seed>,
    ) -> Result<Vec<LeasedHead>, StoreError> {
        call!(self, DbOp::Leases, |s| s.acquire_heads(node, token, n, ttl, seed))
    }

    /// Give up this run's leases on a graceful shutdown: they stay with the node name (its next
    /// run reclaims them at once) but no longer belong to this run.
    pub async fn release_leases(&self, node: &str, token: &str) -> Result<u64, StoreError> {
        call!(self, DbOp::Leases, |s| s.release_leases(node, token))
    }

    /// Extend `node`'s leases to `ttl` from the datastore's clock and record its heads'
    /// addresses ((identity, space-separated multiaddrs)). Returns the identities `node` still
    /// held (and now holds for another `ttl`).
    pub async fn renew_leases(
        &self,
        node: &str,
        token: &str,
        ttl: std::time::Duration,
        heads: &[(u32, String)],
    ) -> Result<Vec<u32>, StoreError> {
        call!(
            self,
            DbOp::Leases,
            sqlite | s | s.renew_leases(node, token, ms_after(now_ms(), ttl), heads),
            postgres | p | p.renew_leases(node, token, ttl, heads)
        )
    }

    /// Processes (node names) holding at least one live head lease (by the datastore's clock):
    /// one row back, however many heads the fleet has.
    pub async fn count_live_processes(&self) -> Result<u64, StoreError> {
        call!(
            self,
            DbOp::Leases,
            sqlite | s | s.count_live_processes(now_ms()),
            postgres | p | p.count_live_processes()
        )
    }

    /// Every identity of the fleet with its lease.
    pub async fn list_heads(&self) -> Result<Vec<FleetHead>, StoreError> {
        let rows =
            call!(self, DbOp::Leases, sqlite | s | s.list_heads(now_ms()), postgres | p | p.list_heads())?;
        Ok(rows
            .into_iter()
            .map(|(identity, peer_id, node, slot, addrs, expires, active)| FleetHead {
                identity,
                peer_id,
                node,
                slot,
                addrs: addrs.split_whitespace().map(str::to_owned).collect(),
                lease_expires_at: expires,
                lease_active: active,
            })
            .collect())
    }

    /// Publish the pool's state to the pool gauges (called at scrape time).
    pub fn refresh_pool_gauges(&self) {
        let (size, in_use, waiting) = match &self.backend {
            Backend::Sqlite(s) => s.pool_status(),
            Backend::Postgres(s) => s.pool_status(),
        };
        self.metrics.pool_connections.set(size as i64);
        self.metrics.pool_in_use.set(in_use as i64);
        self.metrics.pool_waiting.set(waiting as i64);
    }

    /// Close all connections (after the last flush). Releases the GC lease.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close().await,
            Backend::Postgres(s) => s.close().await,
        }
    }
}
