//! `hydra-bench startup`: start-up time and idle memory of `hydra run` with many heads.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::node::{http_get, loopback_run_args, metric_sum, tcp_heads_at, NodeProcess};
use crate::store::median;

/// `hydra-bench startup`: for each head count, start `hydra run` (this checkout's binary, embedded store,
/// loopback, fresh data directory), time until it logs "node started" (identities leased and
/// derived, every head listening), fill its routing table with `peers` synthetic DHT servers
/// ([`populate`]), stay idle, read its resident memory, stop it with SIGTERM.
pub(crate) async fn startup(
    heads: Vec<usize>,
    runs: usize,
    idle: Duration,
    quic: bool,
    peers: usize,
    port_base: Option<u16>,
) -> anyhow::Result<()> {
    let hydra = crate::node::hydra_binary()?;
    println!(
        "hydra-bench startup: {runs} runs per head count, {peers} synthetic DHT servers identified to the heads, \
         idle {idle:?} before reading RSS, QUIC {quic}, {}",
        match port_base {
            Some(0) => "ephemeral ports".to_owned(),
            Some(b) => format!("ports from {b}"),
            None => "ports from the first free block above 10,000".to_owned(),
        }
    );
    println!(
        "{:>6}  {:>16}  {:>14}  {:>16}  {:>12}  {:>12}",
        "heads", "start-up (s)", "idle RSS (MiB)", "RSS per head (KiB)", "table peers", "table MiB"
    );
    for n in heads {
        let (mut secs, mut rss, mut held, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let dir = std::env::temp_dir().join(format!("hydra-bench-startup-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let base = match port_base {
                Some(b) => b,
                None => free_port_block(n, quic).context("find a block of free ports for the heads")?,
            }
            .to_string();
            let t = Instant::now();
            // The synthetic servers announce loopback addresses: the table must admit them.
            let args =
                loopback_run_args(n, &dir, "bench", quic, &["--address-filter", "any", "--port-base", &base]);
            let node = NodeProcess::spawn(&hydra, &args, Duration::from_secs(600)).await?;
            secs.push(t.elapsed().as_secs_f64());
            let servers = if peers > 0 { populate(&node, peers).await? } else { Vec::new() };
            tokio::time::sleep(idle).await;
            rss.push(node.rss_kib().context("read the node's RSS")?);
            let m = http_get(&node.http, "/metrics").await?;
            held.push(metric_sum(&m, "hydra_routing_table_peers", &[]));
            bytes.push(metric_sum(&m, "hydra_routing_table_bytes", &[]));
            node.stop().await;
            drop(servers);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (s, r) = (median(secs), median(rss));
        println!(
            "{n:>6}  {s:>16.2}  {:>14.1}  {:>16.0}  {:>12.0}  {:>12.1}",
            r / 1024.0,
            r / n as f64,
            median(held),
            median(bytes) / 1048576.0
        );
    }
    Ok(())
}

/// The first port p ≥ 10,000 such that p … p + n − 1 are free on 127.0.0.1 (TCP, and UDP with
/// QUIC) and end below the kernel's ephemeral range (32,768 by default), as an operator picks
/// `port_base`.
pub(crate) fn free_port_block(n: usize, quic: bool) -> anyhow::Result<u16> {
    let free = |p: u16| {
        std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && (!quic || std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
    };
    let mut base = 10_000usize;
    while base + n <= 32_768 {
        match (base..base + n).find(|&p| !free(p as u16)) {
            Some(taken) => base = taken + 1,
            None => return Ok(base as u16),
        }
    }
    anyhow::bail!("no {n} consecutive free ports between 10,000 and 32,767; pass --port-base")
}

/// A synthetic DHT server: identify lists the kad protocol (accepted by `streams`), but it runs
/// no kad behaviour — 20,000 of them bootstrapping and querying each other would be a storm on
/// two cores. Kad streams the heads open to it are closed unanswered.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct Server {
    identify: libp2p::identify::Behaviour,
    streams: libp2p_stream::Behaviour,
}

/// Synthetic servers per child process: each needs a listener and may get a connection, and
/// the open-file limit of a process here is 20,000 (the hard limit, not raisable in the sandbox).
const SERVERS_PER_PROCESS: usize = 6_000;

/// Fill the node's routing table with `n` synthetic DHT servers, run by child processes of this
/// binary ([`synthetic_servers`], at most [`SERVERS_PER_PROCESS`] each); returns when all have
/// been identified. The children stay up (and are killed when dropped), so a head that dials a
/// server later (kad's bootstrap) reaches it, as on a real network.
pub(crate) async fn populate(node: &NodeProcess, n: usize) -> anyhow::Result<Vec<tokio::process::Child>> {
    use tokio::io::AsyncBufReadExt as _;
    let t = Instant::now();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for start in (0..n).step_by(SERVERS_PER_PROCESS) {
        let count = SERVERS_PER_PROCESS.min(n - start);
        let mut child = tokio::process::Command::new(&exe)
            .args(["synthetic-servers", "--http", &node.http])
            .args(["--count", &count.to_string(), "--offset", &start.to_string()])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        children.push((child, tokio::io::BufReader::new(out).lines()));
    }
    let (mut kept, mut missed) = (Vec::new(), 0);
    for (child, mut lines) in children {
        missed += tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                match lines.next_line().await? {
                    Some(l) if l.starts_with("identified ") => {
                        return l.rsplit(' ').next().unwrap_or("").parse::<usize>().context("missed count");
                    }
                    Some(_) => {} // its log lines
                    None => anyhow::bail!("a synthetic-servers process exited early"),
                }
            }
        })
        .await
        .context("synthetic servers not identified in 600 s")??;
        // Keep reading its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        kept.push(child);
    }
    println!(
        "  {} synthetic servers identified in {:.1} s ({missed} not identified in 30 s, left out)",
        n - missed,
        t.elapsed().as_secs_f64()
    );
    Ok(kept)
}

/// `hydra-bench synthetic-servers`: `count` DHT servers, each a fresh identity with its own
/// loopback listener, that connect to the node's heads in turn from head `offset` on, answer the
/// head's identify (the kad protocol listed) and stay up, driven, until the process is killed;
/// prints "identified <servers> missed <not identified in 30 s>" once all were tried.
/// 16 are set up at a time (so 4 processes stay well within the node's per-IP connection limit).
pub(crate) async fn synthetic_servers(http: String, count: usize, offset: usize) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;
    let heads = tcp_heads_at(&http).await?;
    anyhow::ensure!(!heads.is_empty(), "the node lists no TCP head");
    let heads = std::sync::Arc::new(heads);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (heads, next) = (heads.clone(), next.clone());
            tokio::spawn(async move {
                let (mut drivers, mut missed) = (Vec::new(), 0usize);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok((drivers, missed));
                    }
                    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                        .with_tokio()
                        .with_tcp(
                            Default::default(),
                            libp2p::noise::Config::new,
                            libp2p::yamux::Config::default,
                        )?
                        .with_behaviour(|k| Server {
                            identify: libp2p::identify::Behaviour::new(libp2p::identify::Config::new(
                                "ipfs/0.1.0".into(),
                                k.public(),
                            )),
                            streams: libp2p_stream::Behaviour::new(),
                        })?
                        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(10)))
                        .build();
                    // Its own loopback address to be dialled at, as a separate host would have.
                    let n = offset + i + 1;
                    let ip = format!("127.{}.{}.{}", 1 + n / 62_500, n / 250 % 250, 1 + n % 250);
                    swarm.listen_on(format!("/ip4/{ip}/tcp/0").parse()?)?;
                    let mut incoming = swarm
                        .behaviour()
                        .streams
                        .new_control()
                        .accept(hydra::net::KAD_PROTOCOL)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let (peer, addr) = &heads[(offset + i) % heads.len()];
                    let mut dialled = false;
                    let identified = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            match swarm.select_next_some().await {
                                SwarmEvent::NewListenAddr { .. } if !dialled => {
                                    dialled = true;
                                    swarm.dial(addr.clone().with(libp2p::multiaddr::Protocol::P2p(*peer)))?;
                                }
                                // Refused (e.g. the node's per-IP connection limit while
                                // earlier ones close): again shortly.
                                SwarmEvent::OutgoingConnectionError { .. } => {
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    swarm.dial(addr.clone().with(libp2p::multiaddr::Protocol::P2p(*peer)))?;
                                }
                                // The first identify may be answered before the connection
                                // knows the kad protocol is accepted: push it again.
                                SwarmEvent::Behaviour(ServerEvent::Identify(
                                    libp2p::identify::Event::Sent { .. },
                                )) => swarm.behaviour_mut().identify.push([*peer]),
                                SwarmEvent::Behaviour(ServerEvent::Identify(
                                    libp2p::identify::Event::Pushed { .. },
                                )) => {
                                    // Identified: leave (the node allows a few hundred
                                    // connections per source address; these all come from
                                    // 127.0.0.1), stay reachable.
                                    let _ = swarm.disconnect_peer_id(*peer);
                                    return anyhow::Ok(());
                                }
                                _ => {}
                            }
                        }
                    })
                    .await;
                    if !matches!(identified, Ok(Ok(()))) {
                        // Not identified in 30 s (rare: a few in 20,000): counted, left out.
                        missed += 1;
                        continue;
                    }
                    drivers.push(tokio::spawn(async move {
                        loop {
                            tokio::select! {
                                _ = swarm.select_next_some() => {}
                                s = incoming.next() => drop(s),
                            }
                        }
                    }));
                }
            })
        })
        .collect();
    let (mut drivers, mut missed) = (Vec::new(), 0);
    for w in workers {
        let (d, m) = w.await??;
        drivers.extend(d);
        missed += m;
    }
    println!("identified {} missed {missed}", drivers.len());
    futures::future::pending::<()>().await;
    Ok(())
}
