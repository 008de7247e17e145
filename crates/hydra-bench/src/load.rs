//! `hydra-bench load`: an open-loop load generator against a real `hydra run` process.
//!
//! The node runs as a child process (the `hydra` binary of this checkout, built first; its RSS
//! and CPU are its own) on a PostgreSQL database (a
//! throwaway cluster unless `--database-url`). Many client identities — each a libp2p swarm with
//! one real connection to every head — send requests at a **fixed arrival rate**: request i of a
//! step is due at `start + i / rate` whether or not earlier ones were answered (a closed loop
//! would slow down with the server and hide overload). Latency is measured from the due time,
//! so queueing in the generator counts too. Every request opens a new stream, as rust-libp2p and
//! js-libp2p clients do.
//!
//! Per step it prints offered and sent rate, **goodput counted at the client** — full answers
//! (GET_PROVIDERS of a preloaded key with providers, FIND_NODE with closer peers) received within
//! 1 s of their due time, plus ADD_PROVIDERs sent within 1 s × the share of a uniform sample of
//! them (300, drawn over the whole step) found by another client after the step — beside what the node counted `ok`; FIND_NODE answered in
//! full / sent; sheds (the node's `hydra_load_shed_total` plus refused, admission-reset and
//! dropped streams); requests the node refused (reset, or closed without a reply) and how long
//! they took to learn it (p99 from the due time); client-side timeouts;
//! latency p50/p99 of answered requests and p99 of answered GET_PROVIDERS,
//! the highest and final tier, node RSS (max of 1 s samples), node CPU per 1,000 requests, and
//! PostgreSQL transactions per second for the node's database (`pg_stat_database`; every
//! statement the node issues is its own transaction).
//!
//! Capacity C is searched first (rates × 1.5 from `--start-rate` in short steps, while the
//! answered GET_PROVIDERS p99 stays under `--p99-target-ms`, client goodput is ≥ 95 % of the
//! rate, nothing is shed, refused or fails, and the generator keeps up); then the `--multiples` of C run for `--step-seconds` each.

pub(crate) mod client;
mod silent;
mod step;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hydra::config::ConfigFile;
use hydra_testkit::{create_database, PgCluster};

use futures::StreamExt as _;

use self::client::{client, random_key, request, Ctx};
use self::step::{connect_pg, run_step, slow_postgres, Pg, Step};
use crate::cpu_quota::{CpuQuota, PERIOD_US};
use crate::node::{http_get, metric_sum, NodeProcess};

/// Options of `hydra-bench load`.
#[derive(Debug, Clone)]
pub(crate) struct LoadBenchOpts {
    pub database_url: Option<String>,
    /// Node config to start from (its `[load]` section, limits, …); listen and store settings
    /// are overridden.
    pub config: Option<PathBuf>,
    pub heads: usize,
    pub clients: usize,
    /// Shares of ADD_PROVIDER, GET_PROVIDERS, FIND_NODE.
    pub mix: [u32; 3],
    /// Explicit rates (requests/s); when empty, capacity is searched and `multiples` of it run.
    pub rates: Vec<f64>,
    /// Capacity C to use instead of searching it (e.g. C of an unslowed run).
    pub capacity: Option<f64>,
    pub multiples: Vec<f64>,
    pub start_rate: f64,
    pub search_step: Duration,
    pub step: Duration,
    pub p99_target: Duration,
    pub preload: usize,
    /// Hold an ACCESS EXCLUSIVE lock on `providers` for `.0` out of every `.1`.
    pub slow_postgres: Option<(Duration, Duration)>,
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// Confine the node to this share of one core (a cgroup with a 10 ms period).
    pub node_cpu_quota: Option<f64>,
    /// The node's runtime workers (None: as inside the quota, see [`workers_inside`]).
    pub node_workers: Option<usize>,
    /// Bisections of the capacity search between the last rate met and the first missed.
    pub search_refine: u32,
    /// Silent/slow peers: each step runs clean, then with this many misbehaving identities
    /// (`load/silent.rs`), and the goodput ratio is printed.
    pub silent_peers: usize,
    /// Misbehaving streams each silent peer holds per head.
    pub silent_streams: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Add,
    Get,
    Find,
}

/// The runtime workers a node started inside a quota of `fraction` of one core picks with
/// `worker_threads = 0`: std's `available_parallelism` takes the whole cores of the quota (at
/// least one), at most the CPUs the process may run on, and the node at least two of them.
fn workers_inside(fraction: f64) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    hydra::config::runtime_workers((fraction.floor() as usize).clamp(1, cpus))
}

fn print_tier_changes(node: &NodeProcess) {
    for c in node.tier_changes() {
        println!("         {c}");
    }
}

/// Run the benchmark and print its report.
pub(crate) async fn load(o: LoadBenchOpts) -> anyhow::Result<()> {
    let hydra = crate::node::hydra_binary()?;
    let (admin, _cluster) = match &o.database_url {
        Some(u) => (u.clone(), None),
        None => {
            let c = PgCluster::start(true).context("start a throwaway PostgreSQL (fsync on)")?;
            // Like the node (see `NodeProcess::spawn`), the database outranks the generator.
            if c.set_priority(-10) == 0 {
                println!(
                    "note: could not raise PostgreSQL's priority (not root?); it competes with the generator"
                );
            }
            (c.url("postgres"), Some(c))
        }
    };
    let db = format!("hydra_loadbench_{}", std::process::id());
    let url = create_database(&admin, &db).await?;
    let dir = std::env::temp_dir().join(format!("hydra-bench-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut file = match &o.config {
        Some(p) => ConfigFile::from_file(p)?,
        None => ConfigFile::default(),
    };
    // The node joins its CPU group only after the preload; a node started inside the group would
    // size its runtime from the quota (`worker_threads = 0` takes std's count, which reads it).
    let workers =
        o.node_workers.or(o.node_cpu_quota.filter(|_| file.worker_threads == 0).map(workers_inside));
    if let Some(w) = workers {
        file.worker_threads = w;
    }
    let cfg_path = crate::node::bench_config(file.clone(), o.heads, &dir, Some(&url), "bench-load")?;
    let l = &file.load;
    println!(
        "hydra-bench load: {} heads, {} clients, mix add/get/find {:?}, request timeout {:?}, \
         statement budget {}/s, least per-peer share {}/s",
        o.heads,
        o.clients,
        o.mix,
        o.request_timeout,
        l.datastore_statements_per_second,
        l.per_peer_requests_per_second
    );
    match file.worker_threads {
        0 => println!("node runtime workers: one per core"),
        w => println!(
            "node runtime workers: {w}{}",
            if o.node_workers.is_none() { " (as inside the quota)" } else { "" }
        ),
    }

    // Before the node starts: a cgroup that cannot be made fails the run at once.
    let quota = o.node_cpu_quota.map(CpuQuota::create).transpose()?;
    let mut node = NodeProcess::spawn(
        &hydra,
        &["run".into(), "--config".into(), cfg_path.display().to_string()],
        Duration::from_secs(120),
    )
    .await?;
    let heads = node.tcp_heads().await?;
    let mut clients = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        clients.push(client(clients.len(), &heads).await?);
    }
    println!("{} clients connected to {} heads", clients.len(), heads.len());

    // Preload: records the GET_PROVIDERS half of known keys finds.
    let preloaded: Vec<Vec<u8>> = (0..o.preload).map(|_| random_key()).collect();
    let ctx = Arc::new(Ctx {
        heads,
        by_key: false,
        pool: None,
        clients: Arc::new(clients),
        preloaded: Vec::new(),
        mix: [1, 0, 0],
        timeout: o.request_timeout,
        in_flight: AtomicUsize::new(0),
        max_in_flight: o.max_in_flight,
    });
    futures::stream::iter(preloaded.iter().cloned())
        // Gently (32 at once): a shed announcement here would read as a false "no providers" later.
        .for_each_concurrent(32, |k| {
            let ctx = ctx.clone();
            async move {
                let _ = tokio::time::timeout(ctx.timeout, request(&ctx, Op::Add, &k)).await;
            }
        })
        .await;
    let Ok(ctx) = Arc::try_unwrap(ctx) else { anyhow::bail!("preload still running") };
    let ctx = Arc::new(Ctx { preloaded, mix: o.mix, ..ctx });
    // Let the buffer drain into the datastore before measuring.
    for _ in 0..120 {
        let m = http_get(&node.http, "/metrics").await?;
        if metric_sum(&m, "hydra_providers_write_buffer_entries", &[]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The preload burst may have raised the tier: measure from `normal` (dwell included).
    step::wait_for_tier(&node, &["normal"], Duration::from_secs(120)).await;
    // Confined only now: the preload is set-up, not measurement, and under the quota the node's
    // admission would reset some of its announcements (lost, unseen by a client that only writes).
    if let Some(q) = &quota {
        q.add(node.pid)?;
        println!(
            "node confined to {:.2} of one core ({} µs of CPU per {PERIOD_US} µs period); generator and \
             PostgreSQL outside",
            q.cores(),
            q.quota_us
        );
    }
    let pg = Pg { client: connect_pg(&url).await?, url: url.clone(), db: db.clone() };
    let slow = o.slow_postgres.map(|(hold, period)| tokio::spawn(slow_postgres(url.clone(), hold, period)));
    if let Some((hold, period)) = o.slow_postgres {
        println!("PostgreSQL slowed: providers locked (ACCESS EXCLUSIVE) {hold:?} of every {period:?}");
    }

    let mut rates: Vec<(String, f64)> = o.rates.iter().map(|r| (format!("{r:.0}/s"), *r)).collect();
    if let (true, Some(c)) = (rates.is_empty(), o.capacity) {
        println!("capacity C = {c:.0} requests/s (given)");
        rates = o.multiples.iter().map(|m| (format!("{m}C"), m * c)).collect();
    }
    if rates.is_empty() {
        println!(
            "searching capacity: steps of {:?}, rate × 1.5 from {}/s (then {} bisections) while get p99 ≤ {:?}, goodput ≥ 95 % \
             of the rate, nothing shed, refused or failed",
            o.search_step, o.start_rate, o.search_refine, o.p99_target
        );
        println!("{}", Step::header());
        let meets = |st: &Step, rate: f64| {
            st.get_p99 <= o.p99_target.as_secs_f64() * 1e3
                && st.failed == 0
                && st.dropped == 0
                && st.shed < 0.005 * rate
                && st.rejected < 0.005 * rate
                && st.goodput >= 0.95 * rate
                && st.sent >= 0.95 * rate
        };
        let mut rate = o.start_rate;
        let mut capacity = None;
        loop {
            let st = run_step(&ctx, &node, &pg, "search".into(), rate, o.search_step).await?;
            println!("{}", st.row());
            print_tier_changes(&node);
            if !meets(&st, rate) {
                break;
            }
            capacity = Some(rate);
            rate *= 1.5;
        }
        let mut c = capacity.context("not even the start rate met the target: lower --start-rate")?;
        // ×1.5 steps leave C up to a third below the rate the node serves; bisect (geometric
        // mean) between the last rate met and the first missed.
        let mut missed = rate;
        for _ in 0..o.search_refine {
            let mid = (c * missed).sqrt();
            let st = run_step(&ctx, &node, &pg, "refine".into(), mid, o.search_step).await?;
            println!("{}", st.row());
            print_tier_changes(&node);
            if meets(&st, mid) {
                c = mid;
            } else {
                missed = mid;
            }
        }
        println!("capacity C = {c:.0} requests/s");
        rates = o.multiples.iter().map(|m| (format!("{m}C"), m * c)).collect();
    }
    println!("{}", Step::header());
    let mut steps = Vec::new();
    for (label, rate) in rates {
        let st = run_step(&ctx, &node, &pg, label.clone(), rate, o.step).await?;
        println!("{}", st.row());
        for line in [st.adds_line(), st.first_adds_line(), st.latency_line(), st.dials_line(), st.shed_line()]
            .into_iter()
            .flatten()
        {
            println!("{line}");
        }
        print_tier_changes(&node);
        let clean = st.goodput;
        steps.push(st);
        if !node.is_running() {
            anyhow::bail!("the node exited during the step");
        }
        if o.silent_peers > 0 {
            let s = silent::start(o.clients, o.silent_peers, o.silent_streams, &ctx.heads).await?;
            tokio::time::sleep(Duration::from_secs(2)).await; // their streams are open
            let st = run_step(&ctx, &node, &pg, format!("{label}+silent"), rate, o.step).await?;
            println!("{}", st.row());
            print_tier_changes(&node);
            println!(
                "         with {} silent peers ({} misbehaving streams per head each; {} ended by the node \
                 and reopened): goodput {:.0}/s = {:.2} × the clean step's {:.0}/s",
                o.silent_peers,
                o.silent_streams,
                s.ended.load(std::sync::atomic::Ordering::Relaxed),
                st.goodput,
                st.goodput / clean.max(1.0),
                clean
            );
            s.stop();
            steps.push(st);
        }
    }
    if let Some(s) = slow {
        s.abort();
    }
    if let Some(q) = &quota {
        if let Some(us) = q.throttled_us() {
            println!("node throttled by its CPU quota for {:.1} s in all", us as f64 / 1e6);
        }
    }
    let running = node.is_running();
    let clean = node.stop().await;
    println!("node still up at the end: {running}; clean shutdown: {clean}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
