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
    /// Which heads it has a connection to, and which it may not dial yet.
    heads: Heads,
    _task: tokio::task::JoinHandle<()>,
}

/// How long a client stays away from a head after dials to it failed, as go-libp2p's swarm does
/// (`DialBackoff` in its swarm_dial.go): 5 s after the first failure, then 5 s + 1 s × tries²
/// (6, 9, 14, 21 s, …), at most 5 min, cleared once a connection to it is established. Requests
/// meanwhile fail at once, without a dial.
fn dial_backoff(tries: u32) -> Duration {
    if tries == 0 {
        return Duration::from_secs(5);
    }
    (Duration::from_secs(5) + Duration::from_secs(u64::from(tries) * u64::from(tries)))
        .min(Duration::from_secs(300))
}

/// What a client knows of each head, shared by its swarm task and its requests: whether it has
/// a connection to it now (a request to it goes out on that connection, to any other it waits
/// for a dial; the bench reports their latencies apart), and its dial backoff — until when it is
/// not dialled, and the failed dials since the client last connected to it.
/// Dials that failed, all clients (a dial the node refuses after accepting it, or one the kernel
/// refuses while the node's listeners are closed: the node counts only the former).
pub(crate) static DIALS_FAILED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Default)]
pub(crate) struct Heads(Arc<Mutex<std::collections::HashMap<PeerId, HeadState>>>);

#[derive(Default)]
struct HeadState {
    connected: bool,
    barred_until: Option<std::time::Instant>,
    failed_dials: u32,
}

impl Heads {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<PeerId, HeadState>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `head` is in dial backoff.
    fn barred(&self, head: &PeerId) -> bool {
        self.lock().get(head).and_then(|h| h.barred_until).is_some_and(|t| t > std::time::Instant::now())
    }

    /// A dial to `head` failed: back off from it ([`dial_backoff`]).
    fn failed(&self, head: PeerId) {
        DIALS_FAILED.fetch_add(1, Ordering::Relaxed);
        let mut heads = self.lock();
        let h = heads.entry(head).or_default();
        h.barred_until = Some(std::time::Instant::now() + dial_backoff(h.failed_dials));
        h.failed_dials += 1;
    }

    /// A connection to `head` was established (its backoff is cleared) or its last one closed.
    fn set_connected(&self, head: PeerId, up: bool) {
        let mut heads = self.lock();
        let h = heads.entry(head).or_default();
        h.connected = up;
        if up {
            h.barred_until = None;
            h.failed_dials = 0;
        }
    }

    /// Whether the client has a connection to `head` now.
    fn connected(&self, head: &PeerId) -> bool {
        self.lock().get(head).is_some_and(|h| h.connected)
    }

    /// Forget every backoff.
    fn clear_backoff(&self) {
        for h in self.lock().values_mut() {
            h.barred_until = None;
            h.failed_dials = 0;
        }
    }
}

/// The `i`-th client's source address (127.1.0.1, 127.1.0.2, …): each client its own host, as
/// the node's per-IP caps expect of separate machines.
pub(crate) fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, (1 + i / 250) as u8, 0, (1 + i % 250) as u8)
}

/// The client's behaviour: streams, and the heads' addresses, so that a stream opened to a head
/// the client is not connected to dials it (as a go or js client dials a peer from its
/// peerstore) instead of failing for want of an address.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct ClientBehaviour {
    streams: libp2p_stream::Behaviour,
    book: AddressBook,
}

/// Known addresses of peers, given to the swarm when it dials them.
struct AddressBook(std::collections::HashMap<PeerId, Multiaddr>);

impl libp2p::swarm::NetworkBehaviour for AddressBook {
    type ConnectionHandler = libp2p::swarm::dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: libp2p::swarm::ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: libp2p::core::Endpoint,
    ) -> Result<Vec<Multiaddr>, libp2p::swarm::ConnectionDenied> {
        Ok(peer.and_then(|p| self.0.get(&p).cloned()).into_iter().collect())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: libp2p::swarm::ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
        Ok(libp2p::swarm::dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: libp2p::swarm::ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: libp2p::core::Endpoint,
        _: libp2p::core::transport::PortUse,
    ) -> Result<libp2p::swarm::THandler<Self>, libp2p::swarm::ConnectionDenied> {
        Ok(libp2p::swarm::dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: libp2p::swarm::FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: libp2p::swarm::ConnectionId,
        ev: libp2p::swarm::THandlerOutEvent<Self>,
    ) {
        match ev {}
    }

    fn poll(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p::swarm::ToSwarm<Self::ToSwarm, libp2p::swarm::THandlerInEvent<Self>>> {
        std::task::Poll::Pending
    }
}

/// A new identity on `src` connected to every head; its peer ID, stream control, dial backoff
/// and the task that drives its swarm.
pub(crate) async fn connect(
    src: Ipv4Addr,
    heads: &[(PeerId, Multiaddr)],
) -> anyhow::Result<(PeerId, libp2p_stream::Control, Heads, tokio::task::JoinHandle<()>)> {
    let addrs: std::collections::HashMap<PeerId, Multiaddr> =
        heads.iter().map(|(p, a)| (*p, a.clone().with(Protocol::P2p(*p)))).collect();
    let book = AddressBook(addrs.clone());
    let mut swarm = hydra_testkit::bound_swarm(src, |_| ClientBehaviour {
        streams: libp2p_stream::Behaviour::new(),
        book,
    });
    let peer = *swarm.local_peer_id();
    let mut want: HashSet<PeerId> = heads.iter().map(|h| h.0).collect();
    for a in addrs.values() {
        swarm.dial(a.clone())?;
    }
    // A refused or failed dial is retried after a pause: a busy server (100 js-libp2p nodes in one
    // Node.js process) fails some of a client's 100 simultaneous handshakes.
    let mut retry = tokio::time::interval(Duration::from_millis(500));
    let mut failed: HashSet<PeerId> = HashSet::new();
    // The last error of each head still missing, for the message if the deadline passes.
    let mut errors: std::collections::HashMap<PeerId, String> = std::collections::HashMap::new();
    let connected = tokio::time::timeout(Duration::from_secs(120), async {
        while !want.is_empty() {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                        want.remove(&peer_id);
                    }
                    SwarmEvent::OutgoingConnectionError { peer_id: Some(p), error, .. } if want.contains(&p) => {
                        errors.insert(p, error.to_string());
                        failed.insert(p);
                    }
                    _ => {}
                },
                _ = retry.tick() => {
                    for p in failed.drain() {
                        if want.contains(&p) && !swarm.is_connected(&p) {
                            swarm.dial(addrs[&p].clone())?;
                        }
                    }
                }
            }
        }
        anyhow::Ok(())
    })
    .await;
    connected.map_err(anyhow::Error::from).and_then(|r| r).with_context(|| {
        let mut seen: Vec<&String> = want.iter().filter_map(|p| errors.get(p)).collect();
        seen.sort();
        seen.dedup();
        let never = want.iter().filter(|p| !errors.contains_key(p)).count();
        format!(
            "client {src} did not connect to {} of the {} heads in time ({never} without a dial error; \
                 errors: {:?})",
            want.len(),
            heads.len(),
            seen.iter().take(3).collect::<Vec<_>>()
        )
    })?;
    let control = swarm.behaviour().streams.new_control();
    let state = Heads::default();
    for h in heads {
        state.set_connected(h.0, swarm.is_connected(&h.0));
    }
    let task_state = state.clone();
    // A head that closes a connection (idle for its timeout, e.g. between the turns of `compare`,
    // or shed) is dialled again at once, as a client that still needs it would; a dial that fails
    // (this one, or one a request started) puts the head in backoff ([`dial_backoff`]).
    // Every second, heads it is not connected to (and not backing off from) are dialled too, so
    // that a client keeps its connections between the steps of a benchmark.
    let task = tokio::spawn(async move {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let mut redial = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                        task_state.set_connected(peer_id, false);
                        if let (false, Some(a)) = (task_state.barred(&peer_id), addrs.get(&peer_id)) {
                            let _ = swarm.dial(a.clone());
                        }
                    }
                    SwarmEvent::OutgoingConnectionError { peer_id: Some(p), .. } => task_state.failed(p),
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => task_state.set_connected(peer_id, true),
                    _ => {}
                },
                _ = redial.tick() => {
                    for (p, a) in &addrs {
                        if !swarm.is_connected(p) && !task_state.barred(p) {
                            let opts = DialOpts::peer_id(*p)
                                .addresses(vec![a.clone()])
                                .condition(PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            let _ = swarm.dial(opts);
                        }
                    }
                }
            }
        }
    });
    Ok((peer, control, state, task))
}

impl Client {
    /// Forget every dial backoff (the 1 s redial tick then reconnects).
    pub(crate) fn clear_backoff(&self) {
        self.heads.clear_backoff();
    }
}

/// Client `i`: its own source address and identity; it announces that address.
pub(crate) async fn client(i: usize, heads: &[(PeerId, Multiaddr)]) -> anyhow::Result<Client> {
    let src = source(i);
    let (peer, control, state, task) = connect(src, heads).await?;
    let record = PeerRecord { peer, addrs: vec![format!("/ip4/{src}/tcp/4001").parse()?] };
    Ok(Client { control, record, heads: state, _task: task })
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
    /// No answer and no error within the request timeout.
    pub(crate) failed: AtomicU64,
    /// Refused by the node: the stream was reset or closed without a reply.
    pub(crate) rejected: AtomicU64,
    pub(crate) answered: AtomicU64,
    /// Full answers within [`GOOD_WITHIN`] of the due time (GET_PROVIDERS of a known key with
    /// providers, FIND_NODE with closer peers; ADD_PROVIDER written and closed — whether it was
    /// kept is checked after the step on a sample, [`Tally::add_sample`]).
    pub(crate) good: AtomicU64,
    pub(crate) good_adds: AtomicU64,
    pub(crate) good_finds: AtomicU64,
    pub(crate) finds_sent: AtomicU64,
    /// Answered request latencies (µs from the due time): all, and GET_PROVIDERS only.
    pub(crate) latency: Mutex<Vec<u32>>,
    pub(crate) get_latency: Mutex<Vec<u32>>,
    /// GET_PROVIDERS answered that went out on a connection the client already had (no dial).
    pub(crate) get_latency_connected: Mutex<Vec<u32>>,
    /// How long a refused request took to learn it (µs from the due time).
    pub(crate) reject_latency: Mutex<Vec<u32>>,
    /// Keys of new records announced in time, samples checked for after the step.
    pub(crate) add_sample: Mutex<AddSample>,
}

/// Two samples of the new records announced in time in a step: a uniform one over the whole step
/// (reservoir sampling), which sizes ADD_PROVIDER goodput, and the step's first ones, kept to
/// show what the earlier bench measured: at 5–10 C its first 300 announcements fall in the first
/// 0.1–0.25 s of the step, before the node has reacted to the new load.
#[derive(Default)]
pub(crate) struct AddSample {
    seen: u64,
    pub(crate) uniform: Vec<Vec<u8>>,
    pub(crate) first: Vec<Vec<u8>>,
}

impl AddSample {
    fn offer(&mut self, key: Vec<u8>) {
        self.seen += 1;
        if self.first.len() < ADD_SAMPLE {
            self.first.push(key.clone());
        }
        if self.uniform.len() < ADD_SAMPLE {
            self.uniform.push(key);
        } else {
            // Algorithm R: the n-th candidate replaces a random slot with probability k / n.
            let j = rand::random::<u64>() % self.seen;
            if let Some(slot) = self.uniform.get_mut(j as usize) {
                *slot = key;
            }
        }
    }
}

/// Goodput counts answers that arrive within this long of their due time.
pub(crate) const GOOD_WITHIN: Duration = Duration::from_secs(1);
/// New-record announcements kept per step to check they were stored.
const ADD_SAMPLE: usize = 300;

pub(crate) struct Ctx {
    pub(crate) heads: Vec<(PeerId, Multiaddr)>,
    /// Requests for a key go to its home head ([`crate::compare::home`]) instead of a random one:
    /// servers that keep one store per node find a record only on the node that received it.
    pub(crate) by_key: bool,
    /// Reuse streams (one pool per client and head) instead of a fresh stream per request.
    pub(crate) pool: Option<StreamPool>,
    /// Shared, so that loads with and without a stream pool can drive the same connections.
    pub(crate) clients: Arc<Vec<Client>>,
    pub(crate) preloaded: Vec<Vec<u8>>,
    pub(crate) mix: [u32; 3],
    pub(crate) timeout: Duration,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: usize,
}

impl Ctx {
    fn pick(&self) -> (Op, Vec<u8>, bool) {
        let total: u32 = self.mix.iter().sum();
        let r = rand::random::<u32>() % total.max(1);
        let op = if r < self.mix[0] {
            Op::Add
        } else if r < self.mix[0] + self.mix[1] {
            Op::Get
        } else {
            Op::Find
        };
        // GET_PROVIDERS asks for known (preloaded) keys, so that a full answer has providers;
        // half of the ADD_PROVIDERs refresh known keys, half announce new ones.
        let known = op == Op::Get || (op == Op::Add && rand::random::<bool>());
        let key = if known && !self.preloaded.is_empty() {
            self.preloaded[rand::random::<usize>() % self.preloaded.len()].clone()
        } else {
            random_key()
        };
        (op, key, known && !self.preloaded.is_empty())
    }
}

/// Idle streams of each (client, head), for clients that reuse streams as go-libp2p does.
#[derive(Default)]
pub(crate) struct StreamPool(Mutex<std::collections::HashMap<(usize, PeerId), Vec<libp2p::Stream>>>);

impl StreamPool {
    fn take(&self, client: usize, head: PeerId) -> Option<libp2p::Stream> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&(client, head))?.pop()
    }

    fn put(&self, client: usize, head: PeerId, s: libp2p::Stream) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).entry((client, head)).or_default().push(s);
    }
}

/// How one request ended.
pub(crate) enum Answer {
    /// A reply with what a full answer holds (providers, closer peers); ADD_PROVIDER: sent.
    Full,
    /// A reply without it (a GET_PROVIDERS shed to closer peers only, an empty FIND_NODE).
    Partial,
    /// The node reset the stream or closed it without a reply.
    Refused,
}

/// One request as `client` (index into `ctx.clients`) to `head`: on a fresh stream, or on an
/// idle one of the pool when `ctx.pool` is set. A pooled stream that fails before a reply (the
/// server closed it while it was idle) is dropped and the request sent once more on a fresh one.
pub(crate) async fn request_as(ctx: &Ctx, client: usize, head: PeerId, op: Op, key: &[u8]) -> Answer {
    if let Some(s) = ctx.pool.as_ref().and_then(|p| p.take(client, head)) {
        if let Some(answer) = request_on(ctx, client, head, s, op, key).await {
            return answer;
        }
    }
    if ctx.clients[client].heads.barred(&head) {
        return Answer::Refused; // a dial to it failed a moment ago: not tried again yet
    }
    match ctx.clients[client].control.clone().open_stream(head, KAD_PROTOCOL).await {
        Ok(s) => request_on(ctx, client, head, s, op, key).await.unwrap_or(Answer::Refused),
        Err(_) => Answer::Refused,
    }
}

/// One request on stream `s`; `None` when the stream failed before any reply arrived.
async fn request_on(
    ctx: &Ctx,
    client: usize,
    head: PeerId,
    mut s: libp2p::Stream,
    op: Op,
    key: &[u8],
) -> Option<Answer> {
    let c = &ctx.clients[client];
    let body = match op {
        Op::Add => wire::encode_request(MessageType::AddProvider, key, std::slice::from_ref(&c.record)),
        Op::Get => wire::encode_request(MessageType::GetProviders, key, &[]),
        Op::Find => wire::encode_request(MessageType::FindNode, key, &[]),
    };
    wire::write_frame(&mut s, &body).await.ok()?;
    if op == Op::Add {
        if let Some(p) = &ctx.pool {
            p.put(client, head, s);
            return Some(Answer::Full);
        }
        return Some(if s.close().await.is_ok() { Answer::Full } else { Answer::Refused });
    }
    let len = wire::read_length(&mut s).await.ok()??;
    let Ok(reply) = wire::read_body(&mut s, len).await else { return Some(Answer::Refused) };
    match &ctx.pool {
        Some(p) => p.put(client, head, s),
        None => {
            let _ = s.close().await;
        }
    }
    let Ok(msg) = wire::decode_message(&reply) else { return Some(Answer::Refused) };
    let full = match op {
        Op::Get => !msg.provider_peers.is_empty(),
        _ => !msg.closer_peers.is_empty(),
    };
    Some(if full { Answer::Full } else { Answer::Partial })
}

/// One request from a random client to a random head (or the key's home head, `ctx.by_key`),
/// and whether the client was connected to that head when it sent it.
pub(crate) async fn request(ctx: &Ctx, op: Op, key: &[u8]) -> (Answer, bool) {
    let client = rand::random::<usize>() % ctx.clients.len();
    let head = if ctx.by_key {
        crate::compare::home(key, ctx.heads.len())
    } else {
        rand::random::<usize>() % ctx.heads.len()
    };
    let head = ctx.heads[head].0;
    let connected = ctx.clients[client].heads.connected(&head);
    (request_as(ctx, client, head, op, key).await, connected)
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
                let (op, key, known) = ctx.pick();
                if op == Op::Find {
                    tally.finds_sent.fetch_add(1, Ordering::Relaxed);
                }
                let res = tokio::time::timeout(ctx.timeout, request(&ctx, op, &key)).await;
                let connected = matches!(res, Ok((_, true)));
                let res = res.map(|(answer, _)| answer);
                let took = due.elapsed();
                let us = took.as_micros().min(u128::from(u32::MAX)) as u32;
                match res {
                    Ok(Answer::Refused) => {
                        tally.rejected.fetch_add(1, Ordering::Relaxed);
                        tally.reject_latency.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                    }
                    Ok(answer) => {
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                        if op != Op::Add {
                            tally.latency.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                        }
                        if op == Op::Get {
                            tally.get_latency.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                            if connected {
                                tally
                                    .get_latency_connected
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(us);
                            }
                        }
                        if matches!(answer, Answer::Full) && took <= GOOD_WITHIN {
                            match op {
                                Op::Add => {
                                    tally.good_adds.fetch_add(1, Ordering::Relaxed);
                                    if !known {
                                        tally.add_sample.lock().unwrap_or_else(|e| e.into_inner()).offer(key);
                                    }
                                }
                                Op::Find => {
                                    tally.good_finds.fetch_add(1, Ordering::Relaxed);
                                    tally.good.fetch_add(1, Ordering::Relaxed);
                                }
                                Op::Get => {
                                    tally.good.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    Err(_) => {
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
