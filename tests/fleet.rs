//! A fleet: several `hydra` processes on different loopback addresses sharing one PostgreSQL and
//! one identity seed. Identities are balanced, survive restarts on the same ports, and are taken
//! over when a process dies; a js-libp2p peer provides through one process and finds through another.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{pg, Process};
use hydra::identity::{self, KeyTrie, Seed};
use hydra::store::FleetHead;

const SEED_HEX: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";

struct Fleet {
    _dir: tempfile::TempDir,
    config: String,
    seed: String,
    url: String,
}

impl Fleet {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fleet.toml");
        std::fs::write(
            &config,
            format!(
                "[identity]\nlease_ttl = \"6s\"\n[providers]\nflush_interval = \"100ms\"\nread_deadline = \"10s\"\n\
                 negative_cache_ttl = \"200ms\"\n\
                 [routing]\naddress_filter = \"any\"\n{}",
                common::STABLE_LOAD_TOML
            ),
        )
        .unwrap();
        let seed = dir.path().join("fleet.seed");
        std::fs::write(&seed, SEED_HEX).unwrap();
        Fleet {
            config: config.to_str().unwrap().into(),
            seed: seed.to_str().unwrap().into(),
            url: pg::fresh_database().await,
            _dir: dir,
        }
    }

    /// Start (without waiting) process `node` on `ip` with `heads` heads from `port_base`.
    fn launch(&self, node: &str, ip: &str, heads: usize, port_base: u16, data: &Path) -> common::Launched {
        let http = format!("{ip}:0");
        let (heads, port_base) = (heads.to_string(), port_base.to_string());
        Process::launch(
            &["run", "--config", &self.config, "--listen-ip", ip, "--http-listen", &http, "--heads", &heads],
            &[
                ("HYDRA_PORT_BASE", &port_base),
                ("HYDRA_NODE_NAME", node),
                ("HYDRA_DATABASE_URL", &self.url),
                ("HYDRA_IDENTITY_SEED_FILE", &self.seed),
                ("HYDRA_DATA_DIR", data.to_str().unwrap()),
            ],
        )
    }
}

fn fleet_heads(p: &Process) -> Vec<FleetHead> {
    serde_json::from_str(&p.get("/v1/heads?fleet=true")).unwrap()
}

fn local_heads(p: &Process) -> Vec<hydra::http::HeadInfo> {
    serde_json::from_str(&p.get("/v1/heads")).unwrap()
}

/// The first `n` identities of the balanced sequence of `SEED_HEX` (a new fleet's scheme), as
/// peer IDs.
fn balanced_sequence(n: u32) -> Vec<String> {
    let seed = Seed::from_hex(SEED_HEX).unwrap();
    let mut trie = KeyTrie::default();
    identity::extend(&seed, &mut trie, 0..n, identity::Scheme::CURRENT)
        .into_iter()
        .map(|i| i.keypair.public().to_peer_id().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_identities_are_balanced_persistent_and_taken_over() {
    let fleet = Fleet::new().await;
    let (da, db, dc) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let base = hydra_testkit::free_port_base(20, &["127.0.0.2", "127.0.0.3"]).unwrap();

    // Two processes start at the same moment.
    let (la, lb) = (
        fleet.launch("a", "127.0.0.2", 20, base, da.path()),
        fleet.launch("b", "127.0.0.3", 20, base, db.path()),
    );
    let (a, b) = (la.started(), lb.started());

    let all = fleet_heads(&a);
    assert_eq!(all.len(), 40, "{all:?}");
    let peers: HashSet<&str> = all.iter().map(|h| h.peer_id.as_str()).collect();
    assert_eq!(peers.len(), 40, "40 distinct peer IDs");
    // Whoever issued which index, together they hold exactly the balanced sequence 0..40.
    let mut by_index: Vec<(u32, String)> = all.iter().map(|h| (h.identity, h.peer_id.clone())).collect();
    by_index.sort();
    assert_eq!(by_index.into_iter().map(|(_, p)| p).collect::<Vec<_>>(), balanced_sequence(40));
    let per_node: HashMap<Option<String>, usize> = all.iter().fold(HashMap::new(), |mut m, h| {
        *m.entry(h.node.clone()).or_default() += 1;
        m
    });
    assert_eq!(per_node.get(&Some("a".into())), Some(&20));
    assert_eq!(per_node.get(&Some("b".into())), Some(&20));
    assert!(all.iter().all(|h| h.lease_active && !h.addrs.is_empty()));

    // Head slot i listens on port_base + i.
    let before_a = local_heads(&a);
    for h in &before_a {
        let want = format!("/ip4/127.0.0.2/tcp/{}", base as usize + h.index);
        assert!(h.addrs.contains(&want), "slot {} on {:?}, wanted {want}", h.index, h.addrs);
    }

    // Restart a: the same identities on the same slots and ports.
    assert!(a.stop());
    let a = fleet.launch("a", "127.0.0.2", 20, base, da.path()).started();
    assert_eq!(local_heads(&a), before_a, "restart changed identities or ports");

    // kill -9 b, wait out its lease: a third process takes over exactly b's identities.
    let b_ids: HashSet<String> = local_heads(&b).into_iter().map(|h| h.peer_id).collect();
    b.kill9();
    let killed = std::time::Instant::now();
    while fleet_heads(&a).iter().any(|h| b_ids.contains(&h.peer_id) && h.lease_active) {
        assert!(killed.elapsed() < Duration::from_secs(60), "b's leases never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = fleet.launch("c", "127.0.0.3", 20, base, dc.path()).started();
    let c_ids: HashSet<String> = local_heads(&c).into_iter().map(|h| h.peer_id).collect();
    assert_eq!(c_ids, b_ids, "c took over b's identities");
    let all = fleet_heads(&c);
    assert_eq!(all.len(), 40, "no new identities were needed");

    // The CLI lists the fleet too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra"))
        .args(["heads", "--database-url", &fleet.url, "--identity-seed-file", &fleet.seed])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().filter(|l| l.contains(" active ")).count(), 40, "{text}");
    assert_eq!(text.lines().filter(|l| l.contains(" c ") || l.contains("  c ")).count(), 20, "{text}");
    assert!(a.stop() && c.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_js_peer_provides_through_one_process_and_finds_through_another() {
    let fleet = Fleet::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (la, lb) =
        (fleet.launch("a", "127.0.0.2", 3, 0, da.path()), fleet.launch("b", "127.0.0.3", 3, 0, db.path()));
    let (a, b) = (la.started(), lb.started());
    let js = hydra_testkit::js_dir();
    hydra_testkit::ensure_js_deps().expect("the pinned js packages (Node.js and npm installed)");
    let out = tokio::process::Command::new("node")
        .args(["interop.mjs", "cross", "50"])
        .env("HEADS", a.get("/v1/heads"))
        .env("HEADS_B", b.get("/v1/heads"))
        .current_dir(&js)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out).await.expect("js peer finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "js failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("js cross-process: {r}");
    assert_eq!(r["provided"], 50);
    assert_eq!(r["found"], 50, "{r}");
    assert_eq!(r["viaHydra"], 50, "every record came from a head of process B: {r}");
    assert!(a.stop() && b.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_the_same_node_name_is_refused() {
    let fleet = Fleet::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet.launch("same", "127.0.0.2", 3, 0, da.path()).started();
    let before = local_heads(&a);
    // Same node name, e.g. two processes on one host both defaulting to the host name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra"))
        .args(["run", "--config", &fleet.config, "--listen-ip", "127.0.0.3", "--http-listen", "127.0.0.3:0"])
        .args(["--heads", "3"])
        .env("HYDRA_NODE_NAME", "same")
        .env("HYDRA_DATABASE_URL", &fleet.url)
        .env("HYDRA_IDENTITY_SEED_FILE", &fleet.seed)
        .env("HYDRA_DATA_DIR", db.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("give every process its own --node-name"), "{stderr}");
    // It waited for the leases to expire first (the running process kept renewing them).
    assert!(String::from_utf8_lossy(&out.stdout).contains("waiting for them to expire"));
    assert_eq!(local_heads(&a), before);
    assert!(fleet_heads(&a).iter().all(|h| h.lease_active && h.node.as_deref() == Some("same")));
    assert!(a.stop());
}

/// libfaketime (Debian package `faketime`, installed by `.ci/run`).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Rows of the fleet's leases that are live by the database's clock, per node name.
async fn live_leases(url: &str, node: &str) -> i64 {
    let c = pg::client(url).await;
    c.query_one("SELECT count(*) FROM head_leases WHERE node_name = $1 AND expires_at > now()", &[&node])
        .await
        .unwrap()
        .get(0)
}

/// Issue 11.4: every expiry and lease decision uses the database's clock. A process whose host
/// clock runs 50 h ahead (libfaketime) must not take over live identities, hide live records,
/// collect them, or write expiries 50 h late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_clock_is_off_cannot_take_over_hide_or_collect() {
    let fleet = Fleet::new().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet.launch("a", "127.0.0.2", 2, 0, da.path()).started();
    let a_heads = a.heads();
    let client = common::RawClient::connect(&a_heads[..1]).await;
    let key = [0x12, 0x20].into_iter().chain((0..32).map(|_| rand::random::<u8>())).collect::<Vec<u8>>();
    let mut s = client.open(a_heads[0].0).await;
    common::RawClient::send(&mut s, &client.add_provider_body(&key)).await.unwrap();
    let c = pg::client(&fleet.url).await;
    let stored = || async {
        c.query_one("SELECT count(*) FROM providers WHERE key = $1", &[&key]).await.unwrap().get::<_, i64>(0)
    };
    let t = std::time::Instant::now();
    while stored().await == 0 {
        assert!(t.elapsed() < common::WAIT, "the record was never flushed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing: install the Debian package faketime (.ci/run does)"
    );
    // B: its clock 50 h ahead; it collects garbage every second (the shipped interval is 10 min).
    let config = std::fs::read_to_string(&fleet.config)
        .unwrap()
        .replace("[providers]\n", "[providers]\ngc_interval = \"1s\"\n");
    let b_config = db.path().join("b.toml");
    std::fs::write(&b_config, config).unwrap();
    // libfaketime preloaded into hydra itself (the `faketime` wrapper would fork, and signals
    // would reach the wrapper, not the node).
    let b = Process::launch(
        &["run", "--config", b_config.to_str().unwrap()],
        &[
            ("LD_PRELOAD", FAKETIME_LIB),
            ("FAKETIME", "+50h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("HYDRA_LISTEN_IP", "127.0.0.3"),
            ("HYDRA_HTTP_LISTEN", "127.0.0.3:0"),
            ("HYDRA_HEADS", "2"),
            ("HYDRA_NODE_NAME", "b"),
            ("HYDRA_DATABASE_URL", &fleet.url),
            ("HYDRA_IDENTITY_SEED_FILE", &fleet.seed),
            ("HYDRA_DATA_DIR", db.path().to_str().unwrap()),
        ],
    )
    .started();
    // Leases: A's two identities stay A's; B leased two new ones.
    let heads = fleet_heads(&b);
    assert_eq!(heads.len(), 4, "{heads:?}");
    let a_ids: HashSet<String> = a_heads.iter().map(|(p, _)| p.to_string()).collect();
    for h in &heads {
        let owner = if a_ids.contains(&h.peer_id) { "a" } else { "b" };
        assert_eq!(h.node.as_deref(), Some(owner), "{h:?}");
        assert!(h.lease_active, "live by the database's clock: {h:?}");
    }
    assert_eq!((live_leases(&fleet.url, "a").await, live_leases(&fleet.url, "b").await), (2, 2));

    // Reads: B returns A's live record (by its own clock it expired 2 h ago).
    let b_heads = b.heads();
    let bc = common::RawClient::connect(&b_heads[..1]).await;
    let reply = bc.get_providers(b_heads[0].0, &key).await;
    assert_eq!(reply.provider_peers.len(), 1, "a live record was hidden");

    // Writes: B's expiries are the database's now + 48 h, not its own clock's.
    let key2 = [0x12, 0x20].into_iter().chain((0..32).map(|_| rand::random::<u8>())).collect::<Vec<u8>>();
    let mut s = bc.open(b_heads[0].0).await;
    common::RawClient::send(&mut s, &bc.add_provider_body(&key2)).await.unwrap();
    let t = std::time::Instant::now();
    let hours = loop {
        let row = c
            .query_opt(
                "SELECT (extract(epoch FROM expires_at - now()) / 3600)::float8 FROM providers WHERE key = $1",
                &[&key2],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            break r.get::<_, f64>(0);
        }
        assert!(t.elapsed() < common::WAIT, "B's record was never flushed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!((47.9..48.1).contains(&hours), "B wrote an expiry {hours:.2} h ahead of the database's clock");

    // GC: once A is gone B holds the collector's lock and sweeps every second; by its own
    // clock every record here has expired, by the database's none has.
    assert!(a.stop());
    let b_gc_rounds = || b.metric("hydra_datastore_operation_duration_seconds_count", &[("op", "gc")]);
    let rounds = b_gc_rounds();
    let t = std::time::Instant::now();
    while b_gc_rounds() < rounds + 3.0 {
        assert!(t.elapsed() < common::WAIT, "B never collected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored().await, 1, "B collected a live record");
    assert_eq!(b.metric("hydra_providers_gc_leader", &[]), 1.0, "B held the collector's lease");
    // And B's host clock really was off: it stamps its GC rounds 50 h ahead.
    let stamped = b.metric("hydra_providers_gc_last_run_timestamp_seconds", &[]);
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(stamped > real + 49.0 * 3600.0, "B's clock was not offset (libfaketime): {stamped} vs {real}");
    assert!(b.stop());
}

/// Issue 11.4, fencing: a process paused past its lease stops serving its heads before another
/// process may take them over, so two hosts never serve one peer ID — and after it resumes it
/// serves nothing on them (streams reset, listeners closed) while the new owner does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_never_serves_an_identity_another_took_over() {
    use hydra::net::wire::{encode_request, MessageType};
    let fleet = Fleet::new().await; // lease_ttl 6 s
    let (da, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet.launch("a", "127.0.0.2", 2, 0, da.path()).started();
    let a_heads = a.heads();
    let find_node = encode_request(MessageType::FindNode, &[7u8; 32], &[]);
    let client = common::RawClient::connect(&a_heads).await;
    assert!(client.try_request(a_heads[0].0, &find_node).await.is_some(), "A serves before the pause");

    let pid = a.child.id().to_string();
    let signal =
        |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let t = std::time::Instant::now();
    while live_leases(&fleet.url, "a").await > 0 {
        assert!(t.elapsed() < common::WAIT, "A's leases never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = fleet.launch("c", "127.0.0.3", 2, 0, dc.path()).started();
    let c_heads = c.heads();
    let ids = |h: &[(libp2p::PeerId, libp2p::Multiaddr)]| h.iter().map(|(p, _)| *p).collect::<HashSet<_>>();
    assert_eq!(ids(&c_heads), ids(&a_heads), "C took over A's identities");
    signal("-CONT");

    // At once after resuming, A refuses: on the connection it already had, and on new ones.
    for (peer, _) in &a_heads {
        if let Some(reply) = client.try_request(*peer, &find_node).await {
            // Seen once in CI under a loaded machine, never reproduced: say what answered.
            panic!(
                "A served {peer} after a takeover: a reply of type {} with {} closer peers; A counted {} fenced \
                 streams, C queued {} (C has no stream from this client unless it answered)",
                reply.r#type,
                reply.closer_peers.len(),
                a.metric("hydra_kad_streams_total", &[("event", "fenced")]),
                c.metric("hydra_kad_streams_total", &[("event", "queued")]),
            );
        }
    }
    // Its listeners close at the head's next tick (200 ms): new connections are refused.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (_, addr) in &a_heads {
        let sock = std::net::SocketAddr::from(([127, 0, 0, 2], common::tcp_port(addr).unwrap()));
        assert!(std::net::TcpStream::connect(sock).is_err(), "A still accepts connections on {sock}");
    }
    // The new owner serves them.
    let cc = common::RawClient::connect(&c_heads).await;
    for (peer, _) in &c_heads {
        assert!(cc.try_request(*peer, &find_node).await.is_some(), "C does not serve {peer}");
    }
    // A learns at its next renewal that the identities are gone, and stops those heads for good.
    let t = std::time::Instant::now();
    loop {
        if a.metric("hydra_head_up", &[]) == 0.0 {
            break;
        }
        assert!(t.elapsed() < common::WAIT, "A's heads still up after losing their leases");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(live_leases(&fleet.url, "a").await, 0, "A renewed nothing it lost");
    assert!(a.stop() && c.stop());
}
