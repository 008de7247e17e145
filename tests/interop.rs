//! Interop with an independent implementation: js-libp2p with `@libp2p/kad-dht` (versions pinned
//! in `tests/js/package-lock.json`) against a node's heads over real TCP on loopback.
//!
//! Needs `node` and `npm` on PATH; the npm packages are installed with `npm ci` on first use.
//!
//! The nodes run the **shipped defaults** (`common::shipped_config_on`): computed tiers, the 40 ms
//! read deadline, per-peer limits, the 25 ms queue wait — what users run, busy machine or not.

mod common;

both_backends!(
    js_peer_provides_and_finds_100_cids_through_the_heads,
    js_dht_walk_through_a_mixed_js_and_hydra_network
);

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use common::{metric, Backend};

static NPM: Mutex<()> = Mutex::new(());
/// One js scenario at a time: each starts several js-libp2p processes, and in parallel on two
/// cores they starve each other and the node.
static JS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Install the pinned js packages once (serialised across the tests of this binary).
fn ensure_js_deps() {
    let _guard = NPM.lock().unwrap_or_else(|e| e.into_inner());
    if js_dir().join("node_modules/@libp2p/kad-dht").exists() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(js_dir())
        .status()
        .expect("npm is installed (the interop tests need Node.js and npm)");
    assert!(status.success(), "npm ci in tests/js failed");
}

#[derive(serde::Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct JsResult {
    provided: u32,
    found: u32,
    via_hydra: u32,
    max_hops: u32,
    /// Lookups that missed once and were retried (reported in the printed result).
    #[allow(dead_code)]
    retried: u32,
}

async fn run_js(heads_json: &str, mode: &str, count: u32) -> JsResult {
    let _one_at_a_time = JS.lock().await;
    let child = tokio::process::Command::new("node")
        .arg("interop.mjs")
        .arg(mode)
        .arg(count.to_string())
        .env("HEADS", heads_json)
        .current_dir(js_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("js peer finishes within 5 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "js peer failed ({}); stdout: {stdout}", out.status);
    let line = stdout.lines().last().expect("js peer printed a result");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad js result {line:?}: {e}"))
}

/// Shed counts of the node, for failure messages.
fn sheds(node: &hydra::Node) -> String {
    let by_type: Vec<String> = ["add_provider", "get_providers", "find_node"]
        .iter()
        .map(|t| {
            format!("{t}={}", metric(node, "hydra_kad_requests_total", &[("type", t), ("outcome", "shed")]))
        })
        .collect();
    let streams: Vec<String> = ["queue_full", "queue_wait", "peer_limit", "error"]
        .iter()
        .map(|e| format!("{e}={}", metric(node, "hydra_kad_streams_total", &[("event", e)])))
        .collect();
    let reasons: Vec<String> =
        ["tier", "cache_only", "peer_rate", "read_deadline", "reads_in_flight", "datastore_error"]
            .iter()
            .map(|r| format!("{r}={}", metric(node, "hydra_load_shed_total", &[("reason", r)])))
            .collect();
    let tier = node.load().tier().as_str();
    format!(
        "shed requests: {}; by reason: {}; tier now {tier}; streams: {}",
        by_type.join(" "),
        reasons.join(" "),
        streams.join(" ")
    )
}

fn heads_json(node: &hydra::Node) -> String {
    let heads: Vec<hydra::http::HeadInfo> = node
        .heads()
        .iter()
        .map(|h| hydra::http::HeadInfo {
            index: h.index,
            identity: h.identity,
            peer_id: h.peer_id.to_string(),
            addrs: h.listen_addrs.load().iter().map(|a| a.to_string()).collect(),
        })
        .collect();
    serde_json::to_string(&heads).unwrap()
}

async fn js_peer_provides_and_finds_100_cids_through_the_heads(backend: Backend) {
    ensure_js_deps();
    let dir = tempfile::tempdir().unwrap();
    let node = hydra::Node::start(common::shipped_config_on(dir.path(), 4, backend).await)
        .await
        .expect("node starts");
    let r = run_js(&heads_json(&node), "provide-find", 100).await;
    println!("js provide-find ({backend:?}): {r:?}");
    assert_eq!(r.provided, 100);
    assert_eq!(r.found, 100, "{r:?}; {}", sheds(&node));
    // The js peers are DHT clients: only hydra heads can have answered.
    assert_eq!(r.via_hydra, 100, "{r:?}");
    let adds = metric(&node, "hydra_kad_requests_total", &[("type", "add_provider"), ("outcome", "ok")]);
    assert!(adds >= 100.0, "heads took {adds} ADD_PROVIDERs");
    node.shutdown().await;
}

async fn js_dht_walk_through_a_mixed_js_and_hydra_network(backend: Backend) {
    ensure_js_deps();
    let dir = tempfile::tempdir().unwrap();
    let node = hydra::Node::start(common::shipped_config_on(dir.path(), 4, backend).await)
        .await
        .expect("node starts");
    let r = run_js(&heads_json(&node), "walk", 20).await;
    println!("js walk ({backend:?}): {r:?}");
    assert_eq!(r.provided, 20);
    assert_eq!(r.found, 20, "{r:?}; {}", sheds(&node));
    assert_eq!(r.via_hydra, 20, "the records live only on the heads: {r:?}");
    // The finder starts connected only to a js server, so reaching a head takes several queries.
    assert!(r.max_hops >= 2, "{r:?}");
    node.shutdown().await;
}
