//! Discovery and refresh: the process keeps the neighbourhood of every head's ID filled with its
//! own outbound FIND_NODE lookups, under one budget for the whole process.
//!
//! One task starts a lookup every `60 s / routing.lookups_per_minute`, for the heads in turn,
//! with at most `routing.max_lookups_in_flight` at once — a thousand heads do not run a thousand
//! bootstraps. A head whose last lookup converged is not looked up again for [`HEAD_REFRESH`]
//! (a stock kad node bootstraps every 5 minutes), so a process of a few heads does not spend
//! the whole budget on them: 4 heads were each looked up every 2 s, 55 ms of CPU a second. A lookup targets its head's own peer ID and goes out **from that head's identity**
//! (its swarm dials and opens the streams, [`super::outbound`]): the peers closest to the head
//! learn of the head itself, which is what the heads exist for, and the process-wide table
//! ([`super::table`]) learns the peers that answered. It starts from the table's peers closest
//! to the target and the configured bootstrap peers; heads of this process are never asked
//! (siblings never dial each other).
//!
//! A lookup is Kademlia's iterative search ([`Lookup`]): ask the [`ALPHA`] closest candidates not
//! asked yet, add the closer peers they name, stop when the [`K_VALUE`] closest candidates that
//! did not fail have all answered — or after [`MAX_REQUESTS`] requests or [`LOOKUP_TIMEOUT`].
//! Every request has a deadline ([`REQUEST_TIMEOUT`]) covering dial, negotiation, write and read.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::kad::{KBucketDistance, KBucketKey};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::addrs::admitted;
use super::head::HeadShared;
use super::routing::{RoutingSnapshot, K_VALUE};
use super::table::{TableFeed, Update};
use super::wire::{self, MessageType, MAX_MESSAGE_SIZE};
use crate::config::AddressFilter;
use crate::metrics::DiscoveryMetrics;
use crate::types::PeerRecord;

/// A head whose last lookup converged is looked up again after this long at the earliest.
pub const HEAD_REFRESH: Duration = Duration::from_secs(300);

/// Requests in flight per lookup (Kademlia's α).
pub const ALPHA: usize = 3;
/// Requests one lookup may send in all.
pub const MAX_REQUESTS: usize = 3 * K_VALUE;
/// Candidates a lookup keeps (the closest; farther ones are forgotten).
const MAX_CANDIDATES: usize = 4 * K_VALUE;
/// One request: dial, stream negotiation, write and read of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One lookup.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Waiting,
    Answered,
    Failed,
}

#[derive(Debug)]
struct Candidate {
    peer: PeerId,
    distance: KBucketDistance,
    addrs: Vec<Multiaddr>,
    state: State,
}

/// How a lookup ended (`hydra_discovery_lookups_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupEnd {
    /// The k closest candidates that did not fail have all answered, or none is left to ask.
    Converged,
    /// [`MAX_REQUESTS`] sent or [`LOOKUP_TIMEOUT`] passed first.
    Exhausted,
    /// Nothing to start from: the table holds no peer and no bootstrap peer is configured.
    NoPeers,
}

impl LookupEnd {
    /// One of [`crate::metrics::LOOKUP_ENDS`].
    pub fn label(self) -> &'static str {
        match self {
            LookupEnd::Converged => "converged",
            LookupEnd::Exhausted => "exhausted",
            LookupEnd::NoPeers => "no_peers",
        }
    }
}

/// The state of one iterative lookup; the network is the caller's.
#[derive(Debug)]
pub struct Lookup {
    target: KBucketKey<Vec<u8>>,
    /// Closest first, at most [`MAX_CANDIDATES`].
    candidates: Vec<Candidate>,
    in_flight: usize,
    requests: usize,
}

impl Lookup {
    /// A lookup of `target` (raw key bytes, hashed as Kademlia does) starting from `seeds`.
    pub fn new(target: &[u8], seeds: impl IntoIterator<Item = PeerRecord>) -> Self {
        let mut l = Self {
            target: KBucketKey::new(target.to_vec()),
            candidates: Vec::new(),
            in_flight: 0,
            requests: 0,
        };
        for s in seeds {
            l.add(s);
        }
        l
    }

    /// Add a candidate (peers without addresses and known peers are ignored).
    fn add(&mut self, r: PeerRecord) {
        if r.addrs.is_empty() || self.candidates.iter().any(|c| c.peer == r.peer) {
            return;
        }
        let distance = KBucketKey::from(r.peer).distance(&self.target);
        let at = self.candidates.partition_point(|c| c.distance < distance);
        if at >= MAX_CANDIDATES {
            return;
        }
        self.candidates.insert(at, Candidate { peer: r.peer, distance, addrs: r.addrs, state: State::New });
        self.candidates.truncate(MAX_CANDIDATES);
    }

    /// The next peer to ask, if a request may start now.
    pub fn next_to_ask(&mut self) -> Option<(PeerId, Vec<Multiaddr>)> {
        if self.in_flight >= ALPHA || self.requests >= MAX_REQUESTS {
            return None;
        }
        let c = self
            .candidates
            .iter_mut()
            .filter(|c| c.state != State::Failed)
            .take(K_VALUE)
            .find(|c| c.state == State::New)?;
        c.state = State::Waiting;
        self.in_flight += 1;
        self.requests += 1;
        Some((c.peer, c.addrs.clone()))
    }

    fn settle(&mut self, peer: &PeerId, state: State) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(c) = self.candidates.iter_mut().find(|c| c.peer == *peer) {
            c.state = state;
        }
    }

    /// `peer` answered with `closer`.
    pub fn answered(&mut self, peer: &PeerId, closer: impl IntoIterator<Item = PeerRecord>) {
        self.settle(peer, State::Answered);
        for r in closer {
            self.add(r);
        }
    }

    /// Asking `peer` failed.
    pub fn failed(&mut self, peer: &PeerId) {
        self.settle(peer, State::Failed);
    }

    /// Nothing in flight and nothing left to ask.
    pub fn is_done(&self) -> bool {
        self.in_flight == 0
            && (self.requests >= MAX_REQUESTS
                || !self
                    .candidates
                    .iter()
                    .filter(|c| c.state != State::Failed)
                    .take(K_VALUE)
                    .any(|c| c.state == State::New))
    }

    pub fn end(&self) -> LookupEnd {
        if self.requests >= MAX_REQUESTS {
            LookupEnd::Exhausted
        } else {
            LookupEnd::Converged
        }
    }

    /// The peers that answered, closest first.
    pub fn answered_peers(&self) -> Vec<PeerId> {
        self.candidates.iter().filter(|c| c.state == State::Answered).map(|c| c.peer).collect()
    }
}

/// What every lookup shares.
pub struct Discovery {
    pub heads: Arc<Vec<Arc<HeadShared>>>,
    pub routing: Arc<ArcSwap<RoutingSnapshot>>,
    pub table: TableFeed,
    /// Configured bootstrap peers: candidates of every lookup.
    pub bootstrap: Vec<PeerRecord>,
    pub filter: AddressFilter,
    pub lookups_per_minute: u32,
    pub max_in_flight: usize,
    pub metrics: DiscoveryMetrics,
}

impl Discovery {
    /// Start lookups, the heads in turn, until `cancel`; lookups in flight are dropped then.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.lookups_per_minute == 0 || self.heads.is_empty() {
            return;
        }
        let every = Duration::from_secs(60).div_f64(f64::from(self.lookups_per_minute));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let slots = Arc::new(Semaphore::new(self.max_in_flight));
        let mut lookups = tokio::task::JoinSet::new();
        let mut next = 0usize;
        // Per head: when its last lookup converged (ms since `start`, + 1; 0: never).
        let start = std::time::Instant::now();
        let since_start = move || start.elapsed().as_millis() as u64 + 1;
        let converged: Arc<Vec<AtomicU64>> = Arc::new(self.heads.iter().map(|_| AtomicU64::new(0)).collect());
        let refresh = HEAD_REFRESH.as_millis() as u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    while lookups.try_join_next().is_some() {}
                    // The next head in turn that is due (never converged, or long enough ago).
                    let n = self.heads.len();
                    let now = since_start();
                    let Some(i) = (0..n).map(|k| (next + k) % n).find(|&i| {
                        let c = converged[i].load(Ordering::Relaxed);
                        c == 0 || now.saturating_sub(c) >= refresh
                    }) else {
                        continue;
                    };
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        self.metrics.skipped.inc();
                        continue;
                    };
                    next = i + 1;
                    let head = self.heads[i].clone();
                    if !head.lease.serving() {
                        continue; // a fenced head sends nothing under its identity
                    }
                    let (me, converged) = (self.clone(), converged.clone());
                    lookups.spawn(async move {
                        me.metrics.in_flight.inc();
                        let end = me.lookup(&head).await;
                        me.metrics.in_flight.dec();
                        me.metrics.lookups.with_label_values(&[end.label()]).inc();
                        if end == LookupEnd::Converged {
                            converged[i].store(since_start(), Ordering::Relaxed);
                        }
                        drop(slot);
                    });
                }
            }
        }
        lookups.abort_all();
        while lookups.join_next().await.is_some() {}
        self.metrics.in_flight.set(0);
    }

    /// One lookup of `head`'s own ID from its identity.
    pub async fn lookup(&self, head: &HeadShared) -> LookupEnd {
        let target = head.peer_id.to_bytes();
        // The current snapshot, loaded per use: a lookup lasting up to a minute must not pin an
        // old copy of the table (its bytes are charged only while it is the published one).
        let ours = |p: &PeerId| self.routing.load().is_head(p);
        let seeds: Vec<PeerRecord> = self
            .routing
            .load()
            .closest_in_table(&target, K_VALUE)
            .into_iter()
            .chain(self.bootstrap.iter().filter(|b| !ours(&b.peer)).cloned())
            .collect();
        if seeds.is_empty() {
            return LookupEnd::NoPeers;
        }
        let mut lookup = Lookup::new(&target, seeds);
        let target = target.as_slice();
        let mut requests = FuturesUnordered::new();
        let deadline = tokio::time::sleep(LOOKUP_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            while let Some((peer, addrs)) = lookup.next_to_ask() {
                requests.push(async move {
                    let r =
                        tokio::time::timeout(REQUEST_TIMEOUT, find_node(head, peer, addrs.clone(), target))
                            .await;
                    head.outbound.done(peer);
                    (peer, addrs, r)
                });
            }
            if lookup.is_done() {
                return lookup.end();
            }
            tokio::select! {
                _ = &mut deadline => return LookupEnd::Exhausted,
                Some((peer, addrs, r)) = requests.next() => match r {
                    Ok(Ok(closer)) => {
                        self.metrics.requests.with_label_values(&["answered"]).inc();
                        // It answered FIND_NODE from the addresses we dialled: a live DHT server.
                        // (Filtered: a bootstrap peer's configured address may be one the
                        // table does not admit, e.g. a private one under `public`.)
                        self.table.send(Update::Routed { peer, addrs: admitted(self.filter, addrs) });
                        let closer = closer
                            .into_iter()
                            .filter(|r| r.peer != head.peer_id && !ours(&r.peer))
                            .map(|r| PeerRecord { addrs: admitted(self.filter, r.addrs), peer: r.peer });
                        lookup.answered(&peer, closer);
                    }
                    Ok(Err(e)) => {
                        self.metrics.requests.with_label_values(&[e.label()]).inc();
                        tracing::debug!(head = head.index, %peer, error = %e, "lookup request failed");
                        lookup.failed(&peer);
                    }
                    Err(_) => {
                        self.metrics.requests.with_label_values(&["timeout"]).inc();
                        lookup.failed(&peer);
                    }
                },
            }
        }
    }
}

/// Why a request of a lookup failed (`hydra_discovery_requests_total{result}`).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Open(#[from] super::outbound::OpenError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("bad answer: {0}")]
    Answer(String),
}

impl RequestError {
    /// One of [`crate::metrics::DISCOVERY_REQUESTS`].
    fn label(&self) -> &'static str {
        match self {
            RequestError::Open(super::outbound::OpenError::Busy) => "busy",
            RequestError::Open(_) | RequestError::Stream(_) => "failed",
            RequestError::Answer(_) => "bad_answer",
        }
    }
}

/// Ask `peer` (dialled at `addrs` if need be) for the peers closest to `target`, from `head`.
async fn find_node(
    head: &HeadShared,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    target: &[u8],
) -> Result<Vec<PeerRecord>, RequestError> {
    let opened = head.outbound.open(peer, addrs)?;
    let mut stream = opened.await.map_err(|_| super::outbound::OpenError::Closed)??;
    let io = |e: std::io::Error| RequestError::Stream(e.to_string());
    wire::write_frame(&mut stream, &wire::encode_request(MessageType::FindNode, target, &[]))
        .await
        .map_err(io)?;
    let len = wire::read_length(&mut stream)
        .await
        .map_err(|e| RequestError::Stream(e.to_string()))?
        .ok_or_else(|| RequestError::Stream("closed without an answer".into()))?;
    if len > MAX_MESSAGE_SIZE {
        return Err(RequestError::Answer(format!("{len} bytes")));
    }
    let body = wire::read_body(&mut stream, len).await.map_err(|e| RequestError::Stream(e.to_string()))?;
    let msg = wire::decode_message(&body).map_err(|e| RequestError::Answer(e.to_string()))?;
    // Close our side; the answer is in.
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
    let mut seen = HashSet::new();
    Ok(msg
        .closer_peers
        .into_iter()
        .take(K_VALUE * 2)
        .filter_map(|p| wire::peer_from_pb(p).ok())
        .filter(|r| seen.insert(r.peer))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(p: PeerId) -> PeerRecord {
        PeerRecord { peer: p, addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()] }
    }

    /// A synthetic network of 2,000 peers, each answering with the 20 closest it knows of a
    /// random quarter of the network: from 3 random seeds the lookup ends with the true 20
    /// closest of the whole network among those that answered, within its request budget.
    #[test]
    fn a_lookup_converges_on_the_true_closest_of_a_synthetic_network() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let peers: Vec<PeerId> = (0..2_000).map(|_| PeerId::random()).collect();
        let views: std::collections::HashMap<PeerId, Vec<PeerId>> =
            peers.iter().map(|p| (*p, peers.choose_multiple(&mut rng, 500).copied().collect())).collect();
        for round in 0..20 {
            let target = PeerId::random().to_bytes();
            let tk = KBucketKey::new(target.clone());
            let by_distance = |list: &[PeerId], n: usize| {
                let mut l = list.to_vec();
                l.sort_by_key(|p| KBucketKey::from(*p).distance(&tk));
                l.truncate(n);
                l
            };
            let seeds: Vec<PeerRecord> =
                (0..3).map(|_| record(peers[rng.gen_range(0..peers.len())])).collect();
            let mut l = Lookup::new(&target, seeds);
            let mut asked = 0;
            while !l.is_done() {
                let mut batch = Vec::new();
                while let Some((p, _)) = l.next_to_ask() {
                    batch.push(p);
                }
                assert!(batch.len() <= ALPHA);
                for p in batch {
                    asked += 1;
                    // Every 10th peer is down.
                    if peers.iter().position(|q| *q == p).unwrap() % 10 == 0 {
                        l.failed(&p);
                    } else {
                        l.answered(&p, by_distance(&views[&p], K_VALUE).into_iter().map(record));
                    }
                }
            }
            assert!(asked <= MAX_REQUESTS);
            let live: Vec<PeerId> =
                peers.iter().enumerate().filter(|(i, _)| i % 10 != 0).map(|(_, p)| *p).collect();
            let want = by_distance(&live, K_VALUE);
            let got = l.answered_peers();
            let found = want.iter().filter(|p| got.contains(p)).count();
            assert!(
                found >= 18,
                "round {round}: {found} of the 20 closest live peers answered ({asked} requests)"
            );
        }
    }

    #[test]
    fn a_lookup_without_candidates_is_done_and_one_never_asks_a_peer_twice() {
        let mut l = Lookup::new(b"k", []);
        assert!(l.is_done());
        assert!(l.next_to_ask().is_none());
        let p = PeerId::random();
        let mut l = Lookup::new(b"k", [record(p), record(p)]);
        assert_eq!(l.next_to_ask().map(|(q, _)| q), Some(p));
        assert!(l.next_to_ask().is_none(), "one candidate, asked");
        assert!(!l.is_done(), "its answer is awaited");
        l.answered(&p, [record(p)]);
        assert!(l.is_done());
        assert_eq!(l.end(), LookupEnd::Converged);
    }

    #[test]
    fn at_most_alpha_requests_are_in_flight_and_failures_free_a_slot() {
        let peers: Vec<PeerRecord> = (0..10).map(|_| record(PeerId::random())).collect();
        let mut l = Lookup::new(b"k", peers);
        let first: Vec<PeerId> = std::iter::from_fn(|| l.next_to_ask().map(|(p, _)| p)).collect();
        assert_eq!(first.len(), ALPHA);
        l.failed(&first[0]);
        assert!(l.next_to_ask().is_some(), "a failure frees a slot");
        assert!(l.next_to_ask().is_none());
    }
}
