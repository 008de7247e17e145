//! `hydra bench load`: an open-loop load generator against a real `hydra run` process.
//!
//! The node runs as a child process (its RSS and CPU are its own) on a PostgreSQL database (a
//! throwaway cluster unless `--database-url`). Many client identities — each a libp2p swarm with
//! one real connection to every head — send requests at a **fixed arrival rate**: request i of a
//! step is due at `start + i / rate` whether or not earlier ones were answered (a closed loop
//! would slow down with the server and hide overload). Latency is measured from the due time,
//! so queueing in the generator counts too. Every request opens a new stream, as rust-libp2p and
//! js-libp2p clients do.
//!
//! Per step it prints offered and sent rate, goodput (requests the node counted `ok`, from its
//! `/metrics`), sheds (the node's `hydra_load_shed_total` plus refused and dropped streams),
//! client-side failures, latency p50/p99 of answered requests and p99 of answered GET_PROVIDERS,
//! the highest and final tier, node RSS (max of 1 s samples), node CPU per 1,000 requests, and
//! PostgreSQL transactions per second for the node's database (`pg_stat_database`; every
//! statement the node issues is its own transaction).
//!
//! Capacity C is searched first (rates × 1.5 from `--start-rate` in short steps, while the
//! answered GET_PROVIDERS p99 stays under `--p99-target-ms`, nothing is shed or fails, and the
//! generator keeps up); then the `--multiples` of C run for `--step-seconds` each.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::io::AsyncBufReadExt;

use crate::config::{AddressFilter, ConfigFile};
use crate::kad_server::KAD_PROTOCOL;
use crate::pgcluster::{create_database, PgCluster};
use crate::types::PeerRecord;
use crate::wire::{self, MessageType};

/// Options of `hydra bench load`.
#[derive(Debug, Clone)]
pub struct LoadBenchOpts {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Get,
    Find,
}

/// A `hydra run` child process: its HTTP address, and its logs drained so it never blocks.
pub struct NodeProcess {
    child: tokio::process::Child,
    pid: u32,
    pub http: String,
    drain: tokio::task::JoinHandle<()>,
    /// Tier changes the node logged (message and signals), taken by [`Self::tier_changes`].
    tier_log: Arc<Mutex<Vec<String>>>,
}

impl NodeProcess {
    /// Start `hydra <args>` (JSON logs) and wait up to `timeout` for "node started".
    pub async fn spawn(args: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("find the hydra binary")?;
        let mut cmd = tokio::process::Command::new(&exe);
        // The node runs at a higher CPU priority than the generator (when allowed: as root), so
        // on a shared machine the generator, not the node, falls behind — as if the clients were
        // other machines. The generator reports the rate it really sent.
        // SAFETY: setpriority is async-signal-safe and touches only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpriority(libc::PRIO_PROCESS, 0, -10);
                Ok(())
            });
        }
        let mut child = cmd
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("pid")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let http = loop {
            let line = tokio::time::timeout(timeout, lines.next_line())
                .await
                .context("the node did not start in time")??
                .context("hydra exited before it started")?;
            if line.contains("\"node started\"") {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                break v["fields"]["http"].as_str().context("http address in the start line")?.to_string();
            }
        };
        // Keep reading logs so the child never blocks on a full pipe; keep the tier changes.
        let tier_log = Arc::new(Mutex::new(Vec::new()));
        let log = tier_log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.contains("load tier") {
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let f = &v["fields"];
                    let entry = format!(
                        "{} {}",
                        f["message"].as_str().unwrap_or(""),
                        f["signals"].as_str().unwrap_or("")
                    );
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
                }
            }
        });
        Ok(Self { child, pid, http, drain, tier_log })
    }

    /// Tier changes logged since the last call.
    pub fn tier_changes(&self) -> Vec<String> {
        std::mem::take(&mut *self.tier_log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> Option<f64> {
        crate::load::rss_bytes(&self.pid.to_string()).map(|b| b as f64 / 1024.0)
    }

    /// User + system CPU time, seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.pid.to_string())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub async fn stop(mut self) -> bool {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let res = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        self.drain.abort();
        matches!(res, Ok(Ok(s)) if s.success())
    }
}

/// `GET path` over HTTP/1.0 from `addr`; the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Sum of the samples of metric `name` whose labels include every `(label, value)`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The `q` quantile of histogram `name` (with `labels`) over the observations between two
/// scrapes, from its cumulative buckets (the upper bound of the bucket it falls in), in ms.
fn histogram_quantile_ms(before: &str, after: &str, name: &str, labels: &[(&str, &str)], q: f64) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut v: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{')?;
                if n != bucket || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                    return None;
                }
                let le = rest.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, value.parse().ok()?))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let (b, a) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> = a.iter().zip(&b).map(|((le, x), (_, y))| (*le, x - y)).collect();
    let Some(&(_, total)) = delta.last() else { return f64::NAN };
    if total <= 0.0 {
        return f64::NAN;
    }
    delta.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| le * 1e3).unwrap_or(f64::NAN)
}

/// One client identity: a swarm connected to every head, driven by its own task.
struct Client {
    control: libp2p_stream::Control,
    record: PeerRecord,
    _task: tokio::task::JoinHandle<()>,
}

async fn client(heads: &[(PeerId, Multiaddr)]) -> anyhow::Result<Client> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let peer = *swarm.local_peer_id();
    let mut addr = None;
    let mut want: HashSet<PeerId> = heads.iter().map(|h| h.0).collect();
    for (p, a) in heads {
        swarm.dial(a.clone().with(Protocol::P2p(*p)))?;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while !want.is_empty() || addr.is_none() {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    want.remove(&peer_id);
                }
                SwarmEvent::NewListenAddr { address, .. } => addr = Some(address),
                _ => {}
            }
        }
    })
    .await
    .context("a client did not connect to every head in time")?;
    let control = swarm.behaviour().new_control();
    let task = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let record = PeerRecord { peer, addrs: addr.into_iter().collect() };
    Ok(Client { control, record, _task: task })
}

fn random_key() -> Vec<u8> {
    let mut k = vec![0x12, 0x20];
    k.extend((0..32).map(|_| rand::random::<u8>()));
    k
}

/// What the generator saw in one step.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// Not sent: the generator's own in-flight bound was reached.
    dropped: AtomicU64,
    failed: AtomicU64,
    answered: AtomicU64,
    /// Answered request latencies (µs from the due time): all, and GET_PROVIDERS only.
    latency: Mutex<Vec<u32>>,
    get_latency: Mutex<Vec<u32>>,
}

struct Ctx {
    heads: Vec<(PeerId, Multiaddr)>,
    clients: Vec<Client>,
    preloaded: Vec<Vec<u8>>,
    mix: [u32; 3],
    timeout: Duration,
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

impl Ctx {
    fn pick(&self) -> (Op, Vec<u8>) {
        let total: u32 = self.mix.iter().sum();
        let r = rand::random::<u32>() % total.max(1);
        let op = if r < self.mix[0] {
            Op::Add
        } else if r < self.mix[0] + self.mix[1] {
            Op::Get
        } else {
            Op::Find
        };
        // Half the keys are known (preloaded), half new: new keys reach the datastore.
        let key = if rand::random::<bool>() && !self.preloaded.is_empty() {
            self.preloaded[rand::random::<usize>() % self.preloaded.len()].clone()
        } else {
            random_key()
        };
        (op, key)
    }
}

/// One request on a fresh stream. Ok(()) when answered (ADD_PROVIDER: written and closed).
async fn request(ctx: &Ctx, op: Op, key: Vec<u8>) -> anyhow::Result<()> {
    let c = &ctx.clients[rand::random::<usize>() % ctx.clients.len()];
    let head = ctx.heads[rand::random::<usize>() % ctx.heads.len()].0;
    let mut s = c.control.clone().open_stream(head, KAD_PROTOCOL).await?;
    let body = match op {
        Op::Add => wire::encode_request(MessageType::AddProvider, &key, std::slice::from_ref(&c.record)),
        Op::Get => wire::encode_request(MessageType::GetProviders, &key, &[]),
        Op::Find => wire::encode_request(MessageType::FindNode, &key, &[]),
    };
    wire::write_frame(&mut s, &body).await?;
    if op == Op::Add {
        s.close().await?;
        return Ok(());
    }
    let len = wire::read_length(&mut s).await?.context("stream closed without a reply")?;
    wire::read_body(&mut s, len).await?;
    let _ = s.close().await;
    Ok(())
}

/// Issue requests at `rate`/s for `dur` (open loop), then wait for stragglers (bounded).
async fn drive(ctx: &Arc<Ctx>, rate: f64, dur: Duration, tally: &Arc<Tally>) {
    let start = tokio::time::Instant::now();
    let total = (rate * dur.as_secs_f64()).round() as u64;
    let mut i = 0u64;
    let tasks = tokio_util::task::TaskTracker::new();
    while i < total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        // Everything due by now goes out now (the timer is coarser than high rates).
        while i < total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due > now {
                break;
            }
            i += 1;
            if ctx.in_flight.load(Ordering::Relaxed) >= ctx.max_in_flight {
                tally.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            ctx.in_flight.fetch_add(1, Ordering::Relaxed);
            tally.sent.fetch_add(1, Ordering::Relaxed);
            let (ctx, tally) = (ctx.clone(), tally.clone());
            let due = due.into_std();
            tasks.spawn(async move {
                let (op, key) = ctx.pick();
                let res = tokio::time::timeout(ctx.timeout, request(&ctx, op, key)).await;
                match res {
                    Ok(Ok(())) => {
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                        let us = due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        if op != Op::Add {
                            tally.latency.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                        }
                        if op == Op::Get {
                            tally.get_latency.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                        }
                    }
                    _ => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(ctx.timeout + Duration::from_secs(1), tasks.wait()).await;
}

fn percentile_ms(v: &Mutex<Vec<u32>>, q: f64) -> f64 {
    let mut v = v.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let idx = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    f64::from(v[idx]) / 1000.0
}

/// Results of one step.
struct Step {
    label: String,
    offered: f64,
    sent: f64,
    goodput: f64,
    /// Of `goodput`: GET_PROVIDERS and ADD_PROVIDER (the datastore-bound requests).
    ds_goodput: f64,
    shed: f64,
    failed: u64,
    dropped: u64,
    p50: f64,
    p99: f64,
    get_p99: f64,
    /// p99 of GET_PROVIDERS inside the node (decoded request to reply written), bucket bound.
    node_get_p99: f64,
    tier_max: String,
    tier_end: String,
    rss_mib: f64,
    cpu_ms_per_1k: f64,
    /// CPU of this process (the generator) per 1,000 requests sent.
    gen_cpu_ms_per_1k: f64,
    /// Busy share of all the machine's cores over the step (node, PostgreSQL, generator, rest).
    machine_busy_pct: f64,
    pg_tps: f64,
    pg_tps_max5: f64,
}

impl Step {
    fn header() -> String {
        format!(
            "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>15} {:>7} {:>8} {:>8} {:>6} {:>8} {:>8}",
            "step",
            "offered",
            "sent",
            "goodput",
            "ds-good",
            "shed/s",
            "failed",
            "gen-drop",
            "p50 ms",
            "p99 ms",
            "get p99",
            "node",
            "tier max/end",
            "RSS MiB",
            "cpu ms/1k",
            "gen ms/1k",
            "busy %",
            "pg tx/s",
            "max 5s"
        )
    }

    fn row(&self) -> String {
        format!(
            "{:>8} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>6} {:>8} {:>7.1} {:>7.1} {:>7.1} {:>6} {:>15} {:>7.0} {:>8.1} {:>8.1} {:>6.0} {:>8.0} {:>8.0}",
            self.label,
            self.offered,
            self.sent,
            self.goodput,
            self.ds_goodput,
            self.shed,
            self.failed,
            self.dropped,
            self.p50,
            self.p99,
            self.get_p99,
            self.node_get_p99,
            format!("{}/{}", self.tier_max, self.tier_end),
            self.rss_mib,
            self.cpu_ms_per_1k,
            self.gen_cpu_ms_per_1k,
            self.machine_busy_pct,
            self.pg_tps,
            self.pg_tps_max5
        )
    }
}

/// PostgreSQL transactions committed + rolled back in `db` so far.
async fn pg_xacts(c: &tokio_postgres::Client, db: &str) -> anyhow::Result<f64> {
    let row = c
        .query_one(
            "SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await?;
    Ok(row.get(0))
}

const TIERS: [&str; 4] = ["normal", "degrade", "refuse", "peak"];

/// What the sampler saw during a step (1 s samples).
#[derive(Default, Clone, Copy)]
struct Samples {
    tier_max: usize,
    rss_max_mib: f64,
    /// Highest PostgreSQL transaction rate over a 5 s window.
    pg_max5: f64,
}

async fn connect_pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Every second: the node's tier and RSS; every 5 s: PostgreSQL's transaction rate.
async fn sample(http: String, pid: u32, pg_url: String, db: String, out: Arc<Mutex<Samples>>) {
    let Ok(pg) = connect_pg(&pg_url).await else { return };
    let mut last = match pg_xacts(&pg, &db).await {
        Ok(x) => (Instant::now(), x),
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 1u64.. {
        tick.tick().await;
        let tier = match http_get(&http, "/v1/status")
            .await
            .map(|b| serde_json::from_str::<serde_json::Value>(&b))
        {
            Ok(Ok(v)) => TIERS.iter().position(|t| v["tier"] == *t).unwrap_or(0),
            _ => 0,
        };
        let rss = crate::load::rss_bytes(&pid.to_string()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let mut pg_rate = None;
        if n % 5 == 0 {
            if let Ok(x) = pg_xacts(&pg, &db).await {
                pg_rate = Some((x - last.1) / last.0.elapsed().as_secs_f64());
                last = (Instant::now(), x);
            }
        }
        let mut s = out.lock().unwrap_or_else(|e| e.into_inner());
        s.tier_max = s.tier_max.max(tier);
        s.rss_max_mib = s.rss_max_mib.max(rss);
        if let Some(r) = pg_rate {
            s.pg_max5 = s.pg_max5.max(r);
        }
    }
}

/// The node's PostgreSQL database, for the transaction counts.
struct Pg {
    url: String,
    db: String,
    client: tokio_postgres::Client,
}

async fn run_step(
    ctx: &Arc<Ctx>,
    node: &NodeProcess,
    pg: &Pg,
    label: String,
    rate: f64,
    dur: Duration,
) -> anyhow::Result<Step> {
    let ok = |m: &str| metric_sum(m, "hydra_kad_requests_total", &[("outcome", "ok")]);
    let ds_ok = |m: &str| {
        ["get_providers", "add_provider"]
            .iter()
            .map(|t| metric_sum(m, "hydra_kad_requests_total", &[("outcome", "ok"), ("type", t)]))
            .sum::<f64>()
    };
    let shed = |m: &str| {
        metric_sum(m, "hydra_load_shed_total", &[])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "refused")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "queue_full")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "peer_limit")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "queue_wait")])
    };
    let before = http_get(&node.http, "/metrics").await?;
    let cpu0 = node.cpu_seconds().unwrap_or(0.0);
    let (gen0, machine0) = (cpu_seconds("self").unwrap_or(0.0), machine_jiffies());
    let x0 = pg_xacts(&pg.client, &pg.db).await?;
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler =
        tokio::spawn(sample(node.http.clone(), node.pid, pg.url.clone(), pg.db.clone(), samples.clone()));
    let tally = Arc::new(Tally::default());
    drive(ctx, rate, dur, &tally).await;
    sampler.abort();
    let secs = t0.elapsed().as_secs_f64();
    let x1 = pg_xacts(&pg.client, &pg.db).await?;
    let after = http_get(&node.http, "/metrics").await?;
    let status: serde_json::Value = serde_json::from_str(&http_get(&node.http, "/v1/status").await?)?;
    let cpu = node.cpu_seconds().unwrap_or(0.0) - cpu0;
    let gen_cpu = cpu_seconds("self").unwrap_or(0.0) - gen0;
    let machine_busy_pct = match (machine0, machine_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64,
        _ => 0.0,
    };
    let s = *samples.lock().unwrap_or_else(|e| e.into_inner());
    let sent = tally.sent.load(Ordering::Relaxed);
    let per_s = |v: f64| v / dur.as_secs_f64();
    Ok(Step {
        label,
        offered: rate,
        sent: per_s(sent as f64),
        goodput: per_s(ok(&after) - ok(&before)),
        ds_goodput: per_s(ds_ok(&after) - ds_ok(&before)),
        shed: per_s(shed(&after) - shed(&before)),
        failed: tally.failed.load(Ordering::Relaxed),
        dropped: tally.dropped.load(Ordering::Relaxed),
        p50: percentile_ms(&tally.latency, 0.5),
        p99: percentile_ms(&tally.latency, 0.99),
        get_p99: percentile_ms(&tally.get_latency, 0.99),
        node_get_p99: histogram_quantile_ms(
            &before,
            &after,
            "hydra_kad_request_duration_seconds",
            &[("type", "get_providers")],
            0.99,
        ),
        tier_max: TIERS[s.tier_max].to_string(),
        tier_end: status["tier"].as_str().unwrap_or("?").to_string(),
        rss_mib: s.rss_max_mib.max(node.rss_kib().unwrap_or(0.0) / 1024.0),
        cpu_ms_per_1k: if sent > 0 { cpu * 1e6 / sent as f64 } else { 0.0 },
        gen_cpu_ms_per_1k: if sent > 0 { gen_cpu * 1e6 / sent as f64 } else { 0.0 },
        machine_busy_pct,
        pg_tps: (x1 - x0) / secs,
        pg_tps_max5: s.pg_max5,
    })
}

/// User + system CPU seconds of process `pid` ("self" for this one) so far, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// (busy, total) jiffies of all cores together, from the first line of /proc/stat (Linux only).
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Hold an ACCESS EXCLUSIVE lock on `providers` for `hold` out of every `period`: every read
/// and write of provider records stalls meanwhile, as behind a slow or overloaded database.
async fn slow_postgres(url: String, hold: Duration, period: Duration) {
    let Ok(c) = connect_pg(&url).await else { return };
    loop {
        let held = async {
            c.batch_execute("BEGIN; LOCK TABLE providers IN ACCESS EXCLUSIVE MODE").await?;
            tokio::time::sleep(hold).await;
            c.batch_execute("COMMIT").await
        };
        if held.await.is_err() {
            return;
        }
        tokio::time::sleep(period.saturating_sub(hold)).await;
    }
}

fn print_tier_changes(node: &NodeProcess) {
    for c in node.tier_changes() {
        println!("         {c}");
    }
}

/// Run the benchmark and print its report.
pub async fn load(o: LoadBenchOpts) -> anyhow::Result<()> {
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
    file.heads = o.heads;
    file.listen_ip = "127.0.0.1".into();
    file.port_base = 0;
    file.http_listen = "127.0.0.1:0".into();
    file.data_dir = dir.join("data");
    file.database_url = url.clone();
    file.quic = false;
    file.bootstrap.clear();
    file.node_name = "bench-load".into();
    file.identity_seed_file = String::new();
    file.routing.address_filter = AddressFilter::Any;
    file.validate().context("node config")?;
    let cfg_path = dir.join("hydra.toml");
    std::fs::write(&cfg_path, toml::to_string(&file)?)?;
    let l = &file.load;
    println!(
        "hydra bench load: {} heads, {} clients, mix add/get/find {:?}, request timeout {:?}, \
         statement budget {}/s, per-peer {}/s",
        o.heads,
        o.clients,
        o.mix,
        o.request_timeout,
        l.datastore_statements_per_second,
        l.per_peer_requests_per_second
    );

    let mut node = NodeProcess::spawn(
        &["run".into(), "--config".into(), cfg_path.display().to_string()],
        Duration::from_secs(120),
    )
    .await?;
    let heads: Vec<crate::http::HeadInfo> = serde_json::from_str(&http_get(&node.http, "/v1/heads").await?)?;
    let heads: Vec<(PeerId, Multiaddr)> = heads
        .into_iter()
        .filter_map(|h| {
            let tcp = h.addrs.iter().find(|a| a.contains("/tcp/"))?.parse().ok()?;
            Some((h.peer_id.parse().ok()?, tcp))
        })
        .collect();
    let mut clients = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        clients.push(client(&heads).await?);
    }
    println!("{} clients connected to {} heads", clients.len(), heads.len());

    // Preload: records the GET_PROVIDERS half of known keys finds.
    let preloaded: Vec<Vec<u8>> = (0..o.preload).map(|_| random_key()).collect();
    let ctx = Arc::new(Ctx {
        heads,
        clients,
        preloaded: Vec::new(),
        mix: [1, 0, 0],
        timeout: o.request_timeout,
        in_flight: AtomicUsize::new(0),
        max_in_flight: o.max_in_flight,
    });
    futures::stream::iter(preloaded.iter().cloned())
        .for_each_concurrent(128, |k| {
            let ctx = ctx.clone();
            async move {
                let _ = tokio::time::timeout(ctx.timeout, request(&ctx, Op::Add, k)).await;
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
    for _ in 0..240 {
        let status = http_get(&node.http, "/v1/status").await.unwrap_or_default();
        if status.contains("\"tier\":\"normal\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
        println!("searching capacity: steps of {:?}, rate × 1.5 from {}/s while get p99 ≤ {:?}, nothing shed or failed", o.search_step, o.start_rate, o.p99_target);
        println!("{}", Step::header());
        let mut rate = o.start_rate;
        let mut capacity = None;
        loop {
            let st = run_step(&ctx, &node, &pg, "search".into(), rate, o.search_step).await?;
            println!("{}", st.row());
            print_tier_changes(&node);
            let pass = st.get_p99 <= o.p99_target.as_secs_f64() * 1e3
                && st.failed == 0
                && st.dropped == 0
                && st.shed < 0.005 * rate
                && st.sent >= 0.95 * rate;
            if !pass {
                break;
            }
            capacity = Some(rate);
            rate *= 1.5;
        }
        let c = capacity.context("not even the start rate met the target: lower --start-rate")?;
        println!("capacity C = {c:.0} requests/s");
        rates = o.multiples.iter().map(|m| (format!("{m}C"), m * c)).collect();
    }
    println!("{}", Step::header());
    let mut steps = Vec::new();
    for (label, rate) in rates {
        let st = run_step(&ctx, &node, &pg, label, rate, o.step).await?;
        println!("{}", st.row());
        print_tier_changes(&node);
        steps.push(st);
        if !node.is_running() {
            anyhow::bail!("the node exited during the step");
        }
    }
    if let Some(s) = slow {
        s.abort();
    }
    let running = node.is_running();
    let clean = node.stop().await;
    println!("node still up at the end: {running}; clean shutdown: {clean}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
