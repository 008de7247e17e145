//! Open inbound kad streams: an idle stream costs memory, not a worker slot.
//!
//! go-libp2p-kad-dht clients keep one stream per peer open and reuse it, so most open streams
//! are idle most of the time. Every accepted stream is registered here under three caps: per
//! (remote peer, head) — 64 by default; rust-libp2p's kad handler allows 32 per connection —, per
//! remote IP address over all heads, and per process. A new stream that finds its scope full
//! closes the **longest-idle** stream of that scope and takes its place; only when every stream
//! of the scope is busy serving a request is the new one refused (reset, counted). A stream is
//! *idle* from the end of one request to the first byte of the next.
//!
//! Idle streams are ordered by the time they went idle in sharded maps (one shard lock per
//! transition, two per request); the per-peer and per-IP lists are sharded by their key. A
//! victim is taken by compare-and-swap on its idle time, so a stream that starts a request at
//! that moment is never closed under it.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

use crate::sharded::Sharded;

const SHARDS: usize = 16;
/// `idle_since` of a stream serving a request.
const BUSY: u64 = u64::MAX;
/// `idle_since` of a stream closed to make room for a newer one.
const EVICTED: u64 = u64::MAX - 1;

/// The caps (see `limits.*` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct StreamCaps {
    pub per_peer_per_head: usize,
    pub per_ip: usize,
    pub per_process: usize,
}

/// Why a new stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every stream of the full scope is serving a request.
    AllBusy,
}

/// One registered stream, shared by its task and the registry.
#[derive(Debug)]
struct Entry {
    id: u64,
    peer: PeerId,
    head: usize,
    ip: Option<IpAddr>,
    /// Micros since the registry's epoch at which it went idle, or [`BUSY`] / [`EVICTED`].
    idle_since: AtomicU64,
    /// Still counted in the caps (cleared once, by eviction or by the stream's end).
    counted: AtomicBool,
    /// Cancelled when the stream is evicted.
    evicted: CancellationToken,
}

/// Streams by a scope's key (peer and head, or IP address), sharded by the key.
type Lists<K> = Sharded<HashMap<K, Vec<Arc<Entry>>>>;

/// Every open inbound stream of the process.
pub struct OpenStreams {
    epoch: Instant,
    caps: StreamCaps,
    next_id: AtomicU64,
    total: AtomicUsize,
    by_peer: Lists<(PeerId, usize)>,
    by_ip: Lists<IpAddr>,
    /// Idle streams by (idle since, id), sharded by id.
    idle: Sharded<BTreeMap<(u64, u64), Arc<Entry>>>,
}

/// A registered stream; dropping it unregisters it.
pub struct OpenStream {
    owner: Arc<OpenStreams>,
    entry: Arc<Entry>,
}

impl OpenStreams {
    pub fn new(caps: StreamCaps) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            caps,
            next_id: AtomicU64::new(1),
            total: AtomicUsize::new(0),
            by_peer: Sharded::new(SHARDS, HashMap::new),
            by_ip: Sharded::new(SHARDS, HashMap::new),
            idle: Sharded::new(SHARDS, BTreeMap::new),
        })
    }

    /// Streams open now.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Register a new stream of `peer` on `head` from `ip`, closing the longest-idle stream of
    /// each full scope; with how many it closed. The new stream starts idle (it has not sent a
    /// request yet).
    pub fn open(
        self: &Arc<Self>,
        peer: PeerId,
        head: usize,
        ip: Option<IpAddr>,
    ) -> Result<(OpenStream, u32), Refusal> {
        let mut evicted = self.make_room(&self.by_peer, &(peer, head), self.caps.per_peer_per_head)?;
        if let Some(ip) = ip {
            evicted += self.make_room(&self.by_ip, &ip, self.caps.per_ip)?;
        }
        if self.total.load(Ordering::Relaxed) >= self.caps.per_process {
            match self.oldest_idle_overall() {
                Some(v) if self.evict(&v) => evicted += 1,
                _ => return Err(Refusal::AllBusy),
            }
        }
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            head,
            ip,
            idle_since: AtomicU64::new(BUSY),
            counted: AtomicBool::new(true),
            evicted: CancellationToken::new(),
        });
        self.by_peer.lock_for(&(peer, head)).entry((peer, head)).or_default().push(entry.clone());
        if let Some(ip) = ip {
            self.by_ip.lock_for(&ip).entry(ip).or_default().push(entry.clone());
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        let s = OpenStream { owner: self.clone(), entry };
        s.set_idle();
        Ok((s, evicted))
    }

    /// Ensure `key`'s scope has room for one more stream: evict its longest-idle stream if full
    /// (returns 1 then). Concurrent registrations of one scope (one per head task at most) may
    /// overshoot the cap by as many; never more.
    fn make_room<K: Hash + Eq + Copy>(&self, map: &Lists<K>, key: &K, cap: usize) -> Result<u32, Refusal> {
        let mut evicted = 0;
        // A victim may start a request between the scan and the eviction; try the next one.
        for _ in 0..4 {
            let victim = {
                let shard = map.lock_for(key);
                let Some(list) = shard.get(key) else { return Ok(evicted) };
                if list.len() < cap {
                    return Ok(evicted);
                }
                list.iter()
                    .filter(|e| e.idle_since.load(Ordering::Relaxed) < EVICTED)
                    .min_by_key(|e| e.idle_since.load(Ordering::Relaxed))
                    .cloned()
            };
            match victim {
                None => return Err(Refusal::AllBusy),
                Some(v) => evicted += u32::from(self.evict(&v)),
            }
        }
        Err(Refusal::AllBusy)
    }

    /// The longest-idle stream of the process (one look at each idle shard).
    fn oldest_idle_overall(&self) -> Option<Arc<Entry>> {
        (0..SHARDS)
            .filter_map(|i| self.idle.lock(i).first_key_value().map(|(k, e)| (*k, e.clone())))
            .min_by_key(|(k, _)| *k)
            .map(|(_, e)| e)
    }

    /// Close `e` if it is still idle: true if this call evicted it.
    fn evict(&self, e: &Arc<Entry>) -> bool {
        let t = e.idle_since.load(Ordering::Relaxed);
        if t >= EVICTED
            || e.idle_since.compare_exchange(t, EVICTED, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return false;
        }
        self.idle.lock_for(&e.id).remove(&(t, e.id));
        self.uncount(e);
        e.evicted.cancel();
        true
    }

    /// Remove `e` from the caps' lists (once).
    fn uncount(&self, e: &Entry) {
        if !e.counted.swap(false, Ordering::AcqRel) {
            return;
        }
        remove_from(&self.by_peer, &(e.peer, e.head), e.id);
        if let Some(ip) = e.ip {
            remove_from(&self.by_ip, &ip, e.id);
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

fn remove_from<K: Hash + Eq + Copy>(map: &Lists<K>, key: &K, id: u64) {
    let mut shard = map.lock_for(key);
    if let Some(list) = shard.get_mut(key) {
        list.retain(|x| x.id != id);
        if list.is_empty() {
            shard.remove(key);
        }
    }
}

impl OpenStream {
    /// The stream waits for its next request. False if it was already evicted.
    pub fn set_idle(&self) -> bool {
        let t = self.owner.now();
        let e = &self.entry;
        if e.idle_since.compare_exchange(BUSY, t, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        self.owner.idle.lock_for(&e.id).insert((t, e.id), e.clone());
        true
    }

    /// The stream starts a request. False if it was evicted meanwhile: then it must end.
    pub fn set_busy(&self) -> bool {
        let e = &self.entry;
        let t = e.idle_since.load(Ordering::Relaxed);
        if t >= EVICTED
            || e.idle_since.compare_exchange(t, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return t == BUSY;
        }
        self.owner.idle.lock_for(&e.id).remove(&(t, e.id));
        true
    }

    /// Resolves when a newer stream took this one's place.
    pub async fn evicted(&self) {
        self.entry.evicted.cancelled().await
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let e = &self.entry;
        let t = e.idle_since.swap(EVICTED, Ordering::AcqRel);
        if t < EVICTED {
            self.owner.idle.lock_for(&e.id).remove(&(t, e.id));
        }
        self.owner.uncount(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(per_peer_per_head: usize, per_ip: usize, per_process: usize) -> StreamCaps {
        StreamCaps { per_peer_per_head, per_ip, per_process }
    }

    const IP: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn a_full_scope_closes_its_longest_idle_stream() {
        let reg = OpenStreams::new(caps(3, 100, 100));
        let p = PeerId::random();
        let a = reg.open(p, 0, IP).unwrap().0;
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = reg.open(p, 0, IP).unwrap().0;
        let c = reg.open(p, 0, IP).unwrap().0;
        // a became busy and idle again: now b is the longest idle.
        assert!(a.set_busy() && a.set_idle());
        let d = reg.open(p, 0, IP).unwrap().0;
        assert!(b.entry.evicted.is_cancelled(), "the longest-idle stream is closed");
        assert!(!a.entry.evicted.is_cancelled() && !c.entry.evicted.is_cancelled());
        assert!(!b.set_busy(), "an evicted stream cannot start a request");
        assert_eq!(reg.len(), 3);
        // Another head is another scope.
        let _e = reg.open(p, 1, IP).unwrap().0;
        assert_eq!(reg.len(), 4);
        drop(b);
        assert_eq!(reg.len(), 4, "an evicted stream was uncounted once, at eviction");
        drop((a, c, d));
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn busy_streams_are_never_closed_and_a_full_busy_scope_refuses() {
        let reg = OpenStreams::new(caps(2, 100, 100));
        let p = PeerId::random();
        let a = reg.open(p, 0, None).unwrap().0;
        let b = reg.open(p, 0, None).unwrap().0;
        assert!(a.set_busy() && b.set_busy());
        assert_eq!(reg.open(p, 0, None).err(), Some(Refusal::AllBusy));
        assert!(!a.entry.evicted.is_cancelled() && !b.entry.evicted.is_cancelled());
        assert!(b.set_idle());
        let _c = reg.open(p, 0, None).unwrap().0;
        assert!(b.entry.evicted.is_cancelled());
    }

    #[test]
    fn ip_and_process_caps_hold_across_peers() {
        let reg = OpenStreams::new(caps(10, 3, 5));
        let ip2 = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)));
        let (mut held, mut evictions) = (Vec::new(), 0);
        for _ in 0..6 {
            let (s, evicted) = reg.open(PeerId::random(), 0, IP).unwrap();
            held.push(s);
            evictions += evicted;
        }
        let by_ip = |ip: IpAddr| reg.by_ip.lock_for(&ip).get(&ip).map_or(0, Vec::len);
        assert_eq!(by_ip(IP.unwrap()), 3, "per-IP cap over distinct peers");
        for _ in 0..4 {
            let (s, evicted) = reg.open(PeerId::random(), 1, ip2).unwrap();
            held.push(s);
            evictions += evicted;
        }
        assert_eq!(reg.len(), 5, "per-process cap");
        assert_eq!(evictions, 3 + 2);
        drop(held);
        assert_eq!(reg.len(), 0);
        assert!(reg.idle.lock(0).is_empty() && reg.by_peer.lock(0).is_empty());
    }
}
