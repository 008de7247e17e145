//! Routing-table snapshots: how stream tasks answer "closer peers" without waiting on a swarm.
//!
//! Each head's swarm task rebuilds a [`RoutingSnapshot`] from its kad routing table when the
//! table changes and publishes it through an `ArcSwap`; stream tasks load the current snapshot
//! (a pointer read) and compute the k closest peers to a key from it. The snapshot is immutable,
//! so readers never block the swarm and the swarm never blocks readers.
//!
//! A snapshot also holds the process's [`Siblings`] — its other heads, one list shared by all —
//! so every head answers with its siblings as DHT servers without them ever entering kad's
//! routing tables (which would make every head dial every other: N² connections).

use std::sync::Arc;

use libp2p::kad::KBucketKey;
use libp2p::{Multiaddr, PeerId};

use crate::types::PeerRecord;

/// Kademlia replication parameter: closer-peer replies carry at most this many peers.
pub const K_VALUE: usize = 20;

/// One routing-table entry with its precomputed Kademlia key.
#[derive(Debug, Clone)]
struct Entry {
    key: KBucketKey<PeerId>,
    addrs: Vec<Multiaddr>,
}

/// The heads of this process, shared by every head's snapshot.
#[derive(Debug, Default)]
pub struct Siblings {
    entries: Vec<Entry>,
    ids: std::collections::HashSet<PeerId>,
}

impl Siblings {
    pub fn new(heads: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>)>) -> Arc<Self> {
        let entries: Vec<Entry> =
            heads.into_iter().map(|(p, addrs)| Entry { key: KBucketKey::from(p), addrs }).collect();
        let ids = entries.iter().map(|e| *e.key.preimage()).collect();
        Arc::new(Self { entries, ids })
    }
}

/// An immutable copy of one head's routing table, plus its siblings.
#[derive(Debug, Clone, Default)]
pub struct RoutingSnapshot {
    entries: Vec<Entry>,
    siblings: Arc<Siblings>,
}

impl RoutingSnapshot {
    pub fn new(peers: impl IntoIterator<Item = (PeerId, Vec<Multiaddr>)>, siblings: Arc<Siblings>) -> Self {
        Self {
            entries: peers
                .into_iter()
                .filter(|(p, a)| !a.is_empty() && !siblings.ids.contains(p))
                .map(|(p, addrs)| Entry { key: KBucketKey::from(p), addrs })
                .collect(),
            siblings,
        }
    }

    /// Peers in the head's own routing table (siblings not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The up to `k` peers closest to `target` (raw key bytes, hashed as Kademlia does),
    /// excluding `exclude` (the requester and the head itself). O(n) selection, then a sort of k.
    pub fn closest(&self, target: &[u8], k: usize, exclude: &[PeerId]) -> Vec<PeerRecord> {
        let target = KBucketKey::new(target.to_vec());
        let mut cands: Vec<(libp2p::kad::KBucketDistance, &Entry)> = self
            .entries
            .iter()
            .chain(self.siblings.entries.iter())
            .filter(|e| !exclude.contains(e.key.preimage()))
            .map(|e| (e.key.distance(&target), e))
            .collect();
        if cands.len() > k && k > 0 {
            cands.select_nth_unstable_by(k - 1, |a, b| a.0.cmp(&b.0));
            cands.truncate(k);
        }
        cands.sort_by_key(|c| c.0);
        cands.truncate(k);
        cands
            .into_iter()
            .map(|(_, e)| PeerRecord { peer: *e.key.preimage(), addrs: e.addrs.clone() })
            .collect()
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
        let siblings = Siblings::new(peers[100..].iter().map(|p| (*p, vec![addr.clone()])));
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
}
