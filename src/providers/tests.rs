//! Unit tests of the provider manager on the embedded store.

use super::*;
use crate::config::{PostgresSection, StoreKind};

async fn manager(dir: &std::path::Path, cfg: ProvidersSection) -> (ProviderManager, crate::metrics::Metrics) {
    let registry = prometheus::Registry::new();
    let metrics = crate::metrics::Metrics::new(&registry, 1);
    let store = Store::open(
        &StoreKind::Sqlite(dir.join("p.sqlite")),
        &PostgresSection::default(),
        metrics.datastore.clone(),
    )
    .await
    .unwrap();
    (ProviderManager::start(store, cfg, 100, metrics.providers.clone()), metrics)
}

fn small(buffer: usize) -> ProvidersSection {
    ProvidersSection {
        write_buffer_entries: buffer,
        flush_batch: buffer,
        flush_interval: Duration::from_secs(3600),
        // Functional tests: a loaded machine must not turn a slow lookup into a shed.
        read_deadline: Duration::from_secs(10),
        ..Default::default()
    }
}

fn rec(peer: libp2p::PeerId) -> PeerRecord {
    PeerRecord { peer, addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()] }
}

fn key(i: u32) -> ProviderKey {
    ProviderKey::new(i.to_be_bytes().to_vec()).unwrap()
}

fn lookups(m: &crate::metrics::Metrics) -> u64 {
    m.datastore.duration.with_label_values(&["get_providers"]).get_sample_count()
}

#[tokio::test]
async fn repeated_announcements_coalesce_and_a_full_buffer_sheds() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), small(3)).await;
    let p = libp2p::PeerId::random();
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
    let (m, _) = manager(dir.path(), small(10_000)).await;
    let p = libp2p::PeerId::random();
    for i in 0..5000u32 {
        m.add_provider(key(i), rec(p)).unwrap();
    }
    assert_eq!(m.buffered(), 5000);
    m.shutdown().await;
    let (m2, _) = manager(dir.path(), small(10)).await;
    for i in (0..5000u32).step_by(499) {
        assert_eq!(m2.get_providers(&key(i)).await.unwrap(), vec![rec(p)], "key {i} lost");
    }
    m2.shutdown().await;
}

// Current-thread runtime: join_all polls every read once (each registers or enqueues) before
// the batcher task can run, so statement counts are exact.
#[tokio::test]
async fn concurrent_reads_of_one_key_share_one_lookup_and_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(dir.path(), small(100)).await;
    let p = libp2p::PeerId::random();
    m.add_provider(key(7), rec(p)).unwrap();
    m.flush().await;
    let before = lookups(&metrics);
    let k = key(7);
    for r in futures::future::join_all((0..50).map(|_| m.get_providers(&k))).await {
        assert_eq!(r.unwrap(), vec![rec(p)]);
    }
    assert_eq!(lookups(&metrics) - before, 1, "50 concurrent reads, one datastore lookup");
    m.get_providers(&key(7)).await.unwrap();
    assert_eq!(lookups(&metrics) - before, 1, "then served from the cache");
    m.shutdown().await;
}

#[tokio::test]
async fn distinct_keys_are_looked_up_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ProvidersSection { max_read_queries: 1, ..small(100) };
    let (m, metrics) = manager(dir.path(), cfg).await;
    let before = lookups(&metrics);
    let keys: Vec<_> = (0..200u32).map(key).collect();
    for r in futures::future::join_all(keys.iter().map(|k| m.get_providers(k))).await {
        assert!(r.unwrap().is_empty());
    }
    // read_batch_keys = 128: 200 queued keys take two statements.
    assert_eq!(lookups(&metrics) - before, 2);
    m.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_value_requests_waits_for_slots_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), ProvidersSection { max_read_queries: 1, ..small(10) }).await;
    let records: Vec<ValueRecord> = (0..20u8)
        .map(|i| ValueRecord { key: vec![b'/', i], value: vec![i], time_received: String::new() })
        .collect();
    let puts = futures::future::join_all(records.iter().map(|r| m.put_value(r, Default::default()))).await;
    assert!(puts.iter().all(|r| r.is_ok()), "{puts:?}");
    let gets = futures::future::join_all(records.iter().map(|r| m.get_value(&r.key))).await;
    assert!(gets.iter().zip(&records).all(|(g, r)| g.as_ref().unwrap().as_ref() == Some(r)));
    m.shutdown().await;
}

// Read-your-writes while a flush of the same key lands: a lookup that started before the
// flush committed, returning after the entry left the buffer, must not hide it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_racing_a_flush_still_sees_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), small(10_000)).await;
    let p = libp2p::PeerId::random();
    for i in 0..300u32 {
        let k = key(i);
        m.add_provider(k.clone(), rec(p)).unwrap();
        let reader = tokio::spawn({
            let (m, k) = (m.clone(), k.clone());
            async move {
                let mut seen = Vec::new();
                for _ in 0..4 {
                    seen.push(m.get_providers(&k).await.unwrap());
                }
                seen
            }
        });
        m.flush().await;
        for got in reader.await.unwrap() {
            assert_eq!(got, vec![rec(p)], "key {i}: a read during the flush lost the write");
        }
    }
    m.shutdown().await;
}

// The embedded store has one writer connection: batches flushed in parallel would only queue
// for it, and that queueing reads as connection-pool distress to the load tiers (it sent an idle
// node into `degrade` in the comparison benchmark). Sixteen shards fill at once; with the
// default four flushes in flight each batch would wait ~1.5 batch times for the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_writes_one_batch_at_a_time_so_no_flush_waits_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ProvidersSection { flush_batch: 500, ..small(40_000) };
    assert_eq!(cfg.max_flushes_in_flight, 4, "the default this test is about");
    let (m, metrics) = manager(dir.path(), cfg).await;
    let p = libp2p::PeerId::random();
    for i in 0..32_000u32 {
        m.add_provider(key(i), rec(p)).unwrap();
    }
    m.flush().await;
    let (waits, waited) =
        (metrics.datastore.pool_wait.get_sample_count(), metrics.datastore.pool_wait.get_sample_sum());
    let batches = metrics.datastore.duration.with_label_values(&["put_providers"]).get_sample_count();
    let written = metrics.datastore.duration.with_label_values(&["put_providers"]).get_sample_sum();
    assert!(batches >= 16, "{batches} batches");
    // Acquiring the idle writer costs a ping (well under a millisecond); waiting for another
    // batch costs that batch's write.
    let mean_wait = waited / waits as f64;
    assert!(
        mean_wait < 0.25 * written / batches as f64,
        "mean pool wait {:.2} ms against {:.2} ms per batch written: flushes queued for the writer",
        mean_wait * 1e3,
        written / batches as f64 * 1e3
    );
    assert_eq!(m.get_providers(&key(31_999)).await.unwrap(), vec![rec(p)]);
    m.shutdown().await;
}

#[tokio::test]
async fn degraded_adds_skip_refreshes_far_from_expiry_and_cached_reads_never_query() {
    let dir = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(dir.path(), small(100)).await;
    let (p, q) = (libp2p::PeerId::random(), libp2p::PeerId::random());
    let day = Some(Duration::from_secs(24 * 3600));
    assert!(m.add_provider_unless_fresh(key(1), rec(p), day).unwrap(), "never written: buffered");
    m.flush().await;
    // Written just now with 48 h to live: a refresh is acknowledged without a write…
    assert!(!m.add_provider_unless_fresh(key(1), rec(p), day).unwrap());
    assert_eq!(m.buffered(), 0);
    // …unless the remaining life asked for is longer than what is left.
    let long = Some(Duration::from_secs(49 * 3600));
    assert!(m.add_provider_unless_fresh(key(1), rec(p), long).unwrap());
    // Another provider of the same key is new: buffered.
    assert!(m.add_provider_unless_fresh(key(1), rec(q), day).unwrap());
    m.flush().await;

    // Cache-only reads: a miss is None and asks nothing; a cached answer is served.
    let before = lookups(&metrics);
    assert_eq!(m.get_providers_cached(&key(2)), None);
    assert_eq!(lookups(&metrics), before, "a cache-only read never queries");
    assert_eq!(m.get_providers(&key(1)).await.unwrap().len(), 2);
    assert_eq!(m.get_providers_cached(&key(1)).map(|v| v.len()), Some(2));
    // Buffered writes are known without the cache.
    m.add_provider(key(3), rec(p)).unwrap();
    assert_eq!(m.get_providers_cached(&key(3)), Some(vec![rec(p)]));
    m.shutdown().await;
}

#[tokio::test]
async fn the_cache_is_coherent_with_local_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), small(100)).await;
    // A negative answer is cached…
    assert!(m.get_providers(&key(9)).await.unwrap().is_empty());
    let (p, q) = (libp2p::PeerId::random(), libp2p::PeerId::random());
    // …yet a local write shows at once (buffer merge), and after its flush (cache evicted).
    m.add_provider(key(9), rec(p)).unwrap();
    assert_eq!(m.get_providers(&key(9)).await.unwrap(), vec![rec(p)]);
    m.flush().await;
    assert_eq!(m.get_providers(&key(9)).await.unwrap(), vec![rec(p)]);
    // A positive cached answer also picks up a second provider written later.
    m.add_provider(key(9), rec(q)).unwrap();
    m.flush().await;
    let mut got: Vec<_> = m.get_providers(&key(9)).await.unwrap().into_iter().map(|r| r.peer).collect();
    got.sort();
    let mut want = vec![p, q];
    want.sort();
    assert_eq!(got, want);
    m.shutdown().await;
}

#[tokio::test]
async fn replies_from_one_cached_answer_sample_every_provider_and_buffered_ones_first() {
    let dir = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(dir.path(), small(1000)).await;
    let stored: Vec<libp2p::PeerId> = (0..150).map(|_| libp2p::PeerId::random()).collect();
    for p in &stored {
        m.add_provider(key(1), rec(*p)).unwrap();
    }
    m.flush().await;
    let before = lookups(&metrics);
    // 150 stored, 100 per reply: a fresh sample of the one cached answer each time.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let got = m.get_providers(&key(1)).await.unwrap();
        let distinct: std::collections::HashSet<_> = got.iter().map(|r| r.peer).collect();
        assert_eq!((got.len(), distinct.len()), (100, 100));
        seen.extend(distinct);
    }
    assert_eq!(lookups(&metrics) - before, 1, "one datastore lookup, then the cache");
    // Each provider is in a reply with probability 2/3: missing one over 40 replies is ~1e-19.
    assert_eq!(seen.len(), 150, "every provider is served");
    // A buffered (newest) write is in every reply, and nobody twice.
    let fresh = libp2p::PeerId::random();
    m.add_provider(key(1), rec(fresh)).unwrap();
    m.add_provider(key(1), rec(stored[0])).unwrap();
    for _ in 0..10 {
        let got = m.get_providers(&key(1)).await.unwrap();
        let distinct: std::collections::HashSet<_> = got.iter().map(|r| r.peer).collect();
        assert_eq!((got.len(), distinct.len()), (100, 100));
        assert!(distinct.contains(&fresh) && distinct.contains(&stored[0]));
    }
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Room for a few hundred small answers, far fewer than the 2,000 keys read.
    let cfg = ProvidersSection { cache_bytes: 64 * 1024, ..small(10_000) };
    let (m, metrics) = manager(dir.path(), cfg).await;
    let p = libp2p::PeerId::random();
    for i in 0..2000 {
        m.add_provider(key(i), rec(p)).unwrap();
    }
    m.flush().await;
    for i in 0..2000 {
        m.get_providers(&key(i)).await.unwrap();
    }
    let (entries, bytes) = m.cache_usage();
    assert!(bytes <= 64 * 1024, "{bytes} bytes cached");
    assert!((100..2000).contains(&entries), "{entries} entries: evicted by bytes, not by count");
    // What was evicted is asked for again.
    let before = lookups(&metrics);
    for i in 0..2000 {
        m.get_providers(&key(i)).await.unwrap();
    }
    assert!(lookups(&metrics) - before >= 1, "evicted keys are looked up again");
}

#[tokio::test]
async fn a_flush_task_that_panics_puts_its_rows_back() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), small(100)).await;
    let p = libp2p::PeerId::random();
    m.add_provider(key(1), rec(p)).unwrap();
    let idx = m.inner.buffer.shard_of(&key(1));
    let batch = m.inner.buffer.take(idx).expect("a pending batch");
    assert_eq!(m.inner.buffer.pending(idx), 0, "taken for writing");
    let task = tokio::spawn({
        let guard = Unsettled { manager: m.clone(), idx, batch: Some(batch) };
        async move {
            let _guard = guard;
            panic!("injected: a flush task panics before it settles its batch");
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(m.inner.buffer.pending(idx), 1, "the rows are back in the buffer");
    m.flush().await;
    assert_eq!(m.buffered(), 0);
    assert_eq!(m.get_providers(&key(1)).await.unwrap(), vec![rec(p)], "and written by the next flush");
}

#[tokio::test]
async fn a_peers_buffered_entries_share_one_copy_of_its_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = manager(dir.path(), small(1000)).await;
    let p = libp2p::PeerId::random();
    for i in 0..100 {
        m.add_provider(key(i), rec(p)).unwrap(); // each announcement decoded on its own
    }
    let bytes = m.inner.buffer.bytes();
    let mut copies: Vec<Arc<[libp2p::Multiaddr]>> = Vec::new();
    for idx in 0..SHARDS {
        if let Some(batch) = m.inner.buffer.take(idx) {
            for by_peer in batch.values() {
                copies.push(by_peer[&p].addrs.clone());
            }
            m.inner.buffer.requeue(idx, &batch);
        }
    }
    assert_eq!(copies.len(), 100);
    assert!(copies.iter().all(|c| Arc::ptr_eq(c, &copies[0])), "one copy of the addresses");
    assert_eq!(m.inner.buffer.bytes(), bytes, "a requeue charges nothing twice");
    // New addresses: a new copy for later entries.
    let moved = PeerRecord { peer: p, addrs: vec!["/ip4/127.0.0.3/tcp/2".parse().unwrap()] };
    m.add_provider(key(1000), moved.clone()).unwrap();
    assert_eq!(m.get_providers(&key(1000)).await.unwrap(), vec![moved]);
}
