//! The write-behind buffer: sharded maps keyed by (key, provider), so repeated announcements
//! coalesce. Each shard's std `Mutex` is held for one map operation and never across an
//! `.await`. Entries count against the limits — entries, and bytes (each entry charged its key,
//! its bookkeeping and the full size of its addresses, though entries of one peer usually share
//! one copy of them) — from the moment they are buffered until their batch is written; batches
//! being written stay visible to reads until then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use crate::sharded::Sharded;
use crate::store::{now_ms, ProviderWrite};
use crate::types::{PeerRecord, ProviderKey};

/// Number of shards (buffer and single-flight). More shards than cores keeps locks uncontended.
pub const SHARDS: usize = 16;

#[derive(Debug, Clone)]
pub struct Pending {
    /// Shared by a peer's entries (see `ProviderManager`'s address book).
    pub addrs: Arc<[Multiaddr]>,
    pub expires_at: i64,
    pub addrs_expire_at: i64,
}

/// What an entry is charged against the byte limit: key, peer ID, map slots and `Pending`, and
/// every address as if it were its own (allocation and bytes).
fn entry_bytes(key: &ProviderKey, p: &Pending) -> usize {
    const ENTRY: usize = 160;
    ENTRY + key.as_bytes().len() + p.addrs.iter().map(crate::types::addr_bytes).sum::<usize>()
}

pub type Batch = HashMap<ProviderKey, HashMap<PeerId, Pending>>;

#[derive(Default)]
struct Shard {
    pending: Batch,
    pending_entries: usize,
    oldest: Option<Instant>,
    in_flight: Vec<Arc<Batch>>,
}

/// Why `add` refused an entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

pub struct WriteBuffer {
    shards: Sharded<Shard>,
    entries: AtomicUsize,
    /// Bytes charged for the entries counted in `entries`.
    bytes: AtomicUsize,
    /// Per shard: how many batches have completed. Lets a reader detect that a write landed while
    /// its datastore query ran (and then not cache a possibly stale answer).
    epochs: Vec<AtomicU64>,
    limit: usize,
    byte_limit: usize,
    flush_batch: usize,
}

impl WriteBuffer {
    pub fn new(limit: usize, byte_limit: usize, flush_batch: usize) -> Self {
        Self {
            shards: Sharded::new(SHARDS, Shard::default),
            entries: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            epochs: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            limit,
            byte_limit,
            flush_batch,
        }
    }

    /// Bytes charged for the buffered entries (never above the byte limit).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Charge `n` more bytes unless that passes the byte limit.
    fn charge(&self, n: usize) -> Result<(), Full> {
        let mut cur = self.bytes.load(Ordering::Relaxed);
        loop {
            if cur + n > self.byte_limit {
                return Err(Full);
            }
            match self.bytes.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    pub fn shard_of(&self, key: &ProviderKey) -> usize {
        self.shards.index_of(key)
    }

    fn lock(&self, idx: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards.lock(idx)
    }

    /// Buffer an entry. Returns whether the shard is now due for a size-triggered flush.
    pub fn add(&self, key: ProviderKey, peer: PeerId, p: Pending) -> Result<bool, Full> {
        let idx = self.shard_of(&key);
        let mut shard = self.lock(idx);
        let b = entry_bytes(&key, &p);
        if let Some(existing) = shard.pending.get_mut(&key).and_then(|m| m.get_mut(&peer)) {
            // Coalesced: no new entry; only a larger address set costs more bytes.
            let old = entry_bytes(&key, existing);
            if b > old {
                self.charge(b - old)?;
            } else {
                self.bytes.fetch_sub(old - b, Ordering::Relaxed);
            }
            *existing = p;
            return Ok(false);
        }
        // Check the limits before touching the map: a refused add must leave nothing behind.
        if self.entries.load(Ordering::Relaxed) >= self.limit {
            return Err(Full);
        }
        self.charge(b)?;
        self.entries.fetch_add(1, Ordering::Relaxed);
        shard.pending.entry(key).or_default().insert(peer, p);
        shard.pending_entries += 1;
        shard.oldest.get_or_insert_with(Instant::now);
        Ok(shard.pending_entries >= self.flush_batch)
    }

    /// Entries pending or being written.
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn epoch(&self, idx: usize) -> u64 {
        self.epochs[idx].load(Ordering::Acquire)
    }

    /// Unexpired buffered and in-flight providers of `key` (newest batch wins), at most `cap`.
    pub fn local(&self, key: &ProviderKey, cap: usize) -> Vec<PeerRecord> {
        let now = now_ms();
        let shard = self.lock(self.shard_of(key));
        let mut out: Vec<PeerRecord> = Vec::new();
        let batches = std::iter::once(&shard.pending).chain(shard.in_flight.iter().rev().map(|b| &**b));
        for batch in batches {
            let Some(by_peer) = batch.get(key) else { continue };
            for (peer, p) in by_peer {
                if out.len() < cap && p.expires_at > now && !out.iter().any(|r| &r.peer == peer) {
                    out.push(PeerRecord { peer: *peer, addrs: p.addrs.to_vec() });
                }
            }
        }
        out
    }

    /// Entries pending (not yet being written) in shard `idx`.
    pub fn pending(&self, idx: usize) -> usize {
        self.lock(idx).pending_entries
    }

    /// Whether shard `idx` should be flushed now.
    pub fn due(&self, idx: usize, interval: Duration) -> bool {
        let shard = self.lock(idx);
        shard.pending_entries >= self.flush_batch || shard.oldest.is_some_and(|t| t.elapsed() >= interval)
    }

    /// Move shard `idx`'s pending entries into a batch being written.
    pub fn take(&self, idx: usize) -> Option<Arc<Batch>> {
        let mut shard = self.lock(idx);
        if shard.pending_entries == 0 {
            return None;
        }
        let batch = Arc::new(std::mem::take(&mut shard.pending));
        shard.pending_entries = 0;
        shard.oldest = None;
        shard.in_flight.push(batch.clone());
        Some(batch)
    }

    /// The batch's write failed: its entries go back to pending, to be written again. Where the
    /// same (key, provider) was announced again meanwhile, the later expiry wins and the older
    /// copy stops counting; nothing is lost and nothing is counted twice.
    pub fn requeue(&self, idx: usize, batch: &Arc<Batch>) {
        let mut guard = self.lock(idx);
        let shard = &mut *guard;
        shard.in_flight.retain(|b| !Arc::ptr_eq(b, batch));
        let (mut duplicates, mut dropped_bytes) = (0, 0);
        for (key, by_peer) in batch.iter() {
            let slot = shard.pending.entry(key.clone()).or_default();
            for (peer, p) in by_peer {
                match slot.entry(*peer) {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        // One of the two copies stops counting: the one that is not kept.
                        if e.get().expires_at < p.expires_at {
                            dropped_bytes += entry_bytes(key, e.get());
                            e.insert(p.clone());
                        } else {
                            dropped_bytes += entry_bytes(key, p);
                        }
                        duplicates += 1;
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(p.clone());
                        shard.pending_entries += 1;
                    }
                }
            }
        }
        shard.oldest.get_or_insert_with(Instant::now);
        drop(guard);
        self.entries.fetch_sub(duplicates, Ordering::Relaxed);
        self.bytes.fetch_sub(dropped_bytes, Ordering::Relaxed);
    }

    /// The batch's write finished (or failed): release its entries. `before_release` runs after
    /// the epoch moved and before the entries stop being visible (cache invalidation goes there).
    pub fn complete(&self, idx: usize, batch: &Arc<Batch>, before_release: impl FnOnce()) -> usize {
        self.epochs[idx].fetch_add(1, Ordering::AcqRel);
        before_release();
        let n: usize = batch.values().map(|m| m.len()).sum();
        let bytes: usize = batch.iter().flat_map(|(k, m)| m.values().map(move |p| entry_bytes(k, p))).sum();
        self.lock(idx).in_flight.retain(|b| !Arc::ptr_eq(b, batch));
        self.entries.fetch_sub(n, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        n
    }
}

/// Rows of a batch as the store writes them.
pub fn rows(batch: &Batch) -> Vec<ProviderWrite> {
    batch
        .iter()
        .flat_map(|(key, by_peer)| {
            by_peer.iter().map(move |(peer, p)| ProviderWrite {
                key: key.clone(),
                provider: *peer,
                addrs: p.addrs.to_vec(),
                expires_at: p.expires_at,
                addrs_expire_at: p.addrs_expire_at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_is_requeued_without_loss_or_double_counting() {
        let buf = WriteBuffer::new(100, usize::MAX, 10);
        let key = ProviderKey::new(vec![1; 34]).unwrap();
        let (a, b) = (PeerId::random(), PeerId::random());
        let p = |expires_at| Pending { addrs: Arc::from([]), expires_at, addrs_expire_at: expires_at };
        buf.add(key.clone(), a, p(100)).unwrap();
        buf.add(key.clone(), b, p(100)).unwrap();
        let idx = buf.shard_of(&key);
        let batch = buf.take(idx).unwrap();
        // While the write is in flight, `a` announces again (a new entry beside the batch's).
        buf.add(key.clone(), a, p(200)).unwrap();
        assert_eq!(buf.entries(), 3);
        buf.requeue(idx, &batch);
        assert_eq!(buf.entries(), 2, "a's two copies count once");
        assert_eq!(buf.pending(idx), 2);
        let again = buf.take(idx).unwrap();
        assert_eq!(again[&key][&a].expires_at, 200, "the later announcement wins");
        assert_eq!(again[&key][&b].expires_at, 100, "nothing of the failed batch is lost");
        buf.complete(idx, &again, || {});
        assert_eq!(buf.entries(), 0);
        assert_eq!(buf.bytes(), 0, "every byte charged is released");
    }

    #[test]
    fn refused_adds_leave_nothing_behind() {
        let b = WriteBuffer::new(1, usize::MAX, 100);
        let p = Pending { addrs: Arc::from([]), expires_at: i64::MAX, addrs_expire_at: i64::MAX };
        let peer = PeerId::random();
        b.add(ProviderKey::new(vec![0]).unwrap(), peer, p.clone()).unwrap();
        for i in 1..=1000u32 {
            let key = ProviderKey::new(i.to_be_bytes().to_vec()).unwrap();
            assert_eq!(b.add(key, peer, p.clone()), Err(Full));
        }
        let keys: usize = (0..SHARDS).map(|i| b.lock(i).pending.len()).sum();
        assert_eq!(keys, 1, "refused keys must not stay in the buffer's maps");
        assert_eq!(b.entries(), 1);
    }

    #[test]
    fn the_buffer_is_bounded_in_bytes() {
        // Room for about 10 entries with 32 addresses of 1 KiB each.
        let buf = WriteBuffer::new(1000, 10 * (160 + 34 + 32 * (48 + 1024)), 1000);
        let big: Arc<[Multiaddr]> = (0..32)
            .map(|i| format!("/dns4/{}{i:03}.example/tcp/1", "a".repeat(1000)).parse().unwrap())
            .collect::<Vec<Multiaddr>>()
            .into();
        assert!(big.iter().all(|a| a.len() >= 1000));
        let p = Pending { addrs: big, expires_at: i64::MAX, addrs_expire_at: i64::MAX };
        let peer = PeerId::random();
        let mut added = 0;
        for i in 0..100u32 {
            let key = ProviderKey::new([i.to_be_bytes().to_vec(), vec![0; 30]].concat()).unwrap();
            if buf.add(key, peer, p.clone()).is_ok() {
                added += 1;
            }
        }
        assert!((5..=10).contains(&added), "{added} entries of 32 KiB admitted");
        assert!(buf.bytes() <= buf.byte_limit);
        // Small entries still fit after the big ones are written.
        for idx in 0..SHARDS {
            if let Some(b) = buf.take(idx) {
                buf.complete(idx, &b, || {});
            }
        }
        assert_eq!((buf.entries(), buf.bytes()), (0, 0));
        let small = Pending { addrs: Arc::from([]), expires_at: i64::MAX, addrs_expire_at: i64::MAX };
        for i in 0..500u32 {
            let key = ProviderKey::new(i.to_be_bytes().to_vec()).unwrap();
            buf.add(key, peer, small.clone()).expect("small entries fit");
        }
    }
}
