//! Per-peer rate limits of datastore-touching requests, in a map bounded in entries.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use libp2p::PeerId;

use crate::config::LoadSection;
use crate::sharded::Sharded;

/// Per-peer rate limiting: a governor keyed limiter over a [`BoundedPeers`] store.
pub(crate) struct PeerLimiter {
    pub(crate) limiter: RateLimiter<PeerId, BoundedPeers, DefaultClock, NoOpMiddleware>,
    pub(crate) store: BoundedPeers,
    pub(crate) degrade_cost: NonZeroU32,
}

impl PeerLimiter {
    pub(crate) fn new(cfg: &LoadSection) -> Option<Self> {
        let rate = NonZeroU32::new(cfg.per_peer_requests_per_second)?;
        let burst = NonZeroU32::new(cfg.per_peer_burst).unwrap_or(rate);
        let store = BoundedPeers::new(cfg.max_tracked_peers);
        let limiter = RateLimiter::new(
            Quota::per_second(rate).allow_burst(burst),
            store.clone(),
            DefaultClock::default(),
        );
        let degrade_cost = NonZeroU32::new(cfg.degrade_per_peer_cost).unwrap_or(NonZeroU32::MIN);
        Some(Self { limiter, store, degrade_cost })
    }
}

const PEER_SHARDS: usize = 16;

/// A governor state store with a hard bound: at most `max` keys (peers, IP addresses) get their
/// own bucket; while it is full, keys without one share a single overflow bucket (so a flood of
/// fresh peer IDs is still rate limited, as one). Entries whose bucket is full again are pruned by
/// `retain_recent`.
pub struct BoundedKeys<K>(Arc<KeyTable<K>>);

/// Peers' buckets.
pub(crate) type BoundedPeers = BoundedKeys<PeerId>;

impl<K> Clone for BoundedKeys<K> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

pub struct KeyTable<K> {
    shards: Sharded<HashMap<K, u64>>,
    overflow: Mutex<u64>,
    len: AtomicUsize,
    per_shard: usize,
}

impl<K> std::ops::Deref for BoundedKeys<K> {
    type Target = KeyTable<K>;
    fn deref(&self) -> &KeyTable<K> {
        &self.0
    }
}

impl<K: std::hash::Hash + Eq + Clone> BoundedKeys<K> {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(KeyTable {
            shards: Sharded::new(PEER_SHARDS, HashMap::new),
            overflow: Mutex::new(0),
            len: AtomicUsize::new(0),
            per_shard: max.div_ceil(PEER_SHARDS).max(1),
        }))
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.per_shard * PEER_SHARDS * 9 / 10
    }
}

/// Apply a GCRA decision to one stored theoretical arrival time (0 = none yet).
fn measure<T, E>(slot: &mut u64, f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>) -> Result<T, E> {
    let prev = (*slot != 0).then(|| Nanos::from(*slot));
    let (t, next) = f(prev)?;
    *slot = u64::from(next).max(1);
    Ok(t)
}

impl<K: std::hash::Hash + Eq + Clone> StateStore for BoundedKeys<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shards.lock_for(key);
        if let Some(slot) = shard.get_mut(key) {
            return measure(slot, f);
        }
        if shard.len() >= self.per_shard {
            drop(shard);
            return measure(&mut self.overflow.lock().unwrap_or_else(|e| e.into_inner()), f);
        }
        let mut slot = 0;
        let res = measure(&mut slot, f);
        if res.is_ok() {
            shard.insert(key.clone(), slot);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<K: std::hash::Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedKeys<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = u64::from(drop_below);
        for i in 0..PEER_SHARDS {
            let mut shard = self.shards.lock(i);
            let before = shard.len();
            shard.retain(|_, t| *t >= below);
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn len(&self) -> usize {
        BoundedKeys::len(self)
    }

    fn is_empty(&self) -> bool {
        BoundedKeys::is_empty(self)
    }
}
