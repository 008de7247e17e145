//! Routing-table snapshots: how stream tasks answer "closer peers" without waiting on a swarm.
//!
//! The process-wide table's task ([`super::table`]) publishes a [`RoutingSnapshot`] of every peer
//! the heads learned of through one `ArcSwap` when the table changes; stream tasks of every head
//! load the current snapshot (a pointer read) and compute the k closest peers to a key from it.
//! The snapshot is immutable, so readers never block the table and the table never blocks readers.
//!
//! A snapshot also holds the process's [`Siblings`] — its other heads, one list shared by all —
//! so every head answers with its siblings as DHT servers without them ever entering a routing
//! table (which would make every head dial every other: N² connections).
//!
//! Both lists are sorted by Kademlia key, so an answer walks the implicit binary trie of the keys
//! ([`crate::identity::prefix_run`]) instead of scanning them: its cost grows with the logarithm of the heads
//! and peers, not with their number (issue 13: 10,000 heads in one process).

use std::sync::Arc;

use arc_swap::ArcSwap;
use libp2p::kad::{KBucketDistance, KBucketKey};
use libp2p::{Multiaddr, PeerId};

use super::addrs::admit;
use crate::config::AddressFilter;
use crate::identity::prefix_run;
use crate::types::PeerRecord;

/// Kademlia replication parameter: closer-peer replies carry at most this many peers.
pub const K_VALUE: usize = 20;

/// One routing-table entry with its precomputed Kademlia key.
#[derive(Debug, Clone)]
struct Entry {
    key: KBucketKey<PeerId>,
    /// Shared with the process-wide table's row: publishing a snapshot copies no address.
    addrs: Arc<Vec<Multiaddr>>,
}

/// A sibling head: its key and its live listen addresses (the head's own ArcSwap).
#[derive(Debug)]
struct Sibling {
    key: KBucketKey<PeerId>,
    addrs: Arc<ArcSwap<Vec<Multiaddr>>>,
}

/// The heads of this process, shared by every head's snapshot. Their addresses are read live,
/// at answer time, and filtered like any peer's (e.g. no loopback addresses on the public DHT).
#[derive(Debug)]
pub struct Siblings {
    entries: Vec<Sibling>,
    ids: std::collections::HashSet<PeerId>,
    filter: AddressFilter,
}

impl Default for Siblings {
    fn default() -> Self {
        Self { entries: Vec::new(), ids: Default::default(), filter: AddressFilter::Any }
    }
}

impl Siblings {
    pub fn new(
        heads: impl IntoIterator<Item = (PeerId, Arc<ArcSwap<Vec<Multiaddr>>>)>,
        filter: AddressFilter,
    ) -> Arc<Self> {
        let mut entries: Vec<Sibling> =
            heads.into_iter().map(|(p, addrs)| Sibling { key: KBucketKey::from(p), addrs }).collect();
        let ids = entries.iter().map(|e| *e.key.preimage()).collect();
        sort_by_hashed_key(&mut entries, |s| &s.key);
        Arc::new(Self { entries, ids, filter })
    }

    pub fn contains(&self, peer: &PeerId) -> bool {
        self.ids.contains(peer)
    }

    /// The XOR distance from `key` to the nearest head (the largest distance if there is none).
    pub fn distance_to_nearest(&self, key: &KBucketKey<PeerId>) -> KBucketDistance {
        nearest_in(&self.entries, |s| &s.key, key, 1)
            .first()
            .map_or(KBucketDistance(libp2p::kad::U256::MAX), |(d, _)| *d)
    }
}

/// Sort `entries` ascending by hashed Kademlia key: the order [`nearest_in`] walks.
fn sort_by_hashed_key<T>(entries: &mut [T], key: impl Fn(&T) -> &KBucketKey<PeerId>) {
    entries.sort_by(|a, b| key(a).hashed_bytes().cmp(key(b).hashed_bytes()));
}

/// The up to `n` entries of `sorted` (ascending by hashed key) closest to `target`, closest
/// first, with their distances: the nearest of its [`prefix_run`].
fn nearest_in<'a, T, U>(
    sorted: &'a [T],
    key: impl Fn(&T) -> &KBucketKey<PeerId>,
    target: &KBucketKey<U>,
    n: usize,
) -> Vec<(KBucketDistance, &'a T)> {
    let run = &sorted[prefix_run(sorted, |e| key(e).hashed_bytes(), target.hashed_bytes(), n)];
    let mut by_distance: Vec<_> = run.iter().map(|e| (key(e).distance(target), e)).collect();
    by_distance.sort_by_key(|(d, _)| *d);
    by_distance.truncate(n);
    by_distance
}

/// A closer-peer candidate: from the routing table, or a sibling head.
enum Candidate<'a> {
    Table(&'a Entry),
    Sibling(&'a Sibling, AddressFilter),
}

impl Candidate<'_> {
    fn key(&self) -> &KBucketKey<PeerId> {
        match self {
            Candidate::Table(e) => &e.key,
            Candidate::Sibling(s, _) => &s.key,
        }
    }

    fn record(&self) -> PeerRecord {
        match self {
            Candidate::Table(e) => PeerRecord { peer: *e.key.preimage(), addrs: (*e.addrs).clone() },
            Candidate::Sibling(s, filter) => PeerRecord {
                peer: *s.key.preimage(),
                addrs: s.addrs.load().iter().filter(|a| admit(*filter, a)).cloned().collect(),
            },
        }
    }
}

/// An immutable copy of the process-wide routing table ([`super::table`]), plus the siblings.
#[derive(Debug, Clone, Default)]
pub struct RoutingSnapshot {
    entries: Vec<Entry>,
    siblings: Arc<Siblings>,
}

impl RoutingSnapshot {
    pub fn new(peers: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>)>, siblings: Arc<Siblings>) -> Self {
        let mut entries: Vec<Entry> = peers
            .into_iter()
            .filter(|(p, a)| !a.is_empty() && !siblings.ids.contains(p))
            .map(|(p, addrs)| Entry { key: KBucketKey::from(p), addrs: Arc::new(addrs) })
            .collect();
        sort_by_hashed_key(&mut entries, |e| &e.key);
        Self { entries, siblings }
    }

    /// A snapshot of entries already sorted by hashed key (the table's order) and free of
    /// siblings.
    pub(super) fn sorted(
        entries: Vec<(KBucketKey<PeerId>, Arc<Vec<Multiaddr>>)>,
        siblings: Arc<Siblings>,
    ) -> Self {
        debug_assert!(entries.windows(2).all(|w| w[0].0.hashed_bytes() < w[1].0.hashed_bytes()));
        let entries = entries.into_iter().map(|(key, addrs)| Entry { key, addrs }).collect();
        Self { entries, siblings }
    }

    /// Peers in the routing table (siblings not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The up to `n` candidates (table and siblings) closest to `target`, closest first: the
    /// nearest of each list's [`prefix_run`], merged.
    fn nearest(&self, target: &KBucketKey<Vec<u8>>, n: usize) -> Vec<(KBucketDistance, Candidate<'_>)> {
        let filter = self.siblings.filter;
        let table = nearest_in(&self.entries, |e| &e.key, target, n);
        let sibs = nearest_in(&self.siblings.entries, |s| &s.key, target, n);
        let mut cands: Vec<(KBucketDistance, Candidate<'_>)> = table
            .into_iter()
            .map(|(d, e)| (d, Candidate::Table(e)))
            .chain(sibs.into_iter().map(|(d, s)| (d, Candidate::Sibling(s, filter))))
            .collect();
        cands.sort_by_key(|c| c.0);
        cands.truncate(n);
        cands
    }

    /// Whether `me` is among the `k` peers closest to `target` that this snapshot knows (the
    /// routing table and the siblings): go-libp2p-kad-dht PR #730's rule for which keys a
    /// loaded node still serves from its datastore.
    pub fn is_among_closest(&self, target: &[u8], me: &PeerId, k: usize) -> bool {
        let target = KBucketKey::new(target.to_vec());
        let mine = KBucketKey::from(*me).distance(&target);
        // If k peers are closer than `me`, they are the k closest other than `me`: among the
        // k + 1 closest.
        let closer = self
            .nearest(&target, k + 1)
            .iter()
            .filter(|(d, c)| c.key().preimage() != me && *d < mine)
            .count();
        closer < k
    }

    /// The up to `k` peers closest to `target` (raw key bytes, hashed as Kademlia does),
    /// excluding `exclude` (the requester and the head itself).
    pub fn closest(&self, target: &[u8], k: usize, exclude: &[PeerId]) -> Vec<PeerRecord> {
        let target = KBucketKey::new(target.to_vec());
        self.nearest(&target, k + exclude.len())
            .into_iter()
            .filter(|(_, c)| !exclude.contains(c.key().preimage()))
            .take(k)
            .map(|(_, c)| c.record())
            .filter(|r| !r.addrs.is_empty())
            .collect()
    }

    /// The up to `n` peers of the routing table alone (no sibling: heads never dial each other)
    /// closest to `target`: where a lookup starts.
    pub fn closest_in_table(&self, target: &[u8], n: usize) -> Vec<PeerRecord> {
        let target = KBucketKey::new(target.to_vec());
        nearest_in(&self.entries, |e| &e.key, &target, n)
            .into_iter()
            .map(|(_, e)| Candidate::Table(e).record())
            .collect()
    }

    /// Whether `peer` is a head of this process.
    pub fn is_head(&self, peer: &PeerId) -> bool {
        self.siblings.contains(peer)
    }

    /// The addresses of `peer` if the table holds it or it is a head of this process —
    /// `GET /routing/v1/peers`, beside the stored addresses.
    pub fn addrs_of(&self, peer: &PeerId) -> Option<Vec<Multiaddr>> {
        self.closest(&peer.to_bytes(), 1, &[]).into_iter().find(|r| r.peer == *peer).map(|r| r.addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_matches_a_full_sort_and_excludes() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let peers: Vec<PeerId> = (0..200).map(|_| PeerId::random()).collect();
        // Half in the routing table, half siblings: both are candidates.
        let siblings = Siblings::new(
            peers[100..].iter().map(|p| (*p, Arc::new(ArcSwap::from_pointee(vec![addr.clone()])))),
            AddressFilter::Any,
        );
        let snap = RoutingSnapshot::new(peers.iter().map(|p| (*p, vec![addr.clone()])), siblings);
        let target = b"some key".to_vec();
        let excluded = peers[0];
        let got: Vec<PeerId> =
            snap.closest(&target, K_VALUE, &[excluded]).into_iter().map(|r| r.peer).collect();

        let t = KBucketKey::new(target.clone());
        let mut all: Vec<PeerId> = peers.iter().copied().filter(|p| *p != excluded).collect();
        all.sort_by_key(|p| KBucketKey::from(*p).distance(&t));
        assert_eq!(got, all[..K_VALUE].to_vec());
        assert!(snap.closest(&target, 5, &[]).len() == 5);
        assert!(RoutingSnapshot::default().closest(&target, 5, &[]).is_empty());
    }

    #[test]
    fn among_closest_counts_table_and_siblings() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let peers: Vec<PeerId> = (0..60).map(|_| PeerId::random()).collect();
        let siblings = Siblings::new(
            peers[..30].iter().map(|p| (*p, Arc::new(ArcSwap::from_pointee(vec![addr.clone()])))),
            AddressFilter::Any,
        );
        let snap = RoutingSnapshot::new(peers[30..].iter().map(|p| (*p, vec![addr.clone()])), siblings);
        let target = b"key".to_vec();
        let t = KBucketKey::new(target.clone());
        let mut sorted = peers.clone();
        sorted.sort_by_key(|p| KBucketKey::from(*p).distance(&t));
        assert!(snap.is_among_closest(&target, &sorted[0], 1));
        assert!(snap.is_among_closest(&target, &sorted[19], 20));
        assert!(!snap.is_among_closest(&target, &sorted[20], 20));
        assert!(!snap.is_among_closest(&target, &sorted[59], 20));
    }

    #[test]
    fn many_siblings_and_peers_answer_like_a_full_sort() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let heads: Vec<PeerId> = (0..2_000).map(|_| PeerId::random()).collect();
        let peers: Vec<PeerId> = (0..3_000).map(|_| PeerId::random()).collect();
        let siblings = Siblings::new(
            heads.iter().map(|p| (*p, Arc::new(ArcSwap::from_pointee(vec![addr.clone()])))),
            AddressFilter::Any,
        );
        let snap = RoutingSnapshot::new(peers.iter().map(|p| (*p, vec![addr.clone()])), siblings);
        let everyone: Vec<PeerId> = heads.iter().chain(&peers).copied().collect();
        for i in 0..100u32 {
            let target = i.to_be_bytes().to_vec();
            let t = KBucketKey::new(target.clone());
            let mut all = everyone.clone();
            all.sort_by_cached_key(|p| KBucketKey::from(*p).distance(&t));
            let exclude = [all[0], all[3]];
            let got: Vec<PeerId> =
                snap.closest(&target, K_VALUE, &exclude).into_iter().map(|r| r.peer).collect();
            let want: Vec<PeerId> =
                all.iter().filter(|p| !exclude.contains(p)).take(K_VALUE).copied().collect();
            assert_eq!(got, want);
            assert!(snap.is_among_closest(&target, &all[19], K_VALUE));
            assert!(!snap.is_among_closest(&target, &all[20], K_VALUE));
        }
    }

    // The addresses are only classified by the filter, never dialled.
    #[test]
    fn siblings_are_answered_with_their_live_filtered_addresses() {
        let live =
            Arc::new(ArcSwap::from_pointee(vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()]));
        let peer = PeerId::random();
        let siblings = Siblings::new([(peer, live.clone())], AddressFilter::Public);
        let snap = RoutingSnapshot::new(std::iter::empty(), siblings);
        assert!(snap.closest(b"k", 20, &[]).is_empty(), "only a loopback address: not advertised");
        live.store(Arc::new(vec![
            "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
            "/ip4/8.8.8.8/tcp/4001".parse().unwrap(),
        ]));
        let got = snap.closest(b"k", 20, &[]);
        assert_eq!(got, vec![PeerRecord { peer, addrs: vec!["/ip4/8.8.8.8/tcp/4001".parse().unwrap()] }]);
    }
}
