//! The PostgreSQL fleet store: sharing between processes, expiry and garbage collection under a
//! single leaseholder, shutdown flushing, the hash-partitioned layout, catalogue estimates, and
//! start-up against an unreachable database. Runs against a real PostgreSQL (see common/pg.rs).

mod common;

use std::time::Duration;

use common::{head_addrs, pg, Backend, Process, RawClient};
use hydra::config::{PostgresSection, ProvidersSection, StoreKind};
use hydra::metrics::Metrics;
use hydra::providers::ProviderManager;
use hydra::store::{now_ms, ProviderWrite, Store};
use hydra::types::{PeerRecord, ProviderKey};
use libp2p::{Multiaddr, PeerId};

fn key(i: u32) -> ProviderKey {
    let mut k = vec![0x12, 0x20];
    k.extend_from_slice(&i.to_be_bytes());
    k.extend_from_slice(&[7u8; 28]);
    ProviderKey::new(k).unwrap()
}

fn write(k: &ProviderKey, peer: PeerId, expires_at: i64) -> ProviderWrite {
    ProviderWrite {
        key: k.clone(),
        provider: peer,
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap()],
        expires_at,
        addrs_expire_at: expires_at,
    }
}

async fn open(url: &str) -> (Store, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry, 1);
    let store =
        Store::open(&StoreKind::Postgres(url.into()), &PostgresSection::default(), metrics.datastore.clone())
            .await
            .unwrap();
    (store, registry)
}

async fn count(url: &str, table: &str) -> i64 {
    let c = pg::client(url).await;
    // count(*) is fine in a test; the product never runs it.
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_sharing_postgres_returns_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("fleet.seed");
    std::fs::write(&seed, hex::encode([9u8; 32])).unwrap();
    let mut cfg = common::config_on(dir.path(), 2, Backend::Postgres).await;
    cfg.identity_seed_file = Some(seed.clone());
    let StoreKind::Postgres(url) = cfg.store.clone() else { unreachable!() };
    let a = hydra::Node::start(cfg).await.unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let b_config = b_dir.path().join("b.toml");
    let stable = format!("[providers]\nread_deadline = \"10s\"\n{}", common::STABLE_LOAD_TOML);
    std::fs::write(&b_config, stable).unwrap();
    let b = Process::spawn(
        &[
            "run",
            "--config",
            b_config.to_str().unwrap(),
            "--heads",
            "2",
            "--listen-ip",
            "127.0.0.1",
            "--http-listen",
            "127.0.0.1:0",
            "--address-filter",
            "any",
        ],
        &[
            ("HYDRA_DATABASE_URL", &url),
            ("HYDRA_DATA_DIR", b_dir.path().to_str().unwrap()),
            ("HYDRA_NODE_NAME", "process-b"),
            ("HYDRA_IDENTITY_SEED_FILE", seed.to_str().unwrap()),
        ],
    );
    let a_heads = head_addrs(&a);
    let b_heads = b.heads();
    let all: Vec<_> = a_heads.iter().chain(b_heads.iter()).cloned().collect();
    let client = RawClient::connect(&all).await;
    let k = key(1);
    let mut s = client.open(a_heads[0].0).await;
    RawClient::send(&mut s, &client.add_provider_body(k.as_bytes())).await.unwrap();
    RawClient::request(
        &mut s,
        &hydra::net::wire::encode_request(hydra::net::wire::MessageType::Ping, &[], &[]),
    )
    .await
    .unwrap();
    a.providers().flush().await;
    for (head, _) in &b_heads {
        let reply = client.get_providers(*head, k.as_bytes()).await;
        assert_eq!(reply.provider_peers.len(), 1, "process B head {head}");
        assert_eq!(reply.provider_peers[0].id, client.peer_id.to_bytes());
        assert_eq!(reply.provider_peers[0].addrs, vec![client.addr.to_vec()]);
    }
    assert!(b.stop(), "process B exits cleanly on SIGTERM");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_never_returned_and_are_collected() {
    let url = pg::fresh_database().await;
    let (store, _r) = open(&url).await;
    let now = now_ms();
    let (live, dead) = (PeerId::random(), PeerId::random());
    let mut rows = Vec::new();
    for i in 0..2000 {
        rows.push(write(&key(i), live, now + 3_600_000));
        rows.push(write(&key(i), dead, now - 1));
    }
    store.put_providers(&rows).await.unwrap();
    let keys: Vec<_> = (0..2000).map(key).collect();
    let got = store.get_providers(&keys, 100).await.unwrap();
    assert_eq!(got.len(), 2000);
    assert!(got.iter().all(|(_, r)| r.peer == live), "an expired record was returned");
    // A refresh with an older expiry never shortens a record's life.
    store.put_providers(&[write(&key(0), live, now - 5)]).await.unwrap();
    assert_eq!(store.get_providers(&[key(0)], 100).await.unwrap().len(), 1);

    assert_eq!(count(&url, "providers").await, 4000);
    // Small chunks: the sweep takes many bounded statements.
    let deleted = store.gc_round(100, 2).await.unwrap().expect("sole process holds the lease");
    assert_eq!(deleted, 2000 + 1, "2000 records and the dead peer's addresses");
    assert_eq!(count(&url, "providers").await, 2000);
    assert_eq!(count(&url, "peer_addrs").await, 1);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_never_deadlocks_with_a_refresh_of_the_rows_it_collects() {
    // The collector walks rows in page order, writers lock them in key order. Two expired rows
    // whose page order is the reverse of their key order, a writer that has refreshed one and is
    // about to refresh the other, and a sweep in between: a collector that waited for row locks
    // would deadlock here, and PostgreSQL would abort one side (a flush's rows, or the sweep).
    let url = pg::fresh_database().await;
    let (store, _r) = open(&url).await;
    let peer = PeerId::random();
    let past = now_ms() - 1;
    let (ka, kb) = (key(2), key(1)); // kb < ka ...
    store.put_providers(&[write(&ka, peer, past)]).await.unwrap(); // ... but A sits on an earlier tuple
    store.put_providers(&[write(&kb, peer, past)]).await.unwrap();

    let mut w = pg::client(&url).await;
    let tx = w.transaction().await.unwrap();
    let refresh = |k: &ProviderKey| {
        (vec![k.as_bytes().to_vec()], vec![peer.to_bytes()], vec![3_600_000i64], vec![1i32])
    };
    let (k, p, e, s) = refresh(&kb);
    tx.execute(hydra::store::UPSERT_PROVIDERS_SQL, &[&k, &p, &e, &s]).await.unwrap(); // holds B

    let gc = tokio::spawn(async move {
        let r = store.gc_round(100, 1000).await;
        (r, store)
    });
    // Wait until the sweep has finished or is blocked on a row lock.
    let watcher = pg::client(&url).await;
    for _ in 0..200 {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%hydra_gc_pages%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 || gc.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (k, p, e, s) = refresh(&ka);
    let second = tx.execute(hydra::store::UPSERT_PROVIDERS_SQL, &[&k, &p, &e, &s]).await;
    let committed = match second {
        Ok(_) => tx.commit().await,
        Err(e) => Err(e),
    };
    let (swept, store) = gc.await.unwrap();
    assert!(committed.is_ok(), "the writer was aborted: {committed:?}");
    assert!(swept.is_ok(), "the sweep was aborted: {swept:?}");
    let live = store.get_providers(&[ka, kb], 10).await.unwrap();
    assert_eq!(live.len(), 2, "both refreshes survive the sweep");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_process_collects_garbage_at_a_time() {
    let url = pg::fresh_database().await;
    let (s1, _r1) = open(&url).await;
    let (s2, _r2) = open(&url).await;
    assert!(s1.gc_round(100, 100).await.unwrap().is_some(), "first asker takes the lease");
    for _ in 0..3 {
        assert!(s2.gc_round(100, 100).await.unwrap().is_none(), "second process must not collect");
        assert!(s1.gc_round(100, 100).await.unwrap().is_some(), "the holder keeps collecting");
    }
    let c = pg::client(&url).await;
    let holders: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 1);
    // The holder stops (or dies: its session ends either way); the other takes over.
    s1.close().await;
    let mut took_over = false;
    for _ in 0..50 {
        if s2.gc_round(100, 100).await.unwrap().is_some() {
            took_over = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took_over, "lease not taken over after the holder stopped");
    s2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_never_lead_gc_together() {
    let url = pg::fresh_database().await;
    let mut gauges = Vec::new();
    let mut managers = Vec::new();
    for _ in 0..2 {
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry, 1);
        let store = Store::open(
            &StoreKind::Postgres(url.clone()),
            &PostgresSection::default(),
            metrics.datastore.clone(),
        )
        .await
        .unwrap();
        let cfg = ProvidersSection { gc_interval: Duration::from_millis(20), ..Default::default() };
        gauges.push(metrics.providers.gc_leader.clone());
        managers.push(ProviderManager::start(store, cfg, 100, metrics.providers.clone()));
    }
    let mut seen_leader = [false, false];
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (a, b) = (gauges[0].get(), gauges[1].get());
        assert!(a + b <= 1, "both processes hold the GC lease");
        seen_leader[0] |= a == 1;
        seen_leader[1] |= b == 1;
    }
    assert!(seen_leader.iter().any(|x| *x), "someone collects");
    let leader = if gauges[0].get() == 1 { 0 } else { 1 };
    managers.remove(leader).shutdown().await;
    let other = &gauges[1 - leader];
    for _ in 0..200 {
        if other.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(other.get(), 1, "the survivor takes the lease over");
    managers.pop().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_every_buffered_write() {
    let url = pg::fresh_database().await;
    let (store, _r) = open(&url).await;
    let metrics = Metrics::new(&prometheus::Registry::new(), 1);
    let cfg = ProvidersSection { flush_interval: Duration::from_secs(3600), ..Default::default() };
    let m = ProviderManager::start(store, cfg, 100, metrics.providers.clone());
    let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
    for i in 0..3000 {
        for p in &peers {
            let rec = PeerRecord { peer: *p, addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()] };
            m.add_provider(key(i), rec).unwrap();
        }
    }
    // flush_batch (1000) fills some shards and triggers flushes; whatever is left waits for shutdown.
    m.shutdown().await;
    assert_eq!(count(&url, "providers").await, 15_000);
    assert_eq!(count(&url, "peer_addrs").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_works_hash_partitioned() {
    let url = pg::fresh_database().await;
    let ddl =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/postgres/partitioned.sql"))
            .unwrap();
    pg::client(&url).await.batch_execute(&ddl).await.unwrap();
    let (store, _r) = open(&url).await; // migrations keep the partitioned tables
    let now = now_ms();
    let peer = PeerId::random();
    let old = PeerId::random();
    let mut rows: Vec<_> = (0..1000).map(|i| write(&key(i), peer, now + 3_600_000)).collect();
    rows.extend((0..1000).map(|i| write(&key(i), old, now - 1)));
    store.put_providers(&rows).await.unwrap();
    let keys: Vec<_> = (0..1000).map(key).collect();
    let got = store.get_providers(&keys, 100).await.unwrap();
    assert_eq!(got.len(), 1000);
    let c = pg::client(&url).await;
    for p in 0..4 {
        let n: i64 = c.query_one(&format!("SELECT count(*) FROM providers_p{p}"), &[]).await.unwrap().get(0);
        assert!(n > 300, "partition {p} holds {n} rows: keys are spread over partitions");
    }
    let deleted = store.gc_round(100, 10).await.unwrap().unwrap();
    assert_eq!(deleted, 1001);
    assert_eq!(count(&url, "providers").await, 1000);
    c.batch_execute("ANALYZE").await.unwrap();
    let (records, peers) = store.estimate_counts().await.unwrap();
    assert!((records - 1000.0).abs() < 50.0, "estimate {records}");
    assert!((peers - 1.0).abs() < 0.5, "estimate {peers}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_catalogue_estimates() {
    let url = pg::fresh_database().await;
    let (store, _r) = open(&url).await;
    assert_eq!(store.estimate_counts().await.unwrap(), (0.0, 0.0));
    let now = now_ms();
    let rows: Vec<_> = (0..5000).map(|i| write(&key(i), PeerId::random(), now + 3_600_000)).collect();
    store.put_providers(&rows).await.unwrap();
    pg::client(&url).await.batch_execute("ANALYZE providers; ANALYZE peer_addrs").await.unwrap();
    let (records, peers) = store.estimate_counts().await.unwrap();
    assert!((records - 5000.0).abs() < 250.0, "{records}");
    assert!((peers - 5000.0).abs() < 250.0, "{peers}");
    store.close().await;
}

#[test]
fn an_unreachable_database_fails_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[postgres]\nconnect_timeout = \"2s\"\n").unwrap();
    // Port 1 on loopback: nothing listens there.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--database-url", "postgres://hydra:secret@127.0.0.1:1/hydra", "--http-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not reachable after"), "{stderr}");
    assert!(
        stdout.matches("database not reachable; retrying").count() >= 2,
        "one line per attempt: {stdout}"
    );
    assert!(!stderr.contains("secret") && !stdout.contains("secret"), "password leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_command_creates_the_schema() {
    let url = pg::fresh_database().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra"))
        .args(["migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&url, "providers").await, 0);
    let c = pg::client(&url).await;
    let n: i64 =
        c.query_one("SELECT count(*) FROM _sqlx_migrations WHERE success", &[]).await.unwrap().get(0);
    let files =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres")).unwrap().count();
    assert_eq!(n as usize, files, "every migration in migrations/postgres applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_accepted_during_a_datastore_outage_are_kept_and_written_when_it_returns() {
    // A cluster of its own: this test stops and restarts it.
    let cluster = hydra_testkit::PgCluster::start(false).unwrap();
    let url = hydra_testkit::create_database(&cluster.url("postgres"), "outage").await.unwrap();
    let (store, _r) = open(&url).await;
    let metrics = Metrics::new(&prometheus::Registry::new(), 1);
    let cfg = ProvidersSection { flush_interval: Duration::from_millis(50), ..Default::default() };
    let m = ProviderManager::start(store, cfg, 100, metrics.providers.clone());
    let rec = || PeerRecord { peer: PeerId::random(), addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()] };
    for i in 0..100 {
        m.add_provider(key(i), rec()).unwrap();
    }
    m.flush().await;
    assert_eq!(count(&url, "providers").await, 100);

    cluster.halt().unwrap();
    for i in 100..200 {
        m.add_provider(key(i), rec()).expect("accepted into the buffer while the datastore is down");
    }
    until("failed flushes", || metrics.providers.flushes_failed.get() >= 2).await;
    assert_eq!(m.buffered(), 100, "failed flushes keep their rows");

    cluster.resume().unwrap();
    until("the buffer to drain", || m.buffered() == 0).await;
    assert_eq!(count(&url, "providers").await, 200, "every record accepted during the outage was written");
    m.shutdown().await;
}

/// Poll `done` until it holds (bounded by `common::WAIT`).
async fn until(what: &str, done: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < common::WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_statement_budget_is_split_among_live_processes() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("fleet.seed");
    std::fs::write(&seed, hex::encode([5u8; 32])).unwrap();
    let mut a_cfg = common::config_on(dir.path(), 1, Backend::Postgres).await;
    a_cfg.identity_seed_file = Some(seed.clone());
    // Leases renewed (and the fleet re-counted) every second.
    a_cfg.lease_ttl = Duration::from_secs(3);
    a_cfg.load.fleet_datastore_statements_per_second = 100;
    let mut b_cfg = a_cfg.clone();
    b_cfg.node_name = format!("{}-b", a_cfg.node_name);
    b_cfg.data_dir = dir.path().join("b");
    let budget =
        |n: &hydra::Node| n.load().status().map(|s| (s.statement_budget_per_second, s.fleet_processes));
    let a = hydra::Node::start(a_cfg).await.unwrap();
    // Alone: the whole fleet budget (below the per-process 2,000/s).
    until("a's first sample", || budget(&a).is_some()).await;
    assert_eq!(budget(&a), Some((100, 1)));
    let b = hydra::Node::start(b_cfg).await.unwrap();
    until("both processes to count each other", || {
        budget(&a) == Some((50, 2)) && budget(&b) == Some((50, 2))
    })
    .await;
    // Once the stopped process's leases expire (lease_ttl), the other takes the whole budget.
    b.shutdown().await;
    until("a to be alone again", || budget(&a) == Some((100, 1))).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_datastore() {
    // A cluster of its own: this test stops and restarts it.
    let cluster = hydra_testkit::PgCluster::start(false).unwrap();
    let url = hydra_testkit::create_database(&cluster.url("postgres"), "ready").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), 2);
    cfg.store = StoreKind::Postgres(url);
    // The tier computed, as shipped: a failing datastore must raise it.
    cfg.load.force_tier = None;
    let node = hydra::Node::start(cfg).await.unwrap();
    let http = node.http_addr().to_string();
    let ready = || async { common::http_get(&http, "/readyz").await };
    assert_eq!(ready().await, (200, "ready\n".to_string()));

    cluster.halt().unwrap();
    let start = std::time::Instant::now();
    let (status, body) = loop {
        let (status, body) = ready().await;
        if status != 200 || start.elapsed() > common::WAIT {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "a stopped datastore makes the node not ready: {body}");
    assert!(body.contains("datastore"), "{body}");
    // Liveness is not readiness: the process is alive and says so.
    assert_eq!(common::http_get(&http, "/healthz").await.0, 200);
    // A datastore that fails fast leaves latency low; its error ratio raises the tier.
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    for i in 0..150u32 {
        let reply = client.get_providers(heads[0].0, key(1000 + i).as_bytes()).await;
        assert!(reply.provider_peers.is_empty());
    }
    let start = std::time::Instant::now();
    while node.load().tier() == hydra::load::Tier::Normal {
        assert!(start.elapsed() < common::WAIT, "failing lookups never raised the tier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = node.load().status().unwrap();
    assert_eq!(status.tier, hydra::load::Tier::Degrade, "errors degrade, they do not refuse");
    assert!(status.signals.datastore_error_ratio > 0.5, "{:?}", status.signals);

    cluster.resume().unwrap();
    let start = std::time::Instant::now();
    while ready().await.0 != 200 {
        assert!(start.elapsed() < common::WAIT, "never ready again after the datastore returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_sample_a_random_window_of_a_popular_keys_providers() {
    let url = pg::fresh_database().await;
    let (store, _r) = open(&url).await;
    let popular = key(1);
    let peers: Vec<PeerId> = (0..300).map(|_| PeerId::random()).collect();
    let far = now_ms() + 3_600_000;
    let mut rows: Vec<_> = peers.iter().map(|p| write(&popular, *p, far)).collect();
    // Other keys, so the planner sees a table where one key is a small part of it.
    rows.extend((2..2000).map(|i| write(&key(i), PeerId::random(), far)));
    store.put_providers(&rows).await.unwrap();
    // Two rows as a version before sampling wrote them (sample key 0); one is then refreshed.
    let c = pg::client(&url).await;
    let legacy: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
    for p in &legacy {
        c.execute(
            "INSERT INTO providers (key, provider, expires_at) VALUES ($1, $2, $3)",
            &[&popular.as_bytes(), &p.to_bytes(), &hydra::store::postgres_time(far)],
        )
        .await
        .unwrap();
    }
    store.put_providers(&[write(&popular, legacy[0], far + 1000)]).await.unwrap();
    let sample_key = |p: PeerId| {
        let c = &c;
        let k = popular.as_bytes().to_vec();
        async move {
            let row = c
                .query_one(
                    "SELECT sample_key FROM providers WHERE key = $1 AND provider = $2",
                    &[&k, &p.to_bytes()],
                )
                .await
                .unwrap();
            row.get::<_, i32>(0)
        }
    };
    assert_ne!(sample_key(legacy[0]).await, 0, "a refresh gives a legacy row a sample key");
    assert_eq!(sample_key(legacy[1]).await, 0);
    let first = sample_key(peers[0]).await;
    store.put_providers(&[write(&popular, peers[0], far + 2000)]).await.unwrap();
    assert_eq!(sample_key(peers[0]).await, first, "a refresh keeps the sample key");

    let all = store.get_providers(std::slice::from_ref(&popular), 1000).await.unwrap();
    assert_eq!(all.iter().map(|(_, r)| r.peer).collect::<std::collections::HashSet<_>>().len(), 302);
    // 20 per read: 20 distinct each time, every provider within 400 reads (a miss: below 1e-8).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        let got = store.get_providers(&[popular.clone(), key(2)], 20).await.unwrap();
        let distinct: std::collections::HashSet<PeerId> =
            got.iter().filter(|(k, _)| *k == popular).map(|(_, r)| r.peer).collect();
        assert_eq!(distinct.len(), 20);
        assert_eq!(got.len(), 21, "the other key's one provider too");
        seen.extend(distinct);
    }
    assert_eq!(seen.len(), 302, "every provider, legacy rows included, is sampled");

    // One index range per arm: no sort of, and no scan through, the popular key's rows.
    c.batch_execute("ANALYZE providers").await.unwrap();
    let plan: Vec<String> = c
        .query(
            &format!(
                "EXPLAIN {}",
                hydra::store::LOOKUP_SQL
                    .replace("$1::bytea[]", "ARRAY[$1::bytea]")
                    .replace("$3::int4[]", "ARRAY[0]")
                    .replace("$2", "20")
            ),
            &[&popular.as_bytes()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.matches("providers_sample").count() == 2 && !plan.contains("Sort"), "{plan}");
    store.close().await;
}

/// Issue 11.4, fencing without a takeover: cut off from its datastore for longer than
/// 0.9 × `lease_ttl`, a node stops serving its heads (nobody can be sure another process did not
/// take them over); once a renewal succeeds again they listen on the same addresses and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_datastore_fences_its_heads_and_serves_again_after() {
    use hydra::net::wire::{encode_request, MessageType};
    // A cluster of its own: this test stops and restarts it.
    let cluster = hydra_testkit::PgCluster::start(false).unwrap();
    let url = hydra_testkit::create_database(&cluster.url("postgres"), "fence").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), 2);
    cfg.store = StoreKind::Postgres(url);
    cfg.lease_ttl = Duration::from_secs(3); // shipped: 60 s; short so the test waits 3 s, not 60
    let node = hydra::Node::start(cfg).await.unwrap();
    let heads = head_addrs(&node);
    let find_node = encode_request(MessageType::FindNode, &[7u8; 32], &[]);
    let up = || common::metric(&node, "hydra_head_up", &[]);
    let client = RawClient::connect(&heads).await;
    assert!(client.try_request(heads[0].0, &find_node).await.is_some());
    assert_eq!(up(), 2.0);

    cluster.halt().unwrap();
    until("the heads to fence", || up() == 0.0).await;
    assert!(client.try_request(heads[0].0, &find_node).await.is_none(), "a fenced head served");

    cluster.resume().unwrap();
    until("the heads to serve again", || up() == 2.0).await;
    let again = RawClient::connect(&heads).await; // the same addresses
    for (peer, _) in &heads {
        assert!(again.try_request(*peer, &find_node).await.is_some(), "{peer} does not serve again");
    }
    node.shutdown().await;
}

/// Issue 11.5: a start that fails after leasing (here: a head's port is taken) gives its leases
/// back, so the next run or another process need not wait for them to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_releases_the_leases_it_took() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config_on(dir.path(), 1, common::Backend::Postgres).await;
    let StoreKind::Postgres(url) = cfg.store.clone() else { unreachable!() };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.port_base = taken.local_addr().unwrap().port();
    let err = hydra::Node::start(cfg).await.err().expect("the head cannot listen on a taken port");
    println!("start failed as it should: {err:#}");
    let c = pg::client(&url).await;
    let leased: i64 = c.query_one("SELECT count(*) FROM head_leases", &[]).await.unwrap().get(0);
    let held: i64 =
        c.query_one("SELECT count(*) FROM head_leases WHERE token IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!((leased, held), (1, 0), "leased at start, then released");
}

/// Issue 11.1, on the shipped defaults: announcements sent before and during a datastore outage
/// (the server stopped, its connections broken) are returned by every head within 5 s of the
/// database's return, without a restart — the cold pool does not turn the first lookups into
/// sheds for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_5_s_of_the_datastore_returning_every_head_returns_what_was_announced() {
    use hydra::net::wire::{encode_request, MessageType};
    // A cluster of its own: this test stops and restarts it.
    let cluster = hydra_testkit::PgCluster::start(false).unwrap();
    let url = hydra_testkit::create_database(&cluster.url("postgres"), "back").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::shipped_config_on(dir.path(), 2, Backend::Sqlite).await;
    cfg.store = StoreKind::Postgres(url);
    let node = hydra::Node::start(cfg).await.unwrap();
    let heads = head_addrs(&node);
    let announcer = RawClient::connect(&heads[..1]).await;
    let announce = |keys: std::ops::Range<u32>| {
        let announcer = &announcer;
        let head = heads[0].0;
        async move {
            let mut s = announcer.open(head).await;
            for i in keys {
                RawClient::send(&mut s, &announcer.add_provider_body(key(i).as_bytes())).await.unwrap();
            }
            // Answered, so every announcement before it on the stream was taken.
            RawClient::request(&mut s, &encode_request(MessageType::Ping, &[], &[])).await.unwrap();
        }
    };
    announce(0..100).await;
    node.providers().flush().await;

    cluster.halt().unwrap();
    announce(100..200).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // flushes fail meanwhile
    cluster.resume().unwrap();
    let back = std::time::Instant::now();

    // Ten clients (separate peers, as DHT clients are) ask every head for every key until each
    // head has returned ≥ 99 % of them.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(RawClient::connect(&heads).await);
    }
    let mut found = vec![std::collections::HashSet::new(); heads.len()];
    let mut round = 0;
    while found.iter().any(|f| f.len() < 198) {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "5 s after the datastore returned the heads had {:?} of 200",
            found.iter().map(|f| f.len()).collect::<Vec<_>>()
        );
        for (h, (head, _)) in heads.iter().enumerate() {
            let missing: Vec<u32> = (0..200u32).filter(|i| !found[h].contains(i)).collect();
            for i in missing {
                let client = &clients[(i as usize + round) % clients.len()];
                let reply = client.get_providers(*head, key(i).as_bytes()).await;
                if reply.provider_peers.iter().any(|p| p.id == announcer.peer_id.to_bytes()) {
                    found[h].insert(i);
                }
            }
        }
        round += 1;
    }
    println!("every head returned ≥ 99 % within {:?} of the datastore's return", back.elapsed());
    node.shutdown().await;
}
