//! `hydra-bench find-node`: the node's CPU per FIND_NODE over the wire as the head count grows.
//!
//! For each head count (and each build, when `--baseline-bin` is given), in rounds that
//! alternate them: `hydra run` on loopback with the embedded store, its process-wide routing
//! table filled with `--peers` synthetic DHT servers (as `startup --peers`), then `--clients`
//! client identities (each its own loopback source address) connected to the first
//! `--client-heads` heads only — a client of a 10,000-head node talks to a few of its heads, as
//! one of a real network would. The node's CPU is read over `--idle` seconds with the clients
//! connected and no requests (its lookups, timers and table upkeep), then over `--seconds` of
//! FIND_NODE for random keys at a fixed arrival rate, each on a fresh stream; the figure is
//! (CPU of the load − idle CPU over as long) per 1,000 answered FIND_NODEs, beside the raw
//! CPU. A FIND_NODE counts as answered when it carries closer peers, and the answers must carry
//! 20 peers (the table is full), so a node cannot look cheap by answering less.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::load::client::{client, drive, Ctx, Tally};
use crate::node::{busy_pct_since, http_get, loopback_run_args, machine_jiffies, metric_sum, NodeProcess};
use crate::store::median;

/// Options of `hydra-bench find-node`.
pub(crate) struct FindNodeOpts {
    pub heads: Vec<usize>,
    pub peers: usize,
    pub clients: usize,
    pub client_heads: usize,
    pub rate: f64,
    pub seconds: u64,
    pub idle: u64,
    pub rounds: usize,
    /// A second `hydra` binary measured alternately with this checkout's (its label first).
    pub baseline: Option<(String, std::path::PathBuf)>,
}

/// One measurement.
struct Point {
    /// Node CPU per 1,000 answered FIND_NODE, idle CPU taken out; and with it.
    net_ms_per_1k: f64,
    raw_ms_per_1k: f64,
    idle_ms_per_s: f64,
    answered: u64,
    sent: u64,
    table_peers: f64,
    busy_pct: f64,
}

pub(crate) async fn find_node(o: FindNodeOpts) -> anyhow::Result<()> {
    let this = crate::node::hydra_binary()?;
    let mut builds = vec![("this".to_owned(), this)];
    if let Some((label, bin)) = &o.baseline {
        builds.insert(0, (label.clone(), bin.clone()));
    }
    println!(
        "hydra-bench find-node: heads {:?}, {} synthetic peers in the table, {} clients on the first {} heads, \
         {}/s FIND_NODE for {} s after {} s idle, {} rounds, builds {:?}",
        o.heads,
        o.peers,
        o.clients,
        o.client_heads,
        o.rate,
        o.seconds,
        o.idle,
        o.rounds,
        builds.iter().map(|b| &b.0).collect::<Vec<_>>()
    );
    println!(
        "{:>5} {:>10} {:>6}  {:>14} {:>14} {:>12} {:>15} {:>11} {:>6}",
        "round",
        "build",
        "heads",
        "net ms/1k",
        "raw ms/1k",
        "idle ms/s",
        "answered/sent",
        "table peers",
        "busy%"
    );
    let mut all: Vec<(String, usize, Point)> = Vec::new();
    for round in 1..=o.rounds {
        for (label, bin) in &builds {
            for &n in &o.heads {
                let p = measure(&o, bin, n).await.with_context(|| format!("{label} at {n} heads"))?;
                println!(
                    "{round:>5} {label:>10} {n:>6}  {:>14.1} {:>14.1} {:>12.1} {:>15} {:>11.0} {:>6.0}",
                    p.net_ms_per_1k,
                    p.raw_ms_per_1k,
                    p.idle_ms_per_s,
                    format!("{}/{}", p.answered, p.sent),
                    p.table_peers,
                    p.busy_pct
                );
                all.push((label.clone(), n, p));
            }
        }
    }
    println!("medians over {} rounds (node CPU per 1,000 FIND_NODE, idle taken out):", o.rounds);
    for (label, _) in &builds {
        let of = |n: usize| {
            median(
                all.iter()
                    .filter(|(l, h, _)| l == label && *h == n)
                    .map(|(_, _, p)| p.net_ms_per_1k)
                    .collect(),
            )
        };
        let base = of(o.heads[0]);
        for &n in &o.heads {
            println!(
                "  {label:>10} {n:>6} heads: {:>8.1} ms/1k ({:.2} × {} heads)",
                of(n),
                of(n) / base,
                o.heads[0]
            );
        }
    }
    Ok(())
}

async fn measure(o: &FindNodeOpts, hydra: &std::path::Path, n: usize) -> anyhow::Result<Point> {
    let dir = std::env::temp_dir().join(format!("hydra-bench-findnode-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let base = crate::startup::free_port_block(n, false)?.to_string();
    let args = loopback_run_args(n, &dir, "bench", false, &["--address-filter", "any", "--port-base", &base]);
    let node = NodeProcess::spawn(hydra, &args, Duration::from_secs(600)).await?;
    let servers = if o.peers > 0 { crate::startup::populate(&node, o.peers).await? } else { Vec::new() };
    let heads: Vec<_> = node.tcp_heads().await?.into_iter().take(o.client_heads.max(1)).collect();
    let mut clients = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        clients.push(client(i, &heads).await?);
    }
    let ctx = Arc::new(Ctx {
        heads,
        by_key: false,
        pool: None,
        clients: Arc::new(clients),
        preloaded: Vec::new(),
        mix: [0, 0, 1],
        timeout: Duration::from_secs(5),
        in_flight: AtomicUsize::new(0),
        max_in_flight: 50_000,
    });
    // Settle: the clients' identify exchanges and the first lookups are not the idle cost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = || node.cpu_seconds().context("read the node's CPU time");
    let c0 = cpu()?;
    tokio::time::sleep(Duration::from_secs(o.idle)).await;
    let idle_per_s = (cpu()? - c0) / o.idle.max(1) as f64;
    let busy0 = machine_jiffies();
    let tally = Arc::new(Tally::default());
    let t = std::time::Instant::now();
    let c1 = cpu()?;
    drive(&ctx, o.rate, Duration::from_secs(o.seconds), &tally).await;
    let (spent, took) = (cpu()? - c1, t.elapsed().as_secs_f64());
    let busy_pct = busy_pct_since(busy0).unwrap_or(f64::NAN);
    let answered = tally.good_finds.load(Ordering::Relaxed);
    let sent = tally.finds_sent.load(Ordering::Relaxed);
    // Every answer must hold k = 20 peers, checked on one more FIND_NODE per head.
    let full = check_twenty(&ctx).await;
    anyhow::ensure!(full, "a head answered FIND_NODE with fewer than 20 closer peers");
    let m = http_get(&node.http, "/metrics").await?;
    let table_peers = metric_sum(&m, "hydra_routing_table_peers", &[]);
    drop(ctx);
    node.stop().await;
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    let per_1k = |cpu_s: f64| cpu_s * 1e6 / answered.max(1) as f64;
    Ok(Point {
        net_ms_per_1k: per_1k(spent - idle_per_s * took),
        raw_ms_per_1k: per_1k(spent),
        idle_ms_per_s: idle_per_s * 1e3,
        answered,
        sent,
        table_peers,
        busy_pct,
    })
}

/// One FIND_NODE to each head the clients use: does every answer hold 20 closer peers?
async fn check_twenty(ctx: &Ctx) -> bool {
    use hydra::net::wire::{self, MessageType};
    for (head, _) in &ctx.heads {
        let Ok(mut s) = ctx.clients[0].control.clone().open_stream(*head, hydra::net::KAD_PROTOCOL).await
        else {
            return false;
        };
        let key = crate::load::client::random_key();
        let body = wire::encode_request(MessageType::FindNode, &key, &[]);
        let reply = async {
            wire::write_frame(&mut s, &body).await.ok()?;
            let len = wire::read_length(&mut s).await.ok()??;
            wire::read_body(&mut s, len).await.ok()
        };
        let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(5), reply).await else { return false };
        match wire::decode_message(&reply) {
            Ok(m) if m.closer_peers.len() >= 20 => {}
            _ => return false,
        }
    }
    true
}
