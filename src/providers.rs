//! The provider manager: one per process, shared by every head.
//!
//! It owns the write-behind buffer, read admission and garbage collection over a [`Store`]; it
//! does not own the SQL (the store does) or the wire format (the server does).
//!
//! **Writes.** `add_provider` puts the record into one of [`SHARDS`] buffer shards, each a map
//! keyed by (key, provider) under a std `Mutex` held only for a map operation (never across an
//! `.await`), so repeated announcements coalesce and no lock is global. A shard is flushed as one
//! batched write when it holds `flush_batch` entries or its oldest entry is `flush_interval` old;
//! at most `max_flushes_in_flight` flushes run at once. Entries count against
//! `write_buffer_entries` from the moment they are buffered until their flush completes; at the
//! limit `add_provider` is refused (counted) — memory never grows past it.
//!
//! **Crash loss.** Acknowledged records still in the buffer are lost on a crash: at most
//! `write_buffer_entries` records, and in steady state about `flush_interval` worth of
//! announcements. A graceful shutdown flushes everything ([`ProviderManager::shutdown`]). A flush
//! that fails is counted (`hydra_providers_flush_failures_total`) and its rows are dropped; clients
//! re-announce every 22 h.
//!
//! **Reads.** `get_providers` merges the datastore's unexpired rows with this process's buffered
//! and in-flight writes (read-your-writes across heads). At most `max_reads_in_flight` datastore
//! reads run at once and each has `read_deadline`; beyond either the read is shed and the caller
//! answers with closer peers only.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProvidersSection;
use crate::metrics::{ProviderMetrics, ShedReason};
use crate::store::{ms_after, now_ms, ProviderWrite, Store};
use crate::types::{PeerRecord, ProviderKey, ValueRecord};

/// Number of buffer shards. More shards than cores keeps lock hold times uncontended.
pub const SHARDS: usize = 16;

/// A request the manager deliberately did not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shed: {}", .0.as_str())]
pub struct Shed(pub ShedReason);

#[derive(Debug, Clone)]
struct Pending {
    addrs: Vec<Multiaddr>,
    expires_at: i64,
    addrs_expire_at: i64,
}

type Batch = HashMap<ProviderKey, HashMap<PeerId, Pending>>;

#[derive(Default)]
struct Shard {
    /// Buffered, not yet handed to a flush.
    pending: Batch,
    pending_entries: usize,
    /// When the oldest pending entry arrived.
    oldest: Option<Instant>,
    /// Batches being written; still visible to reads until the write completes.
    in_flight: Vec<Arc<Batch>>,
}

struct Inner {
    store: Store,
    cfg: ProvidersSection,
    /// `max_providers_per_reply`: the cap of one read.
    per_key: usize,
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Entries pending or in flight, over all shards.
    entries: AtomicUsize,
    flush_permits: Arc<Semaphore>,
    read_permits: Arc<Semaphore>,
    flush_wanted: Notify,
    metrics: ProviderMetrics,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Cheap-to-clone handle to the process's provider manager.
#[derive(Clone)]
pub struct ProviderManager {
    inner: Arc<Inner>,
}

impl ProviderManager {
    /// Start the manager and its background flusher and garbage collector.
    pub fn start(store: Store, cfg: ProvidersSection, per_key: usize, metrics: ProviderMetrics) -> Self {
        let inner = Arc::new(Inner {
            store,
            per_key,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            entries: AtomicUsize::new(0),
            flush_permits: Arc::new(Semaphore::new(cfg.max_flushes_in_flight)),
            read_permits: Arc::new(Semaphore::new(cfg.max_reads_in_flight)),
            flush_wanted: Notify::new(),
            metrics,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cfg,
        });
        let this = Self { inner };
        this.inner.tasks.spawn(this.clone().flusher());
        this.inner.tasks.spawn(this.clone().collector());
        this
    }

    fn shard_of(&self, key: &ProviderKey) -> usize {
        (self.inner.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Buffer one provider record. Returns `Err(Shed)` if the buffer is full.
    pub fn add_provider(&self, key: ProviderKey, record: PeerRecord) -> Result<(), Shed> {
        let inner = &self.inner;
        let now = now_ms();
        let pending = Pending {
            addrs: record.addrs,
            expires_at: ms_after(now, inner.cfg.record_ttl),
            addrs_expire_at: ms_after(now, inner.cfg.address_ttl),
        };
        let idx = self.shard_of(&key);
        let full;
        {
            // Critical section: one map update, no await.
            let mut shard = inner.shards[idx].lock().expect("shard lock poisoned");
            let by_peer = shard.pending.entry(key).or_default();
            if let Some(existing) = by_peer.get_mut(&record.peer) {
                *existing = pending; // coalesced: no new entry
                return Ok(());
            }
            if inner.entries.load(Ordering::Relaxed) >= inner.cfg.write_buffer_entries {
                drop(shard);
                inner.metrics.shed.with_label_values(&[ShedReason::WriteBufferFull.as_str()]).inc();
                return Err(Shed(ShedReason::WriteBufferFull));
            }
            by_peer.insert(record.peer, pending);
            shard.pending_entries += 1;
            shard.oldest.get_or_insert_with(Instant::now);
            full = shard.pending_entries >= inner.cfg.flush_batch;
        }
        let n = inner.entries.fetch_add(1, Ordering::Relaxed) + 1;
        inner.metrics.write_buffer_entries.set(n as i64);
        if full {
            inner.flush_wanted.notify_one();
        }
        Ok(())
    }

    /// Unexpired providers of `key`, from the datastore merged with local buffered writes.
    pub async fn get_providers(&self, key: &ProviderKey) -> Result<Vec<PeerRecord>, Shed> {
        let inner = &self.inner;
        let local = self.local_providers(key);
        let Ok(_permit) = inner.read_permits.try_acquire() else {
            inner.metrics.shed.with_label_values(&[ShedReason::ReadsInFlight.as_str()]).inc();
            return Err(Shed(ShedReason::ReadsInFlight));
        };
        inner.metrics.reads_in_flight.inc();
        let res = tokio::time::timeout(
            inner.cfg.read_deadline,
            inner.store.get_providers(std::slice::from_ref(key), now_ms(), inner.per_key),
        )
        .await;
        inner.metrics.reads_in_flight.dec();
        let stored = match res {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "provider read failed");
                inner.metrics.shed.with_label_values(&[ShedReason::DatastoreError.as_str()]).inc();
                return Err(Shed(ShedReason::DatastoreError));
            }
            Err(_) => {
                inner.metrics.shed.with_label_values(&[ShedReason::ReadDeadline.as_str()]).inc();
                return Err(Shed(ShedReason::ReadDeadline));
            }
        };
        let mut out = local;
        for (_, rec) in stored {
            if out.len() >= inner.per_key {
                break;
            }
            if !out.iter().any(|r| r.peer == rec.peer) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Buffered and in-flight providers of `key` in this process (newest first wins).
    fn local_providers(&self, key: &ProviderKey) -> Vec<PeerRecord> {
        let now = now_ms();
        let shard = self.inner.shards[self.shard_of(key)].lock().expect("shard lock poisoned");
        let mut out: Vec<PeerRecord> = Vec::new();
        let batches = std::iter::once(&shard.pending).chain(shard.in_flight.iter().rev().map(|b| &**b));
        for batch in batches {
            let Some(by_peer) = batch.get(key) else { continue };
            for (peer, p) in by_peer {
                if p.expires_at > now
                    && !out.iter().any(|r| &r.peer == peer)
                    && out.len() < self.inner.per_key
                {
                    out.push(PeerRecord { peer: *peer, addrs: p.addrs.clone() });
                }
            }
        }
        out
    }

    /// Store a validated value record (written through; values are rare).
    pub async fn put_value(&self, record: &ValueRecord) -> Result<(), Shed> {
        let inner = &self.inner;
        let Ok(_permit) = inner.read_permits.try_acquire() else {
            inner.metrics.shed.with_label_values(&[ShedReason::ReadsInFlight.as_str()]).inc();
            return Err(Shed(ShedReason::ReadsInFlight));
        };
        let expires = ms_after(now_ms(), inner.cfg.value_ttl);
        match tokio::time::timeout(inner.cfg.read_deadline, inner.store.put_value(record, expires)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "value write failed");
                inner.metrics.shed.with_label_values(&[ShedReason::DatastoreError.as_str()]).inc();
                Err(Shed(ShedReason::DatastoreError))
            }
            Err(_) => {
                inner.metrics.shed.with_label_values(&[ShedReason::ReadDeadline.as_str()]).inc();
                Err(Shed(ShedReason::ReadDeadline))
            }
        }
    }

    pub async fn get_value(&self, key: &[u8]) -> Result<Option<ValueRecord>, Shed> {
        let inner = &self.inner;
        let Ok(_permit) = inner.read_permits.try_acquire() else {
            inner.metrics.shed.with_label_values(&[ShedReason::ReadsInFlight.as_str()]).inc();
            return Err(Shed(ShedReason::ReadsInFlight));
        };
        match tokio::time::timeout(inner.cfg.read_deadline, inner.store.get_value(key, now_ms())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "value read failed");
                inner.metrics.shed.with_label_values(&[ShedReason::DatastoreError.as_str()]).inc();
                Err(Shed(ShedReason::DatastoreError))
            }
            Err(_) => {
                inner.metrics.shed.with_label_values(&[ShedReason::ReadDeadline.as_str()]).inc();
                Err(Shed(ShedReason::ReadDeadline))
            }
        }
    }

    /// Entries buffered or being written.
    pub fn buffered(&self) -> usize {
        self.inner.entries.load(Ordering::Relaxed)
    }

    /// Flush every shard now and wait until all writes (also earlier ones) have completed.
    pub async fn flush(&self) {
        for idx in 0..SHARDS {
            self.flush_shard(idx).await;
        }
        // Every flush holds a permit; owning all of them means none is running.
        let all = self.inner.cfg.max_flushes_in_flight as u32;
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
        self.inner.store.close().await;
    }

    /// Take shard `idx`'s pending entries and write them as one batch, waiting for a flush slot.
    async fn flush_shard(&self, idx: usize) {
        let Ok(permit) = self.inner.flush_permits.clone().acquire_owned().await else { return };
        let batch = {
            let mut shard = self.inner.shards[idx].lock().expect("shard lock poisoned");
            if shard.pending_entries == 0 {
                return;
            }
            let batch = Arc::new(std::mem::take(&mut shard.pending));
            shard.pending_entries = 0;
            shard.oldest = None;
            shard.in_flight.push(batch.clone());
            batch
        };
        let this = self.clone();
        // Not in `tasks`: shutdown waits for flushes through the permits instead.
        tokio::spawn(async move {
            let rows: Vec<ProviderWrite> = batch
                .iter()
                .flat_map(|(key, by_peer)| {
                    by_peer.iter().map(move |(peer, p)| ProviderWrite {
                        key: key.clone(),
                        provider: *peer,
                        addrs: p.addrs.clone(),
                        expires_at: p.expires_at,
                        addrs_expire_at: p.addrs_expire_at,
                    })
                })
                .collect();
            let inner = &this.inner;
            inner.metrics.flush_rows.observe(rows.len() as f64);
            if let Err(e) = inner.store.put_providers(&rows).await {
                tracing::error!(error = %e, rows = rows.len(), "provider flush failed; rows dropped");
                inner.metrics.flushes_failed.inc();
            }
            {
                let mut shard = inner.shards[idx].lock().expect("shard lock poisoned");
                shard.in_flight.retain(|b| !Arc::ptr_eq(b, &batch));
            }
            let n = inner.entries.fetch_sub(rows.len(), Ordering::Relaxed) - rows.len();
            inner.metrics.write_buffer_entries.set(n as i64);
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
            for idx in 0..SHARDS {
                let due = {
                    let shard = self.inner.shards[idx].lock().expect("shard lock poisoned");
                    shard.pending_entries >= self.inner.cfg.flush_batch
                        || shard.oldest.is_some_and(|t| t.elapsed() >= interval)
                };
                if due {
                    tokio::select! {
                        _ = self.inner.cancel.cancelled() => return,
                        _ = self.flush_shard(idx) => {}
                    }
                }
            }
        }
    }

    /// Deletes expired rows in bounded chunks every `gc_interval`.
    async fn collector(self) {
        let cfg = &self.inner.cfg;
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(cfg.gc_interval) => {}
            }
            // Bounded: at most 1,000 chunks per round, with a pause so writers get the lock.
            for _ in 0..1000 {
                match self.inner.store.gc_chunk(now_ms(), cfg.gc_chunk_rows).await {
                    Ok(n) => {
                        self.inner.metrics.gc_deleted_rows.inc_by(n);
                        if n == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "garbage collection failed");
                        break;
                    }
                }
                tokio::select! {
                    _ = self.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreKind;

    async fn manager(dir: &std::path::Path, buffer: usize) -> (ProviderManager, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::new(&registry, 1);
        let store =
            Store::open(&StoreKind::Sqlite(dir.join("p.sqlite")), metrics.datastore.clone()).await.unwrap();
        let cfg = ProvidersSection {
            write_buffer_entries: buffer,
            flush_batch: buffer,
            flush_interval: Duration::from_secs(3600),
            ..Default::default()
        };
        (ProviderManager::start(store, cfg, 100, metrics.providers.clone()), registry)
    }

    fn rec(peer: PeerId) -> PeerRecord {
        PeerRecord { peer, addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()] }
    }

    #[tokio::test]
    async fn repeated_announcements_coalesce_and_a_full_buffer_sheds() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _reg) = manager(dir.path(), 3).await;
        let key = |i: u8| ProviderKey::new(vec![i]).unwrap();
        let p = PeerId::random();
        for _ in 0..10 {
            m.add_provider(key(1), rec(p)).unwrap();
        }
        assert_eq!(m.buffered(), 1, "ten announcements of one (key, provider) are one entry");
        m.add_provider(key(2), rec(p)).unwrap();
        m.add_provider(key(3), rec(p)).unwrap();
        assert_eq!(m.add_provider(key(4), rec(p)), Err(Shed(ShedReason::WriteBufferFull)));
        // A refresh of a buffered entry is still accepted when full: it takes no new space.
        m.add_provider(key(2), rec(p)).unwrap();
        assert_eq!(m.buffered(), 3);
        // Buffered records are readable before they are written…
        assert_eq!(m.get_providers(&key(3)).await.unwrap(), vec![rec(p)]);
        // …and after the flush, from the store; the space is free again.
        m.flush().await;
        assert_eq!(m.buffered(), 0);
        assert_eq!(m.get_providers(&key(3)).await.unwrap(), vec![rec(p)]);
        m.add_provider(key(4), rec(p)).unwrap();
        m.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_flushes_every_buffered_record() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _reg) = manager(dir.path(), 10_000).await;
        let p = PeerId::random();
        for i in 0..5000u32 {
            m.add_provider(ProviderKey::new(i.to_be_bytes().to_vec()).unwrap(), rec(p)).unwrap();
        }
        assert_eq!(m.buffered(), 5000);
        m.shutdown().await;
        let (m2, _reg) = manager(dir.path(), 10).await;
        for i in (0..5000u32).step_by(499) {
            let got = m2.get_providers(&ProviderKey::new(i.to_be_bytes().to_vec()).unwrap()).await.unwrap();
            assert_eq!(got, vec![rec(p)], "key {i} lost");
        }
        m2.shutdown().await;
    }
}
