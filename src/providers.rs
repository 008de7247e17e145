//! The provider manager: one per process, shared by every head.
//!
//! It owns the write-behind buffer ([`buffer`]), the read path ([`reads`]: shared cache,
//! single-flight, batched lookups), garbage collection and record-count estimates over a
//! [`Store`], and the validation of value records ([`records`]). It does not own SQL (the store
//! does) or the wire format ([`crate::net::wire`]), and it never calls into `net` or a swarm.
//! Nothing here holds a lock across an `.await`; every background task is bounded.
//!
//! **Writes.** `add_provider` buffers the record in one of [`buffer::SHARDS`] shards keyed by
//! (key, provider), so repeated announcements coalesce. A shard is flushed as one batched write
//! when it holds `flush_batch` entries or its oldest entry is `flush_interval` old; at most
//! `max_flushes_in_flight` flushes run at once (one on the embedded store, which has one
//! writer). At `write_buffer_entries` (pending plus being written) `add_provider` is refused and
//! counted: memory never grows past it.
//!
//! **Crash loss.** Accepted records still buffered are lost on a crash: at most
//! `write_buffer_entries`, in steady state about `flush_interval` worth of announcements. A
//! graceful shutdown flushes everything ([`ProviderManager::shutdown`]). A failed flush is logged
//! and counted (`hydra_providers_flush_failures_total`); its rows go back to the buffer and are
//! written again after a backoff (100 ms doubling to 2 s), so a datastore outage loses nothing the
//! buffer can hold; while the buffer is full, new announcements are shed and counted. Records
//! still buffered when a shutdown finds the datastore down are logged (ERROR) with their count.
//!
//! **Reads.** `get_providers` = cached-or-looked-up datastore answer ∪ this process's buffered and
//! in-flight writes, within `read_deadline`; when the deadline passes or too many lookups are
//! pending, the read is shed and the caller answers with closer peers only.

pub mod buffer;
pub mod ipns;
pub mod reads;
pub mod records;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::buffer::{Full, Pending, WriteBuffer, SHARDS};
use self::reads::{ReadConfig, Reads};
use crate::config::ProvidersSection;
use crate::metrics::{ProviderMetrics, ShedReason};
use crate::store::{ms_after, now_ms, Store};
use crate::types::{PeerRecord, ProviderKey, ValueRecord};

/// What a read answers for one key: this process's buffered entries (`local`, then those of
/// `earlier`, read before the datastore answer, that are not in it) and a random sample of the
/// datastore's `stored` answer, at most `cap` in all and no provider twice (a buffered entry
/// wins: it is this process's newest write). `stored` holds one row per provider; when more of
/// it than fits remains, the entries taken are chosen afresh per call, so replies served from one
/// cached answer cover all of it (docs/decisions/2026-12-01-fair-provider-sampling.md).
fn sample_merge(
    mut out: Vec<PeerRecord>,
    earlier: &[PeerRecord],
    stored: &[PeerRecord],
    cap: usize,
) -> Vec<PeerRecord> {
    for r in earlier {
        if out.len() < cap && !out.iter().any(|o| o.peer == r.peer) {
            out.push(r.clone());
        }
    }
    out.truncate(cap);
    let local: HashSet<PeerId> = out.iter().map(|r| r.peer).collect();
    let room = cap - out.len();
    if stored.len() <= room {
        out.extend(stored.iter().filter(|r| !local.contains(&r.peer)).cloned());
    } else {
        // `room + local` distinct candidates hold at least `room` that are not buffered.
        let n = (room + local.len()).min(stored.len());
        let picks = rand::seq::index::sample(&mut rand::thread_rng(), stored.len(), n);
        out.extend(
            picks.into_iter().map(|i| &stored[i]).filter(|r| !local.contains(&r.peer)).take(room).cloned(),
        );
    }
    out
}

/// A batch taken from the buffer whose flush has not settled it (written or requeued). Dropped
/// unsettled — the flush task panicked — it puts the rows back in the buffer, so a bug costs a
/// retry, not the records or the buffer's space.
struct Unsettled {
    manager: ProviderManager,
    idx: usize,
    batch: Option<Arc<buffer::Batch>>,
}

impl Unsettled {
    fn settled(mut self) {
        self.batch = None;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            tracing::error!(
                shard = self.idx,
                "a provider flush ended without settling its batch; rows requeued"
            );
            self.manager.inner.metrics.flushes_failed.inc();
            self.manager.inner.buffer.requeue(self.idx, &batch);
        }
    }
}

/// Exponential backoff between failed flushes: 100 ms, doubling to 2 s; reset by a success.
#[derive(Default)]
struct Backoff(std::sync::Mutex<Option<(tokio::time::Instant, Duration)>>);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    /// A flush failed: the delay before the next attempt.
    fn failed(&self) -> Duration {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let delay = s.map_or(Self::FIRST, |(_, d)| (d * 2).min(Self::MAX));
        *s = Some((tokio::time::Instant::now() + delay, delay));
        delay
    }

    fn succeeded(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether flushes may be attempted now.
    fn ready(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|(at, _)| tokio::time::Instant::now() >= at)
    }
}

/// Datastore lookups one `get_providers` makes at most when its answers raced a flush.
const READ_ATTEMPTS: u32 = 3;

/// A request the manager deliberately did not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shed: {}", .0.as_str())]
pub struct Shed(pub ShedReason);

struct Inner {
    store: Store,
    cfg: ProvidersSection,
    /// Cap of providers one read answers for a key (`limits.max_providers_per_reply`).
    per_reply: usize,
    buffer: Arc<WriteBuffer>,
    reads: Arc<Reads>,
    flush_permits: Arc<Semaphore>,
    /// The permits `flush_permits` holds: `max_flushes_in_flight`, or fewer if the backend writes
    /// with fewer connections ([`Store::max_parallel_writes`]).
    flush_slots: usize,
    value_permits: Semaphore,
    flush_wanted: Notify,
    /// After a failed flush, the flusher waits before the next attempt.
    backoff: Backoff,
    metrics: ProviderMetrics,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Expiry last written by this process per (key, provider) hash: lets `degrade` skip
    /// refreshes of records far from expiry. Bounded (`recent_writes_entries`).
    recent: quick_cache::sync::Cache<u64, i64>,
    /// Each peer's last announced addresses, so its buffered entries share one copy.
    addr_book: quick_cache::sync::Cache<PeerId, Arc<[libp2p::Multiaddr]>, AddrBytes>,
    hasher: std::collections::hash_map::RandomState,
}

/// Peers and bytes the address book holds (it only saves memory: a peer it forgot gets a copy
/// of its own again).
const ADDR_BOOK_PEERS: usize = 65_536;
const ADDR_BOOK_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes one remembered write costs in `recent` (a heap profile of a soak: 20 MiB for its
/// 262,144 entries); reported, not enforced — that cache is bounded in entries.
const RECENT_ENTRY_BYTES: usize = 80;

#[derive(Clone)]
struct AddrBytes;

impl quick_cache::Weighter<PeerId, Arc<[libp2p::Multiaddr]>> for AddrBytes {
    fn weight(&self, _: &PeerId, addrs: &Arc<[libp2p::Multiaddr]>) -> u64 {
        (64 + addrs.iter().map(crate::types::addr_bytes).sum::<usize>()) as u64
    }
}

/// Cheap-to-clone handle to the process's provider manager.
#[derive(Clone)]
pub struct ProviderManager {
    inner: Arc<Inner>,
}

impl ProviderManager {
    /// Datastore statements one buffered announcement costs: its part of a full flush (a
    /// flush is 2 statements for up to `flush_batch` entries).
    pub fn statements_per_write(&self) -> f64 {
        2.0 / self.inner.cfg.flush_batch.max(1) as f64
    }

    /// Start the manager and its background tasks (flusher, lookup batcher, GC, counts).
    /// `per_reply` caps the providers one read answers; the datastore is asked for
    /// `cfg.sample_per_key` (at least `per_reply`), from which each read samples.
    pub fn start(store: Store, cfg: ProvidersSection, per_reply: usize, metrics: ProviderMetrics) -> Self {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let buffer =
            Arc::new(WriteBuffer::new(cfg.write_buffer_entries, cfg.write_buffer_bytes, cfg.flush_batch));
        let (reads, batcher) = Reads::new(
            ReadConfig {
                cache_entries: cfg.cache_entries,
                cache_bytes: cfg.cache_bytes,
                cache_ttl: cfg.cache_ttl,
                negative_ttl: cfg.negative_cache_ttl,
                max_pending: cfg.max_reads_in_flight,
                batch_keys: cfg.read_batch_keys,
                max_queries: cfg.max_read_queries,
                per_key: cfg.sample_per_key.max(per_reply),
            },
            store.clone(),
            buffer.clone(),
            metrics.clone(),
            cancel.clone(),
        );
        tasks.spawn(batcher);
        let flushes = store
            .max_parallel_writes()
            .map_or(cfg.max_flushes_in_flight, |n| n.min(cfg.max_flushes_in_flight));
        let inner = Arc::new(Inner {
            store,
            per_reply,
            buffer,
            reads,
            flush_permits: Arc::new(Semaphore::new(flushes)),
            flush_slots: flushes,
            value_permits: Semaphore::new(cfg.max_read_queries),
            flush_wanted: Notify::new(),
            backoff: Backoff::default(),
            metrics,
            cancel,
            tasks,
            recent: quick_cache::sync::Cache::new(cfg.recent_writes_entries),
            addr_book: quick_cache::sync::Cache::with_weighter(ADDR_BOOK_PEERS, ADDR_BOOK_BYTES, AddrBytes),
            hasher: Default::default(),
            cfg,
        });
        // The byte budgets are fixed for the life of the manager: published once.
        let limits = [
            ("provider_cache", inner.cfg.cache_bytes),
            ("write_buffer", inner.cfg.write_buffer_bytes as u64),
            ("address_book", ADDR_BOOK_BYTES),
            ("recent_writes", (inner.cfg.recent_writes_entries * RECENT_ENTRY_BYTES) as u64),
        ];
        for (part, bytes) in limits {
            inner.metrics.memory_limit.with_label_values(&[part]).set(bytes as i64);
        }
        let this = Self { inner };
        this.inner.tasks.spawn(this.clone().flusher());
        this.inner.tasks.spawn(this.clone().collector());
        this.inner.tasks.spawn(this.clone().counter());
        this
    }

    fn shed(&self, r: ShedReason) -> Shed {
        self.inner.metrics.shed.with_label_values(&[r.as_str()]).inc();
        Shed(r)
    }

    /// Buffer one provider record. `Err(Shed)` if the buffer is full.
    pub fn add_provider(&self, key: ProviderKey, record: PeerRecord) -> Result<(), Shed> {
        self.add_provider_unless_fresh(key, record, None).map(|_| ())
    }

    /// Like [`Self::add_provider`], but with `skip_if_remaining = Some(d)` a refresh of a record
    /// this process wrote that still has more than `d` to live is acknowledged without a write.
    /// Returns whether the record was buffered.
    pub fn add_provider_unless_fresh(
        &self,
        key: ProviderKey,
        record: PeerRecord,
        skip_if_remaining: Option<Duration>,
    ) -> Result<bool, Shed> {
        let inner = &self.inner;
        let now = now_ms();
        if let Some(d) = skip_if_remaining {
            let written = inner.recent.get(&self.pair_hash(&key, &record.peer));
            if written.is_some_and(|expires| expires > ms_after(now, d)) {
                inner.metrics.refreshes_skipped.inc();
                return Ok(false);
            }
        }
        let pending = Pending {
            addrs: self.shared_addrs(record.peer, record.addrs),
            expires_at: ms_after(now, inner.cfg.record_ttl),
            addrs_expire_at: ms_after(now, inner.cfg.address_ttl),
        };
        match inner.buffer.add(key, record.peer, pending) {
            Ok(due) => {
                inner.metrics.write_buffer_entries.set(inner.buffer.entries() as i64);
                if due {
                    inner.flush_wanted.notify_one();
                }
                Ok(true)
            }
            Err(Full) => Err(self.shed(ShedReason::WriteBufferFull)),
        }
    }

    /// Unexpired providers of `key` (at most `max_providers_per_reply`; a random sample of the
    /// stored answer when more are stored).
    ///
    /// Read-your-writes: every provider buffered by this process before the call is in the answer.
    /// The buffer is read before and after the datastore answer, so an entry that leaves the buffer
    /// meanwhile is still seen; one that left before the call was committed before it, and an
    /// answer from a query that may have started earlier (a shared lookup) is flagged as raced and
    /// asked for again, up to [`READ_ATTEMPTS`] times within the one `read_deadline`.
    pub async fn get_providers(&self, key: &ProviderKey) -> Result<Vec<PeerRecord>, Shed> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.cfg.read_deadline;
        let mut attempt = 1;
        let (before, stored) = loop {
            let before = inner.buffer.local(key, inner.per_reply);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answer = inner.reads.get(key, left).await.map_err(|r| self.shed(r))?;
            if !answer.raced || attempt == READ_ATTEMPTS {
                break (before, answer.providers);
            }
            attempt += 1;
        };
        Ok(sample_merge(inner.buffer.local(key, inner.per_reply), &before, &stored, inner.per_reply))
    }

    /// Providers of `key` known without asking the datastore: a cached answer merged with this
    /// process's buffered writes. `None` when the cache has no answer and nothing is buffered.
    pub fn get_providers_cached(&self, key: &ProviderKey) -> Option<Vec<PeerRecord>> {
        self.cached(key, true).or_else(|| {
            let buffered = self.inner.buffer.local(key, self.inner.per_reply);
            (!buffered.is_empty()).then_some(buffered)
        })
    }

    /// A cached datastore answer for `key` merged with this process's buffered writes: what
    /// [`Self::get_providers`] would answer without a lookup. `None` on a cache miss, which is
    /// not counted here (the lookup that follows counts it).
    pub fn cached_answer(&self, key: &ProviderKey) -> Option<Vec<PeerRecord>> {
        self.cached(key, false)
    }

    /// The cached answer merged with buffered writes; `None` on a cache miss.
    fn cached(&self, key: &ProviderKey, count_miss: bool) -> Option<Vec<PeerRecord>> {
        let inner = &self.inner;
        let stored = inner.reads.peek(key, count_miss)?;
        Some(sample_merge(inner.buffer.local(key, inner.per_reply), &[], &stored, inner.per_reply))
    }

    /// (entries buffered or being written, `write_buffer_entries`).
    pub fn write_buffer_fill(&self) -> (usize, usize) {
        (self.inner.buffer.entries(), self.inner.cfg.write_buffer_entries)
    }

    /// (provider records, peers with addresses) in the datastore, as last estimated.
    pub fn estimates(&self) -> (f64, f64) {
        (self.inner.metrics.records_estimate.get(), self.inner.metrics.peers_estimate.get())
    }

    /// (entries, bytes) in the provider cache; the bytes never exceed `cache_bytes`.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.reads.cache_usage()
    }

    /// (keys queued for or in a lookup, `max_reads_in_flight`).
    pub fn reads_in_flight(&self) -> (usize, usize) {
        (self.inner.reads.pending(), self.inner.cfg.max_reads_in_flight)
    }

    /// `addrs` as one shared copy: the one already in the address book when a peer announces
    /// the same addresses again (a peer providing 1,000 keys holds one copy, not 1,000).
    fn shared_addrs(&self, peer: PeerId, addrs: Vec<libp2p::Multiaddr>) -> Arc<[libp2p::Multiaddr]> {
        let book = &self.inner.addr_book;
        if let Some(known) = book.get(&peer).filter(|k| **k == addrs[..]) {
            return known;
        }
        let shared: Arc<[libp2p::Multiaddr]> = addrs.into();
        book.insert(peer, shared.clone());
        shared
    }

    fn pair_hash(&self, key: &ProviderKey, peer: &libp2p::PeerId) -> u64 {
        use std::hash::BuildHasher;
        self.inner.hasher.hash_one((key, peer))
    }

    /// Store a value record that passed [`records::validate`] (written through; values are
    /// rare). `Ok(false)`: a better record of the name is stored (higher sequence, or the same
    /// and a later validity), which stays. An IPNS record expires at its end of validity, if
    /// that comes before `value_ttl`.
    pub async fn put_value(&self, record: &ValueRecord, v: records::Validated) -> Result<bool, Shed> {
        self.value_op(self.inner.store.put_value(record, self.inner.cfg.value_ttl, v.eol_ms, v.order)).await
    }

    pub async fn get_value(&self, key: &[u8]) -> Result<Option<ValueRecord>, Shed> {
        self.value_op(self.inner.store.get_value(key)).await
    }

    async fn value_op<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, Shed> {
        // At most `max_read_queries` value operations run at once; the rest wait for a slot,
        // all within one deadline (waiting callers are bounded by the stream tasks).
        let work = async {
            let _permit = self.inner.value_permits.acquire().await;
            op.await
        };
        match tokio::time::timeout(self.inner.cfg.read_deadline, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "value operation failed");
                Err(self.shed(ShedReason::DatastoreError))
            }
            Err(_) => Err(self.shed(ShedReason::ReadDeadline)),
        }
    }

    /// Refresh gauges that are sampled rather than counted (called at scrape time).
    pub fn refresh_gauges(&self) {
        let inner = &self.inner;
        inner.store.refresh_pool_gauges();
        let used = [
            ("provider_cache", inner.reads.cache_usage().1),
            ("write_buffer", inner.buffer.bytes() as u64),
            ("address_book", inner.addr_book.weight()),
            ("recent_writes", (inner.recent.len() * RECENT_ENTRY_BYTES) as u64),
        ];
        for (part, bytes) in used {
            inner.metrics.memory.with_label_values(&[part]).set(bytes as i64);
        }
    }

    /// Entries buffered or being written.
    pub fn buffered(&self) -> usize {
        self.inner.buffer.entries()
    }

    /// Flush every shard now and wait until all writes (also earlier ones) have completed.
    pub async fn flush(&self) {
        for idx in 0..SHARDS {
            self.flush_shard(idx).await;
        }
        // Every flush holds a permit; owning all of them means none is running.
        let all = self.inner.flush_slots as u32;
        if let Ok(p) = self.inner.flush_permits.acquire_many(all).await {
            drop(p);
        }
    }

    /// Stop the background tasks, flush everything buffered, and close the store.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.flush().await;
        let left = self.inner.buffer.entries();
        if left > 0 {
            tracing::error!(
                records = left,
                "datastore unavailable at shutdown: buffered provider records lost"
            );
        }
        self.inner.store.close().await;
    }

    /// Write shard `idx`'s pending entries as one batch, once a flush slot is free.
    async fn flush_shard(&self, idx: usize) {
        let Ok(permit) = self.inner.flush_permits.clone().acquire_owned().await else { return };
        if self.inner.buffer.pending(idx) == 0 {
            return;
        }
        // Two statements; whatever is buffered while the budget makes us wait joins this batch.
        self.inner.store.budget().take(2).await;
        let Some(batch) = self.inner.buffer.take(idx) else { return };
        let this = self.clone();
        // Not in `tasks`: `flush` waits for these through the permits.
        tokio::spawn(async move {
            let guard = Unsettled { manager: this.clone(), idx, batch: Some(batch.clone()) };
            let inner = &this.inner;
            let rows = buffer::rows(&batch);
            inner.metrics.flush_rows.observe(rows.len() as f64);
            match inner.store.put_providers(&rows).await {
                Ok(()) => {
                    for r in &rows {
                        inner.recent.insert(this.pair_hash(&r.key, &r.provider), r.expires_at);
                    }
                }
                Err(e) => {
                    // Accepted means kept: the rows go back to the (bounded) buffer and are
                    // written again after a backoff; only the buffer's bound sheds new ones.
                    let retry_in = inner.backoff.failed();
                    tracing::warn!(
                        error = %e,
                        rows = rows.len(),
                        ?retry_in,
                        "provider flush failed; rows kept in the buffer for a retry"
                    );
                    inner.metrics.flushes_failed.inc();
                    guard.settled();
                    inner.buffer.requeue(idx, &batch);
                    drop(permit);
                    return;
                }
            }
            inner.backoff.succeeded();
            guard.settled();
            inner.buffer.complete(idx, &batch, || inner.reads.invalidate(batch.keys()));
            inner.metrics.write_buffer_entries.set(inner.buffer.entries() as i64);
            drop(permit);
        });
    }

    /// Flushes shards that are full or whose oldest entry is older than `flush_interval`.
    async fn flusher(self) {
        let interval = self.inner.cfg.flush_interval;
        let tick = (interval / 4).max(Duration::from_millis(5));
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = self.inner.flush_wanted.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            if !self.inner.backoff.ready() {
                continue; // the datastore failed a flush: wait before trying again
            }
            for idx in 0..SHARDS {
                if self.inner.buffer.due(idx, interval) {
                    tokio::select! {
                        _ = self.inner.cancel.cancelled() => return,
                        _ = self.flush_shard(idx) => {}
                    }
                }
            }
        }
    }

    /// Every `gc_interval`: one GC round if this process holds the fleet's GC lease.
    async fn collector(self) {
        let cfg = &self.inner.cfg;
        let m = &self.inner.metrics;
        loop {
            let round = self.inner.store.gc_round(cfg.gc_chunk_rows, cfg.gc_chunk_pages);
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                res = round => match res {
                    Ok(Some(n)) => {
                        m.gc_leader.set(1);
                        m.gc_deleted_rows.inc_by(n);
                        m.gc_last_run.set(unix_seconds());
                    }
                    Ok(None) => m.gc_leader.set(0),
                    Err(e) => {
                        m.gc_leader.set(0);
                        tracing::warn!(error = %e, "garbage collection failed");
                    }
                },
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(cfg.gc_interval) => {}
            }
        }
    }

    /// Every `count_interval`: refresh the record-count estimates.
    async fn counter(self) {
        let m = &self.inner.metrics;
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                res = self.inner.store.estimate_counts() => match res {
                    Ok((records, peers)) => {
                        m.records_estimate.set(records);
                        m.peers_estimate.set(peers);
                    }
                    Err(e) => tracing::warn!(error = %e, "record count estimate failed"),
                },
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.inner.cfg.count_interval) => {}
            }
        }
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
