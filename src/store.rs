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

use crate::config::StoreKind;
use crate::metrics::{DatastoreMetrics, DbOp};
use crate::types::{PeerRecord, ProviderKey, ValueRecord};

mod sqlite;

pub use sqlite::SqliteStore;

/// Milliseconds since the Unix epoch, the time unit of every stored expiry.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// `now_ms() + d`, saturating.
pub fn ms_after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("the PostgreSQL store is not available in this build yet (database_url = {0})")]
    PostgresUnsupported(String),
}

/// Handle to the configured datastore.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    metrics: DatastoreMetrics,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
}

impl Store {
    /// Open the datastore and apply pending migrations.
    pub async fn open(kind: &StoreKind, metrics: DatastoreMetrics) -> Result<Self, StoreError> {
        let backend = match kind {
            StoreKind::Sqlite(path) => {
                let store = SqliteStore::open(path).await?;
                metrics.time(DbOp::Migrate, store.migrate()).await?;
                Backend::Sqlite(store)
            }
            StoreKind::Postgres(url) => {
                return Err(StoreError::PostgresUnsupported(crate::config::redact_url(url)))
            }
        };
        Ok(Self { backend, metrics })
    }

    /// Upsert a batch of provider records and their addresses.
    pub async fn put_providers(&self, rows: &[ProviderWrite]) -> Result<(), StoreError> {
        let Backend::Sqlite(s) = &self.backend;
        self.metrics.time(DbOp::PutProviders, s.put_providers(rows)).await
    }

    /// Unexpired providers of each key, at most `per_key` per key, with their unexpired addresses.
    pub async fn get_providers(
        &self,
        keys: &[ProviderKey],
        now: i64,
        per_key: usize,
    ) -> Result<Vec<(ProviderKey, PeerRecord)>, StoreError> {
        let Backend::Sqlite(s) = &self.backend;
        self.metrics.time(DbOp::GetProviders, s.get_providers(keys, now, per_key)).await
    }

    pub async fn put_value(&self, record: &ValueRecord, expires_at: i64) -> Result<(), StoreError> {
        let Backend::Sqlite(s) = &self.backend;
        self.metrics.time(DbOp::PutValue, s.put_value(record, expires_at)).await
    }

    pub async fn get_value(&self, key: &[u8], now: i64) -> Result<Option<ValueRecord>, StoreError> {
        let Backend::Sqlite(s) = &self.backend;
        self.metrics.time(DbOp::GetValue, s.get_value(key, now)).await
    }

    /// Delete up to `chunk` expired rows from each table; returns rows deleted.
    pub async fn gc_chunk(&self, now: i64, chunk: usize) -> Result<u64, StoreError> {
        let Backend::Sqlite(s) = &self.backend;
        self.metrics.time(DbOp::Gc, s.gc_chunk(now, chunk)).await
    }

    /// Close all connections (after the last flush).
    pub async fn close(&self) {
        let Backend::Sqlite(s) = &self.backend;
        s.close().await
    }
}
