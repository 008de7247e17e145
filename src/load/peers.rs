//! Per-peer fair shares of the datastore under contention, in a map bounded in entries.
//!
//! While the node is short of capacity every peer is held to one rate, the **share**, in
//! datastore statements per second: a GCRA (one theoretical arrival time per peer, in a
//! [`BoundedPeers`] map) charges each datastore-touching request its statements (a lookup 1, a
//! buffered announcement its part of a flush). The load controller re-computes the share every
//! sample ([`PeerLimiter::update_share`]) so that what all peers are admitted together matches
//! what is available — the statement budget, divided by `load.degrade_per_peer_cost` from
//! `degrade` up. A peer asking less than the share is never limited and leaves the rest to the
//! others; the share grows until the busy peers take what the quiet ones leave (max-min
//! fairness by water-filling); a lone peer gets everything available. The share never falls
//! below `load.per_peer_requests_per_second`, and a burst is at most `load.per_peer_burst`
//! statements and one second of the share.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use libp2p::PeerId;

use crate::config::LoadSection;
use crate::sharded::Sharded;

const NANOS_PER_SECOND: f64 = 1e9;
/// The share follows what was admitted over about this long (a second: a peer's burst is at most
/// a second of its share, so a shorter window reads bursts as rates).
const MEASURE_NANOS: u64 = 1_000_000_000;

/// Per-peer fair shares: one GCRA bucket per peer, one share for all.
pub(crate) struct PeerLimiter {
    pub(crate) store: BoundedPeers,
    /// Time zero of the buckets' arrival times.
    epoch: Instant,
    /// The share, statements per second (`f64` bits).
    share: AtomicU64,
    /// The least share (`load.per_peer_requests_per_second`).
    floor: f64,
    /// Largest burst, statements.
    burst: f64,
    /// Statements admitted (in millionths) and requests refused, since start.
    admitted_micro: AtomicU64,
    refused: AtomicU64,
    /// What the recent [`Self::update_share`] calls read, (when, admitted, refused), over the
    /// last [`MEASURE_NANOS`].
    history: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl PeerLimiter {
    /// None when per-peer limits are off (`per_peer_requests_per_second = 0`).
    pub(crate) fn new(cfg: &LoadSection) -> Option<Self> {
        let floor = f64::from(cfg.per_peer_requests_per_second);
        if floor <= 0.0 {
            return None;
        }
        Some(Self {
            store: BoundedPeers::new(cfg.max_tracked_peers),
            epoch: Instant::now(),
            share: AtomicU64::new(f64::INFINITY.to_bits()),
            floor,
            burst: f64::from(cfg.per_peer_burst.max(1)),
            admitted_micro: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
        })
    }

    /// Nanoseconds since the limiter's epoch.
    pub(crate) fn now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// The share in force, statements per second (infinite until the first contention).
    pub(crate) fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Whether `peer` may spend `statements` now (`now` from [`Self::now`]); charged if so.
    pub(crate) fn check(&self, peer: &PeerId, statements: f64, now: u64) -> bool {
        let share = self.share();
        if !share.is_finite() {
            self.admitted_micro.fetch_add((statements * 1e6) as u64, Ordering::Relaxed);
            return true;
        }
        // GCRA: one statement every `interval`; a burst of `tolerance` ahead of time at most.
        let interval = NANOS_PER_SECOND / share;
        let tolerance = (self.burst * interval).min(NANOS_PER_SECOND).max(interval);
        let cost = statements * interval;
        let res = self.store.measure_and_replace(peer, |prev| {
            let tat = prev.map_or(now, |t| u64::from(t).max(now));
            let next = tat as f64 + cost;
            if next - now as f64 > tolerance {
                Err(())
            } else {
                Ok(((), Nanos::from(next as u64)))
            }
        });
        if res.is_ok() {
            self.admitted_micro.fetch_add((statements * 1e6) as u64, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        res.is_ok()
    }

    /// Re-compute the share from what was admitted over the last second, so that all peers
    /// together are admitted `available` statements per second (`active`: limits apply now).
    /// While nobody was refused and no more than `available` was admitted, no peer is held back
    /// and the share may be anything above every peer's demand: it is set to all that is
    /// available. Otherwise it moves toward the share that would have admitted `available` —
    /// up when quiet peers leave some unused, down when the peers together take too much — by
    /// the square root of the ratio (damped: a peer's bucket answers a change of share a
    /// second late), at most a factor of 2 per sample.
    pub(crate) fn update_share(&self, available: f64, active: bool, now: u64) -> f64 {
        let admitted = self.admitted_micro.load(Ordering::Relaxed);
        let refused = self.refused.load(Ordering::Relaxed);
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        while history.len() > 64 || (history.len() > 1 && history[1].0 + MEASURE_NANOS <= now) {
            history.pop_front();
        }
        let base = history.front().copied();
        history.push_back((now, admitted, refused));
        let available = available.max(self.floor);
        let share = self.share();
        let next = match base {
            _ if !active => f64::INFINITY,
            None => available,
            Some(_) if !share.is_finite() => available,
            Some((t, a, r)) => {
                let secs = (now.saturating_sub(t) as f64 / NANOS_PER_SECOND).max(1e-3);
                let admitted_per_s = admitted.saturating_sub(a) as f64 / 1e6 / secs;
                if refused == r && admitted_per_s <= available {
                    available
                } else if admitted_per_s <= 0.0 {
                    share * 2.0
                } else {
                    (share * (available / admitted_per_s).sqrt()).clamp(share / 2.0, share * 2.0)
                }
            }
        };
        let next = if next.is_finite() { next.clamp(self.floor, available) } else { next };
        self.share.store(next.to_bits(), Ordering::Relaxed);
        next
    }

    /// Forget the buckets of peers that are below their share again.
    pub(crate) fn prune(&self) {
        self.store.retain_recent(Nanos::from(self.now()));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers asking at fixed rates (requests per second) for `secs` seconds of simulated time,
    /// the share re-computed every 250 ms as the controller does: requests admitted per peer
    /// in the second half.
    fn simulate(available: f64, rates: &[f64], secs: u64) -> Vec<f64> {
        let cfg =
            LoadSection { per_peer_requests_per_second: 1, per_peer_burst: 400, ..LoadSection::default() };
        let limiter = PeerLimiter::new(&cfg).unwrap();
        let peers: Vec<PeerId> = rates.iter().map(|_| PeerId::random()).collect();
        let mut next: Vec<f64> = rates.iter().map(|r| 1e9 / r * 0.5).collect();
        let mut admitted = vec![0.0; rates.len()];
        let (step, end) = (250_000_000u64, secs * 1_000_000_000);
        let mut t = 1;
        limiter.update_share(available, true, t);
        while t < end {
            let until = t + step;
            // Every request due before the next sample, in time order.
            loop {
                let (i, due) = next.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap();
                if *due >= until as f64 {
                    break;
                }
                let due = *due;
                if limiter.check(&peers[i], 1.0, due as u64) && due >= end as f64 / 2.0 {
                    admitted[i] += 1.0;
                }
                next[i] = due + 1e9 / rates[i];
            }
            t = until;
            limiter.update_share(available, true, t);
        }
        admitted.iter().map(|a| a / (secs as f64 / 2.0)).collect()
    }

    fn near(got: f64, want: f64, tolerance: f64) -> bool {
        (got - want).abs() <= want * tolerance
    }

    #[test]
    fn a_lone_peer_gets_everything_available() {
        let got = simulate(100.0, &[1000.0], 20);
        assert!(near(got[0], 100.0, 0.1), "admitted {got:?}/s of 100 available");
    }

    #[test]
    fn a_quiet_peer_is_not_limited_and_busy_peers_split_what_it_leaves() {
        let got = simulate(100.0, &[10.0, 1000.0, 400.0], 20);
        assert!(near(got[0], 10.0, 0.02), "the quiet peer got {got:?}/s");
        assert!(near(got[1], 45.0, 0.15) && near(got[2], 45.0, 0.15), "the busy peers got {got:?}/s");
        let total: f64 = got.iter().sum();
        assert!(near(total, 100.0, 0.1), "{total}/s admitted of 100 available");
    }

    #[test]
    fn many_peers_are_held_to_equal_shares() {
        let rates = vec![5.0; 50];
        let got = simulate(100.0, &rates, 30);
        let total: f64 = got.iter().sum();
        assert!(near(total, 100.0, 0.15), "{total}/s admitted of 100 available: {got:?}");
        let (lo, hi) = got.iter().fold((f64::MAX, 0.0f64), |(l, h), g| (l.min(*g), h.max(*g)));
        assert!(lo >= 1.5 && hi <= 2.5, "shares from {lo} to {hi}/s, fair is 2/s");
    }

    #[test]
    fn without_contention_nobody_is_limited() {
        let cfg =
            LoadSection { per_peer_requests_per_second: 1, per_peer_burst: 1, ..LoadSection::default() };
        let limiter = PeerLimiter::new(&cfg).unwrap();
        let p = PeerId::random();
        limiter.update_share(1.0, false, 1);
        assert!((0..1000).all(|_| limiter.check(&p, 1.0, 2)), "limits not active: every request allowed");
        limiter.update_share(1.0, true, 3);
        assert!(limiter.check(&p, 1.0, 4) && !limiter.check(&p, 1.0, 5), "active at 1/s: one, then wait");
    }
}
