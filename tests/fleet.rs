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

/// The first `n` identities of the balanced sequence of `SEED_HEX`, as peer IDs.
fn balanced_sequence(n: u32) -> Vec<String> {
    let seed = Seed::from_hex(SEED_HEX).unwrap();
    let mut trie = KeyTrie::default();
    identity::extend(&seed, &mut trie, 0..n)
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
    let js = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if !js.join("node_modules/@libp2p/kad-dht").exists() {
        let ok = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&js)
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "npm ci in tests/js failed");
    }
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
