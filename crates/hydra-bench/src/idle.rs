//! `hydra-bench idle-streams`: what idle streams cost the node, and whether they crowd out a new
//! client.
//!
//! Starts this checkout's `hydra run` (embedded store, loopback), then `--clients` client
//! identities, each from its own loopback source address (127.x.0.y, as separate hosts), each
//! opening `--streams-per-head` streams on every head, sending one PING on each and keeping them
//! open and idle — as go-libp2p-kad-dht clients keep their streams. It prints the node's RSS
//! before and after, the memory per idle stream, the streams the node holds and closed, and then
//! how many of `--probes` FIND_NODEs a fresh client from yet another address gets answered
//! within 1 s, each on a new stream.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::AsyncWriteExt as _;
use hydra::net::wire::{self, MessageType};
use hydra::net::KAD_PROTOCOL;
use libp2p::{Multiaddr, PeerId, Stream};

use crate::load::client::{connect, source};
use crate::node::{http_get, loopback_run_args, metric_sum, NodeProcess};

pub(crate) struct IdleOpts {
    pub heads: usize,
    pub clients: usize,
    pub streams_per_head: usize,
    pub probes: usize,
}

/// Send `body` and read one reply frame.
async fn request(s: &mut Stream, body: &[u8]) -> anyhow::Result<()> {
    wire::write_frame(s, body).await?;
    let len = wire::read_length(s).await?.context("stream ended")?;
    wire::read_body(s, len).await?;
    Ok(())
}

pub(crate) async fn idle_streams(o: IdleOpts) -> anyhow::Result<()> {
    let hydra = crate::node::hydra_binary()?;
    let dir = std::env::temp_dir().join(format!("hydra-bench-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = loopback_run_args(o.heads, &dir, "bench-idle", false, &["--address-filter", "any"]);
    let node = NodeProcess::spawn(&hydra, &args, Duration::from_secs(120)).await?;
    let infos: Vec<hydra::http::HeadInfo> = serde_json::from_str(&http_get(&node.http, "/v1/heads").await?)?;
    let heads: Vec<(PeerId, Multiaddr)> = infos
        .into_iter()
        .filter_map(|h| {
            Some((h.peer_id.parse().ok()?, h.addrs.iter().find(|a| a.contains("/tcp/"))?.parse().ok()?))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = node.rss_kib().context("read the node's RSS")?;
    println!(
        "hydra-bench idle-streams: {} heads, {} clients on distinct loopback addresses, {} streams each per head",
        o.heads, o.clients, o.streams_per_head
    );
    let ping = wire::encode_request(MessageType::Ping, &[], &[]);
    let t = Instant::now();
    let mut held: Vec<Stream> = Vec::new();
    let mut tasks = Vec::new();
    let mut failed = 0usize;
    for i in 0..o.clients {
        let (_, control, _, task) = connect(source(i), &heads).await?;
        tasks.push(task);
        let opened = futures::future::join_all(heads.iter().flat_map(|(h, _)| {
            let (control, ping) = (control.clone(), ping.clone());
            (0..o.streams_per_head).map(move |_| {
                let (mut control, ping, h) = (control.clone(), ping.clone(), *h);
                async move {
                    let mut s = control.open_stream(h, KAD_PROTOCOL).await.ok()?;
                    tokio::time::timeout(Duration::from_secs(10), request(&mut s, &ping)).await.ok()?.ok()?;
                    Some(s)
                }
            })
        }))
        .await;
        for s in opened {
            match s {
                Some(s) => held.push(s),
                None => failed += 1,
            }
        }
    }
    let setup = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = node.rss_kib().context("read the node's RSS")?;
    let m = http_get(&node.http, "/metrics").await?;
    let open = metric_sum(&m, "hydra_kad_active_streams", &[]);
    let evicted = metric_sum(&m, "hydra_kad_streams_total", &[("event", "evicted")]);
    let refused = metric_sum(&m, "hydra_kad_streams_total", &[("event", "peer_limit")]);
    println!(
        "held {} idle streams ({} failed to open) in {:.1} s; the node reports {open:.0} open, {evicted:.0} \
         closed for newer ones, {refused:.0} refused",
        held.len(),
        failed,
        setup.as_secs_f64()
    );
    let per_stream = (rss1 - rss0) / open.max(1.0);
    println!(
        "node RSS {:.1} MiB before, {:.1} MiB with the idle streams: {per_stream:.1} KiB per idle stream",
        rss0 / 1024.0,
        rss1 / 1024.0
    );

    // A fresh client from yet another address: FIND_NODE on new streams.
    let (_, control, _, task) = connect(Ipv4Addr::new(127, 200, 0, 1), &heads).await?;
    tasks.push(task);
    let mut ok = 0usize;
    for p in 0..o.probes {
        let mut control = control.clone();
        let head = heads[p % heads.len()].0;
        let find = wire::encode_request(MessageType::FindNode, &rand::random::<[u8; 32]>(), &[]);
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            let mut s = control.open_stream(head, KAD_PROTOCOL).await.ok()?;
            request(&mut s, &find).await.ok()?;
            let _ = s.close().await;
            Some(())
        })
        .await;
        ok += usize::from(matches!(answered, Ok(Some(()))));
    }
    println!(
        "fresh client: {ok} of {} FIND_NODE answered within 1 s ({:.1} %)",
        o.probes,
        100.0 * ok as f64 / o.probes.max(1) as f64
    );
    // The held streams still work.
    let (mut still, mut sampled) = (0usize, 0usize);
    let every = (held.len() / 100).max(1);
    for s in held.iter_mut().step_by(every) {
        let alive = tokio::time::timeout(Duration::from_secs(2), request(s, &ping)).await;
        still += usize::from(matches!(alive, Ok(Ok(()))));
        sampled += 1;
    }
    println!("{still} of {sampled} sampled idle streams still answer");
    drop(held);
    for t in tasks {
        t.abort();
    }
    let clean = node.stop().await;
    println!("clean shutdown: {clean}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
