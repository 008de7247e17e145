//! `hydra-bench compare`: hydra side by side with the servers a user would run instead, in one
//! sitting on one machine (docs/benchmarks.md "Side by side").
//!
//! Servers: hydra on its embedded store (`hydra`), hydra on PostgreSQL (`hydra-pg`; the
//! database's CPU is counted as the server's), a stock rust-libp2p kad node (`rust-kad`,
//! [`stock_kad`], this binary run as its own process) and stock js-libp2p kad-dht
//! (`js`, tests/js/bench-server.mjs). Each runs N heads/nodes in one process on loopback and holds
//! R preloaded provider records ([`preload_key`]; hydra's are written into its store before it
//! starts, the others' into their memory stores in-process).
//!
//! The workload is identical for all: the same client identities (one per loopback source
//! address, each connected to every head), the same open-loop arrival rate and op mix
//! (ADD_PROVIDER / GET_PROVIDERS of preloaded keys / FIND_NODE), every request for a key sent to
//! its home head ([`home`]), because the stock servers keep one store per node; fresh streams
//! (one per request, as rust-libp2p and js-libp2p clients do) and reused streams (as
//! go-libp2p-kad-dht does). Servers are measured in turn, A B C D A B C D. Per server: goodput
//! counted at the client (full answers within 1 s; ADD_PROVIDER × the share of a sample found
//! again), latency p50/p99 of answered requests, **server CPU per 1,000 requests** (user + system
//! from /proc of the server process, plus PostgreSQL's processes for `hydra-pg`), peak RSS
//! (VmHWM), and correctness: the sampled new records asked by another identity — on the home
//! node for stock servers, on a *different* head for hydra (its heads share one store).
//!
//! `--overload --node-cpu-quota Q` instead runs each server alone under the CPU quota, searches
//! its own capacity C and offers 0.5C … 10C: the overload curves, as a table and an SVG chart.

pub(crate) mod stock_kad;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::StreamExt as _;
use hydra::config::ConfigFile;
use hydra::store::{ms_after, now_ms, ProviderWrite, Store};
use hydra::types::ProviderKey;
use hydra_testkit::{create_database_from, PgCluster};
use libp2p::{Multiaddr, PeerId};
use tokio::io::AsyncBufReadExt as _;

use crate::cpu_quota::CpuQuota;
use crate::load::client::{client, drive, percentile_ms, request_as, Answer, Client, Ctx, StreamPool, Tally};
use crate::load::Op;
use crate::node::{cpu_seconds, machine_jiffies, NodeProcess};

/// The key of preloaded record `i`: the sha2-256 multihash of "hydra-bench-compare" ‖ i (u64 LE),
/// derived the same way by the js server.
pub(crate) fn preload_key(i: u64) -> Vec<u8> {
    use sha2::Digest as _;
    let digest =
        sha2::Sha256::new().chain_update(b"hydra-bench-compare").chain_update(i.to_le_bytes()).finalize();
    let mut k = vec![0x12, 0x20];
    k.extend_from_slice(&digest);
    k
}

/// The head/node of `n` that holds `key` (bytes 2..10 of the multihash, little-endian, mod n).
pub(crate) fn home(key: &[u8], n: usize) -> usize {
    let mut b = [0u8; 8];
    let tail = key.get(2..).unwrap_or(key);
    b[..tail.len().min(8)].copy_from_slice(&tail[..tail.len().min(8)]);
    (u64::from_le_bytes(b) % n.max(1) as u64) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Hydra,
    /// hydra on the embedded store with one runtime worker (`worker_threads = 1`).
    Hydra1w,
    /// hydra on the embedded store, run from `--baseline-bin` (an earlier build).
    HydraBase,
    HydraPg,
    RustKad,
    Js,
}

impl Kind {
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "hydra" => Self::Hydra,
            "hydra-1w" => Self::Hydra1w,
            "hydra-base" => Self::HydraBase,
            "hydra-pg" => Self::HydraPg,
            "rust-kad" => Self::RustKad,
            "js" => Self::Js,
            _ => bail!("unknown server {s:?} (hydra, hydra-1w, hydra-base, hydra-pg, rust-kad, js)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hydra => "hydra",
            Self::Hydra1w => "hydra-1w",
            Self::HydraBase => "hydra-base",
            Self::HydraPg => "hydra-pg",
            Self::RustKad => "rust-kad",
            Self::Js => "js",
        }
    }

    /// Servers whose heads share one store: a record is found on any head.
    fn shared_store(self) -> bool {
        matches!(self, Self::Hydra | Self::Hydra1w | Self::HydraBase | Self::HydraPg)
    }
}

/// Options of `hydra-bench compare`.
#[derive(Debug, Clone)]
pub(crate) struct CompareOpts {
    pub servers: Vec<Kind>,
    pub heads: Vec<usize>,
    pub records: Vec<u64>,
    pub clients: usize,
    pub mix: [u32; 3],
    pub rate: f64,
    pub step: Duration,
    pub rounds: usize,
    /// Stream modes to run: false = a fresh stream per request, true = reused streams.
    pub reuse: Vec<bool>,
    pub overload: bool,
    pub node_cpu_quota: Option<f64>,
    pub multiples: Vec<f64>,
    pub start_rate: f64,
    pub search_step: Duration,
    pub p99_target: Duration,
    pub svg: Option<PathBuf>,
    /// The binary `hydra-base` runs.
    pub baseline_bin: Option<PathBuf>,
}

/// A running server: its process, the PIDs whose CPU counts as its own, its heads.
struct Server {
    kind: Kind,
    heads: Vec<(PeerId, Multiaddr)>,
    pid: u32,
    proc: Proc,
    /// PostgreSQL's cluster, whose processes' CPU counts too (`hydra-pg`).
    pg: Option<Arc<PgCluster>>,
}

enum Proc {
    Hydra(NodeProcess),
    Child(tokio::process::Child),
}

impl Server {
    /// The server's PIDs now (for `hydra-pg` also every PostgreSQL process of the cluster).
    fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid];
        if let Some(pg) = &self.pg {
            v.extend(pg.pids());
        }
        v
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }

    async fn stop(self) {
        match self.proc {
            Proc::Hydra(n) => {
                n.stop().await;
            }
            Proc::Child(mut c) => {
                let _ = c.kill().await;
            }
        }
    }
}

/// A child process (rust-kad, js) started at higher priority like the hydra node
/// ([`NodeProcess::spawn`]), whose first stdout line lists its nodes as JSON.
async fn spawn_listing(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> anyhow::Result<(tokio::process::Child, Vec<(PeerId, Multiaddr)>)> {
    crate::node::outrank_generator(&mut cmd);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = loop {
        let line = tokio::time::timeout(timeout, lines.next_line())
            .await
            .context("the server did not list its nodes in time")??
            .context("the server exited before listing its nodes")?;
        if line.starts_with('[') {
            break line;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, parse_heads(&line)?))
}

fn parse_heads(json: &str) -> anyhow::Result<Vec<(PeerId, Multiaddr)>> {
    let v: Vec<serde_json::Value> = serde_json::from_str(json)?;
    v.iter()
        .map(|h| {
            let peer = h["peer_id"].as_str().context("peer_id")?.parse()?;
            let addr = h["addrs"]
                .as_array()
                .and_then(|a| a.iter().filter_map(|x| x.as_str()).find(|a| a.contains("/tcp/")))
                .context("a TCP address")?
                .parse()?;
            Ok((peer, addr))
        })
        .collect()
}

/// What one sitting shares between servers: the hydra binary, PostgreSQL, a scratch directory.
struct Sitting {
    hydra: PathBuf,
    /// The binary `hydra-base` runs.
    baseline: Option<PathBuf>,
    pg: Option<Arc<PgCluster>>,
    dir: PathBuf,
    started: usize,
    /// Preloaded hydra stores by record count, copied for every start (preloading 10⁶ records
    /// takes minutes): an embedded store's file, and a PostgreSQL template database.
    sqlite_templates: std::collections::HashMap<u64, PathBuf>,
    pg_templates: std::collections::HashMap<u64, String>,
}

impl Sitting {
    async fn start(&mut self, kind: Kind, heads: usize, records: u64) -> anyhow::Result<Server> {
        self.started += 1;
        let t0 = Instant::now();
        // The js server starts its nodes one by one and dials a ring between them, retrying
        // refused dials: 100 nodes took minutes on this machine (more than the 125 s once
        // allowed); the deadline grows with the node count.
        let preload_timeout = Duration::from_secs(120 + records / 2_000 + 6 * heads as u64);
        let server = match kind {
            Kind::Hydra | Kind::Hydra1w | Kind::HydraBase | Kind::HydraPg => {
                let dir = self.dir.join(format!("{}-{}", kind.name(), self.started));
                let cfg = match kind {
                    Kind::HydraPg => {
                        let template = self.pg_template(records).await?;
                        let pg = self.pg.as_ref().context("PostgreSQL")?;
                        let db = format!("hydra_compare_{}_{}", std::process::id(), self.started);
                        let url = create_database_from(&pg.url("postgres"), &db, Some(&template)).await?;
                        crate::node::bench_config(ConfigFile::default(), heads, &dir, Some(&url), "compare")?
                    }
                    _ => {
                        let template = self.sqlite_template(records).await?;
                        let workers = if kind == Kind::Hydra1w { 1 } else { 0 };
                        let file = ConfigFile { worker_threads: workers, ..ConfigFile::default() };
                        let cfg = crate::node::bench_config(file, heads, &dir, None, "compare")?;
                        copy_sqlite(&template, &dir.join("data"))?;
                        cfg
                    }
                };
                let bin = if kind == Kind::HydraBase {
                    self.baseline.as_ref().context("hydra-base needs --baseline-bin")?
                } else {
                    &self.hydra
                };
                let node = NodeProcess::spawn(
                    bin,
                    &["run".into(), "--config".into(), cfg.display().to_string()],
                    Duration::from_secs(120),
                )
                .await?;
                let heads = node.tcp_heads().await?;
                Server {
                    kind,
                    heads,
                    pid: node.pid,
                    proc: Proc::Hydra(node),
                    pg: (kind == Kind::HydraPg).then(|| self.pg.clone()).flatten(),
                }
            }
            Kind::RustKad => {
                let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
                cmd.args([
                    "stock-rust-kad",
                    "--nodes",
                    &heads.to_string(),
                    "--records",
                    &records.to_string(),
                ]);
                let (child, heads) = spawn_listing(cmd, preload_timeout).await?;
                Server { kind, heads, pid: child.id().context("pid")?, proc: Proc::Child(child), pg: None }
            }
            Kind::Js => {
                hydra_testkit::ensure_js_deps()?;
                let js = hydra_testkit::js_dir();
                let mut cmd = tokio::process::Command::new("node");
                cmd.current_dir(&js)
                    .arg("--max-old-space-size=8192")
                    .arg("bench-server.mjs")
                    .env("NODES", heads.to_string())
                    .env("RECORDS", records.to_string());
                let (child, heads) = spawn_listing(cmd, preload_timeout).await?;
                Server { kind, heads, pid: child.id().context("pid")?, proc: Proc::Child(child), pg: None }
            }
        };
        println!(
            "  {:<8} {} heads, {} records: up in {:.1} s (pid {})",
            kind.name(),
            server.heads.len(),
            records,
            t0.elapsed().as_secs_f64(),
            server.pid
        );
        Ok(server)
    }

    /// An embedded store holding `records` preloaded records (made once per count).
    async fn sqlite_template(&mut self, records: u64) -> anyhow::Result<PathBuf> {
        if let Some(p) = self.sqlite_templates.get(&records) {
            return Ok(p.clone());
        }
        let t0 = Instant::now();
        let dir = self.dir.join(format!("template-{records}"));
        let cfg = crate::node::bench_config(ConfigFile::default(), 1, &dir, None, "template")?;
        preload_hydra(&cfg, records).await?;
        let file = dir.join("data").join("hydra.sqlite");
        println!("  (embedded store with {records} records written in {:.1} s)", t0.elapsed().as_secs_f64());
        self.sqlite_templates.insert(records, file.clone());
        Ok(file)
    }

    /// A PostgreSQL database holding `records` preloaded records (made once per count).
    async fn pg_template(&mut self, records: u64) -> anyhow::Result<String> {
        if let Some(t) = self.pg_templates.get(&records) {
            return Ok(t.clone());
        }
        let t0 = Instant::now();
        let pg = self.pg.as_ref().context("PostgreSQL")?;
        let name = format!("hydra_compare_template_{records}");
        let url = create_database_from(&pg.url("postgres"), &name, None).await?;
        let dir = self.dir.join(format!("template-pg-{records}"));
        let cfg = crate::node::bench_config(ConfigFile::default(), 1, &dir, Some(&url), "template")?;
        preload_hydra(&cfg, records).await?;
        println!(
            "  (PostgreSQL database with {records} records written in {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        self.pg_templates.insert(records, name.clone());
        Ok(name)
    }
}

/// Copy the closed embedded store `file` into directory `to`: the database file and its
/// write-ahead log when one was left (committed rows may still be only in the log).
fn copy_sqlite(file: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let name = file.file_name().context("a file name")?.to_string_lossy().into_owned();
    for suffix in ["", "-wal"] {
        let from = file.with_file_name(format!("{name}{suffix}"));
        if from.exists() {
            std::fs::copy(&from, to.join(format!("{name}{suffix}")))?;
        }
    }
    Ok(())
}

/// Write `records` preloaded provider records into the store of the node config at `cfg` (in this
/// process, before the node starts: set-up, not measurement); with 0, only the schema.
async fn preload_hydra(cfg: &std::path::Path, records: u64) -> anyhow::Result<()> {
    let conf = ConfigFile::from_file(cfg)?.validate()?;
    let metrics = hydra::metrics::Metrics::new(&prometheus::Registry::new(), 1);
    let store = Store::open(&conf.store, &conf.postgres, metrics.datastore.clone()).await?;
    let providers: Vec<_> = (0..64).map(stock_kad::preload_provider).collect();
    let expires = ms_after(now_ms(), Duration::from_secs(24 * 3600));
    let mut i = 0;
    while i < records {
        let batch: Vec<ProviderWrite> = (i..records.min(i + 1000))
            .map(|i| {
                let (peer, addr) = &providers[(i % 64) as usize];
                ProviderWrite {
                    key: ProviderKey::new(preload_key(i)).expect("a 34-byte key"),
                    provider: *peer,
                    addrs: vec![addr.clone()],
                    expires_at: expires,
                    addrs_expire_at: expires,
                }
            })
            .collect();
        store.put_providers(&batch).await?;
        i += batch.len() as u64;
    }
    store.close().await;
    Ok(())
}

/// The load on one server: its clients, and a separate finder identity for the correctness check.
struct Load {
    ctx: Arc<Ctx>,
    finder: Ctx,
}

/// The connected identities of one server's load: its clients and the finder.
struct Conns {
    clients: Arc<Vec<Client>>,
    finder: Arc<Vec<Client>>,
}

/// Connect the clients and the finder to every head of `server`, once per scale point: both
/// stream modes drive the same connections (reconnecting 33 identities to 100 busy js nodes took
/// longer than a client waits).
async fn connect_clients(server: &Server, o: &CompareOpts) -> anyhow::Result<Conns> {
    let named = || format!("server {}", server.kind.name());
    let mut clients = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        clients.push(client(i, &server.heads).await.with_context(named)?);
    }
    let finder = client(o.clients, &server.heads).await.with_context(named)?;
    Ok(Conns { clients: Arc::new(clients), finder: Arc::new(vec![finder]) })
}

fn load_on(server: &Server, conns: &Conns, o: &CompareOpts, records: u64, reuse: bool) -> Load {
    // Known keys: a sample of the preloaded ones (GET_PROVIDERS asks only these).
    let preloaded =
        (0..records.min(100_000)).map(|i| preload_key(i * (records / records.clamp(1, 100_000)))).collect();
    let ctx = |clients, preloaded, pool| Ctx {
        heads: server.heads.clone(),
        by_key: true,
        pool,
        clients,
        preloaded,
        mix: o.mix,
        timeout: Duration::from_secs(5),
        in_flight: AtomicUsize::new(0),
        max_in_flight: 50_000,
    };
    Load {
        ctx: Arc::new(ctx(conns.clients.clone(), preloaded, reuse.then(StreamPool::default))),
        finder: ctx(conns.finder.clone(), Vec::new(), None),
    }
}

/// One measured step on one server.
#[derive(Clone, Default)]
struct Measured {
    offered: f64,
    goodput: f64,
    p50: f64,
    p99: f64,
    get_p99: f64,
    cpu_ms_per_1k: f64,
    rejected: f64,
    failed: u64,
    found: (usize, usize),
    busy_pct: f64,
    /// The server's CPU while its clients were connected but sent nothing, ms per second (its
    /// background work: timers, maintenance), measured just before the load.
    idle_ms_per_s: f64,
}

fn cpu_of(pids: &[u32]) -> std::collections::HashMap<u32, f64> {
    pids.iter().filter_map(|p| Some((*p, cpu_seconds(&p.to_string())?))).collect()
}

/// Stop (SIGSTOP) or resume the stock servers other than `measured` (rust-kad, js), so that a
/// server's own background work does not share the cores with the one measured: 100 js-libp2p
/// nodes in one Node.js process keep a core busy with their DHT maintenance even when not
/// driven. hydra nodes are left running (a stopped runtime would read as a CPU-distress lag);
/// idle, they cost ~15 ms of CPU per second.
fn pause_others(servers: &[Server], measured: usize, stop: bool) {
    let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    for (i, s) in servers.iter().enumerate() {
        if i != measured && matches!(s.proc, Proc::Child(_)) {
            // SAFETY: kill(2) on the PID of a child this process started and still holds.
            unsafe { libc::kill(s.pid as libc::pid_t, sig) };
        }
    }
}

/// Wait (≤ 60 s) until the machine is quiet — under 25 % busy over half a second — so that a
/// server still working off its backlog from its own turn (js-libp2p does, for seconds) does not
/// share the cores with the next one measured. Returns how long it waited.
async fn quiet() -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let a = machine_jiffies();
        tokio::time::sleep(Duration::from_millis(500)).await;
        match (a, machine_jiffies()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 && (b1 - b0) * 4 < t1 - t0 => break,
            (None, _) | (_, None) => break,
            _ => {}
        }
    }
    t0.elapsed()
}

async fn measure(server: &Server, load: &Load, rate: f64, dur: Duration) -> Measured {
    let waited = quiet().await;
    if waited > Duration::from_secs(2) {
        println!("    (waited {:.1} s for the machine to be quiet)", waited.as_secs_f64());
    }
    let idle0 = cpu_of(&server.pids());
    tokio::time::sleep(IDLE_SPAN).await;
    let cpu0 = cpu_of(&server.pids());
    let idle: f64 = cpu0.iter().filter_map(|(p, c1)| Some(c1 - idle0.get(p)?)).sum();
    let machine0 = machine_jiffies();
    let tally = Arc::new(Tally::default());
    drive(&load.ctx, rate, dur, &tally).await;
    let cpu1 = cpu_of(&server.pids());
    // Processes present at both ends (a PostgreSQL backend that came or went is left out).
    let cpu: f64 = cpu1.iter().filter_map(|(p, c1)| Some(c1 - cpu0.get(p)?)).sum();
    let busy_pct = crate::node::busy_pct_since(machine0).unwrap_or(f64::NAN);
    let sample = std::mem::take(&mut *tally.add_sample.lock().unwrap_or_else(|e| e.into_inner()));
    let found = check_found(server, &load.finder, sample.uniform).await;
    if let Proc::Hydra(node) = &server.proc {
        for c in node.tier_changes() {
            println!("         {} {c}", server.kind.name());
        }
    }
    let kept = if found.1 == 0 { 1.0 } else { found.0 as f64 / found.1 as f64 };
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let sent = n(&tally.sent);
    let secs = dur.as_secs_f64();
    Measured {
        offered: rate,
        goodput: (n(&tally.good) + n(&tally.good_adds) * kept) / secs,
        p50: percentile_ms(&tally.latency, 0.5),
        p99: percentile_ms(&tally.latency, 0.99),
        get_p99: percentile_ms(&tally.get_latency, 0.99),
        cpu_ms_per_1k: if sent > 0.0 { cpu * 1e6 / sent } else { f64::NAN },
        rejected: n(&tally.rejected) / secs,
        failed: tally.failed.load(Ordering::Relaxed),
        found,
        busy_pct,
        idle_ms_per_s: idle * 1e3 / IDLE_SPAN.as_secs_f64(),
    }
}

/// How long [`measure`] reads a server's idle CPU before loading it.
const IDLE_SPAN: Duration = Duration::from_secs(2);

/// The sampled new records, asked by the finder identity: on their home node for stock servers,
/// on the next head for hydra (any head answers from the shared store).
async fn check_found(server: &Server, finder: &Ctx, keys: Vec<Vec<u8>>) -> (usize, usize) {
    if keys.is_empty() {
        return (0, 0);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = server.heads.len();
    let total = keys.len();
    let found = futures::stream::iter(keys)
        .map(|k| async move {
            let mut h = home(&k, n);
            if server.kind.shared_store() {
                h = (h + 1) % n;
            }
            let ask = request_as(finder, 0, server.heads[h].0, Op::Get, &k);
            matches!(tokio::time::timeout(Duration::from_secs(5), ask).await, Ok(Answer::Full))
        })
        .buffer_unordered(16)
        .filter(|f| futures::future::ready(*f))
        .count()
        .await;
    (found, total)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

async fn sitting(o: &CompareOpts) -> anyhow::Result<Sitting> {
    let hydra = crate::node::hydra_binary()?;
    let pg = if o.servers.contains(&Kind::HydraPg) {
        let c = PgCluster::start(true).context("start a throwaway PostgreSQL (fsync on)")?;
        c.set_priority(-10);
        Some(Arc::new(c))
    } else {
        None
    };
    let dir = std::env::temp_dir().join(format!("hydra-bench-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(Sitting {
        hydra,
        baseline: o.baseline_bin.clone(),
        pg,
        dir,
        started: 0,
        sqlite_templates: Default::default(),
        pg_templates: Default::default(),
    })
}

fn versions() -> String {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "not found".into());
    format!(
        "hydra {} (this checkout), rust-libp2p 0.57 / libp2p-kad 0.49 (Cargo.lock), js-libp2p 3.3.11 + \
         @libp2p/kad-dht 16.4.5 (tests/js/package.json) on Node.js {node}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Run the benchmark and print its report.
pub(crate) async fn compare(o: CompareOpts) -> anyhow::Result<()> {
    println!("hydra-bench compare: {}", versions());
    let mut s = sitting(&o).await?;
    if o.overload {
        return overload(&o, &mut s).await;
    }
    let started = Instant::now();
    println!(
        "{} clients (each its own loopback address, connected to every head), mix add/get/find {:?}, \
         {:.0} requests/s offered, {} s per measurement, {} rounds, servers alternated",
        o.clients,
        o.mix,
        o.rate,
        o.step.as_secs(),
        o.rounds
    );
    for &heads in &o.heads {
        for &records in &o.records {
            println!("\n## {heads} heads/nodes per process, {records} records held");
            let mut servers = Vec::new();
            for &k in &o.servers {
                servers.push(s.start(k, heads, records).await?);
            }
            let mut conns = Vec::new();
            for srv in &servers {
                conns.push(connect_clients(srv, &o).await?);
            }
            for &reuse in &o.reuse {
                let loads: Vec<Load> =
                    servers.iter().zip(&conns).map(|(srv, c)| load_on(srv, c, &o, records, reuse)).collect();
                let mut results: Vec<Vec<Measured>> = vec![Vec::new(); servers.len()];
                for round in 0..o.rounds {
                    for (i, srv) in servers.iter().enumerate() {
                        pause_others(&servers, i, true);
                        let m = measure(srv, &loads[i], o.rate, o.step).await;
                        pause_others(&servers, i, false);
                        println!(
                            "    round {} {:<8} goodput {:>6.0}/s  p50 {:>6.1} ms  p99 {:>7.1} ms  cpu {:>6.1} ms/1k  \
                             found {}/{}  refused {:.0}/s  timeouts {}  busy {:.0} %  idle {:.1} ms/s",
                            round + 1,
                            srv.kind.name(),
                            m.goodput,
                            m.p50,
                            m.p99,
                            m.cpu_ms_per_1k,
                            m.found.0,
                            m.found.1,
                            m.rejected,
                            m.failed,
                            m.busy_pct,
                            m.idle_ms_per_s
                        );
                        results[i].push(m);
                    }
                }
                print_table(&servers, &results, reuse);
            }
            for srv in servers {
                srv.stop().await;
            }
        }
    }
    println!("\nsitting took {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    let _ = std::fs::remove_dir_all(&s.dir);
    Ok(())
}

fn print_table(servers: &[Server], results: &[Vec<Measured>], reuse: bool) {
    let med = |i: usize, f: fn(&Measured) -> f64| median(results[i].iter().map(f).collect());
    let base = servers.iter().position(|s| s.kind == Kind::Hydra).unwrap_or(0);
    let base_cpu = med(base, |m| m.cpu_ms_per_1k);
    println!(
        "  {} streams, medians of {} rounds:",
        if reuse { "reused" } else { "fresh" },
        results.first().map_or(0, Vec::len)
    );
    println!(
        "  | server | goodput/s | p50 ms | p99 ms | GET p99 ms | server CPU ms per 1k requests | ÷ {} | idle CPU ms/s | peak RSS MiB | found again |",
        servers[base].kind.name()
    );
    println!("  |---|---|---|---|---|---|---|---|---|---|");
    for (i, srv) in servers.iter().enumerate() {
        let (found, total) = found_in(&results[i]);
        let cpu = med(i, |m| m.cpu_ms_per_1k);
        println!(
            "  | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.0} | {found}/{total} |",
            srv.kind.name(),
            med(i, |m| m.goodput),
            med(i, |m| m.p50),
            med(i, |m| m.p99),
            med(i, |m| m.get_p99),
            cpu,
            cpu / base_cpu,
            med(i, |m| m.idle_ms_per_s),
            srv.peak_rss_mib(),
        );
    }
    let cpu_of = |k: Kind| servers.iter().position(|s| s.kind == k).map(|i| med(i, |m| m.cpu_ms_per_1k));
    let p99_of = |k: Kind| servers.iter().position(|s| s.kind == k).map(|i| med(i, |m| m.p99));
    if let (Some(h), Some(js), Some(rk)) = (cpu_of(Kind::Hydra), cpu_of(Kind::Js), cpu_of(Kind::RustKad)) {
        println!(
            "  targets: hydra CPU/request ≤ 0.1 × js: {:.2} ({}); ≤ 0.5 × rust-kad: {:.2} ({})",
            h / js,
            if h / js <= 0.1 { "met" } else { "not met" },
            h / rk,
            if h / rk <= 0.5 { "met" } else { "not met" }
        );
    }
    if let (Some(h), Some(js), Some(rk)) = (p99_of(Kind::Hydra), p99_of(Kind::Js), p99_of(Kind::RustKad)) {
        println!(
            "  target: hydra p99 ≤ both: {:.1} vs js {:.1} and rust-kad {:.1} ms ({})",
            h,
            js,
            rk,
            if h <= js && h <= rk { "met" } else { "not met" }
        );
    }
}

/// Each server alone under the CPU quota: its capacity C, then the multiples of C.
async fn overload(o: &CompareOpts, s: &mut Sitting) -> anyhow::Result<()> {
    let q = o.node_cpu_quota.context("--overload needs --node-cpu-quota")?;
    let (heads, records) = (o.heads[0], o.records[0]);
    println!(
        "overload curves: {heads} heads/nodes, {records} records, {} clients, mix {:?}, fresh streams; each \
         server alone, confined to {q} of one core (10 ms period), load and PostgreSQL outside; medians of {} \
         rounds of the multiples",
        o.clients, o.mix, o.rounds
    );
    let mut curves = Vec::new();
    for &kind in &o.servers {
        let srv = s.start(kind, heads, records).await?;
        let load = load_on(&srv, &connect_clients(&srv, o).await?, o, records, false);
        let quota = CpuQuota::create(q)?;
        quota.add(srv.pid)?;
        let Some(c) = capacity(kind, &srv, &load, o).await else {
            println!("  {:<8} not even {}/s met the target; skipped", kind.name(), o.start_rate);
            srv.stop().await;
            continue;
        };
        // The multiples in rounds (0.5C … 10C, then again), each point the median of its rounds,
        // as the side-by-side tables are: one step can catch a GC pause or a compaction.
        let mut rounds: Vec<Vec<Measured>> = vec![Vec::new(); o.multiples.len()];
        for round in 1..=o.rounds {
            for (i, &mult) in o.multiples.iter().enumerate() {
                let m = measure(&srv, &load, mult * c, o.step).await;
                println!(
                    "  {:<8} round {round} {mult:>4}C {:>7.0}/s: goodput {:>6.0}/s ({:.2} C), p99 {:.1} ms, refused {:.0}/s, \
                     timeouts {}, cpu {:.1} ms/1k, busy {:.0} %",
                    kind.name(),
                    m.offered,
                    m.goodput,
                    m.goodput / c,
                    m.p99,
                    m.rejected,
                    m.failed,
                    m.cpu_ms_per_1k,
                    m.busy_pct
                );
                rounds[i].push(m);
            }
        }
        let points: Vec<(f64, Measured)> =
            o.multiples.iter().zip(&rounds).map(|(&mult, ms)| (mult, median_of(ms))).collect();
        drop(load);
        srv.stop().await;
        curves.push((kind, c, points));
    }
    println!(
        "\n| server | C (req/s) | {} |",
        o.multiples.iter().map(|m| format!("{m}C")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(o.multiples.len()));
    for (kind, c, points) in &curves {
        let cells: Vec<String> = points
            .iter()
            .map(|(_, m)| format!("{:.0} ({:.2} C), p99 {:.0} ms", m.goodput, m.goodput / c, m.p99))
            .collect();
        println!("| {} | {c:.0} | {} |", kind.name(), cells.join(" | "));
    }
    if let Some(path) = &o.svg {
        std::fs::write(path, overload_svg(q, &curves))?;
        println!("chart: {}", path.display());
    }
    Ok(())
}

/// A server's capacity C under the quota: the highest offered rate whose step meets the target
/// (GET_PROVIDERS p99, no timeouts, under 0.5 % refused, goodput ≥ 95 % of offered). Rates grow
/// ×1.5 from `--start-rate` to the first miss, then two halvings of the gap between the last pass
/// and the first miss narrow it to within 1.125×.
async fn capacity(kind: Kind, srv: &Server, load: &Load, o: &CompareOpts) -> Option<f64> {
    let check = |rate: f64| async move {
        let m = measure(srv, load, rate, o.search_step).await;
        let pass = m.get_p99 <= o.p99_target.as_secs_f64() * 1e3
            && m.failed == 0
            && m.rejected < 0.005 * rate
            && m.goodput >= 0.95 * rate;
        println!(
            "  {:<8} search {:>6.0}/s: goodput {:>6.0}/s, GET p99 {:.1} ms, refused {:.0}/s, timeouts {} → {}",
            kind.name(),
            rate,
            m.goodput,
            m.get_p99,
            m.rejected,
            m.failed,
            if pass { "pass" } else { "miss" }
        );
        pass
    };
    let (mut pass, mut miss) = (None, o.start_rate);
    while check(miss).await {
        pass = Some(miss);
        miss *= 1.5;
    }
    let mut pass = pass?;
    for _ in 0..2 {
        let mid = (pass + miss) / 2.0;
        if check(mid).await {
            pass = mid;
        } else {
            miss = mid;
        }
    }
    Some(pass)
}

/// (found, sought) summed over measurements: every round's sample counts.
fn found_in(ms: &[Measured]) -> (usize, usize) {
    ms.iter().fold((0, 0), |(f, t), m| (f + m.found.0, t + m.found.1))
}

/// The median of each figure over the rounds of one point.
fn median_of(ms: &[Measured]) -> Measured {
    let med = |f: fn(&Measured) -> f64| median(ms.iter().map(f).collect());
    Measured {
        offered: med(|m| m.offered),
        goodput: med(|m| m.goodput),
        p50: med(|m| m.p50),
        p99: med(|m| m.p99),
        get_p99: med(|m| m.get_p99),
        cpu_ms_per_1k: med(|m| m.cpu_ms_per_1k),
        rejected: med(|m| m.rejected),
        failed: median(ms.iter().map(|m| m.failed as f64).collect()) as u64,
        // Every round's sample counts (as in the side-by-side tables).
        found: found_in(ms),
        busy_pct: med(|m| m.busy_pct),
        idle_ms_per_s: med(|m| m.idle_ms_per_s),
    }
}

/// Goodput ÷ C against offered ÷ C (log scale), one line per server: an SVG document.
/// One server's overload curve: its kind, its C, and (offered multiple of C, measured) per step.
type Curve = (Kind, f64, Vec<(f64, Measured)>);

fn overload_svg(quota: f64, curves: &[Curve]) -> String {
    use std::fmt::Write as _;
    let (w, h, m) = (720.0, 420.0, 60.0);
    let x_of = |mult: f64| m + (w - 2.0 * m) * (mult.max(0.1).log10() + 1.0) / 3.0; // 0.1 … 100
    let y_max = 2.0;
    let y_of = |g: f64| h - m - (h - 2.0 * m) * (g / y_max).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Goodput under overload, each server at {quota} of one core (its own C)</text>"#,
        w / 2.0
    );
    for i in 0..=4 {
        let g = i as f64 * 0.5;
        let y = y_of(g);
        let _ = writeln!(
            s,
            r##"<line x1="{m}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{g:.1} C</text>"##,
            w - m,
            m - 6.0,
            y + 4.0
        );
    }
    for mult in [0.5, 1.0, 2.0, 5.0, 10.0] {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{mult}C</text>"#,
            x_of(mult),
            h - m + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (multiples of each server's C, log scale)</text>"#,
        w / 2.0,
        h - 16.0
    );
    const COLOURS: [&str; 4] = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"];
    for (i, (kind, c, points)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = points
            .iter()
            .map(|(mult, mm)| format!("{:.1},{:.1}", x_of(*mult), y_of(mm.goodput / c)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = m + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{} (C = {c:.0}/s)</text>"#,
            w - m - 190.0,
            w - m - 166.0,
            w - m - 160.0,
            ly + 4.0,
            kind.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_keys_are_sha256_multihashes_spread_over_homes() {
        let k = preload_key(0);
        assert_eq!((k.len(), k[0], k[1]), (34, 0x12, 0x20));
        assert_ne!(k, preload_key(1));
        let mut per_home = [0usize; 4];
        for i in 0..4000 {
            per_home[home(&preload_key(i), 4)] += 1;
        }
        assert!(per_home.iter().all(|&n| (800..1200).contains(&n)), "{per_home:?}");
        assert_eq!(home(&k, 1), 0);
    }

    #[test]
    fn medians_skip_missing_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, f64::NAN, 1.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
