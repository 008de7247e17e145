//! The embedded store: one SQLite file in WAL mode.
//!
//! One writer connection (SQLite serialises writers anyway; a single connection avoids
//! `SQLITE_BUSY` storms) and a small pool of reader connections, which WAL lets run beside the
//! writer. Migrations live in `migrations/sqlite/` and are compiled into the binary.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::{Multiaddr, PeerId};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqlitePool};

use super::leases::{self, IdentityRow, LeaseTx, LeasedHead};
use super::{new_sample_key, now_ms, ProviderWrite, StoreError, StoredProvider};
use crate::identity::LeaseRow;
use crate::types::{decode_addrs, encode_addrs, PeerRecord, ProviderKey, ValueRecord};

/// Upsert of a value record; a stored IPNS record is replaced only by a better one or itself
/// (see `Store::put_value`). Parameters: key, value, time_received, expires_at, seq, eol_ms.
const PUT_VALUE: &str = "\
    INSERT INTO value_records (key, value, time_received, expires_at, seq, eol_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, time_received = excluded.time_received, \
        expires_at = excluded.expires_at, seq = excluded.seq, eol_ms = excluded.eol_ms \
    WHERE excluded.seq IS NULL OR value_records.seq IS NULL \
       OR value_records.expires_at <= unixepoch('subsec') * 1000 \
       OR excluded.seq > value_records.seq \
       OR (excluded.seq = value_records.seq AND excluded.eol_ms > value_records.eol_ms) \
       OR excluded.value = value_records.value";

/// Migrations compiled into the binary: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, "head identities", include_str!("../../migrations/sqlite/0002_head_identities.sql")),
    (3, "lease tokens", include_str!("../../migrations/sqlite/0003_lease_tokens.sql")),
    (4, "value order", include_str!("../../migrations/sqlite/0004_value_order.sql")),
    (5, "sample key", include_str!("../../migrations/sqlite/0005_sample_key.sql")),
];

/// Rows per INSERT statement: 4 bound parameters each stays far below SQLite's 32,766 limit.
const ROWS_PER_STATEMENT: usize = 1000;

/// A key's live providers from sample key `?3` on, then (if short) those before it.
const SAMPLE_FROM: &str = "SELECT p.provider, a.addrs FROM providers p \
     LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > ?1 \
     WHERE p.key = ?2 AND p.sample_key >= ?3 AND p.expires_at > ?1 ORDER BY p.sample_key LIMIT ?4";
const SAMPLE_BEFORE: &str = "SELECT p.provider, a.addrs FROM providers p \
     LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > ?1 \
     WHERE p.key = ?2 AND p.sample_key < ?3 AND p.expires_at > ?1 ORDER BY p.sample_key LIMIT ?4";
/// One bounded delete of expired rows per table (binds: now, chunk).
const GC_STATEMENTS: [&str; 3] = [
    "DELETE FROM providers WHERE (key, provider) IN \
     (SELECT key, provider FROM providers WHERE expires_at <= ? LIMIT ?)",
    "DELETE FROM peer_addrs WHERE peer IN (SELECT peer FROM peer_addrs WHERE expires_at <= ? LIMIT ?)",
    "DELETE FROM value_records WHERE key IN (SELECT key FROM value_records WHERE expires_at <= ? LIMIT ?)",
];

/// Reader connections. Reads are point lookups that finish in microseconds; four keep both cores
/// busy while a write is in progress.
const READERS: u32 = 4;

/// A [`MigrationSource`] over SQL compiled into the binary (no `sqlx::migrate!` macro needed).
#[derive(Debug)]
pub struct Embedded(pub &'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(v, d, sql)| {
                    Migration::new(*v, Cow::Borrowed(*d), MigrationType::Simple, Cow::Borrowed(*sql), false)
                })
                .collect())
        })
    }
}

/// Handle to the SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
    /// Time spent waiting for a pooled connection.
    pool_wait: prometheus::Histogram,
}

impl SqliteStore {
    pub async fn open(path: &Path, pool_wait: prometheus::Histogram) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| StoreError::DataDir { path: dir.display().to_string(), source })?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        // No ping before each use (sqlx's default): a connection to a local file cannot go stale
        // the way a network one can, a failing statement reports its own error, and the ping is
        // a round trip to the connection's thread — two thread wake-ups — per datastore call.
        let pool = || SqlitePoolOptions::new().test_before_acquire(false);
        let writer = pool().max_connections(1).connect_with(opts.clone()).await?;
        let readers = pool().max_connections(READERS).connect_with(opts).await?;
        Ok(Self { writer, readers, pool_wait })
    }

    /// A connection from `pool`; the wait is measured.
    async fn acquire(&self, pool: &SqlitePool) -> Result<PoolConnection<Sqlite>, StoreError> {
        let t = std::time::Instant::now();
        let c = pool.acquire().await?;
        self.pool_wait.observe(t.elapsed().as_secs_f64());
        Ok(c)
    }

    /// (open connections, in use, tasks waiting — not exposed by sqlx, reported as 0).
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let size = (self.writer.size() + self.readers.size()) as usize;
        let idle = self.writer.num_idle() + self.readers.num_idle();
        (size, size.saturating_sub(idle), 0)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = Migrator::new(Embedded(MIGRATIONS)).await?;
        // Rolling upgrades: a process may start on a schema a newer version already migrated
        // (migrations are additive: docs/decisions/2026-12-01-routing-api-and-ipns.md).
        migrator.set_ignore_missing(true);
        migrator.run(&self.writer).await?;
        Ok(())
    }

    pub async fn put_providers(&self, rows: &[ProviderWrite]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Latest addresses per peer in this batch (a later announcement wins).
        let mut addrs: HashMap<PeerId, &ProviderWrite> = HashMap::new();
        for r in rows {
            addrs.insert(r.provider, r);
        }
        let addrs: Vec<&ProviderWrite> = addrs.into_values().collect();

        let mut conn = self.acquire(&self.writer).await?;
        let mut tx = conn.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO providers (key, provider, expires_at, sample_key) ");
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(r.key.as_bytes())
                    .push_bind(r.provider.to_bytes())
                    .push_bind(r.expires_at)
                    .push_bind(new_sample_key());
            });
            // A refresh keeps the row's sample key, except the 0 of a row older than migration 5.
            qb.push(
                " ON CONFLICT (key, provider) DO UPDATE SET \
                 expires_at = max(providers.expires_at, excluded.expires_at), \
                 sample_key = CASE WHEN providers.sample_key = 0 THEN excluded.sample_key \
                              ELSE providers.sample_key END",
            );
            qb.build().execute(&mut *tx).await?;
        }
        for chunk in addrs.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO peer_addrs (peer, addrs, expires_at) ");
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(r.provider.to_bytes())
                    .push_bind(encode_addrs(&r.addrs))
                    .push_bind(r.addrs_expire_at);
            });
            qb.push(
                " ON CONFLICT (peer) DO UPDATE SET addrs = excluded.addrs, expires_at = excluded.expires_at \
                 WHERE peer_addrs.expires_at <= excluded.expires_at",
            );
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_providers(
        &self,
        keys: &[ProviderKey],
        now: i64,
        per_key: usize,
    ) -> Result<Vec<(ProviderKey, PeerRecord)>, StoreError> {
        // Per key: the live rows from a random starting point in sample-key order, wrapping
        // around (docs/decisions/2026-12-01-fair-provider-sampling.md). Each statement is one
        // range of the (key, sample_key) index; the second runs only if the first fell short.
        let mut out = Vec::new();
        let mut conn = self.acquire(&self.readers).await?;
        for key in keys {
            let start: i32 = rand::random();
            let mut want = per_key;
            for sql in [SAMPLE_FROM, SAMPLE_BEFORE] {
                if want == 0 {
                    break;
                }
                let rows = sqlx::query(sql)
                    .bind(now)
                    .bind(key.as_bytes())
                    .bind(start)
                    .bind(i64::try_from(want).unwrap_or(i64::MAX))
                    .fetch_all(&mut *conn)
                    .await?;
                want -= rows.len().min(want);
                for row in rows {
                    let provider: Vec<u8> = row.try_get("provider")?;
                    let addrs: Option<Vec<u8>> = row.try_get("addrs")?;
                    // Rows we wrote ourselves always decode; skip anything else rather than fail a read.
                    let Ok(peer) = PeerId::from_bytes(&provider) else { continue };
                    let addrs = addrs.map(|a| decode_addrs(&a)).unwrap_or_default();
                    out.push((key.clone(), PeerRecord { peer, addrs }));
                }
            }
        }
        Ok(out)
    }

    pub async fn inspect_providers(
        &self,
        key: &ProviderKey,
        now: i64,
        limit: usize,
    ) -> Result<Vec<StoredProvider>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.provider, p.expires_at, a.addrs, a.expires_at AS addrs_expire_at \
             FROM providers p LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > ? \
             WHERE p.key = ? AND p.expires_at > ? ORDER BY p.expires_at DESC LIMIT ?",
        )
        .bind(now)
        .bind(key.as_bytes())
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.acquire(&self.readers).await?)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let provider: Vec<u8> = row.try_get("provider")?;
            let Ok(peer) = PeerId::from_bytes(&provider) else { continue };
            let addrs: Option<Vec<u8>> = row.try_get("addrs")?;
            out.push(StoredProvider {
                peer,
                addrs: addrs.map(|a| decode_addrs(&a)).unwrap_or_default(),
                expires_at: row.try_get("expires_at")?,
                addrs_expire_at: row.try_get("addrs_expire_at")?,
            });
        }
        Ok(out)
    }

    pub async fn peer_addrs(
        &self,
        peer: &PeerId,
        now: i64,
    ) -> Result<Option<(Vec<Multiaddr>, i64)>, StoreError> {
        let row = sqlx::query("SELECT addrs, expires_at FROM peer_addrs WHERE peer = ? AND expires_at > ?")
            .bind(peer.to_bytes())
            .bind(now)
            .fetch_optional(&mut *self.acquire(&self.readers).await?)
            .await?;
        Ok(match row {
            Some(row) => {
                let addrs: Vec<u8> = row.try_get("addrs")?;
                Some((decode_addrs(&addrs), row.try_get("expires_at")?))
            }
            None => None,
        })
    }

    pub async fn put_value(
        &self,
        r: &ValueRecord,
        expires_at: i64,
        order: Option<(i64, i64)>,
    ) -> Result<bool, StoreError> {
        let (seq, eol) = order.unzip();
        let done = sqlx::query(PUT_VALUE)
            .bind(&r.key)
            .bind(&r.value)
            .bind(&r.time_received)
            .bind(expires_at)
            .bind(seq)
            .bind(eol)
            .execute(&mut *self.acquire(&self.writer).await?)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn get_value(&self, key: &[u8], now: i64) -> Result<Option<ValueRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key, value, time_received FROM value_records WHERE key = ? AND expires_at > ?",
        )
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *self.acquire(&self.readers).await?)
        .await?;
        Ok(match row {
            Some(row) => Some(ValueRecord {
                key: row.try_get("key")?,
                value: row.try_get("value")?,
                time_received: row.try_get("time_received")?,
            }),
            None => None,
        })
    }

    pub async fn gc_chunk(&self, now: i64, chunk: usize) -> Result<u64, StoreError> {
        let chunk = i64::try_from(chunk).unwrap_or(i64::MAX);
        let mut deleted = 0;
        for sql in GC_STATEMENTS {
            deleted += sqlx::query(sql).bind(now).bind(chunk).execute(&self.writer).await?.rows_affected();
        }
        Ok(deleted)
    }

    /// Collect every expired row, `chunk` rows per statement per table (this process is the only
    /// user of the file, so it always holds the "lease").
    pub async fn gc_round(&self, now: i64, chunk: usize) -> Result<Option<u64>, StoreError> {
        let mut total = 0;
        // Bounded: a round deletes at most 10,000 chunks; the rest waits for the next round.
        for _ in 0..10_000 {
            let n = self.gc_chunk(now, chunk).await?;
            total += n;
            if n == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok(Some(total))
    }

    /// Row estimates from `sqlite_stat1`, refreshed by a sampling ANALYZE (at most ~1,000 rows
    /// per index are read, so this stays cheap on any table size).
    pub async fn estimate_counts(&self) -> Result<(f64, f64), StoreError> {
        let mut conn = self.writer.acquire().await?;
        sqlx::query("PRAGMA analysis_limit = 1000").execute(&mut *conn).await?;
        sqlx::query("ANALYZE providers").execute(&mut *conn).await?;
        sqlx::query("ANALYZE peer_addrs").execute(&mut *conn).await?;
        let rows = sqlx::query("SELECT tbl, stat FROM sqlite_stat1 WHERE tbl IN ('providers', 'peer_addrs')")
            .fetch_all(&mut *conn)
            .await?;
        let (mut providers, mut peers) = (0f64, 0f64);
        for row in rows {
            let tbl: String = row.try_get("tbl")?;
            let stat: String = row.try_get("stat")?;
            let n: f64 = stat.split(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            match tbl.as_str() {
                "providers" => providers = providers.max(n),
                _ => peers = peers.max(n),
            }
        }
        Ok((providers, peers))
    }

    /// One trivial statement on a reader: the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.readers.acquire().await?;
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.readers.close().await;
    }
}

/// A lease transaction on the single writer connection (the embedded store has one process).
struct SqliteLeaseTx<'a>(sqlx::Transaction<'a, Sqlite>);

impl LeaseTx for SqliteLeaseTx<'_> {
    /// The embedded store's clock is this host's.
    async fn now(&mut self) -> Result<i64, StoreError> {
        Ok(now_ms())
    }

    async fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM hydra_meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&mut *self.0)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("value")?),
            None => None,
        })
    }

    async fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO hydra_meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn identities(&mut self) -> Result<Vec<IdentityRow>, StoreError> {
        let rows =
            sqlx::query("SELECT idx, choice, kad_key FROM head_identities").fetch_all(&mut *self.0).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>("idx")? as u32,
                    r.try_get::<i64, _>("choice")? as u8,
                    r.try_get("kad_key")?,
                ))
            })
            .collect()
    }

    async fn leases(&mut self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = sqlx::query("SELECT idx, node_name, slot, expires_at, token FROM head_leases")
            .fetch_all(&mut *self.0)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRow {
                    index: r.try_get::<i64, _>("idx")? as u32,
                    node: r.try_get("node_name")?,
                    slot: r.try_get::<i64, _>("slot")? as u32,
                    expires_at: r.try_get("expires_at")?,
                    token: r.try_get("token")?,
                })
            })
            .collect()
    }

    async fn insert_identity(
        &mut self,
        index: u32,
        choice: u8,
        kad_key: &[u8],
        peer: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO head_identities (idx, choice, kad_key, peer_id) VALUES (?, ?, ?, ?)")
            .bind(i64::from(index))
            .bind(i64::from(choice))
            .bind(kad_key)
            .bind(peer)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn release(&mut self, node: &str, index: u32) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM head_leases WHERE idx = ? AND node_name = ?")
            .bind(i64::from(index))
            .bind(node)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn lease(
        &mut self,
        index: u32,
        node: &str,
        token: &str,
        slot: u32,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO head_leases (idx, node_name, slot, expires_at, token) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (idx) DO UPDATE SET node_name = excluded.node_name, slot = excluded.slot, \
             expires_at = excluded.expires_at, token = excluded.token",
        )
        .bind(i64::from(index))
        .bind(node)
        .bind(i64::from(slot))
        .bind(expires_at)
        .bind(token)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await?;
        Ok(())
    }
}

impl SqliteStore {
    /// Lease `n` head identities for `node` (see `store::leases`).
    pub async fn acquire_heads(
        &self,
        node: &str,
        token: &str,
        n: u32,
        ttl: std::time::Duration,
        seed: std::sync::Arc<crate::identity::Seed>,
    ) -> Result<Vec<LeasedHead>, StoreError> {
        let tx = self.writer.begin().await?;
        leases::acquire(SqliteLeaseTx(tx), node, token, n, ttl, seed).await
    }

    /// Clear this run's token from its leases (graceful shutdown).
    pub async fn release_leases(&self, node: &str, token: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query("UPDATE head_leases SET token = NULL WHERE node_name = ? AND token = ?")
            .bind(node)
            .bind(token)
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    pub async fn renew_leases(
        &self,
        node: &str,
        token: &str,
        expires_at: i64,
        heads: &[(u32, String)],
    ) -> Result<Vec<u32>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let mut held = Vec::new();
        for (idx, addrs) in heads {
            let n = sqlx::query(
                "UPDATE head_leases SET expires_at = ?, addrs = ? WHERE idx = ? AND node_name = ? AND token = ?",
            )
            .bind(expires_at)
            .bind(addrs)
            .bind(i64::from(*idx))
            .bind(node)
            .bind(token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                held.push(*idx);
            }
        }
        tx.commit().await?;
        Ok(held)
    }

    /// Distinct processes (node names) holding a lease that expires after `now` (ms).
    pub async fn count_live_processes(&self, now: i64) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT count(DISTINCT node_name) FROM head_leases WHERE expires_at > ?")
            .bind(now)
            .fetch_one(&self.readers)
            .await?;
        Ok(row.try_get::<i64, _>(0)?.max(0) as u64)
    }

    pub async fn list_heads(&self, now: i64) -> Result<Vec<super::HeadRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT i.idx, i.peer_id, l.node_name, l.slot, l.addrs, l.expires_at \
             FROM head_identities i LEFT JOIN head_leases l ON l.idx = i.idx ORDER BY i.idx",
        )
        .fetch_all(&self.readers)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>(0)? as u32,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get::<Option<i64>, _>(3)?.map(|s| s as u32),
                    r.try_get::<Option<String>, _>(4)?.unwrap_or_default(),
                    r.try_get(5)?,
                    r.try_get::<Option<i64>, _>(5)?.is_some_and(|e| e > now),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;
    use std::collections::HashSet;

    fn test_histogram() -> prometheus::Histogram {
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap()
    }

    fn row(key: &ProviderKey, peer: PeerId, expires_at: i64, addrs_expire_at: i64) -> ProviderWrite {
        ProviderWrite {
            key: key.clone(),
            provider: peer,
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap()],
            expires_at,
            addrs_expire_at,
        }
    }

    #[tokio::test]
    async fn live_processes_are_counted_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite"), test_histogram()).await.unwrap();
        s.migrate().await.unwrap();
        assert_eq!(s.count_live_processes(1_000).await.unwrap(), 0);
        // Two heads of "a", one of "b", one of "c" whose lease has expired.
        let mut tx = s.writer.begin().await.unwrap();
        for (idx, node, expires) in [(0, "a", 5_000), (1, "a", 5_000), (2, "b", 5_000), (3, "c", 500)] {
            sqlx::query(
                "INSERT INTO head_identities (idx, choice, kad_key, peer_id) VALUES (?, 0, x'00', ?)",
            )
            .bind(idx)
            .bind(format!("peer{idx}"))
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO head_leases (idx, node_name, token, slot, addrs, expires_at) VALUES (?, ?, 't', ?, '', ?)",
            )
            .bind(idx)
            .bind(node)
            .bind(idx)
            .bind(expires)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        assert_eq!(s.count_live_processes(1_000).await.unwrap(), 2, "a and b; c's lease has expired");
        assert_eq!(s.count_live_processes(6_000).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn expired_rows_are_never_returned_and_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite"), test_histogram()).await.unwrap();
        s.migrate().await.unwrap();
        let now = 1_000_000;
        let key = ProviderKey::new(b"k1".to_vec()).unwrap();
        let (live, dead, no_addr) = (PeerId::random(), PeerId::random(), PeerId::random());
        s.put_providers(&[
            row(&key, live, now + 10, now + 10),
            row(&key, dead, now - 1, now + 10),
            row(&key, no_addr, now + 10, now - 1),
        ])
        .await
        .unwrap();
        let got = s.get_providers(std::slice::from_ref(&key), now, 100).await.unwrap();
        let mut peers: Vec<_> = got.iter().map(|(_, r)| (r.peer, r.addrs.len())).collect();
        peers.sort();
        let mut want = vec![(live, 1), (no_addr, 0)];
        want.sort();
        assert_eq!(peers, want, "expired record hidden; expired addresses dropped");

        // A refresh never moves expiry backwards.
        s.put_providers(&[row(&key, live, now - 5, now - 5)]).await.unwrap();
        assert_eq!(s.get_providers(std::slice::from_ref(&key), now, 100).await.unwrap().len(), 2);

        // GC removes the expired record and the expired address row, in chunks.
        let mut deleted = 0;
        loop {
            let n = s.gc_chunk(now, 1).await.unwrap();
            if n == 0 {
                break;
            }
            deleted += n;
        }
        assert_eq!(deleted, 2);
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM providers").fetch_one(&s.readers).await.unwrap();
        assert_eq!(left, 2);
    }

    #[tokio::test]
    async fn reads_cap_providers_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite"), test_histogram()).await.unwrap();
        s.migrate().await.unwrap();
        let key = ProviderKey::new(b"popular".to_vec()).unwrap();
        let rows: Vec<_> = (0..50).map(|_| row(&key, PeerId::random(), i64::MAX, i64::MAX)).collect();
        s.put_providers(&rows).await.unwrap();
        assert_eq!(s.get_providers(std::slice::from_ref(&key), 0, 20).await.unwrap().len(), 20);
    }

    #[tokio::test]
    async fn reads_sample_a_random_window_of_a_popular_keys_providers() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite"), test_histogram()).await.unwrap();
        s.migrate().await.unwrap();
        let key = ProviderKey::new(b"popular".to_vec()).unwrap();
        let peers: Vec<PeerId> = (0..300).map(|_| PeerId::random()).collect();
        let rows: Vec<_> = peers.iter().map(|p| row(&key, *p, i64::MAX, i64::MAX)).collect();
        s.put_providers(&rows).await.unwrap();
        // Two rows as a version before sampling wrote them (sample key 0), then one refreshed.
        let legacy: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
        for p in &legacy {
            sqlx::query("INSERT INTO providers (key, provider, expires_at) VALUES (?, ?, ?)")
                .bind(key.as_bytes())
                .bind(p.to_bytes())
                .bind(i64::MAX)
                .execute(&s.writer)
                .await
                .unwrap();
        }
        s.put_providers(&[row(&key, legacy[0], i64::MAX, i64::MAX)]).await.unwrap();
        let sample_key = |p: PeerId| {
            sqlx::query_scalar::<_, i64>("SELECT sample_key FROM providers WHERE key = ? AND provider = ?")
                .bind(key.as_bytes())
                .bind(p.to_bytes())
                .fetch_one(&s.readers)
        };
        assert_ne!(sample_key(legacy[0]).await.unwrap(), 0, "a refresh gives a legacy row a sample key");
        assert_eq!(sample_key(legacy[1]).await.unwrap(), 0);
        let first = sample_key(peers[0]).await.unwrap();
        s.put_providers(&[row(&key, peers[0], i64::MAX, i64::MAX)]).await.unwrap();
        assert_eq!(sample_key(peers[0]).await.unwrap(), first, "a refresh keeps the sample key");

        // Everything fits: all 302 in one read (the window wraps around).
        let all = s.get_providers(std::slice::from_ref(&key), 0, 1000).await.unwrap();
        assert_eq!(all.iter().map(|(_, r)| r.peer).collect::<HashSet<_>>().len(), 302);
        // 20 per read: 20 distinct each time, and every provider within 400 reads (each is in a
        // read with probability about 20/302; missing one over 400 reads: below 1e-8).
        let mut seen = HashSet::new();
        for _ in 0..400 {
            let got = s.get_providers(std::slice::from_ref(&key), 0, 20).await.unwrap();
            let distinct: HashSet<PeerId> = got.iter().map(|(_, r)| r.peer).collect();
            assert_eq!((got.len(), distinct.len()), (20, 20));
            seen.extend(distinct);
        }
        assert_eq!(seen.len(), 302, "every provider, legacy rows included, is sampled");

        // Each read is a range of the (key, sample_key) index, not a scan of the key's rows.
        sqlx::query("ANALYZE").execute(&s.writer).await.unwrap();
        for sql in [SAMPLE_FROM, SAMPLE_BEFORE] {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(0)
                .bind(key.as_bytes())
                .bind(0)
                .bind(20)
                .fetch_all(&s.readers)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>("detail"))
                .collect();
            let plan = plan.join("; ");
            assert!(plan.contains("providers_sample") && !plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    /// The identity scheme is recorded with a fleet's first identities (v2: 32 candidates); a
    /// fleet whose identities predate the record keeps extending its sequence with v1's rule.
    #[tokio::test]
    async fn the_identity_scheme_is_recorded_and_older_fleets_keep_theirs() {
        use crate::identity::{extend, kad_key, KeyTrie, Scheme, Seed};
        let seed = std::sync::Arc::new(Seed::from_hex(&"5a".repeat(32)).unwrap());
        let ttl = std::time::Duration::from_secs(60);
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.sqlite"), test_histogram()).await.unwrap();
        s.migrate().await.unwrap();
        let peers = |s: &SqliteStore| {
            let s = s.clone();
            async move { s.list_heads(0).await.unwrap().into_iter().map(|r| r.1).collect::<Vec<String>>() }
        };
        let expected = |keys: &[String], range: std::ops::Range<u32>, scheme| {
            let mut trie = KeyTrie::default();
            for p in keys {
                trie.insert(kad_key(&p.parse().unwrap()));
            }
            extend(&seed, &mut trie, range, scheme)
                .into_iter()
                .map(|i| i.keypair.public().to_peer_id().to_string())
                .collect::<Vec<_>>()
        };

        s.acquire_heads("a", "t1", 5, ttl, seed.clone()).await.unwrap();
        let first = peers(&s).await;
        assert_eq!(first, expected(&[], 0..5, Scheme::V2), "a new fleet is issued scheme v2");
        let recorded: Vec<u8> =
            sqlx::query_scalar("SELECT value FROM hydra_meta WHERE key = 'identity_scheme'")
                .fetch_one(&s.readers)
                .await
                .unwrap();
        assert_eq!(recorded, b"2");

        // As if an older release had issued these five: no record of a scheme.
        sqlx::query("DELETE FROM hydra_meta WHERE key = 'identity_scheme'").execute(&s.writer).await.unwrap();
        s.acquire_heads("b", "t2", 5, ttl, seed.clone()).await.unwrap();
        let all = peers(&s).await;
        assert_eq!(all[..5], first[..], "existing identities never change");
        assert_eq!(all[5..], expected(&first, 5..10, Scheme::V1)[..], "the older fleet keeps v1");

        // A scheme this release does not know is refused, not guessed.
        sqlx::query("UPDATE hydra_meta SET value = x'39' WHERE key = 'identity_scheme'")
            .execute(&s.writer)
            .await
            .unwrap();
        let err = s.acquire_heads("c", "t3", 1, ttl, seed.clone()).await.unwrap_err();
        assert!(err.to_string().contains("newer than this release"), "{err}");
    }
}
