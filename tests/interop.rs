//! Interop with independent implementations: js-libp2p with `@libp2p/kad-dht` against a node's
//! heads over real TCP on loopback, Helia's Delegated Routing V1 client against its routing API,
//! and IPNS records made by the `ipns` package (versions pinned in `tests/js/package-lock.json`).
//!
//! Needs `node` and `npm` on PATH; the npm packages are installed with `npm ci` on first use.
//!
//! The nodes run the **shipped defaults** (`common::shipped_config_on`): computed tiers, the 40 ms
//! read deadline, per-peer limits, the 25 ms queue wait — what users run, busy machine or not.

mod common;

both_backends!(
    js_peer_provides_and_finds_100_cids_through_the_heads,
    js_dht_walk_through_a_mixed_js_and_hydra_network,
    helias_routing_client_finds_what_a_libp2p_peer_announced_over_the_dht,
    ipns_records_of_the_ipns_package_are_validated_at_both_doors
);

use std::process::Stdio;
use std::time::Duration;

use common::{metric, Backend};
use hydra::net::wire::MessageType;

/// One js scenario at a time: each starts several js-libp2p processes, and in parallel on two
/// cores they starve each other and the node.
static JS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use hydra_testkit::js_dir;

/// Install the pinned js packages once (serialised across the tests of this binary).
fn ensure_js_deps() {
    hydra_testkit::ensure_js_deps().expect("the pinned js packages (Node.js and npm installed)");
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

/// Run `node <script> <args…>` in `tests/js` (one js scenario at a time) within `limit`; its
/// last stdout line parsed as JSON.
async fn run_script<T: serde::de::DeserializeOwned>(
    script: &str,
    args: &[&str],
    envs: &[(&str, String)],
    limit: Duration,
) -> T {
    let _one_at_a_time = JS.lock().await;
    let child = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(js_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} finishes within {limit:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script} {args:?} failed ({}); stdout: {stdout}", out.status);
    let line = stdout.lines().last().expect("the script printed a result");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad js result {line:?}: {e}"))
}

async fn run_js(heads_json: &str, mode: &str, count: u32) -> JsResult {
    let envs = [("HEADS", heads_json.to_string())];
    run_script("interop.mjs", &[mode, &count.to_string()], &envs, Duration::from_secs(300)).await
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
            advertised: Vec::new(),
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

/// A node with the shipped defaults and the Delegated Routing V1 API on a loopback port.
async fn node_with_routing_api(dir: &std::path::Path, backend: Backend) -> hydra::Node {
    let mut cfg = common::shipped_config_on(dir, 2, backend).await;
    cfg.routing_listen = Some("127.0.0.1:0".parse().unwrap());
    hydra::Node::start(cfg).await.expect("node starts")
}

/// Run `node routing.mjs <mode>` and parse its JSON line.
async fn run_routing_js(mode: &str, envs: &[(&str, String)]) -> serde_json::Value {
    run_script("routing.mjs", &[mode], envs, Duration::from_secs(120)).await
}

/// Helia's routing client (`@helia/delegated-routing-v1-http-api-client`) finds, over HTTP, the
/// provider record and the IPNS record a js-libp2p peer published over the DHT; it puts a newer
/// IPNS record and reads it back; an older one is refused and the newer stays.
async fn helias_routing_client_finds_what_a_libp2p_peer_announced_over_the_dht(backend: Backend) {
    ensure_js_deps();
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_routing_api(dir.path(), backend).await;
    let url = format!("http://{}/", node.routing_addr().unwrap());
    let r = run_routing_js("helia", &[("HEADS", heads_json(&node)), ("ROUTING_URL", url)]).await;
    println!("helia routing client ({backend:?}): {r}");
    assert_eq!(r["providerFound"], true, "{r}; {}", sheds(&node));
    assert_eq!(r["ipnsFound"], true, "{r}");
    assert_eq!(r["ipnsAfterPut"], true, "{r}");
    assert_eq!(r["staleRejected"], true, "{r}");
    node.shutdown().await;
}

/// Records made by the `ipns` package: a valid one is stored; a forged signature, a foreign
/// embedded key, an expired record and a lower sequence are refused — over HTTP PUT and over
/// PUT_VALUE — and the stored record stays what it was.
async fn ipns_records_of_the_ipns_package_are_validated_at_both_doors(backend: Backend) {
    use hydra::net::wire::{PbMessage, PbRecord};
    use prost::Message as _;
    ensure_js_deps();
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_routing_api(dir.path(), backend).await;
    let api = node.routing_addr().unwrap();
    let bytes = |v: &serde_json::Value, k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();

    // HTTP door.
    let set = run_routing_js("records", &[]).await;
    let path = format!("/routing/v1/ipns/{}", set["name"].as_str().unwrap());
    let put = |body: Vec<u8>| {
        let path = path.clone();
        async move {
            common::http_call(
                api,
                "PUT",
                &path,
                &[("Content-Type", "application/vnd.ipfs.ipns-record")],
                &body,
            )
            .await
        }
    };
    let get = || async {
        common::http_call(api, "GET", &path, &[("Accept", "application/vnd.ipfs.ipns-record")], b"").await
    };
    let r = get().await;
    assert_eq!(r.status, 200, "no record yet: 200, not 404 (IPIP-0513)");
    assert_ne!(r.header("content-type"), Some("application/vnd.ipfs.ipns-record"));
    assert_eq!(put(bytes(&set, "valid1")).await.status, 200);
    assert_eq!(get().await.body, bytes(&set, "valid1"));
    for bad in ["forged", "wrongKey", "expired"] {
        let r = put(bytes(&set, bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(get().await.body, bytes(&set, "valid1"), "{bad} left the record unchanged");
    }
    assert_eq!(put(bytes(&set, "valid2")).await.status, 200);
    let r = put(bytes(&set, "valid1")).await;
    assert_eq!(r.status, 409, "a lower sequence: {}", r.text());
    let r = get().await;
    assert_eq!(r.body, bytes(&set, "valid2"));
    assert_eq!(r.header("content-type"), Some("application/vnd.ipfs.ipns-record"));

    // DHT door, a second name.
    let set = run_routing_js("records", &[]).await;
    let key = bytes(&set, "routingKey");
    let heads = common::head_addrs(&node);
    let client = common::RawClient::connect(&heads).await;
    let put_value = |value: Vec<u8>| {
        PbMessage {
            r#type: MessageType::PutValue as i32,
            key: key.clone(),
            record: Some(PbRecord { key: key.clone(), value, time_received: String::new() }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let stored = || async {
        let req = PbMessage { r#type: MessageType::GetValue as i32, key: key.clone(), ..Default::default() }
            .encode_to_vec();
        let reply = client.try_request(heads[1].0, &req).await.expect("GET_VALUE answered");
        reply.record.map(|r| r.value)
    };
    assert!(
        client.try_request(heads[0].0, &put_value(bytes(&set, "valid1"))).await.is_some(),
        "valid record accepted"
    );
    assert_eq!(stored().await, Some(bytes(&set, "valid1")));
    for bad in ["forged", "wrongKey", "expired"] {
        assert!(
            client.try_request(heads[0].0, &put_value(bytes(&set, bad))).await.is_none(),
            "{bad} refused"
        );
        assert_eq!(stored().await, Some(bytes(&set, "valid1")), "{bad} left the record unchanged");
    }
    assert!(client.try_request(heads[0].0, &put_value(bytes(&set, "valid2"))).await.is_some());
    assert!(
        client.try_request(heads[1].0, &put_value(bytes(&set, "valid1"))).await.is_none(),
        "lower sequence refused"
    );
    assert_eq!(stored().await, Some(bytes(&set, "valid2")));
    // The same record through the other door: one validator, one store.
    let name = hydra::keys::ipns_name(&set["peerId"].as_str().unwrap().parse().unwrap());
    let r = common::http_call(api, "GET", &format!("/routing/v1/ipns/{name}"), &[], b"").await;
    assert_eq!(r.body, bytes(&set, "valid2"));
    node.shutdown().await;
}
