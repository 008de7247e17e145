//! `hydra-bench store` and `hydra-bench gc`: the provider manager against the raw PostgreSQL ceiling, in one run.
//!
//! Every run creates fresh databases on one server, preloads them identically (`preload` rows,
//! 4 providers per key), then measures, side by side:
//! - **writes**: the same `rows` records (half refreshes of preloaded records, half new keys)
//!   written (a) raw: 1,000-row `unnest` upserts from 4 concurrent connections, the statement the
//!   store itself uses; (b) raw: binary COPY into a staging table + upsert, 4 connections;
//!   (c) through `ProviderManager::add_provider` from 4 producer tasks, until `flush()` returns;
//! - **reads**: the same `lookups` distinct preloaded keys looked up (a) raw: 100 keys per
//!   statement from 4 connections; (b) through `ProviderManager::get_providers` from many
//!   concurrent callers, one key each (no key twice, so the cache cannot help).
//!
//! It prints rows/s (keys/s) per run, the medians, and the manager/raw ratios, plus the client
//! process's CPU time per row. Both sides pay for address upserts (peer_addrs) on writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use libp2p::{Multiaddr, PeerId};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;

use hydra::config::{PostgresSection, ProvidersSection, StoreKind};
use hydra::metrics::Metrics;
use hydra::providers::ProviderManager;
use hydra::store::{now_ms, Store};
use hydra::types::{encode_addrs, PeerRecord, ProviderKey};
use hydra_testkit::{create_database, PgCluster};

/// Options of `hydra bench store`.
#[derive(Debug, Clone)]
pub(crate) struct StoreBenchOpts {
    /// Server to use (a database on it must allow CREATE DATABASE); None: a throwaway cluster
    /// with production durability (fsync on).
    pub database_url: Option<String>,
    pub preload: usize,
    pub rows: usize,
    pub lookups: usize,
    pub runs: usize,
}

const WRITERS: usize = 4;
const WRITE_BATCH: usize = 1000;
const READ_BATCH: usize = 100;
const READERS: usize = 4;
const CALLERS: usize = 512;
const PEERS: usize = 2000;

/// One record: key, index into `Dataset::peers`, expiry.
#[derive(Clone)]
struct Row {
    key: ProviderKey,
    peer: usize,
    expires: SystemTime,
}

struct Dataset {
    peers: Vec<(PeerId, Vec<u8>, Vec<Multiaddr>)>,
    preload: Vec<Row>,
    /// Records to write.
    writes: Vec<Row>,
    /// Preloaded keys to look up (distinct).
    lookups: Vec<ProviderKey>,
}

fn random_key() -> ProviderKey {
    let mut k = vec![0x12, 0x20];
    k.extend((0..32).map(|_| rand::random::<u8>()));
    ProviderKey::new(k).expect("34-byte key")
}

/// `expired_share` of the preloaded rows are already expired (for the GC benchmark).
fn dataset(preload_rows: usize, write_rows: usize, lookups: usize, expired_share: f64) -> Dataset {
    use rand::seq::SliceRandom;
    let live = hydra::store::postgres_time(now_ms() + 48 * 3_600_000);
    let dead = hydra::store::postgres_time(now_ms() - 1000);
    let peers: Vec<_> = (0..PEERS)
        .map(|i| {
            let p = PeerId::random();
            let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", 4001 + i).parse().expect("valid");
            (p, p.to_bytes(), vec![addr])
        })
        .collect();
    let mut preload = Vec::with_capacity(preload_rows);
    while preload.len() < preload_rows {
        let k = random_key();
        for _ in 0..4 {
            let expires = if rand::random::<f64>() < expired_share { dead } else { live };
            preload.push(Row { key: k.clone(), peer: rand::random::<usize>() % PEERS, expires });
        }
    }
    preload.truncate(preload_rows);
    let mut rng = rand::thread_rng();
    let mut writes: Vec<Row> = preload
        .choose_multiple(&mut rng, write_rows / 2)
        .map(|r| Row { expires: live, ..r.clone() })
        .collect();
    while writes.len() < write_rows {
        writes.push(Row { key: random_key(), peer: rand::random::<usize>() % PEERS, expires: live });
    }
    writes.shuffle(&mut rng);
    let mut keys: Vec<ProviderKey> = preload.iter().step_by(4).map(|r| r.key.clone()).collect();
    keys.shuffle(&mut rng);
    keys.truncate(lookups);
    Dataset { peers, preload, writes, lookups: keys }
}

/// CPU time (user + system) of this process so far.
pub(crate) fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return Duration::ZERO };
    let Some(after) = stat.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")".
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ = 100 on Linux
}

pub(crate) struct Measured {
    pub(crate) per_sec: f64,
    pub(crate) cpu_us_per_item: f64,
}

pub(crate) async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    items: usize,
    f: F,
) -> anyhow::Result<Measured> {
    let (t0, c0) = (Instant::now(), cpu_time());
    f.await?;
    let (dt, dc) = (t0.elapsed(), cpu_time().saturating_sub(c0));
    Ok(Measured {
        per_sec: items as f64 / dt.as_secs_f64(),
        cpu_us_per_item: dc.as_secs_f64() * 1e6 / items as f64,
    })
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

const UPSERT_ADDRS: &str = "\
    INSERT INTO peer_addrs (peer, addrs, expires_at) \
    SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::timestamptz[]) \
    ON CONFLICT (peer) DO UPDATE SET addrs = excluded.addrs, expires_at = excluded.expires_at \
    WHERE peer_addrs.expires_at <= excluded.expires_at";

/// Milliseconds from now until `t` (negative once it has passed).
fn ms_left(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Sorted, deduplicated address rows of a batch (as the store writes them).
fn addr_rows(d: &Dataset, batch: &[Row]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut idx: Vec<usize> = batch.iter().map(|r| r.peer).collect();
    idx.sort_by(|a, b| d.peers[*a].1.cmp(&d.peers[*b].1));
    idx.dedup();
    (
        idx.iter().map(|i| d.peers[*i].1.clone()).collect(),
        idx.iter().map(|i| encode_addrs(&d.peers[*i].2)).collect(),
    )
}

/// A batch sorted by (key, provider) without duplicates, as the store writes it.
fn sorted_batch(d: &Dataset, rows: &[Row]) -> Vec<Row> {
    let mut batch = rows.to_vec();
    batch.sort_by(|a, b| (a.key.as_bytes(), &d.peers[a.peer].1).cmp(&(b.key.as_bytes(), &d.peers[b.peer].1)));
    batch.dedup_by(|a, b| a.key == b.key && a.peer == b.peer);
    batch
}

/// Raw batched upserts (unnest), `WRITERS` connections pulling batches from a shared cursor.
async fn raw_unnest(url: &str, d: Arc<Dataset>, rows: Arc<Vec<Row>>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (d, rows, next, url) = (d.clone(), rows.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let up = c.prepare(hydra::store::UPSERT_PROVIDERS_SQL).await?;
            let ua = c.prepare(UPSERT_ADDRS).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize * WRITE_BATCH;
                if i >= rows.len() {
                    return anyhow::Ok(());
                }
                let batch = sorted_batch(&d, &rows[i..(i + WRITE_BATCH).min(rows.len())]);
                let keys: Vec<&[u8]> = batch.iter().map(|r| r.key.as_bytes()).collect();
                let provs: Vec<&[u8]> = batch.iter().map(|r| d.peers[r.peer].1.as_slice()).collect();
                // The store's upsert takes lifetimes left (the database adds them to its clock).
                let exp: Vec<i64> = batch.iter().map(|r| ms_left(r.expires)).collect();
                let sample: Vec<i32> = batch.iter().map(|_| rand::random::<i32>() | 1).collect();
                let (peers, addrs) = addr_rows(&d, &batch);
                let aexp = vec![
                    batch.iter().map(|r| r.expires).max().unwrap_or(SystemTime::UNIX_EPOCH);
                    peers.len()
                ];
                let p1: [&(dyn ToSql + Sync); 4] = [&keys, &provs, &exp, &sample];
                let p2: [&(dyn ToSql + Sync); 3] = [&peers, &addrs, &aexp];
                let (r1, r2) = tokio::join!(c.execute(&up, &p1), c.execute(&ua, &p2));
                r1?;
                r2?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Raw binary COPY into a staging table, then one upsert from it, per 1,000-row batch.
async fn raw_copy(url: &str, d: Arc<Dataset>, rows: Arc<Vec<Row>>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (d, rows, next, url) = (d.clone(), rows.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&url).await?;
            c.batch_execute(
                "CREATE TEMP TABLE stage (key bytea, provider bytea, expires_at timestamptz, sample_key int4) \
                 ON COMMIT DELETE ROWS",
            )
            .await?;
            let ua = c.prepare(UPSERT_ADDRS).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize * WRITE_BATCH;
                if i >= rows.len() {
                    return anyhow::Ok(());
                }
                let batch = sorted_batch(&d, &rows[i..(i + WRITE_BATCH).min(rows.len())]);
                let tx = c.transaction().await?;
                let sink = tx.copy_in("COPY stage FROM STDIN BINARY").await?;
                let w = BinaryCopyInWriter::new(sink, &[Type::BYTEA, Type::BYTEA, Type::TIMESTAMPTZ, Type::INT4]);
                futures::pin_mut!(w);
                for r in &batch {
                    let sample = rand::random::<i32>() | 1;
                    w.as_mut().write(&[&r.key.as_bytes(), &d.peers[r.peer].1.as_slice(), &r.expires, &sample]).await?;
                }
                w.finish().await?;
                tx.execute(
                    "INSERT INTO providers (key, provider, expires_at, sample_key) \
                     SELECT * FROM stage ORDER BY key, provider \
                     ON CONFLICT (key, provider) DO UPDATE SET expires_at = excluded.expires_at, \
                     sample_key = CASE WHEN providers.sample_key = 0 THEN excluded.sample_key \
                     ELSE providers.sample_key END \
                     WHERE providers.expires_at < excluded.expires_at",
                    &[],
                )
                .await?;
                let (peers, addrs) = addr_rows(&d, &batch);
                let aexp = vec![batch.iter().map(|r| r.expires).max().unwrap_or(SystemTime::UNIX_EPOCH); peers.len()];
                tx.execute(&ua, &[&peers, &addrs, &aexp]).await?;
                tx.commit().await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn manager_on(url: &str) -> anyhow::Result<ProviderManager> {
    let metrics = Metrics::new(&prometheus::Registry::new(), 1);
    let store =
        Store::open(&StoreKind::Postgres(url.into()), &PostgresSection::default(), metrics.datastore.clone())
            .await?;
    let cfg = ProvidersSection {
        read_deadline: Duration::from_secs(30),
        max_reads_in_flight: 4096,
        // Reads of distinct keys only: caching is not measured here.
        cache_entries: 16,
        cache_bytes: 64 * 1024,
        ..Default::default()
    };
    Ok(ProviderManager::start(store, cfg, 100, metrics.providers.clone()))
}

/// Manager ingest: 4 producers call `add_provider`, backing off while the buffer is full.
async fn manager_writes(m: ProviderManager, d: Arc<Dataset>) -> anyhow::Result<u64> {
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (m, d, retries) = (m.clone(), d.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            for r in d.writes.iter().skip(w).step_by(WRITERS) {
                let rec = PeerRecord { peer: d.peers[r.peer].0, addrs: d.peers[r.peer].2.clone() };
                while m.add_provider(r.key.clone(), rec.clone()).is_err() {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    m.flush().await;
    Ok(retries.load(Ordering::Relaxed))
}

async fn raw_reads(url: &str, keys: Arc<Vec<ProviderKey>>) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..READERS {
        let (keys, next, url) = (keys.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            let stmt = c.prepare(hydra::store::LOOKUP_SQL).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize * READ_BATCH;
                if i >= keys.len() {
                    return anyhow::Ok(());
                }
                let batch: Vec<&[u8]> =
                    keys[i..(i + READ_BATCH).min(keys.len())].iter().map(|k| k.as_bytes()).collect();
                let starts: Vec<i32> = batch.iter().map(|_| rand::random()).collect();
                c.query(&stmt, &[&batch, &100i64, &starts]).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn manager_reads(m: ProviderManager, keys: Arc<Vec<ProviderKey>>) -> anyhow::Result<u64> {
    let shed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let (m, keys, shed) = (m.clone(), keys.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            for k in keys.iter().skip(c).step_by(CALLERS) {
                if m.get_providers(k).await.is_err() {
                    shed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(shed.load(Ordering::Relaxed))
}

async fn preload(url: &str, d: Arc<Dataset>) -> anyhow::Result<()> {
    Store::migrate_only(&StoreKind::Postgres(url.into()), &PostgresSection::default()).await?;
    raw_unnest(url, d.clone(), Arc::new(d.preload.clone())).await?;
    let c = connect(url).await?;
    c.batch_execute("VACUUM ANALYZE providers").await?;
    c.batch_execute("VACUUM ANALYZE peer_addrs").await?;
    Ok(())
}

/// The server to benchmark against: `url`, or a throwaway cluster with production durability
/// (kept alive by the returned handle).
pub(crate) fn server(url: &Option<String>) -> anyhow::Result<(String, Option<PgCluster>)> {
    match url {
        Some(u) => Ok((u.clone(), None)),
        None => {
            let c = PgCluster::start(true).context("start a throwaway PostgreSQL (fsync on)")?;
            Ok((c.url("postgres"), Some(c)))
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Run the benchmark and print its report.
pub(crate) async fn store(o: StoreBenchOpts) -> anyhow::Result<()> {
    let (admin, _cluster) = server(&o.database_url)?;
    println!(
        "hydra bench store: preload {} rows, write {} rows (half refreshes), look up {} keys, {} runs",
        o.preload, o.rows, o.lookups, o.runs
    );
    println!("run  raw-unnest  raw-copy  manager  (rows/s)   |  raw-read  manager-read  (keys/s)");
    let mut cols: [Vec<f64>; 5] = Default::default();
    let mut cpu = (Vec::new(), Vec::new());
    let mut notes = (0u64, 0u64);
    for run in 0..o.runs {
        let d = Arc::new(dataset(o.preload, o.rows, o.lookups, 0.0));
        let writes = Arc::new(d.writes.clone());
        let mut urls = Vec::new();
        for side in ["unnest", "copy", "mgr"] {
            let name = format!("hydra_bench_{}_{run}_{side}", std::process::id());
            let url = create_database(&admin, &name).await?;
            preload(&url, d.clone()).await?;
            urls.push(url);
        }
        // Rotate which side writes first, so cache warmth and background work (checkpoints,
        // autovacuum, other tenants) do not always favour the same side.
        let m = manager_on(&urls[2]).await?;
        let mut retries = 0;
        let (mut a, mut b, mut c) = (None, None, None);
        for side in (0..3).map(|i| (i + run) % 3) {
            match side {
                0 => a = Some(timed(o.rows, raw_unnest(&urls[0], d.clone(), writes.clone())).await?),
                1 => b = Some(timed(o.rows, raw_copy(&urls[1], d.clone(), writes.clone())).await?),
                _ => {
                    c = Some(
                        timed(o.rows, async {
                            retries = manager_writes(m.clone(), d.clone()).await?;
                            Ok(())
                        })
                        .await?,
                    )
                }
            }
        }
        let (a, b, c) = (a.expect("ran"), b.expect("ran"), c.expect("ran"));
        let keys = Arc::new(d.lookups.clone());
        let mut shed = 0;
        let (mut r, mut mr) = (None, None);
        for side in (0..2).map(|i| (i + run) % 2) {
            if side == 0 {
                r = Some(timed(keys.len(), raw_reads(&urls[2], keys.clone())).await?);
            } else {
                mr = Some(
                    timed(keys.len(), async {
                        shed = manager_reads(m.clone(), keys.clone()).await?;
                        Ok(())
                    })
                    .await?,
                );
            }
        }
        let (r, mr) = (r.expect("ran"), mr.expect("ran"));
        m.shutdown().await;
        println!(
            "{run:>3}  {:>10.0}  {:>8.0}  {:>7.0}             |  {:>8.0}  {:>12.0}",
            a.per_sec, b.per_sec, c.per_sec, r.per_sec, mr.per_sec
        );
        for (i, v) in [a.per_sec, b.per_sec, c.per_sec, r.per_sec, mr.per_sec].into_iter().enumerate() {
            cols[i].push(v);
        }
        cpu.0.push(c.cpu_us_per_item);
        cpu.1.push(mr.cpu_us_per_item);
        notes.0 += retries;
        notes.1 += shed;
    }
    let med: Vec<f64> = cols.iter().map(|c| median(c.clone())).collect();
    let raw_write = med[0].max(med[1]);
    println!(
        "median {:>8.0}  {:>8.0}  {:>7.0}             |  {:>8.0}  {:>12.0}",
        med[0], med[1], med[2], med[3], med[4]
    );
    println!(
        "writes: manager / best raw = {:.2}   reads: manager / raw = {:.2}",
        med[2] / raw_write,
        med[4] / med[3]
    );
    println!(
        "client CPU per row (manager): write {:.1} us, read {:.1} us; producer back-offs {}, shed reads {}",
        median(cpu.0),
        median(cpu.1),
        notes.0,
        notes.1
    );
    Ok(())
}

/// Options of `hydra bench gc`.
#[derive(Debug, Clone)]
pub(crate) struct GcBenchOpts {
    pub database_url: Option<String>,
    /// Preloaded rows, half of them expired.
    pub rows: usize,
    /// Rows written while measuring writes (alone, and during a GC round).
    pub writes: usize,
    pub runs: usize,
}

/// `hydra bench gc`: the page-range collector's rate, alone and under concurrent writes, and what
/// it costs those writes, measured side by side on identical databases.
pub(crate) async fn gc(o: GcBenchOpts) -> anyhow::Result<()> {
    let (admin, _cluster) = server(&o.database_url)?;
    let chunk_pages = ProvidersSection::default().gc_chunk_pages;
    println!(
        "hydra bench gc: {} rows preloaded (half expired), {} rows written, chunk {} pages, {} runs",
        o.rows, o.writes, chunk_pages, o.runs
    );
    println!(
        "run  gc-alone(rows/s)  writes-alone(rows/s)  writes-during-gc(rows/s)  gc-during-writes(rows/s)"
    );
    let mut cols: [Vec<f64>; 4] = Default::default();
    for run in 0..o.runs {
        let d = Arc::new(dataset(o.rows, o.writes, 0, 0.5));
        let writes = Arc::new(d.writes.clone());
        let mut urls = Vec::new();
        for side in ["gc", "w", "both"] {
            let url = create_database(&admin, &format!("hydra_gcbench_{}_{run}_{side}", std::process::id()))
                .await?;
            preload(&url, d.clone()).await?;
            urls.push(url);
        }
        let open = |url: String| async move {
            let metrics = Metrics::new(&prometheus::Registry::new(), 1);
            Store::open(&StoreKind::Postgres(url), &PostgresSection::default(), metrics.datastore.clone())
                .await
        };
        // GC alone.
        let s = open(urls[0].clone()).await?;
        let t = Instant::now();
        let deleted = s.gc_round(0, chunk_pages).await?.unwrap_or(0);
        let gc_alone = deleted as f64 / t.elapsed().as_secs_f64();
        s.close().await;
        // Writes alone.
        let w_alone = timed(o.writes, raw_unnest(&urls[1], d.clone(), writes.clone())).await?.per_sec;
        // Both at once: the writes' rate while the collector sweeps.
        let s = open(urls[2].clone()).await?;
        let t = Instant::now();
        let (g, w) = tokio::join!(
            async {
                let n = s.gc_round(0, chunk_pages).await?.unwrap_or(0);
                anyhow::Ok((n, t.elapsed()))
            },
            timed(o.writes, raw_unnest(&urls[2], d.clone(), writes.clone()))
        );
        let (gdel, gtime) = g?;
        let w = w?;
        s.close().await;
        let gc_busy = gdel as f64 / gtime.as_secs_f64();
        println!("{run:>3}  {gc_alone:>16.0}  {w_alone:>20.0}  {:>24.0}  {gc_busy:>24.0}", w.per_sec);
        for (i, v) in [gc_alone, w_alone, w.per_sec, gc_busy].into_iter().enumerate() {
            cols[i].push(v);
        }
    }
    let m: Vec<f64> = cols.iter().map(|c| median(c.clone())).collect();
    println!("median {:>14.0}  {:>20.0}  {:>24.0}  {:>24.0}", m[0], m[1], m[2], m[3]);
    println!("writes during GC / writes alone = {:.2}", m[2] / m[1]);
    Ok(())
}
