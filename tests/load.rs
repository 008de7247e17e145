//! Load tiers end to end, over real libp2p connections: what each tier does to requests, the
//! statement budget as a ceiling, and reloading `[load]` without a restart. Tiers are forced
//! (`load.force_tier`) so the tests do not depend on how busy the machine is; how tiers are
//! computed from signals is tested in `src/load.rs` under tokio's paused clock.

mod common;

both_backends!(refuse_serves_find_node_and_buffers_add_provider);

use std::time::{Duration, Instant};

use common::{head_addrs, http_get, http_request, metric, Backend, RawClient};
use hydra::config::LoadSection;
use hydra::load::Tier;
use hydra::net::wire::{self, MessageType};
use libp2p::kad::KBucketKey;

fn random_key() -> Vec<u8> {
    let mut k = vec![0x12, 0x20];
    k.extend((0..32).map(|_| rand::random::<u8>()));
    k
}

fn shed(node: &hydra::Node, tier: &str, reason: &str) -> f64 {
    metric(node, "hydra_load_shed_total", &[("tier", tier), ("reason", reason)])
}

/// Write `[load]` settings to the node's config file (what a reload reads).
fn write_load(path: &std::path::Path, load: &LoadSection) {
    #[derive(serde::Serialize)]
    struct File<'a> {
        load: &'a LoadSection,
    }
    std::fs::write(path, toml::to_string(&File { load }).unwrap()).unwrap();
}

async fn reload(node: &hydra::Node) -> (u16, String) {
    http_request(&node.http_addr().to_string(), "POST", "/v1/config/reload").await
}

/// A node with its `[load]` section in a config file, tier forced to `tier`.
async fn start_forced(dir: &std::path::Path, heads: usize, backend: Backend, tier: Tier) -> hydra::Node {
    let mut cfg = common::config_on(dir, heads, backend).await;
    cfg.load.force_tier = Some(tier);
    let file = dir.join("hydra.toml");
    write_load(&file, &cfg.load);
    cfg.config_file = Some(file);
    hydra::Node::start(cfg).await.expect("node starts")
}

async fn refuse_serves_find_node_and_buffers_add_provider(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 2, backend, Tier::Refuse).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let key = random_key();

    // GET_PROVIDERS of a key not cached: refused datastore work, closer peers only.
    let reply = client.get_providers(heads[1].0, &key).await;
    assert!(reply.provider_peers.is_empty());
    assert!(!reply.closer_peers.is_empty(), "GET_PROVIDERS is answered with closer peers only");
    assert_eq!(shed(&node, "refuse", "tier"), 1.0);

    let mut s = client.open(heads[0].0).await;
    RawClient::send(&mut s, &client.add_provider_body(&key)).await.unwrap();
    // FIND_NODE (and PING) never touch the datastore: answered in refuse.
    let reply =
        RawClient::request(&mut s, &wire::encode_request(MessageType::FindNode, &key, &[])).await.unwrap();
    assert_eq!(reply.r#type, MessageType::FindNode as i32);
    assert_eq!(reply.closer_peers.len(), 1, "the sibling head");
    // The ADD_PROVIDER before it was accepted into the buffer, not shed: a slow datastore is no
    // reason to lose an announcement (the buffer is bounded, its flushes wait for the budget).
    assert_eq!(shed(&node, "refuse", "tier"), 1.0, "only the lookup was shed");
    let accepted = [("type", "add_provider"), ("outcome", "ok")];
    assert_eq!(metric(&node, "hydra_kad_requests_total", &accepted), 1.0);

    // Back to normal without a restart: the record announced during refuse is there.
    let file = dir.path().join("hydra.toml");
    write_load(
        &file,
        &LoadSection { force_tier: Some(Tier::Normal), ..node.load().config().as_ref().clone() },
    );
    assert_eq!(reload(&node).await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if client.get_providers(heads[1].0, &key).await.provider_peers.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the announcement made in refuse was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_refuses_new_streams_while_open_streams_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 1, Backend::Sqlite, Tier::Normal).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let mut open = client.open(heads[0].0).await;
    let ping = wire::encode_request(MessageType::Ping, &[], &[]);
    RawClient::request(&mut open, &ping).await.unwrap();

    let file = dir.path().join("hydra.toml");
    write_load(&file, &LoadSection { force_tier: Some(Tier::Peak), ..node.load().config().as_ref().clone() });
    assert_eq!(reload(&node).await.0, 200);
    // A new stream is reset by the handler: the request gets no reply.
    let mut fresh = client.open(heads[0].0).await;
    assert!(RawClient::request(&mut fresh, &ping).await.is_err());
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "refused")]), 1.0);
    // The stream opened before still serves FIND_NODE.
    let reply =
        RawClient::request(&mut open, &wire::encode_request(MessageType::FindNode, b"k", &[])).await.unwrap();
    assert_eq!(reply.r#type, MessageType::FindNode as i32);
    node.shutdown().await;
}

/// Degrade: GET_PROVIDERS goes to the datastore only at heads among the k closest to the key
/// (go-libp2p-kad-dht #730); other heads answer from the cache, and a miss gets closer peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_serves_keys_far_from_the_head_from_cache_only() {
    let dir = tempfile::tempdir().unwrap();
    // 25 heads: for any key, 5 of them are not among the 20 closest of the process's heads.
    let node = start_forced(dir.path(), 25, Backend::Sqlite, Tier::Degrade).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let key = random_key();
    let target = KBucketKey::new(key.clone());
    let mut by_distance = heads.clone();
    by_distance.sort_by_key(|(p, _)| KBucketKey::from(*p).distance(&target));
    let (near, far) = (by_distance[0].0, by_distance[24].0);

    // Stored and flushed: the flush evicts the key from the cache.
    let mut s = client.open(near).await;
    RawClient::send(&mut s, &client.add_provider_body(&key)).await.unwrap();
    RawClient::request(&mut s, &wire::encode_request(MessageType::Ping, &[], &[])).await.unwrap();
    node.providers().flush().await;

    let reply = client.get_providers(far, &key).await;
    assert!(reply.provider_peers.is_empty(), "far head, cache miss: closer peers only");
    assert!(!reply.closer_peers.is_empty());
    assert_eq!(shed(&node, "degrade", "cache_only"), 1.0);
    // A head among the closest still reads the datastore (and fills the shared cache)…
    assert_eq!(client.get_providers(near, &key).await.provider_peers.len(), 1);
    // …after which the far head answers from the cache.
    assert_eq!(client.get_providers(far, &key).await.provider_peers.len(), 1);
    assert_eq!(shed(&node, "degrade", "cache_only"), 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_is_rejected_and_the_old_settings_stay() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 1, Backend::Sqlite, Tier::Normal).await;
    let http = node.http_addr().to_string();
    let file = dir.path().join("hydra.toml");
    let mut good = node.load().config().as_ref().clone();
    good.degrade.datastore_p99_ms = 80.0;
    write_load(&file, &good);
    let (code, body) = reload(&node).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&http_get(&http, "/v1/status").await.1).unwrap();
    assert_eq!(status["load"]["degrade"]["datastore_p99_ms"], 80.0);
    assert_eq!(status["tier"], "normal");
    for key in ["signals", "datastore_latency_ms"] {
        assert!(status[key].is_object(), "{key} in {status}");
    }

    // A refuse threshold below the degrade one: rejected, naming the field; nothing changes.
    std::fs::write(&file, "[load.degrade]\ndatastore_p99_ms = 80\n[load.refuse]\ndatastore_p99_ms = 40\n")
        .unwrap();
    let (code, body) = reload(&node).await;
    assert_eq!(code, 400);
    assert!(body.contains("load.refuse.datastore_p99_ms"), "{body}");
    // A file that does not parse is rejected too.
    std::fs::write(&file, "[load]\nexit_ratio = \"high\"\n").unwrap();
    assert_eq!(reload(&node).await.0, 400);
    let status: serde_json::Value = serde_json::from_str(&http_get(&http, "/v1/status").await.1).unwrap();
    assert_eq!(status["load"]["degrade"]["datastore_p99_ms"], 80.0);
    assert_eq!(status["load"]["refuse"]["datastore_p99_ms"], 250.0);
    assert_eq!(metric(&node, "hydra_load_config_reloads_total", &[("result", "error")]), 2.0);
    assert_eq!(
        metric(&node, "hydra_load_threshold", &[("tier", "degrade"), ("signal", "datastore_p99_ms")]),
        80.0
    );
    node.shutdown().await;
}

/// The statement budget is a ceiling: request-driven statements never run faster than
/// `load.datastore_statements_per_second`, however many requests arrive; they wait, and the
/// writes still land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastore_statements_never_exceed_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config_on(dir.path(), 2, Backend::Postgres).await;
    const BUDGET: f64 = 20.0;
    cfg.load.datastore_statements_per_second = BUDGET as u32;
    cfg.providers.flush_batch = 5;
    cfg.providers.flush_interval = Duration::from_millis(10);
    cfg.providers.read_batch_keys = 2;
    let node = hydra::Node::start(cfg).await.expect("node starts");
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let count = |op: &str| metric(&node, "hydra_datastore_operation_duration_seconds_count", &[("op", op)]);
    let statements = || 2.0 * count("put_providers") + count("get_providers");

    let start = Instant::now();
    let before = statements();
    let keys: Vec<Vec<u8>> = (0..100).map(|_| random_key()).collect();
    let mut s = client.open(heads[0].0).await;
    for k in &keys {
        RawClient::send(&mut s, &client.add_provider_body(k)).await.unwrap();
    }
    // Distinct unknown keys, concurrently: each needs a lookup.
    let unknown: Vec<Vec<u8>> = (0..40).map(|_| random_key()).collect();
    futures::future::join_all(unknown.iter().map(|k| client.get_providers(heads[1].0, k))).await;
    node.providers().flush().await;
    let elapsed = start.elapsed().as_secs_f64();
    let ran = statements() - before;
    // GCRA: at most rate × time, plus the burst (1 at this rate).
    assert!(ran <= BUDGET * elapsed + 1.0, "{ran} statements in {elapsed:.2} s over a {BUDGET}/s budget");
    let waited = metric(&node, "hydra_load_statement_budget_wait_seconds_count", &[]);
    assert!(waited > 0.0, "the budget never made a statement wait: the test did not exercise it");
    // Waiting, not dropping: every announcement is readable.
    for k in keys.iter().step_by(10) {
        assert_eq!(client.get_providers(heads[1].0, k).await.provider_peers.len(), 1);
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_peer_limits_apply_only_under_contention_share_fairly_and_cached_answers_are_free() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config_on(dir.path(), 2, Backend::Sqlite).await;
    // The least share 1/s (shipped: 5/s); per-peer limits are on (common::config turns them off).
    cfg.load.per_peer_requests_per_second = 1;
    cfg.load.force_tier = Some(Tier::Normal);
    let file = dir.path().join("hydra.toml");
    write_load(&file, &cfg.load);
    cfg.config_file = Some(file.clone());
    let node = hydra::Node::start(cfg).await.expect("node starts");
    let heads = head_addrs(&node);
    let provider = RawClient::connect(&heads).await;
    let asker = RawClient::connect(&heads).await;
    let key = random_key();
    let mut s = provider.open(heads[0].0).await;
    RawClient::send(&mut s, &provider.add_provider_body(&key)).await.unwrap();
    RawClient::request(&mut s, &wire::encode_request(MessageType::Ping, &[], &[])).await.unwrap();

    // Normal tier, spare capacity: 30 lookups of new keys at once, 3 × the budget's second,
    // none limited.
    let keys: Vec<Vec<u8>> = (0..30).map(|_| random_key()).collect();
    futures::future::join_all(keys.iter().map(|k| asker.get_providers(heads[1].0, k))).await;
    assert_eq!(asker.get_providers(heads[1].0, &key).await.provider_peers.len(), 1);
    assert_eq!(shed(&node, "normal", "peer_rate"), 0.0, "no peer is limited at the normal tier");
    assert_eq!(node.load().peer_share(), None);

    // Contention (degrade forced) and a small statement budget, so that a few requests exceed
    // what peers share: 40/s, 10/s in `degrade` (÷ degrade_per_peer_cost 4). The shipped budget
    // is 2000/s; the normal tier above ran under it, so no statement waited and nobody was limited.
    let degrade = LoadSection {
        force_tier: Some(Tier::Degrade),
        datastore_statements_per_second: 40,
        ..node.load().config().as_ref().clone()
    };
    write_load(&file, &degrade);
    assert_eq!(reload(&node).await.0, 200);
    eventually(Duration::from_secs(10), "no per-peer share in degrade", || {
        node.load().peer_share().is_some()
    })
    .await;
    assert_eq!(node.load().peer_share(), Some(10.0), "a lone peer may take all there is");
    // The cached answer for `key` stays free however often it is asked.
    for _ in 0..20 {
        let reply = asker.get_providers(heads[1].0, &key).await;
        assert_eq!(reply.provider_peers.len(), 1, "a cached answer is never limited");
    }
    assert_eq!(shed(&node, "degrade", "peer_rate"), 0.0);
    // Keys every head is among the 20 closest to (two heads): not cache-only, so charged. The
    // asker alone may burst a second of all there is (10), not a quarter of a fixed rate.
    let mut answered = 0;
    for _ in 0..40 {
        let reply = asker.get_providers(heads[1].0, &random_key()).await;
        assert!(!reply.closer_peers.is_empty(), "a shed GET_PROVIDERS still carries closer peers");
        answered += 1;
    }
    let limited = shed(&node, "degrade", "peer_rate") as usize;
    let served = answered - limited;
    eprintln!("degrade, one busy peer: {served} of {answered} lookups served, {limited} limited");
    assert!(limited >= 5, "40 lookups at once exceed a 10/s share: {limited} limited");
    assert!(served >= 5, "a lone busy peer gets what is available: {served} of 40 served");
    // Another peer asking little is not limited by the busy one's excess.
    let other = RawClient::connect(&heads).await;
    let before = shed(&node, "degrade", "peer_rate");
    for _ in 0..3 {
        other.get_providers(heads[1].0, &random_key()).await;
    }
    assert_eq!(shed(&node, "degrade", "peer_rate"), before, "one peer's excess does not limit another");
    assert!(metric(&node, "hydra_load_peer_share_statements_per_second", &[]) >= 1.0);
    node.shutdown().await;
}

/// Wait (≤ 10 s) until the rate `pick` reads from the node's status is `want`.
async fn status_rate_becomes(
    node: &hydra::Node,
    what: &str,
    pick: fn(&hydra::load::Status) -> Option<u32>,
    want: Option<u32>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = node.load().status().and_then(|s| pick(&s));
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what} is {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the node's admission gate shows `want` (None: every stream admitted).
async fn admission_becomes(node: &hydra::Node, want: Option<u32>) {
    status_rate_becomes(node, "admission", |s| s.admission_streams_per_second, want).await;
}

/// Wait until new connections are admitted at `want` per second (None: all).
async fn connections_become(node: &hydra::Node, want: Option<u32>) {
    status_rate_becomes(node, "connection admission", |s| s.admission_connections_per_second, want).await;
}

/// CPU distress, pinned (`load.force_admission_per_second`): new streams are reset at once,
/// streams opened before keep serving FIND_NODE, and a small rate admits a few of a burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_resets_new_streams_while_open_streams_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 1, Backend::Sqlite, Tier::Normal).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let ping = wire::encode_request(MessageType::Ping, &[], &[]);
    let mut open = client.open(heads[0].0).await;
    RawClient::request(&mut open, &ping).await.unwrap();

    let file = dir.path().join("hydra.toml");
    // The stream gate alone: connection shedding off, or the burst below (far more offered than
    // admitted) would close this client's connection and its open stream with it — that is
    // `shedding_closes_busy_connections_refuses_new_ones_fast_and_ends`.
    let pinned = |rate| LoadSection {
        force_admission_per_second: Some(rate),
        admission_shed_ratio: 0.0,
        ..node.load().config().as_ref().clone()
    };
    write_load(&file, &pinned(0));
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, Some(0)).await;
    for _ in 0..5 {
        let asked = Instant::now();
        assert!(client.try_request(heads[0].0, &ping).await.is_none(), "a new stream is refused");
        // A reset, not a silent drop: the client learns long before its own 10 s timeout.
        assert!(asked.elapsed() < Duration::from_secs(2), "refused after {:?}", asked.elapsed());
    }
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "admission")]), 5.0);
    let reply =
        RawClient::request(&mut open, &wire::encode_request(MessageType::FindNode, b"k", &[])).await.unwrap();
    assert_eq!(reply.r#type, MessageType::FindNode as i32, "the open stream is still served");

    // 5 streams/s (a burst of one): of 20 new streams at once, few are admitted, not none.
    write_load(&file, &pinned(5));
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, Some(5)).await;
    let before = metric(&node, "hydra_kad_streams_total", &[("event", "admission")]);
    let tries = futures::future::join_all(
        (0..20).map(|_| async { client.try_request(heads[0].0, &ping).await.is_some() }),
    )
    .await;
    let served = tries.iter().filter(|ok| **ok).count();
    assert!((1..=5).contains(&served), "{served} of 20 admitted at 5/s");
    let refused = metric(&node, "hydra_kad_streams_total", &[("event", "admission")]) - before;
    assert_eq!(refused as usize, 20 - served);

    // Unpinned and not short of CPU: every stream admitted again.
    write_load(&file, &LoadSection { force_admission_per_second: None, ..pinned(0) });
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, None).await;
    let mut fresh = client.open(heads[0].0).await;
    RawClient::request(&mut fresh, &ping).await.unwrap();
    node.shutdown().await;
}

/// The real signal: the node runs in this test's runtime, so tasks that hold both workers
/// (blocking sleeps) delay every other task as a saturated CPU would. The lag probe sees it,
/// admission starts limiting new streams, and opens again once the workers are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_lag_starts_admission_by_rate_and_its_end_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config_on(dir.path(), 1, Backend::Sqlite).await;
    // Computed, not forced: the tier and admission follow the signals in this test.
    cfg.load.force_tier = None;
    cfg.load.degrade.runtime_lag_ms = hydra::config::LoadSection::default().degrade.runtime_lag_ms;
    cfg.load.admission_lag_ms = hydra::config::LoadSection::default().admission_lag_ms;
    let node = hydra::Node::start(cfg).await.expect("node starts");
    let hog = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let hog = hog.clone();
            tokio::spawn(async move {
                while hog.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(40)); // holds a worker
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let limited = loop {
        if let Some(r) = node.load().status().and_then(|s| s.admission_streams_per_second) {
            break r;
        }
        assert!(Instant::now() < deadline, "admission never limited under a 40 ms lag");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(limited >= node.load().config().admission_min_streams_per_second, "never below the floor");
    let lag = metric(&node, "hydra_load_signal", &[("signal", "runtime_lag_ms")]);
    assert!(lag >= node.load().config().admission_lag_ms, "lag signal {lag} ms");
    hog.store(false, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.await.unwrap();
    }
    admission_becomes(&node, None).await;
    node.shutdown().await;
}

/// QUIC connections are their own muxers: the same gate refuses their new streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_gates_quic_streams_too() {
    use futures::StreamExt as _;
    use libp2p::multiaddr::Protocol;
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 1, Backend::Sqlite, Tier::Normal).await;
    let head = &node.heads()[0];
    let quic = head
        .listen_addrs
        .load()
        .iter()
        .find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1)))
        .cloned()
        .expect("the head listens on QUIC");
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .build();
    let control = swarm.behaviour().new_control();
    swarm.dial(quic.with(Protocol::P2p(head.peer_id))).unwrap();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let ping = wire::encode_request(MessageType::Ping, &[], &[]);
    let ask = || {
        let mut control = control.clone();
        let ping = ping.clone();
        let peer = head.peer_id;
        async move {
            let mut s = tokio::time::timeout(
                Duration::from_secs(10),
                control.open_stream(peer, hydra::net::KAD_PROTOCOL),
            )
            .await
            .expect("open in time")
            .ok()?;
            RawClient::request(&mut s, &ping).await.ok()
        }
    };
    assert!(ask().await.is_some(), "served over QUIC while admission is open");
    let file = dir.path().join("hydra.toml");
    write_load(
        &file,
        &LoadSection { force_admission_per_second: Some(0), ..node.load().config().as_ref().clone() },
    );
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, Some(0)).await;
    assert!(ask().await.is_none(), "a new QUIC stream is refused");
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "admission")]), 1.0);
    node.shutdown().await;
}

/// Dial `head` from `src`: how long until the connection was established (Ok) or refused (Err).
async fn dial_from(
    src: std::net::Ipv4Addr,
    head: &(libp2p::PeerId, libp2p::Multiaddr),
) -> Result<Duration, Duration> {
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;
    let mut swarm = hydra_testkit::bound_swarm(src, |_| libp2p_stream::Behaviour::new());
    let asked = Instant::now();
    swarm.dial(head.1.clone().with(libp2p::multiaddr::Protocol::P2p(head.0))).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return Ok(asked.elapsed()),
                SwarmEvent::OutgoingConnectionError { .. } => return Err(asked.elapsed()),
                _ => {}
            }
        }
    })
    .await;
    end.expect("the dial ends, one way or the other, in time")
}

/// Wait (≤ `within`) until `cond` holds; fail with `what` if it does not.
async fn eventually(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A dial from `src` to `head` is refused while the node sheds, and learns it within a second.
async fn refused_within_a_second(src: std::net::Ipv4Addr, head: &(libp2p::PeerId, libp2p::Multiaddr)) {
    let took = dial_from(src, head).await.expect_err("a new connection is refused while shedding");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
}

/// Far past capacity (pinned: 20 new streams/s admitted while clients offer hundreds), the node
/// sheds connections: busy inbound connections are closed, new ones are refused before their
/// handshake — the client learns within a round trip, not at its timeout — while a connection
/// that opens no new streams keeps its open stream and FIND_NODE on it; once the excess is gone
/// shedding ends and new connections are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_closes_busy_connections_refuses_new_ones_fast_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_forced(dir.path(), 1, Backend::Sqlite, Tier::Normal).await;
    let heads = head_addrs(&node);
    let head = heads[0].0;
    let ping = wire::encode_request(MessageType::Ping, &[], &[]);
    let find = wire::encode_request(MessageType::FindNode, &random_key(), &[]);
    // A quiet client holds one open stream and opens no others.
    let quiet = RawClient::connect_from(std::net::Ipv4Addr::new(127, 0, 3, 1), &heads).await;
    let mut open = quiet.open(head).await;
    RawClient::request(&mut open, &ping).await.unwrap();
    let busy: Vec<RawClient> = futures::future::join_all(
        (0..8).map(|i| RawClient::connect_from(std::net::Ipv4Addr::new(127, 0, 3, 10 + i), &heads)),
    )
    .await;

    let file = dir.path().join("hydra.toml");
    let pinned = |rate: Option<u32>| LoadSection {
        force_admission_per_second: rate,
        ..node.load().config().as_ref().clone()
    };
    write_load(&file, &pinned(Some(20)));
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, Some(20)).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // two controller samples
    let status = node.load().status().unwrap();
    assert_eq!(status.admission_connections_per_second, Some(0), "limited, no room for 3 s yet");
    assert!(!status.shedding_connections, "no new connections yet is not shedding");
    // CPU short: new connections by rate, once the gate has had room for a few seconds.
    connections_become(&node, Some(20)).await;

    // Each busy client opens a new stream every 10 ms: 800/s offered against 20/s admitted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused_fast = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused_slow = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = futures::future::join_all(busy.iter().map(|c| {
        let (stop, fast, slow, ping) =
            (stop.clone(), refused_fast.clone(), refused_slow.clone(), ping.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                if tokio::time::timeout(Duration::from_secs(5), c.try_request(head, &ping))
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                {
                    let counter = if asked.elapsed() < Duration::from_secs(1) { &fast } else { &slow };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }));
    let watch = async {
        let shed = || metric(&node, "hydra_kad_connections_shed_total", &[]);
        eventually(Duration::from_secs(20), "no connection shed in 20 s", || shed() >= 1.0).await;
        // Checked at once: shedding ends two calm seconds after the busy connections are gone.
        assert_eq!(metric(&node, "hydra_load_shedding_connections", &[]), 1.0);
        let status = node.load().status().unwrap();
        assert!(status.shedding_connections);
        assert_eq!(status.admission_connections_per_second, Some(0));
        // A new connection is refused at once, by the kernel: the head's TCP listener is closed
        // (shipped default `admission_close_listeners`), the node never sees the dial.
        let closed = || metric(&node, "hydra_kad_listeners_closed", &[]);
        eventually(Duration::from_secs(2), "the listener was not closed while shedding", || closed() >= 1.0)
            .await;
        assert!(node.load().status().unwrap().listeners_closed);
        let raw = std::net::TcpStream::connect(("127.0.0.1", common::tcp_port(&heads[0].1).unwrap()));
        assert_eq!(raw.map(drop).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        refused_within_a_second(std::net::Ipv4Addr::new(127, 0, 3, 99), &heads[0]).await;
        assert_eq!(metric(&node, "hydra_kad_connections_refused_total", &[]), 0.0, "the node saw no dial");
        // Listeners kept open: the node accepts the dial and closes it before its handshake.
        write_load(&file, &LoadSection { admission_close_listeners: false, ..pinned(Some(20)) });
        assert_eq!(reload(&node).await.0, 200);
        eventually(Duration::from_secs(2), "the listener was not opened again", || closed() == 0.0).await;
        assert!(node.load().status().unwrap().shedding_connections);
        refused_within_a_second(std::net::Ipv4Addr::new(127, 0, 3, 98), &heads[0]).await;
        assert!(metric(&node, "hydra_kad_connections_refused_total", &[]) >= 1.0);
        write_load(&file, &pinned(Some(20)));
        assert_eq!(reload(&node).await.0, 200);
        // The quiet connection was not cut: its open stream still answers FIND_NODE.
        let reply = RawClient::request(&mut open, &find).await.expect("the quiet connection's stream");
        assert_eq!(reply.r#type, MessageType::FindNode as i32);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    futures::future::join(load, watch).await;
    assert!(refused_fast.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_eq!(
        refused_slow.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "every refused request learned it within a second"
    );

    // The excess gone: shedding ends (two calm seconds) and, after a few seconds with room, a
    // new connection is admitted (by rate while the gate is still pinned).
    let calm = || !node.load().status().unwrap().shedding_connections;
    eventually(Duration::from_secs(20), "still shedding 20 s after the load stopped", calm).await;
    connections_become(&node, Some(20)).await;
    assert_eq!(metric(&node, "hydra_kad_listeners_closed", &[]), 0.0, "listening again");
    dial_from(std::net::Ipv4Addr::new(127, 0, 3, 100), &heads[0]).await.expect("admitted again");
    write_load(&file, &pinned(None));
    assert_eq!(reload(&node).await.0, 200);
    admission_becomes(&node, None).await;
    node.shutdown().await;
}
