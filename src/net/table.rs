//! The process-wide routing table: every peer any head learns of, stored once, read by every head.
//!
//! Heads' swarm tasks *feed* it ([`TableFeed::send`]: a `try_send` into a bounded channel that
//! never waits; a full channel drops the update, counted) with what they see: a DHT server's
//! identify (its addresses, replacing the old ones), a peer kad put into the head's own table
//! (outbound lookups), a connection opened or closed (the peer is alive), a dial that failed on
//! every address (the peer is removed). One task owns the [`PeerTable`], applies the updates in
//! batches and publishes a [`RoutingSnapshot`] (sorted by Kademlia key, with the sibling heads)
//! through one `ArcSwap` when something changed — at most every [`PUBLISH_INTERVAL`]. Stream
//! tasks of every head read that one snapshot, so an answer from any head is the k closest of
//! everything the process knows (issue 13), and a reader never waits for the table.
//!
//! Bounds: `routing.max_peers` entries and `routing.max_bytes` bytes (each entry charged for its
//! row, its addresses — at most [`MAX_ADDRS_PER_PEER`] of at most
//! [`super::wire::MAX_ADDR_LEN`] bytes — and its copy in the snapshot). At a bound, the peer
//! farthest (XOR) from its nearest head goes: the table keeps, around every head's ID, the closest
//! peers it has seen, which is the neighbourhood that head's requests ask about and the property
//! k-buckets give one node, here for all heads at once. A newcomer farther than every kept peer is
//! refused. A peer not seen alive for `routing.peer_ttl` is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use libp2p::kad::{KBucketDistance, KBucketKey};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::routing::{RoutingSnapshot, Siblings};
use super::wire::MAX_ADDRS_PER_PEER;
use crate::config::RoutingSection;
use crate::metrics::RoutingTableMetrics;

/// How often a changed table is republished (changes in between are coalesced).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);
/// How often peers not seen for `peer_ttl` are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Updates waiting for the table task; beyond, new ones are dropped (counted).
const FEED_CAPACITY: usize = 16_384;
/// Updates applied per wake-up of the table task.
const BATCH: usize = 1024;

/// What a head tells the table.
#[derive(Debug, Clone)]
pub enum Update {
    /// A DHT server's identify: its (filtered, capped) listen addresses, replacing any older ones.
    Identified { peer: PeerId, addrs: Vec<Multiaddr> },
    /// A peer that answered one of the process's lookups ([`super::discovery`]) at these
    /// addresses: inserted with them if the table does not know it yet, else only marked alive.
    Routed { peer: PeerId, addrs: Vec<Multiaddr> },
    /// A connection to the peer opened or closed: it is alive (known peers only).
    Seen(PeerId),
    /// A dial to the peer failed on every address: removed.
    Unreachable(PeerId),
}

/// A head's handle for feeding the table. Cloned per head; never waits.
#[derive(Clone)]
pub struct TableFeed {
    tx: mpsc::Sender<Update>,
    metrics: RoutingTableMetrics,
}

impl TableFeed {
    pub fn send(&self, update: Update) {
        if self.tx.try_send(update).is_err() {
            self.metrics.changes.with_label_values(&[DROPPED]).inc();
        }
    }
}

const DROPPED: &str = "dropped_update";

/// What a change did, for the metrics (`hydra_routing_table_changes_total{change}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Inserted,
    Updated,
    /// Removed at a bound for a peer closer to a head.
    Evicted,
    /// A new peer not taken: at a bound, and farther from every head than every kept peer.
    Refused,
    Expired,
    Unreachable,
    /// Not a DHT server the table keeps (no addresses, a head of this process, unknown peer).
    Ignored,
}

impl Change {
    pub fn label(self) -> &'static str {
        match self {
            Change::Inserted => "inserted",
            Change::Updated => "updated",
            Change::Evicted => "evicted",
            Change::Refused => "refused",
            Change::Expired => "expired",
            Change::Unreachable => "unreachable",
            Change::Ignored => "ignored",
        }
    }
}

type Hash = [u8; 32];

struct Row {
    key: KBucketKey<PeerId>,
    addrs: Arc<Vec<Multiaddr>>,
    seen: Instant,
    /// XOR distance to the nearest head: the replacement rank (largest goes first).
    to_head: KBucketDistance,
    bytes: usize,
}

/// Bytes one entry costs beyond its addresses' own bytes: the row in the map, its hash as the
/// map's key and in the rank index (with their B-tree share), its `Arc`'d address list and its
/// entry in the published snapshot. Checked against the allocator in `tests/memory_accounting.rs`.
const ROW_BYTES: usize = std::mem::size_of::<Row>()
    + 2 * (std::mem::size_of::<Hash>() + std::mem::size_of::<KBucketDistance>())
    + 40
    + std::mem::size_of::<(KBucketKey<PeerId>, Arc<Vec<Multiaddr>>)>()
    + 64;
/// Bytes one address costs beyond its own length: the `Multiaddr` in the list and its `Arc`'d
/// buffer's header.
const ADDR_BYTES: usize = std::mem::size_of::<Multiaddr>() + 16 + 24;

fn row_bytes(addrs: &[Multiaddr]) -> usize {
    ROW_BYTES + addrs.iter().map(|a| a.len() + ADDR_BYTES).sum::<usize>()
}

/// The newest [`MAX_ADDRS_PER_PEER`] addresses, without duplicates, in their order.
fn capped(mut addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(a.clone()));
    let excess = addrs.len().saturating_sub(MAX_ADDRS_PER_PEER);
    addrs.drain(..excess);
    addrs
}

fn hash_of(key: &KBucketKey<PeerId>) -> Hash {
    key.hashed_bytes().try_into().expect("Kademlia keys are SHA-256 hashes")
}

fn hash_of_peer(peer: PeerId) -> Hash {
    hash_of(&KBucketKey::from(peer))
}

/// The table itself: owned by one task ([`run`]), pure logic, no I/O.
pub struct PeerTable {
    rows: BTreeMap<Hash, Row>,
    by_rank: BTreeSet<(KBucketDistance, Hash)>,
    bytes: usize,
    max_peers: usize,
    max_bytes: usize,
    ttl: Duration,
    heads: Arc<Siblings>,
    evicted: u64,
    /// Bumped by every change a reader can see (an entry in or out, new addresses).
    version: u64,
}

impl PeerTable {
    pub fn new(cfg: &RoutingSection, heads: Arc<Siblings>) -> Self {
        Self {
            rows: BTreeMap::new(),
            by_rank: BTreeSet::new(),
            bytes: 0,
            max_peers: cfg.max_peers,
            max_bytes: cfg.max_bytes,
            ttl: cfg.peer_ttl,
            heads,
            evicted: 0,
            version: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes charged for the entries (see [`ROW_BYTES`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.rows.contains_key(&hash_of_peer(*peer))
    }

    /// Apply one update at time `now`.
    pub fn apply(&mut self, update: Update, now: Instant) -> Change {
        match update {
            Update::Identified { peer, addrs } => self.learn(peer, addrs, true, now),
            Update::Routed { peer, addrs } => self.learn(peer, addrs, false, now),
            Update::Seen(peer) => match self.rows.get_mut(&hash_of_peer(peer)) {
                Some(row) => {
                    row.seen = row.seen.max(now);
                    Change::Updated
                }
                None => Change::Ignored,
            },
            Update::Unreachable(peer) => match self.remove(&hash_of_peer(peer)) {
                true => Change::Unreachable,
                false => Change::Ignored,
            },
        }
    }

    fn learn(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, replace: bool, now: Instant) -> Change {
        if self.heads.contains(&peer) {
            return Change::Ignored;
        }
        let key = KBucketKey::from(peer);
        let hash = hash_of(&key);
        if let Some(row) = self.rows.get_mut(&hash) {
            row.seen = row.seen.max(now);
            // A kad update of a known peer only says it is alive: its addresses are not read.
            let addrs = if replace { capped(addrs) } else { Vec::new() };
            if !addrs.is_empty() && *row.addrs != addrs {
                let bytes = row_bytes(&addrs);
                self.bytes = self.bytes - row.bytes + bytes;
                row.bytes = bytes;
                row.addrs = Arc::new(addrs);
                self.version += 1;
                // More bytes may pass the byte bound: the farthest go, possibly this peer.
                while self.bytes > self.max_bytes {
                    self.evict_farthest();
                }
            }
            return Change::Updated;
        }
        let addrs = capped(addrs);
        if addrs.is_empty() {
            return Change::Ignored;
        }
        let to_head = self.heads.distance_to_nearest(&key);
        let bytes = row_bytes(&addrs);
        if bytes > self.max_bytes {
            return Change::Refused;
        }
        // Make room: the farthest kept peers go while they are farther than the newcomer.
        while self.rows.len() >= self.max_peers || self.bytes + bytes > self.max_bytes {
            match self.by_rank.last() {
                Some(&(far, _)) if far > to_head => self.evict_farthest(),
                _ => return Change::Refused,
            }
        }
        self.by_rank.insert((to_head, hash));
        self.bytes += bytes;
        self.rows.insert(hash, Row { key, addrs: Arc::new(addrs), seen: now, to_head, bytes });
        self.version += 1;
        Change::Inserted
    }

    fn evict_farthest(&mut self) {
        if let Some(&(_, h)) = self.by_rank.last() {
            self.remove(&h);
            self.evicted += 1;
        }
    }

    /// Changes so far that readers can see: a snapshot taken at another version differs.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Peers evicted at a bound since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    fn remove(&mut self, hash: &Hash) -> bool {
        match self.rows.remove(hash) {
            Some(row) => {
                self.by_rank.remove(&(row.to_head, *hash));
                self.bytes -= row.bytes;
                self.version += 1;
                true
            }
            None => false,
        }
    }

    /// Remove every peer not seen since `now - peer_ttl`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let Some(cutoff) = now.checked_sub(self.ttl) else { return 0 };
        let stale: Vec<Hash> = self.rows.iter().filter(|(_, r)| r.seen < cutoff).map(|(h, _)| *h).collect();
        for h in &stale {
            self.remove(h);
        }
        stale.len()
    }

    /// An immutable copy for readers, in key order (no sort needed), with the sibling heads.
    pub fn snapshot(&self) -> RoutingSnapshot {
        RoutingSnapshot::sorted(
            self.rows.values().map(|r| (r.key, r.addrs.clone())).collect(),
            self.heads.clone(),
        )
    }
}

/// Start the table: the feed heads send into, and the task that owns the table and publishes
/// into `out` until `cancel`.
pub fn start(
    cfg: &RoutingSection,
    heads: Arc<Siblings>,
    out: Arc<ArcSwap<RoutingSnapshot>>,
    metrics: RoutingTableMetrics,
    cancel: CancellationToken,
) -> (TableFeed, impl std::future::Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    let table = PeerTable::new(cfg, heads);
    out.store(Arc::new(table.snapshot()));
    metrics.max_bytes.set(cfg.max_bytes as i64);
    let feed = TableFeed { tx, metrics: metrics.clone() };
    (feed, run(table, rx, out, metrics, cancel))
}

async fn run(
    mut table: PeerTable,
    mut rx: mpsc::Receiver<Update>,
    out: Arc<ArcSwap<RoutingSnapshot>>,
    metrics: RoutingTableMetrics,
    cancel: CancellationToken,
) {
    let mut publish = tokio::time::interval(PUBLISH_INTERVAL);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    let mut published = table.version();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                for u in batch.drain(..) {
                    let change = table.apply(u, now);
                    metrics.changes.with_label_values(&[change.label()]).inc();
                }
                let evicted = table.take_evicted();
                metrics.changes.with_label_values(&[Change::Evicted.label()]).inc_by(evicted);
            }
            _ = publish.tick() => {
                // Refreshed liveness alone does not change what readers see.
                if table.version() != published {
                    out.store(Arc::new(table.snapshot()));
                    metrics.peers.set(table.len() as i64);
                    metrics.bytes.set(table.bytes() as i64);
                    published = table.version();
                }
            }
            _ = sweep.tick() => {
                let n = table.expire(Instant::now());
                metrics.changes.with_label_values(&[Change::Expired.label()]).inc_by(n as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AddressFilter;

    fn addr(i: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{i}").parse().unwrap()
    }

    fn heads(n: usize) -> (Vec<PeerId>, Arc<Siblings>) {
        let ids: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        let live = Arc::new(ArcSwap::from_pointee(vec![addr(1)]));
        let s = Siblings::new(ids.iter().map(|p| (*p, live.clone())), AddressFilter::Any);
        (ids, s)
    }

    fn cfg(max_peers: usize, max_bytes: usize) -> RoutingSection {
        RoutingSection { max_peers, max_bytes, peer_ttl: Duration::from_secs(60), ..Default::default() }
    }

    fn identified(peer: PeerId, addrs: Vec<Multiaddr>) -> Update {
        Update::Identified { peer, addrs }
    }

    /// Issue 13's test: with a synthetic population of 20,000 peers, an answer is the true k
    /// closest of everything the table holds (heads included), for random keys.
    #[test]
    fn answers_are_the_true_closest_of_a_synthetic_population() {
        let (head_ids, sibs) = heads(16);
        let mut t = PeerTable::new(&cfg(100_000, usize::MAX), sibs);
        let now = Instant::now();
        let peers: Vec<PeerId> = (0..20_000).map(|_| PeerId::random()).collect();
        for p in &peers {
            assert_eq!(t.apply(identified(*p, vec![addr(2)]), now), Change::Inserted);
        }
        let snap = t.snapshot();
        assert_eq!(snap.len(), 20_000);
        let everyone: Vec<PeerId> = peers.iter().chain(&head_ids).copied().collect();
        for i in 0..50u32 {
            let target = format!("key {i}").into_bytes();
            let tk = KBucketKey::new(target.clone());
            let mut want = everyone.clone();
            want.sort_by_cached_key(|p| KBucketKey::from(*p).distance(&tk));
            let got: Vec<PeerId> = snap.closest(&target, 20, &[]).into_iter().map(|r| r.peer).collect();
            assert_eq!(got, want[..20].to_vec());
        }
    }

    #[test]
    fn at_the_entry_bound_the_peer_farthest_from_every_head_goes() {
        let (_, sibs) = heads(4);
        let mut t = PeerTable::new(&cfg(100, usize::MAX), sibs.clone());
        let now = Instant::now();
        let peers: Vec<PeerId> = (0..1_000).map(|_| PeerId::random()).collect();
        let mut refused = 0;
        for p in &peers {
            match t.apply(identified(*p, vec![addr(2)]), now) {
                Change::Inserted => {}
                Change::Refused => refused += 1,
                c => panic!("{c:?}"),
            }
            assert!(t.len() <= 100, "never above the bound");
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.take_evicted() + refused, 900, "every peer beyond the bound was evicted or refused");
        // What is kept: exactly the 100 peers closest to their nearest head.
        let mut ranked = peers.clone();
        ranked.sort_by_cached_key(|p| sibs.distance_to_nearest(&KBucketKey::from(*p)));
        for (i, p) in ranked.iter().enumerate() {
            assert_eq!(t.contains(p), i < 100, "peer ranked {i}");
        }
    }

    #[test]
    fn the_byte_bound_holds_with_many_long_addresses() {
        let (_, sibs) = heads(2);
        let max = 200_000;
        let mut t = PeerTable::new(&cfg(1_000_000, max), sibs);
        let now = Instant::now();
        let long = |p: u16| -> Vec<Multiaddr> {
            (0..40)
                .map(|i| format!("/dns4/{}.example.org/tcp/{}", "a".repeat(200), p * 40 + i).parse().unwrap())
                .collect()
        };
        for i in 0..200u16 {
            t.apply(identified(PeerId::random(), long(i)), now);
            assert!(t.bytes() <= max, "{} bytes", t.bytes());
        }
        assert!(t.len() > 10, "{} peers fit", t.len());
        // At most 32 addresses per peer, the newest.
        let p = PeerId::random();
        let mut t = PeerTable::new(&cfg(10, usize::MAX), heads(1).1);
        t.apply(identified(p, (0..50).map(addr).collect()), now);
        let snap = t.snapshot();
        let got = snap.closest(&p.to_bytes(), 1, &[]);
        assert_eq!(got[0].addrs, (18..50).map(addr).collect::<Vec<_>>());
    }

    #[test]
    fn identify_replaces_addresses_kad_only_adds_peers_and_heads_stay_out() {
        let (head_ids, sibs) = heads(3);
        let mut t = PeerTable::new(&cfg(10, usize::MAX), sibs);
        let now = Instant::now();
        let p = PeerId::random();
        assert_eq!(t.apply(Update::Routed { peer: p, addrs: vec![addr(1)] }, now), Change::Inserted);
        assert_eq!(t.apply(Update::Routed { peer: p, addrs: vec![addr(9)] }, now), Change::Updated);
        assert_eq!(t.snapshot().closest(&p.to_bytes(), 1, &[])[0].addrs, vec![addr(1)]);
        let v = t.version();
        t.apply(identified(p, vec![addr(2), addr(3)]), now);
        assert_eq!(t.snapshot().closest(&p.to_bytes(), 1, &[])[0].addrs, vec![addr(2), addr(3)]);
        assert!(t.version() > v, "new addresses are republished");
        let v = t.version();
        t.apply(identified(p, vec![addr(2), addr(3)]), now);
        t.apply(Update::Seen(p), now);
        assert_eq!(t.version(), v, "the same addresses and a sign of life change nothing readers see");
        assert_eq!(t.apply(identified(head_ids[0], vec![addr(4)]), now), Change::Ignored);
        assert_eq!(t.apply(identified(PeerId::random(), vec![]), now), Change::Ignored);
        assert_eq!(
            t.apply(Update::Seen(PeerId::random()), now),
            Change::Ignored,
            "unknown peers are not added"
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.apply(Update::Unreachable(p), now), Change::Unreachable);
        assert!(t.is_empty() && t.bytes() == 0);
    }

    #[test]
    fn every_change_has_its_metric_series() {
        use crate::metrics::TABLE_CHANGES;
        let all = [
            Change::Inserted,
            Change::Updated,
            Change::Evicted,
            Change::Refused,
            Change::Expired,
            Change::Unreachable,
            Change::Ignored,
        ];
        for c in all {
            assert!(TABLE_CHANGES.contains(&c.label()), "{c:?}");
        }
        assert!(TABLE_CHANGES.contains(&DROPPED));
    }

    #[test]
    fn peers_not_seen_for_the_ttl_expire_and_a_sign_of_life_keeps_them() {
        let (_, sibs) = heads(1);
        let mut t = PeerTable::new(&cfg(10, usize::MAX), sibs);
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        t.apply(identified(a, vec![addr(1)]), t0);
        t.apply(identified(b, vec![addr(2)]), t0);
        t.apply(Update::Seen(b), t0 + Duration::from_secs(50));
        assert_eq!(t.expire(t0 + Duration::from_secs(59)), 0);
        assert_eq!(t.expire(t0 + Duration::from_secs(61)), 1);
        assert!(!t.contains(&a) && t.contains(&b));
        assert_eq!(t.expire(t0 + Duration::from_secs(111)), 1);
        assert!(t.is_empty() && t.bytes() == 0);
    }
}
