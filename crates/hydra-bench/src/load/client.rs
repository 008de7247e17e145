//! Client identities (one libp2p swarm each, connected to every head) and the open-loop driver
//! that sends requests on fresh streams at a fixed arrival rate.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::{AsyncWriteExt, StreamExt};
use hydra::net::wire::{self, MessageType};
use hydra::net::KAD_PROTOCOL;
use hydra::types::PeerRecord;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};

use super::Op;

/// One client identity: a swarm connected to every head, driven by its own task.
pub(crate) struct Client {
    pub(crate) control: libp2p_stream::Control,
    pub(crate) record: PeerRecord,
    _task: tokio::task::JoinHandle<()>,
}

/// The `i`-th client's source address (127.1.0.1, 127.1.0.2, …): each client its own host, as
/// the node's per-IP caps expect of separate machines.
pub(crate) fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, (1 + i / 250) as u8, 0, (1 + i % 250) as u8)
}

/// A new identity on `src` connected to every head; its peer ID, stream control and the task
/// that drives its swarm.
pub(crate) async fn connect(
    src: Ipv4Addr,
    heads: &[(PeerId, Multiaddr)],
) -> anyhow::Result<(PeerId, libp2p_stream::Control, tokio::task::JoinHandle<()>)> {
    let mut swarm = hydra_testkit::bound_swarm(src, |_| libp2p_stream::Behaviour::new());
    let peer = *swarm.local_peer_id();
    let mut want: HashSet<PeerId> = heads.iter().map(|h| h.0).collect();
    for (p, a) in heads {
        swarm.dial(a.clone().with(Protocol::P2p(*p)))?;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while !want.is_empty() {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
                want.remove(&peer_id);
            }
        }
    })
    .await
    .with_context(|| format!("client {src} did not connect to every head in time"))?;
    let control = swarm.behaviour().new_control();
    let task = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((peer, control, task))
}

/// Client `i`: its own source address and identity; it announces that address.
pub(crate) async fn client(i: usize, heads: &[(PeerId, Multiaddr)]) -> anyhow::Result<Client> {
    let src = source(i);
    let (peer, control, task) = connect(src, heads).await?;
    let record = PeerRecord { peer, addrs: vec![format!("/ip4/{src}/tcp/4001").parse()?] };
    Ok(Client { control, record, _task: task })
}

pub(crate) fn random_key() -> Vec<u8> {
    let mut k = vec![0x12, 0x20];
    k.extend((0..32).map(|_| rand::random::<u8>()));
    k
}

/// What the generator saw in one step.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) sent: AtomicU64,
    /// Not sent: the generator's own in-flight bound was reached.
    pub(crate) dropped: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) answered: AtomicU64,
    /// Answered request latencies (µs from the due time): all, and GET_PROVIDERS only.
    pub(crate) latency: Mutex<Vec<u32>>,
    pub(crate) get_latency: Mutex<Vec<u32>>,
}

pub(crate) struct Ctx {
    pub(crate) heads: Vec<(PeerId, Multiaddr)>,
    pub(crate) clients: Vec<Client>,
    pub(crate) preloaded: Vec<Vec<u8>>,
    pub(crate) mix: [u32; 3],
    pub(crate) timeout: Duration,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: usize,
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
pub(crate) async fn request(ctx: &Ctx, op: Op, key: Vec<u8>) -> anyhow::Result<()> {
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
pub(crate) async fn drive(ctx: &Arc<Ctx>, rate: f64, dur: Duration, tally: &Arc<Tally>) {
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

pub(crate) fn percentile_ms(v: &Mutex<Vec<u32>>, q: f64) -> f64 {
    let mut v = v.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let idx = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    f64::from(v[idx]) / 1000.0
}
