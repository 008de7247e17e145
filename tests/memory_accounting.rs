//! Byte budgets charge what their entries really hold: the bytes the allocator hands out, counted
//! by a global allocator that wraps the system's, agree with the structure's own accounting — the
//! provider cache's (`hydra_memory_bytes{part="provider_cache"}`) and the routing table's
//! (`hydra_routing_table_bytes`). An accounting that undercounts lets a structure grow past its
//! budget in RSS (a soak showed 1.5× before cache entries were cut to size). Alone in its binary,
//! and its tests one at a time: the counter is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use hydra::config::{PostgresSection, ProvidersSection, StoreKind};
use hydra::providers::ProviderManager;
use hydra::store::Store;
use hydra::types::{PeerRecord, ProviderKey};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// One test at a time: each measures the process-wide counter.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_cost_what_the_cache_charges_for_them() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let metrics = hydra::metrics::Metrics::new(&registry, 1);
    let store = Store::open(
        &StoreKind::Sqlite(dir.path().join("p.sqlite")),
        &PostgresSection::default(),
        metrics.datastore.clone(),
    )
    .await
    .unwrap();
    let cfg = ProvidersSection {
        // Functional test: a loaded machine must not turn a slow lookup into a shed.
        read_deadline: Duration::from_secs(10),
        ..Default::default()
    };
    let m = ProviderManager::start(store, cfg, 100, metrics.providers.clone());
    // Answers of the sizes the network sees most: one to a few providers, one or two addresses.
    let peers: Vec<_> = (0..50).map(|_| libp2p::PeerId::random()).collect();
    let key = |i: u32| ProviderKey::new([0x12, 0x20].into_iter().chain(i.to_be_bytes()).collect()).unwrap();
    const KEYS: u32 = 6000;
    for i in 0..KEYS {
        for j in 0..(1 + i % 3) {
            let peer = peers[((i + j * 7) % 50) as usize];
            let addrs =
                (0..(1 + j % 2)).map(|n| format!("/ip4/127.0.0.{}/tcp/{}", 1 + n, 4000 + j).parse().unwrap());
            m.add_provider(key(i), PeerRecord { peer, addrs: addrs.collect() }).unwrap();
        }
    }
    m.flush().await;
    // Warm up what lookups allocate once (statements, pools, maps), then start counting.
    for i in 0..200 {
        m.get_providers(&key(KEYS + i)).await.unwrap();
    }
    let (_, weight_before) = m.cache_usage();
    let live_before = LIVE.load(Ordering::Relaxed);
    for i in 0..KEYS {
        let got = m.get_providers(&key(i)).await.unwrap();
        assert_eq!(got.len() as u32, 1 + i % 3);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // lookup tasks finish and free
    let (entries, weight) = m.cache_usage();
    let held = (LIVE.load(Ordering::Relaxed) - live_before) as f64;
    let charged = (weight - weight_before) as f64;
    println!(
        "{entries} cached answers: the allocator holds {held} bytes for them, the cache charged {charged}"
    );
    assert!(entries as u32 >= KEYS, "every answer cached ({entries})");
    let ratio = held / charged;
    assert!((0.8..=1.25).contains(&ratio), "held / charged = {ratio:.2} ({held} / {charged} bytes)");
    m.shutdown().await;
}

/// Issue 13: the process-wide routing table with a synthetic population of 20,000 peers (two
/// addresses each, TCP and QUIC, as most DHT servers announce) and its published snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_table_costs_what_it_charges() {
    use hydra::config::{AddressFilter, RoutingSection};
    use hydra::net::routing::Siblings;
    use hydra::net::table::{PeerTable, Update};
    let _serial = SERIAL.lock().await;
    let live = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new()));
    let heads = Siblings::new((0..100).map(|_| (libp2p::PeerId::random(), live.clone())), AddressFilter::Any);
    let mut table = PeerTable::new(&RoutingSection::default(), heads);
    let now = std::time::Instant::now();
    const PEERS: u32 = 20_000;
    let live_before = LIVE.load(Ordering::Relaxed);
    for i in 0..PEERS {
        let ip = format!("{}.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256, 7);
        let addrs = vec![
            format!("/ip4/{ip}/tcp/4001").parse().unwrap(),
            format!("/ip4/{ip}/udp/4001/quic-v1").parse().unwrap(),
        ];
        table.apply(Update::Identified { peer: libp2p::PeerId::random(), addrs }, now);
    }
    let snapshot = table.snapshot();
    let held = (LIVE.load(Ordering::Relaxed) - live_before) as f64;
    let charged = table.bytes() as f64;
    println!(
        "{} peers: the allocator holds {held} bytes for the table and its snapshot ({:.0} per peer), \
         the table charged {charged} ({:.0} per peer)",
        snapshot.len(),
        held / PEERS as f64,
        charged / PEERS as f64
    );
    assert_eq!(table.len(), PEERS as usize);
    let ratio = held / charged;
    assert!((0.8..=1.25).contains(&ratio), "held / charged = {ratio:.2} ({held} / {charged} bytes)");
}
