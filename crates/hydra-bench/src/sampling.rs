//! `hydra-bench sampling`: what fair provider sampling costs on PostgreSQL, side by side in one
//! run (docs/decisions/2026-12-01-fair-provider-sampling.md).
//!
//! Per run, two fresh databases on one server get the same rows: `indexed` has the current
//! schema (with the `(key, sample_key)` index), `plain` the same schema without that index. Then:
//! - **writes**: the same `writes` records (half refreshes, half new keys) through the store's
//!   own upsert, 1,000-row batches from 4 connections, into each (order alternating per run);
//! - **popular key**: `lookups` reads of one key holding `popular` live providers, 200 per read:
//!   the store's window read (`LOOKUP`) on `indexed`; the previous statement (`LIMIT` without an
//!   order: always the same rows) on `plain`; and `ORDER BY random()` (fair, but it reads all of
//!   the key's rows) on `plain`;
//! - **ordinary keys**: `lookups` reads of 100 keys with 4 providers each per statement, window
//!   read vs the previous statement.
//!
//! It prints per run and as medians: rows/s, microseconds per read, and the ratios.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydra::config::{PostgresSection, StoreKind};
use hydra::store::{Store, LOOKUP_SQL, UPSERT_PROVIDERS_SQL};
use hydra_testkit::create_database;

use crate::store::{connect, median, server};

/// Options of `hydra-bench sampling`.
pub(crate) struct SamplingOpts {
    pub database_url: Option<String>,
    /// Ordinary keys preloaded (4 providers each).
    pub keys: usize,
    /// Providers of the one popular key.
    pub popular: usize,
    pub writes: usize,
    pub lookups: usize,
    pub runs: usize,
}

/// The lookup before fair sampling: the first rows in primary-key order.
const LOOKUP_UNORDERED: &str = "\
    SELECT k.key, p.provider, a.addrs \
    FROM unnest($1::bytea[]) AS k(key) \
    CROSS JOIN LATERAL ( \
        SELECT provider FROM providers \
        WHERE providers.key = k.key AND providers.expires_at > now() LIMIT $2) p \
    LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > now()";

/// Fair without a sort key: every row of the key is read and sorted per request.
const LOOKUP_RANDOM_ORDER: &str = "\
    SELECT k.key, p.provider, a.addrs \
    FROM unnest($1::bytea[]) AS k(key) \
    CROSS JOIN LATERAL ( \
        SELECT provider FROM providers \
        WHERE providers.key = k.key AND providers.expires_at > now() ORDER BY random() LIMIT $2) p \
    LEFT JOIN peer_addrs a ON a.peer = p.provider AND a.expires_at > now()";

const WRITERS: usize = 4;
const BATCH: usize = 1000;
const READERS: usize = 4;

fn random_bytes(prefix: &[u8], n: usize) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend((0..n).map(|_| rand::random::<u8>()));
    k
}

fn key() -> Vec<u8> {
    random_bytes(&[0x12, 0x20], 32)
}

/// A peer ID's bytes (identity multihash of an ed25519 key's protobuf form: 38 bytes).
fn peer() -> Vec<u8> {
    random_bytes(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20], 32)
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Upsert `rows` through the store's statement: `WRITERS` connections, sorted 1,000-row batches.
async fn write(url: &str, rows: Arc<Rows>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let lifetime: i64 = 3_600_000; // ms: the store's upsert takes lifetimes left
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (rows, next, url) = (rows.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let up = c.prepare(UPSERT_PROVIDERS_SQL).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) * BATCH;
                if i >= rows.len() {
                    return anyhow::Ok(());
                }
                let mut batch: Vec<&(Vec<u8>, Vec<u8>)> =
                    rows[i..(i + BATCH).min(rows.len())].iter().collect();
                batch.sort();
                let keys: Vec<&[u8]> = batch.iter().map(|r| r.0.as_slice()).collect();
                let provs: Vec<&[u8]> = batch.iter().map(|r| r.1.as_slice()).collect();
                let exp: Vec<i64> = vec![lifetime; batch.len()];
                let sample: Vec<i32> = batch.iter().map(|_| rand::random::<i32>() | 1).collect();
                c.execute(&up, &[&keys, &provs, &exp, &sample]).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `n` statements of `sql` over `keys` (cycled, `per_stmt` keys each) from `READERS`
/// connections; returns microseconds per statement (wall time × connections / statements).
async fn read(
    url: &str,
    sql: &'static str,
    keys: Arc<Vec<Vec<u8>>>,
    per_stmt: usize,
    n: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let window = sql == LOOKUP_SQL;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..READERS {
        let (keys, next, url) = (keys.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let stmt = c.prepare(sql).await?;
            let mut got = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(got);
                }
                let batch: Vec<&[u8]> =
                    (0..per_stmt).map(|j| keys[(i * per_stmt + j) % keys.len()].as_slice()).collect();
                let rows = if window {
                    let starts: Vec<i32> = batch.iter().map(|_| rand::random()).collect();
                    c.query(&stmt, &[&batch, &200i64, &starts]).await?
                } else {
                    c.query(&stmt, &[&batch, &200i64]).await?
                };
                got += rows.len();
            }
        }));
    }
    let mut rows = 0;
    for t in tasks {
        rows += t.await??;
    }
    anyhow::ensure!(rows > 0, "reads returned nothing");
    Ok(t0.elapsed().as_secs_f64() * 1e6 * READERS as f64 / n as f64)
}

pub(crate) async fn sampling(o: SamplingOpts) -> anyhow::Result<()> {
    let (admin, _cluster) = server(&o.database_url)?;
    println!(
        "hydra-bench sampling: {} keys x 4 providers + 1 key x {} providers; write {} rows (half refreshes); \
         {} reads per case; {} runs",
        o.keys, o.popular, o.writes, o.lookups, o.runs
    );
    println!(
        "run  writes/s indexed  plain  |  popular-key read us: window  unordered  random-order  |  100-key read us: window  unordered"
    );
    let mut cols: [Vec<f64>; 7] = Default::default();
    for run in 0..o.runs {
        let popular = key();
        let keys: Vec<Vec<u8>> = (0..o.keys).map(|_| key()).collect();
        let mut preload: Rows = keys.iter().flat_map(|k| (0..4).map(move |_| (k.clone(), peer()))).collect();
        preload.extend((0..o.popular).map(|_| (popular.clone(), peer())));
        let preload = Arc::new(preload);
        let mut writes: Rows = (0..o.writes / 2).map(|i| preload[i * 4 % preload.len()].clone()).collect();
        writes.extend((0..o.writes - o.writes / 2).map(|_| (key(), peer())));
        let writes = Arc::new(writes);
        let mut urls = Vec::new();
        for side in ["indexed", "plain"] {
            let url =
                create_database(&admin, &format!("hydra_bench_sampling_{}_{run}_{side}", std::process::id()))
                    .await?;
            Store::migrate_only(&StoreKind::Postgres(url.clone()), &PostgresSection::default()).await?;
            let c = connect(&url).await?;
            if side == "plain" {
                c.batch_execute("DROP INDEX providers_sample").await?;
            }
            write(&url, preload.clone()).await?;
            c.batch_execute("VACUUM ANALYZE providers").await?;
            urls.push(url);
        }
        let mut w = [0.0; 2];
        for side in (0..2).map(|i| (i + run) % 2) {
            let t0 = Instant::now();
            write(&urls[side], writes.clone()).await?;
            w[side] = o.writes as f64 / t0.elapsed().as_secs_f64();
        }
        let one = Arc::new(vec![popular]);
        let ordinary = Arc::new(keys);
        let pw = read(&urls[0], LOOKUP_SQL, one.clone(), 1, o.lookups).await?;
        let pu = read(&urls[1], LOOKUP_UNORDERED, one.clone(), 1, o.lookups).await?;
        let pr = read(&urls[1], LOOKUP_RANDOM_ORDER, one.clone(), 1, (o.lookups / 10).max(10)).await?;
        let ow = read(&urls[0], LOOKUP_SQL, ordinary.clone(), 100, o.lookups).await?;
        let ou = read(&urls[1], LOOKUP_UNORDERED, ordinary.clone(), 100, o.lookups).await?;
        println!(
            "{run:>3}  {:>16.0}  {:>5.0}  |  {:>27.0}  {:>9.0}  {:>12.0}  |  {:>23.0}  {:>9.0}",
            w[0], w[1], pw, pu, pr, ow, ou
        );
        for (i, v) in [w[0], w[1], pw, pu, pr, ow, ou].into_iter().enumerate() {
            cols[i].push(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m: Vec<f64> = cols.iter().map(|c| median(c.clone())).collect();
    println!(
        "median {:>14.0}  {:>5.0}  |  {:>27.0}  {:>9.0}  {:>12.0}  |  {:>23.0}  {:>9.0}",
        m[0], m[1], m[2], m[3], m[4], m[5], m[6]
    );
    println!(
        "writes indexed/plain {:.2}; popular read window/unordered {:.2}, random-order/window {:.1}; \
         100-key read window/unordered {:.2}",
        m[0] / m[1],
        m[2] / m[3],
        m[4] / m[2],
        m[5] / m[6]
    );
    Ok(())
}
