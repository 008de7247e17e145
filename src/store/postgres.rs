//! The fleet store: PostgreSQL through a `deadpool-postgres` pool of `tokio-postgres` clients.
//!
//! Hot-path statements are prepared once per connection (`prepare_cached`) and move whole batches
//! as arrays: writes are `INSERT … SELECT FROM unnest(…) ON CONFLICT …` (as fast as binary COPY up
//! to 1,000 rows here, one round trip, no staging table), reads are one `unnest` + `LATERAL … LIMIT`
//! statement for many keys. Rows are sorted before writing so concurrent flushes, from this process
//! or another, lock rows in the same order and cannot deadlock.
//!
//! Garbage collection sweeps heap-page ranges (`hydra_gc_pages`) on a dedicated session that holds
//! a fleet-wide advisory lock: only the holder collects, and a crashed holder's lock ends with its
//! session. Migrations (`migrations/postgres/`) run through sqlx, which serialises concurrent
//! migrators with its own advisory lock.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use libp2p::{Multiaddr, PeerId};
use sqlx::migrate::Migrator;
use sqlx::Connection;
use tokio::sync::Mutex;
use tokio_postgres::NoTls;

use std::sync::Arc;

use super::leases::{self, IdentityRow, LeaseTx, LeasedHead};
use super::sqlite::Embedded;
use super::{new_sample_key, now_ms, ProviderWrite, StoreError, StoredProvider};
use crate::config::{redact_url, PostgresSection};
use crate::identity::{LeaseRow, Seed};
use crate::types::{decode_addrs, encode_addrs, PeerRecord, ProviderKey, ValueRecord};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
    (2, "head identities", include_str!("../../migrations/postgres/0002_head_identities.sql")),
    (3, "lease tokens", include_str!("../../migrations/postgres/0003_lease_tokens.sql")),
    (4, "value order", include_str!("../../migrations/postgres/0004_value_order.sql")),
    (5, "sample key", include_str!("../../migrations/postgres/0005_sample_key.sql")),
];

/// Advisory lock key of the garbage-collection lease ("hydra gc").
const GC_LOCK_KEY: i64 = 0x0068_7964_7261_6763;

/// The batched provider upsert (also used raw by the benchmark and tests). `$3` holds each row's
/// remaining lifetime in milliseconds: the expiry is reckoned on the database's clock, so a host
/// whose clock is off writes the same expiry as any other. `$4` holds each row's random sample
/// key; a refresh keeps the stored one (so it stays a HOT update), except the 0 of a row written
/// before migration 0005.
pub const UPSERT_PROVIDERS: &str = "\
    INSERT INTO providers (key, provider, expires_at, sample_key) \
    SELECT k, p, now() + ms * interval '1 millisecond', s \
    FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int4[]) AS u(k, p, ms, s) \
    ON CONFLICT (key, provider) DO UPDATE SET expires_at = excluded.expires_at, \
        sample_key = CASE WHEN providers.sample_key = 0 THEN excluded.sample_key ELSE providers.sample_key END \
    WHERE providers.expires_at < excluded.expires_at";

const UPSERT_ADDRS: &str = "\
    INSERT INTO peer_addrs (peer, addrs, expires_at) \
    SELECT p, a, now() + ms * interval '1 millisecond' \
    FROM unnest($1::bytea[], $2::bytea[], $3::int8[]) AS u(p, a, ms) \
    ON CONFLICT (peer) DO UPDATE SET addrs = excluded.addrs, expires_at = excluded.expires_at \
    WHERE peer_addrs.expires_at <= excluded.expires_at";

/// The batched lookup statement (also used raw by the benchmark): per key (`$1`), at most `$2`
/// live providers (by the database's clock) in sample-key order from a random starting point
/// (`$3`), wrapping around. Each
/// arm is one range of the `(key, sample_key)` index and the outer `LIMIT` stops the second arm
/// as soon as the first has filled the answer.
pub const LOOKUP: &str = "\
    SELECT k.key, p.provider, a.addrs \
    FROM unnest($1::bytea[], $3::int4[]) AS k(key, start) \
    CROSS JOIN LATERAL ( \
        (SELECT provider, sample_key FROM providers \
         WHERE providers.key = k.key AND sample_key >= k.start AND providers.expires_at > now() \
         ORDER BY sample_key LIMIT $2) \
        UNION ALL \
        (SELECT provider, sample_key FROM providers \
         WHERE providers.key = k.key AND sample_key < k.start AND providers.expires_at > now() \
         ORDER BY sample_key LIMIT $2) \
        LIMIT $2) p \
    LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > now()";

/// Upsert of a value record; a stored IPNS record is replaced only by a better one or itself
/// (see `Store::put_value`). The row lock of `ON CONFLICT` orders concurrent writers of a fleet:
/// each compares against the committed winner, so a name never regresses.
const PUT_VALUE: &str = "\
    INSERT INTO value_records AS v (key, value, time_received, expires_at, seq, eol_ms) \
    VALUES ($1, $2, $3, LEAST(now() + $4::int8 * interval '1 millisecond', to_timestamp($7::float8 / 1000.0)), $5, $6) \
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, time_received = excluded.time_received, \
        expires_at = excluded.expires_at, seq = excluded.seq, eol_ms = excluded.eol_ms \
    WHERE excluded.seq IS NULL OR v.seq IS NULL OR v.expires_at <= now() \
       OR excluded.seq > v.seq \
       OR (excluded.seq = v.seq AND excluded.eol_ms > v.eol_ms) \
       OR excluded.value = v.value";

/// Deadlock or serialization failure: the statement may succeed if run again.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// Convert the store's millisecond timestamps to the `timestamptz` values PostgreSQL keeps.
pub fn to_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// Inverse of [`to_time`] (milliseconds since the epoch).
fn from_time(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Handle to the PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    /// Time spent waiting for a pooled connection.
    pool_wait: prometheus::Histogram,
    pg_config: tokio_postgres::Config,
    /// The session holding the GC advisory lock, if this process is the leaseholder.
    lease: Mutex<Option<tokio_postgres::Client>>,
}

impl PgStore {
    /// Connect, retrying an unreachable server until `cfg.connect_timeout` (one log line per try).
    pub async fn connect(
        url: &str,
        cfg: &PostgresSection,
        pool_wait: prometheus::Histogram,
    ) -> Result<Self, StoreError> {
        let mut pg_config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Unreachable(format!("{}: {e}", redact_url(url))))?;
        // Bounds on the client side too: a database that silently stops answering (network
        // black hole) must not hold a flush, a lookup or a lease renewal for minutes.
        let io_deadline = cfg.statement_timeout + Duration::from_secs(5);
        // And on the server's side: a transaction whose client stopped between statements (a
        // frozen or partitioned process) is aborted after the same deadline. A lease transaction
        // holds the fleet's lease lock, so an abandoned one would stop every process's renewals.
        pg_config
            .options(format!(
                "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
                cfg.statement_timeout.as_millis(),
                io_deadline.as_millis()
            ))
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(io_deadline)
            .application_name("hydra");
        let mgr = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .wait_timeout(Some(io_deadline))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        let start = Instant::now();
        let mut attempt = 1;
        loop {
            match pool.get().await {
                Ok(_) => break,
                Err(e) if start.elapsed() < cfg.connect_timeout => {
                    tracing::warn!(attempt, error = %e, url = %redact_url(url), "database not reachable; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(StoreError::Unreachable(format!(
                        "{} not reachable after {attempt} attempts in {:?}: {e}",
                        redact_url(url),
                        cfg.connect_timeout
                    )))
                }
            }
        }
        // Warm the pool (4 connections: the default lookup statements in flight): the first
        // lookups must not each pay a connection set-up (under a busy
        // CPU that is hundreds of ms, enough to miss the read deadline and raise the tier).
        // Best effort: a connection that fails now is made on demand later.
        let warm = futures::future::join_all((0..cfg.pool_size.min(4)).map(|_| pool.get())).await;
        let warmed = warm.iter().filter(|c| c.is_ok()).count();
        drop(warm);
        tracing::debug!(connections = warmed, "datastore pool warmed");
        Ok(Self { pool, pool_wait, pg_config, lease: Mutex::new(None) })
    }

    /// A pooled connection; the wait is measured.
    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let t = Instant::now();
        let c = self.pool.get().await?;
        self.pool_wait.observe(t.elapsed().as_secs_f64());
        Ok(c)
    }

    /// (open connections, in use, tasks waiting).
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.size.saturating_sub(s.available), s.waiting)
    }

    /// Apply pending migrations (sqlx holds an advisory lock while it does).
    pub async fn migrate(url: &str) -> Result<(), StoreError> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let mut migrator = Migrator::new(Embedded(MIGRATIONS)).await?;
        // Rolling upgrades: a process may start on a schema a newer version already migrated
        // (migrations are additive: docs/decisions/2026-12-01-routing-api-and-ipns.md).
        migrator.set_ignore_missing(true);
        migrator.run(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    /// Upsert a batch. A deadlock or serialization failure (which sorted rows make unlikely but
    /// not impossible against other writers of the same database) is retried, at most twice.
    pub async fn put_providers(&self, rows: &[ProviderWrite]) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            match self.put_providers_once(rows).await {
                Err(StoreError::Postgres(e)) if attempt < 2 && is_transient(&e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "provider flush retried");
                    tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                }
                res => return res,
            }
        }
    }

    async fn put_providers_once(&self, rows: &[ProviderWrite]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sorted: Vec<&ProviderWrite> = rows.iter().collect();
        sorted.sort_unstable_by(|a, b| (a.key.as_bytes(), a.provider).cmp(&(b.key.as_bytes(), b.provider)));
        let keys: Vec<&[u8]> = sorted.iter().map(|r| r.key.as_bytes()).collect();
        let providers: Vec<Vec<u8>> = sorted.iter().map(|r| r.provider.to_bytes()).collect();
        // Lifetimes left, not host times: the database adds them to its own clock.
        let now = now_ms();
        let expires: Vec<i64> = sorted.iter().map(|r| r.expires_at.saturating_sub(now)).collect();
        let sample_keys: Vec<i32> = sorted.iter().map(|_| new_sample_key()).collect();

        // One row per peer: the latest addresses and expiry in this batch.
        let mut by_peer: HashMap<PeerId, &ProviderWrite> = HashMap::new();
        for r in rows {
            by_peer
                .entry(r.provider)
                .and_modify(|cur| {
                    if r.addrs_expire_at > cur.addrs_expire_at {
                        *cur = r
                    }
                })
                .or_insert(r);
        }
        let mut peers: Vec<(Vec<u8>, &ProviderWrite)> =
            by_peer.into_iter().map(|(p, r)| (p.to_bytes(), r)).collect();
        peers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let peer_ids: Vec<&[u8]> = peers.iter().map(|(p, _)| p.as_slice()).collect();
        let addrs: Vec<Vec<u8>> = peers.iter().map(|(_, r)| encode_addrs(&r.addrs)).collect();
        let addr_expires: Vec<i64> =
            peers.iter().map(|(_, r)| r.addrs_expire_at.saturating_sub(now)).collect();

        let client = self.conn().await?;
        let up = client.prepare_cached(UPSERT_PROVIDERS).await?;
        let ua = client.prepare_cached(UPSERT_ADDRS).await?;
        // Two autocommit statements, pipelined: records first, then addresses.
        let p1: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&keys, &providers, &expires, &sample_keys];
        let p2: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&peer_ids, &addrs, &addr_expires];
        let (r1, r2) = tokio::join!(client.execute(&up, &p1), client.execute(&ua, &p2));
        r1?;
        r2?;
        Ok(())
    }

    pub async fn get_providers(
        &self,
        keys: &[ProviderKey],
        per_key: usize,
    ) -> Result<Vec<(ProviderKey, PeerRecord)>, StoreError> {
        let client = self.conn().await?;
        let stmt = client.prepare_cached(LOOKUP).await?;
        let key_bytes: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let limit = i64::try_from(per_key).unwrap_or(i64::MAX);
        let starts: Vec<i32> = keys.iter().map(|_| rand::random()).collect();
        let rows = client.query(&stmt, &[&key_bytes, &limit, &starts]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let key: Vec<u8> = row.try_get(0)?;
            let provider: &[u8] = row.try_get(1)?;
            let addrs: Option<&[u8]> = row.try_get(2)?;
            let (Ok(key), Ok(peer)) = (ProviderKey::new(key), PeerId::from_bytes(provider)) else { continue };
            out.push((key, PeerRecord { peer, addrs: addrs.map(decode_addrs).unwrap_or_default() }));
        }
        Ok(out)
    }

    pub async fn inspect_providers(
        &self,
        key: &ProviderKey,
        limit: usize,
    ) -> Result<Vec<StoredProvider>, StoreError> {
        let client = self.conn().await?;
        let stmt = client
            .prepare_cached(
                "SELECT p.provider, p.expires_at, a.addrs, a.expires_at \
                 FROM providers p LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > now() \
                 WHERE p.key = $1 AND p.expires_at > now() ORDER BY p.expires_at DESC LIMIT $2",
            )
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&stmt, &[&key.as_bytes(), &limit]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let provider: &[u8] = row.try_get(0)?;
            let Ok(peer) = PeerId::from_bytes(provider) else { continue };
            let addrs: Option<&[u8]> = row.try_get(2)?;
            let addrs_expire_at: Option<SystemTime> = row.try_get(3)?;
            out.push(StoredProvider {
                peer,
                addrs: addrs.map(decode_addrs).unwrap_or_default(),
                expires_at: from_time(row.try_get(1)?),
                addrs_expire_at: addrs_expire_at.map(from_time),
            });
        }
        Ok(out)
    }

    pub async fn peer_addrs(&self, peer: &PeerId) -> Result<Option<(Vec<Multiaddr>, i64)>, StoreError> {
        let client = self.conn().await?;
        let stmt = client
            .prepare_cached("SELECT addrs, expires_at FROM peer_addrs WHERE peer = $1 AND expires_at > now()")
            .await?;
        let row = client.query_opt(&stmt, &[&peer.to_bytes()]).await?;
        Ok(match row {
            Some(row) => Some((decode_addrs(row.try_get(0)?), from_time(row.try_get(1)?))),
            None => None,
        })
    }

    /// `ttl`: lifetime from the database's clock; `eol_ms`: a record's own end of validity
    /// (absolute, from the record), which caps it.
    pub async fn put_value(
        &self,
        r: &ValueRecord,
        ttl: Duration,
        eol_ms: Option<i64>,
        order: Option<(i64, i64)>,
    ) -> Result<bool, StoreError> {
        let client = self.conn().await?;
        let stmt = client.prepare_cached(PUT_VALUE).await?;
        let (seq, order_eol) = order.unzip();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        // LEAST ignores a NULL: without an end of validity the lifetime alone decides.
        let cap: Option<f64> = eol_ms.map(|e| e as f64);
        let n = client
            .execute(&stmt, &[&r.key, &r.value, &r.time_received, &ttl_ms, &seq, &order_eol, &cap])
            .await?;
        Ok(n > 0)
    }

    pub async fn get_value(&self, key: &[u8]) -> Result<Option<ValueRecord>, StoreError> {
        let client = self.conn().await?;
        let stmt = client
            .prepare_cached(
                "SELECT key, value, time_received FROM value_records WHERE key = $1 AND expires_at > now()",
            )
            .await?;
        let row = client.query_opt(&stmt, &[&key]).await?;
        Ok(match row {
            Some(row) => Some(ValueRecord {
                key: row.try_get(0)?,
                value: row.try_get(1)?,
                time_received: row.try_get(2)?,
            }),
            None => None,
        })
    }

    /// Take (or confirm) the fleet-wide GC lease. Returns whether this process holds it.
    pub async fn hold_gc_lease(&self) -> Result<bool, StoreError> {
        let mut lease = self.lease.lock().await;
        if let Some(c) = lease.as_ref() {
            if c.simple_query("SELECT 1").await.is_ok() {
                return Ok(true);
            }
            *lease = None; // the session died: so did the lock
        }
        let (client, conn) = self.pg_config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "GC lease session ended");
            }
        });
        let got: bool =
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&GC_LOCK_KEY]).await?.try_get(0)?;
        if got {
            *lease = Some(client);
        }
        Ok(got)
    }

    /// One garbage-collection sweep, if this process holds the lease: every heap relation of
    /// every table, `chunk_pages` pages per statement. `Ok(None)`: another process holds it.
    /// Expiry is judged by the database's clock (`now()`), never the host's.
    pub async fn gc_round(&self, chunk_pages: usize) -> Result<Option<u64>, StoreError> {
        if !self.hold_gc_lease().await? {
            return Ok(None);
        }
        let lease = self.lease.lock().await;
        let Some(client) = lease.as_ref() else { return Ok(None) };
        let chunk = i64::try_from(chunk_pages).unwrap_or(i64::MAX);
        let mut deleted = 0u64;
        for table in ["providers", "peer_addrs", "value_records"] {
            let rels = client
                .query("SELECT rel::oid, pages FROM hydra_heap_relations($1::text::regclass)", &[&table])
                .await?;
            for rel in rels {
                let oid: u32 = rel.try_get(0)?;
                let pages: i64 = rel.try_get(1)?;
                let mut first = 0i64;
                while first < pages {
                    let n: i64 = client
                        .query_one(
                            "SELECT hydra_gc_pages($1::oid::regclass, $2, $3, now())",
                            &[&oid, &first, &(first + chunk)],
                        )
                        .await?
                        .try_get(0)?;
                    deleted += n as u64;
                    first += chunk;
                }
            }
        }
        Ok(Some(deleted))
    }

    /// Catalogue estimates of (provider records, peers with addresses).
    pub async fn estimate_counts(&self) -> Result<(f64, f64), StoreError> {
        let client = self.conn().await?;
        let row = client
            .query_one("SELECT hydra_estimate_rows('providers'), hydra_estimate_rows('peer_addrs')", &[])
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// One trivial statement on a pooled connection: the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.conn().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Release the GC lease and close the pool.
    pub async fn close(&self) {
        self.lease.lock().await.take();
        self.pool.close();
    }
}

/// Advisory transaction-lock key serialising head-identity leasing ("hydra heads").
const HEADS_LOCK_KEY: i64 = 0x0068_7964_7261_6864;

/// A lease transaction holding the fleet's lease lock.
struct PgLeaseTx<'a>(deadpool_postgres::Transaction<'a>);

impl LeaseTx for PgLeaseTx<'_> {
    async fn now(&mut self) -> Result<i64, StoreError> {
        let row =
            self.0.query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8", &[]).await?;
        Ok(row.try_get(0)?)
    }

    async fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.0.query_opt("SELECT value FROM hydra_meta WHERE key = $1", &[&key]).await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    async fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.execute("INSERT INTO hydra_meta (key, value) VALUES ($1, $2)", &[&key, &value]).await?;
        Ok(())
    }

    async fn identities(&mut self) -> Result<Vec<IdentityRow>, StoreError> {
        let rows = self.0.query("SELECT idx, choice, kad_key FROM head_identities", &[]).await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<_, i32>(0)? as u32, r.try_get::<_, i16>(1)? as u8, r.try_get(2)?)))
            .collect()
    }

    async fn leases(&mut self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = self
            .0
            .query(
                "SELECT idx, node_name, slot, (extract(epoch FROM expires_at) * 1000)::int8, token \
                 FROM head_leases",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRow {
                    index: r.try_get::<_, i32>(0)? as u32,
                    node: r.try_get(1)?,
                    slot: r.try_get::<_, i32>(2)? as u32,
                    expires_at: r.try_get(3)?,
                    token: r.try_get(4)?,
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
        self.0
            .execute(
                "INSERT INTO head_identities (idx, choice, kad_key, peer_id) VALUES ($1, $2, $3, $4)",
                &[&(index as i32), &i16::from(choice), &kad_key, &peer],
            )
            .await?;
        Ok(())
    }

    async fn release(&mut self, node: &str, index: u32) -> Result<(), StoreError> {
        self.0
            .execute("DELETE FROM head_leases WHERE idx = $1 AND node_name = $2", &[&(index as i32), &node])
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
        self.0
            .execute(
                "INSERT INTO head_leases (idx, node_name, slot, expires_at, token) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (idx) DO UPDATE SET node_name = excluded.node_name, slot = excluded.slot, \
                 expires_at = excluded.expires_at, token = excluded.token",
                &[&(index as i32), &node, &(slot as i32), &to_time(expires_at), &token],
            )
            .await?;
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await?;
        Ok(())
    }
}

impl PgStore {
    /// Lease `n` head identities for `node` (see `store::leases`), under the fleet's lease lock.
    pub async fn acquire_heads(
        &self,
        node: &str,
        token: &str,
        n: u32,
        ttl: Duration,
        seed: Arc<Seed>,
    ) -> Result<Vec<LeasedHead>, StoreError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HEADS_LOCK_KEY]).await?;
        leases::acquire(PgLeaseTx(tx), node, token, n, ttl, seed).await
    }

    /// Clear this run's token from its leases (graceful shutdown).
    pub async fn release_leases(&self, node: &str, token: &str) -> Result<u64, StoreError> {
        let client = self.conn().await?;
        Ok(client
            .execute(
                "UPDATE head_leases SET token = NULL WHERE node_name = $1 AND token = $2",
                &[&node, &token],
            )
            .await?)
    }

    /// Extend `node`'s leases to `ttl` from the database's clock and record its heads' addresses;
    /// returns the identities it still held. Runs under the same lock as leasing, so a renewal
    /// never races a takeover: whichever commits first wins, and the other sees it (an identity
    /// missing from the answer, or a lease not yet expired).
    pub async fn renew_leases(
        &self,
        node: &str,
        token: &str,
        ttl: Duration,
        heads: &[(u32, String)],
    ) -> Result<Vec<u32>, StoreError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HEADS_LOCK_KEY]).await?;
        let idx: Vec<i32> = heads.iter().map(|(i, _)| *i as i32).collect();
        let addrs: Vec<&str> = heads.iter().map(|(_, a)| a.as_str()).collect();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let rows = tx
            .query(
                "UPDATE head_leases l SET expires_at = clock_timestamp() + $1::int8 * interval '1 millisecond', \
                 addrs = u.addrs \
                 FROM unnest($2::int4[], $3::text[]) AS u(idx, addrs) \
                 WHERE l.idx = u.idx AND l.node_name = $4 AND l.token = $5 RETURNING l.idx",
                &[&ttl_ms, &idx, &addrs, &node, &token],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(|r| Ok(r.try_get::<_, i32>(0)? as u32)).collect()
    }

    /// Every identity of the fleet with its lease.
    /// Distinct processes (node names) holding a live lease, by the database's clock.
    pub async fn count_live_processes(&self) -> Result<u64, StoreError> {
        let client = self.conn().await?;
        let row = client
            .query_one("SELECT count(DISTINCT node_name) FROM head_leases WHERE expires_at > now()", &[])
            .await?;
        Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
    }

    pub async fn list_heads(&self) -> Result<Vec<super::HeadRow>, StoreError> {
        let client = self.conn().await?;
        let rows = client
            .query(
                "SELECT i.idx, i.peer_id, l.node_name, l.slot, l.addrs, \
                        (extract(epoch FROM l.expires_at) * 1000)::int8, coalesce(l.expires_at > now(), false) \
                 FROM head_identities i LEFT JOIN head_leases l USING (idx) ORDER BY i.idx",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, i32>(0)? as u32,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get::<_, Option<i32>>(3)?.map(|s| s as u32),
                    r.try_get::<_, Option<String>>(4)?.unwrap_or_default(),
                    r.try_get(5)?,
                    r.try_get(6)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transaction_left_idle_is_aborted_and_releases_its_locks() {
        let cluster = hydra_testkit::PgCluster::start(false).unwrap();
        let url = hydra_testkit::create_database(&cluster.url("postgres"), "idle_tx").await.unwrap();
        let cfg = PostgresSection { statement_timeout: Duration::from_millis(100), ..Default::default() };
        let store = PgStore::connect(
            &url,
            &cfg,
            prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("w", "w")).unwrap(),
        )
        .await
        .unwrap();
        let mut held = store.conn().await.unwrap();
        let row = held.query_one("SHOW idle_in_transaction_session_timeout", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "5100ms");
        // A lease transaction whose process stops answering between statements.
        let tx = held.transaction().await.unwrap();
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&HEADS_LOCK_KEY]).await.unwrap();
        let other = store.conn().await.unwrap();
        let try_lock = || async {
            let r = other.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&HEADS_LOCK_KEY]).await;
            r.unwrap().get::<_, bool>(0)
        };
        assert!(!try_lock().await, "held by the open transaction");
        tokio::time::sleep(Duration::from_millis(5100)).await;
        // The server aborts it once the timeout has passed; on a busy machine (the whole suite
        // runs at once on two cores) that can take a while longer than 0.5 s, seen failing once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !try_lock().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server aborted the idle transaction and released its lock"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(tx.execute("SELECT 1", &[]).await.is_err(), "its session was ended");
    }
}
