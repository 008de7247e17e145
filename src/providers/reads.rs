//! The read path: one shared bounded cache, single-flight per key, and batched lookups.
//!
//! A miss registers the caller as a waiter for its key; only the first waiter of a key enqueues
//! it, so concurrent reads of one key share one lookup. A batcher takes queued keys, waits for one
//! of `max_read_queries` query slots, then drains whatever else queued meanwhile (up to
//! `read_batch_keys`) into one statement: under load batches grow, at rest a key waits for nothing.
//! At most `max_reads_in_flight` distinct keys are queued or being looked up; beyond that a read is
//! shed. Callers wait at most `read_deadline`; a late answer still fills the cache.
//!
//! Coherence: the cache holds datastore answers only; the caller merges this process's buffered
//! and in-flight writes on top, and a completed flush evicts its keys. An answer whose query raced
//! a completed flush of the same shard is not cached and is marked [`Answer::raced`]: the rows of
//! that flush may be missing from it although they already left the buffer, so the caller asks
//! again (see `ProviderManager::get_providers`). Writes by other processes become visible when a
//! cached entry expires (`cache_ttl`, `negative_cache_ttl`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::buffer::{WriteBuffer, SHARDS};
use crate::metrics::{CacheResult, ProviderMetrics, ShedReason};
use crate::sharded::Sharded;
use crate::store::Store;
use crate::types::{PeerRecord, ProviderKey};

pub type Providers = Arc<Vec<PeerRecord>>;

/// A datastore answer for one key.
#[derive(Clone)]
pub struct Answer {
    pub providers: Providers,
    /// A flush of the key's shard completed while the query ran: rows it wrote may be missing.
    pub raced: bool,
}

#[derive(Clone)]
struct Cached {
    providers: Providers,
    until: Instant,
    /// What the entry costs in memory, charged against `cache_bytes`.
    bytes: u64,
}

impl Cached {
    fn new(key: &ProviderKey, providers: Providers, until: Instant) -> Self {
        // The cache's slot (key, value, links) and the `Arc<Vec<_>>` header.
        const ENTRY: usize = std::mem::size_of::<ProviderKey>() + std::mem::size_of::<Cached>() + 48 + 40;
        let bytes = ENTRY
            + key.as_bytes().len()
            + (providers.capacity() - providers.len()) * std::mem::size_of::<PeerRecord>()
            + providers.iter().map(PeerRecord::memory_bytes).sum::<usize>();
        Self { providers, until, bytes: bytes as u64 }
    }
}

/// Keys of a lookup in progress. Dropped before the lookup finished (its task panicked), it fails
/// them, so their waiters are released and `pending` does not leak capacity.
struct Lookup {
    reads: Arc<Reads>,
    keys: Vec<ProviderKey>,
}

impl Drop for Lookup {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            tracing::error!(keys = self.keys.len(), "a provider lookup ended without an answer");
            self.reads.fail(std::mem::take(&mut self.keys));
        }
    }
}

/// Weighs cache entries by their bytes: the cache is bounded in bytes, not entries.
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<ProviderKey, Cached> for ByBytes {
    fn weight(&self, _key: &ProviderKey, v: &Cached) -> u64 {
        v.bytes
    }
}

pub struct Reads {
    cache: quick_cache::sync::Cache<ProviderKey, Cached, ByBytes>,
    /// Single-flight: the callers waiting for each key being looked up.
    waiting: Sharded<HashMap<ProviderKey, Vec<oneshot::Sender<Answer>>>>,
    queue: mpsc::Sender<ProviderKey>,
    /// Distinct keys queued or being looked up.
    pending: AtomicUsize,
    max_pending: usize,
    cache_ttl: Duration,
    negative_ttl: Duration,
    metrics: ProviderMetrics,
}

/// Settings of the read path.
pub struct ReadConfig {
    /// Expected number of cached keys (sizes the cache's index).
    pub cache_entries: usize,
    /// The cache's bound: entries are evicted before their bytes exceed it.
    pub cache_bytes: u64,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub max_pending: usize,
    pub batch_keys: usize,
    pub max_queries: usize,
    pub per_key: usize,
}

impl Reads {
    /// Create the read path; returns it and the batcher future to spawn.
    pub fn new(
        cfg: ReadConfig,
        store: Store,
        buffer: Arc<WriteBuffer>,
        metrics: ProviderMetrics,
        cancel: CancellationToken,
    ) -> (Arc<Self>, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(cfg.max_pending);
        let reads = Arc::new(Self {
            cache: quick_cache::sync::Cache::with_weighter(cfg.cache_entries, cfg.cache_bytes, ByBytes),
            waiting: Sharded::new(SHARDS, HashMap::new),
            queue: tx,
            pending: AtomicUsize::new(0),
            max_pending: cfg.max_pending,
            cache_ttl: cfg.cache_ttl,
            negative_ttl: cfg.negative_ttl,
            metrics,
        });
        let batcher = reads.clone().batcher(rx, store, buffer, cfg, cancel);
        (reads, batcher)
    }

    /// Stored providers of `key`: from the cache, or from one shared, batched lookup.
    pub async fn get(&self, key: &ProviderKey, deadline: Duration) -> Result<Answer, ShedReason> {
        if let Some(providers) = self.peek(key, true) {
            return Ok(Answer { providers, raced: false });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock_for(key);
            if let Some(w) = waiting.get_mut(key) {
                // Single-flight: join the lookup already under way (dropping waiters that gave up).
                w.retain(|s| !s.is_closed());
                w.push(tx);
            } else {
                if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    return Err(ShedReason::ReadsInFlight);
                }
                if self.queue.try_send(key.clone()).is_err() {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    return Err(ShedReason::ReadsInFlight);
                }
                waiting.insert(key.clone(), vec![tx]);
            }
        }
        self.metrics.reads_in_flight.set(self.pending.load(Ordering::Relaxed) as i64);
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ShedReason::DatastoreError),
            Err(_) => Err(ShedReason::ReadDeadline),
        }
    }

    /// The cached answer for `key`, without a lookup on a miss. Counted like any cache lookup,
    /// except a miss when `!count_miss` (the caller's own lookup will count it).
    pub fn peek(&self, key: &ProviderKey, count_miss: bool) -> Option<Providers> {
        let c = self.cache.get(key).filter(|c| c.until > Instant::now());
        let r = match &c {
            Some(c) if c.providers.is_empty() => CacheResult::NegativeHit,
            Some(_) => CacheResult::Hit,
            None if count_miss => CacheResult::Miss,
            None => return None,
        };
        self.metrics.cache.with_label_values(&[r.as_str()]).inc();
        c.map(|c| c.providers)
    }

    /// (entries, bytes) the cache holds.
    pub fn cache_usage(&self) -> (usize, u64) {
        (self.cache.len(), self.cache.weight())
    }

    /// Distinct keys queued for or in a lookup.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Drop cached answers for keys just written by this process.
    pub fn invalidate<'a>(&self, keys: impl Iterator<Item = &'a ProviderKey>) {
        for k in keys {
            self.cache.remove(k);
        }
    }

    async fn batcher(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<ProviderKey>,
        store: Store,
        buffer: Arc<WriteBuffer>,
        cfg: ReadConfig,
        cancel: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(cfg.max_queries));
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                k = rx.recv() => match k { Some(k) => k, None => return },
            };
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            // One statement of the budget; keys queued while it makes us wait join this batch.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = store.budget().take(1) => {}
            }
            let mut keys = vec![first];
            while keys.len() < cfg.batch_keys {
                match rx.try_recv() {
                    Ok(k) => keys.push(k),
                    Err(_) => break,
                }
            }
            let this = self.clone();
            let store = store.clone();
            let buffer = buffer.clone();
            let per_key = cfg.per_key;
            // Bounded by `slots`: at most `max_read_queries` of these run at once.
            tokio::spawn(async move {
                let epochs: Vec<u64> = keys.iter().map(|k| buffer.epoch(buffer.shard_of(k))).collect();
                let mut lookup = Lookup { reads: this.clone(), keys };
                let res = store.get_providers(&lookup.keys, per_key).await;
                this.finish(std::mem::take(&mut lookup.keys), epochs, res, &buffer);
                drop(permit);
            });
        }
    }

    fn finish(
        &self,
        keys: Vec<ProviderKey>,
        epochs: Vec<u64>,
        res: Result<Vec<(ProviderKey, PeerRecord)>, crate::store::StoreError>,
        buffer: &WriteBuffer,
    ) {
        let n = keys.len();
        match res {
            Ok(rows) => {
                let mut by_key: HashMap<ProviderKey, Vec<PeerRecord>> = HashMap::new();
                for (k, r) in rows {
                    by_key.entry(k).or_default().push(r);
                }
                let now = Instant::now();
                for (key, epoch) in keys.into_iter().zip(epochs) {
                    let mut found = by_key.remove(&key).unwrap_or_default();
                    found.shrink_to_fit(); // held in the cache: no spare capacity
                    let providers: Providers = Arc::new(found);
                    let shard = buffer.shard_of(&key);
                    let mut raced = buffer.epoch(shard) != epoch;
                    if !raced {
                        let ttl = if providers.is_empty() { self.negative_ttl } else { self.cache_ttl };
                        self.cache.insert(key.clone(), Cached::new(&key, providers.clone(), now + ttl));
                        // A flush that completed between the check and the insert may already have
                        // evicted this key: undo rather than cache a stale answer.
                        if buffer.epoch(shard) != epoch {
                            self.cache.remove(&key);
                            raced = true;
                        }
                    }
                    let answer = Answer { providers, raced };
                    let waiters = self.waiting.lock_for(&key).remove(&key).unwrap_or_default();
                    for w in waiters {
                        let _ = w.send(answer.clone());
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, keys = n, "provider lookup failed");
                return self.fail(keys);
            }
        }
        let left = self.pending.fetch_sub(n, Ordering::AcqRel) - n;
        self.metrics.reads_in_flight.set(left as i64);
    }

    /// A lookup of `keys` failed: every waiter learns it (its sender dropped) and the keys no
    /// longer count as pending.
    fn fail(&self, keys: Vec<ProviderKey>) {
        let n = keys.len();
        for key in keys {
            drop(self.waiting.lock_for(&key).remove(&key));
        }
        let left = self.pending.fetch_sub(n, Ordering::AcqRel) - n;
        self.metrics.reads_in_flight.set(left as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PostgresSection, StoreKind};

    #[tokio::test]
    async fn a_lookup_task_that_panics_releases_its_waiters_and_pending_keys() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::new(&prometheus::Registry::new(), 1);
        let store = Store::open(
            &StoreKind::Sqlite(dir.path().join("r.sqlite")),
            &PostgresSection::default(),
            metrics.datastore.clone(),
        )
        .await
        .unwrap();
        let cfg = ReadConfig {
            cache_entries: 16,
            cache_bytes: 1 << 20,
            cache_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_pending: 8,
            batch_keys: 8,
            max_queries: 1,
            per_key: 20,
        };
        let buffer = Arc::new(WriteBuffer::new(16, 1 << 20, 16));
        // The batcher is not run: the test plays the lookup task itself.
        let (reads, _batcher) =
            Reads::new(cfg, store, buffer, metrics.providers.clone(), CancellationToken::new());
        let key = ProviderKey::new(b"k".to_vec()).unwrap();
        let waiter = tokio::spawn({
            let (reads, key) = (reads.clone(), key.clone());
            async move { reads.get(&key, Duration::from_secs(30)).await.map(|_| ()) }
        });
        while reads.pending() == 0 {
            tokio::task::yield_now().await;
        }
        let task = tokio::spawn({
            let lookup = Lookup { reads: reads.clone(), keys: vec![key.clone()] };
            async move {
                let _lookup = lookup;
                panic!("injected: a lookup task panics before it answers");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        let answer = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("released at once");
        assert_eq!(answer.unwrap(), Err(ShedReason::DatastoreError));
        assert_eq!(reads.pending(), 0, "no pending capacity leaked");
        assert!(reads.waiting.lock_for(&key).get(&key).is_none(), "no dead lookup left to join");
    }
}
