//! The Delegated Routing V1 API (`routing_listen`) against a real node and store: every
//! endpoint, empty results, 400s, ndjson, both filters, cache headers, CORS, shedding under a
//! forced tier, and the public listener's limits. Records are announced over real libp2p
//! connections first, so the API is checked against what the DHT side stored.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{http_call, http_call_from, Backend, RawClient};
use hydra::keys::{ipns_name, key_to_cid};
use hydra::types::ProviderKey;
use hydra::Node;

/// A node with the routing API on an ephemeral loopback port.
async fn node_with_api(
    dir: &std::path::Path,
    heads: usize,
    backend: Backend,
    f: impl FnOnce(&mut hydra::Config),
) -> Node {
    let mut cfg = common::config_on(dir, heads, backend).await;
    cfg.routing_listen = Some("127.0.0.1:0".parse().unwrap());
    f(&mut cfg);
    Node::start(cfg).await.expect("node starts")
}

fn api(node: &Node) -> SocketAddr {
    node.routing_addr().expect("routing_listen is set")
}

/// A fresh multihash (sha2-256 of random bytes) as a provider key.
fn random_key() -> ProviderKey {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(rand::random::<[u8; 16]>());
    ProviderKey::new([&[0x12, 0x20][..], &digest[..]].concat()).unwrap()
}

fn ids(v: &serde_json::Value, field: &str) -> Vec<String> {
    v[field].as_array().unwrap().iter().map(|r| r["ID"].as_str().unwrap().to_string()).collect()
}

async fn every_endpoint_answers_from_what_the_dht_side_stored(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_api(dir.path(), 2, backend, |_| {}).await;
    let heads = common::head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let key = random_key();
    let mut s = client.open(heads[0].0).await;
    RawClient::send(&mut s, &client.add_provider_body(key.as_bytes())).await.unwrap();
    let start = Instant::now();
    while node.providers().buffered() == 0 && start.elapsed() < common::WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.providers().flush().await;
    let cid = key_to_cid(&key);
    let me = client.peer_id.to_base58();

    // JSON: the record, the spec's field names, cache headers for a result, CORS.
    let r = http_call(api(&node), "GET", &format!("/routing/v1/providers/{cid}"), &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(ids(&v, "Providers"), vec![me.clone()]);
    let p = &v["Providers"][0];
    assert_eq!(p["Schema"], "peer");
    assert_eq!(p["Addrs"][0], client.addr.to_string());
    assert_eq!(p["Protocols"], serde_json::json!([]));
    assert!(r.header("cache-control").unwrap().contains("max-age=300"), "{:?}", r.headers);
    assert!(r.header("cache-control").unwrap().contains("stale-if-error"), "{:?}", r.headers);
    assert_eq!(r.header("vary"), Some("Accept"));
    assert!(r.header("last-modified").unwrap().ends_with(" GMT"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));

    // ndjson: one record per line.
    let r = http_call(
        api(&node),
        "GET",
        &format!("/routing/v1/providers/{cid}"),
        &[("Accept", "application/x-ndjson")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["ID"], me.as_str());

    // Filters: the client's only address is TCP; it has no protocols.
    let with = |q: &str| format!("/routing/v1/providers/{cid}?{q}");
    let r = http_call(api(&node), "GET", &with("filter-addrs=tcp"), &[], b"").await;
    assert_eq!(ids(&r.json(), "Providers"), vec![me.clone()]);
    let r = http_call(api(&node), "GET", &with("filter-addrs=quic-v1"), &[], b"").await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({"Providers": []})));
    assert!(r.header("cache-control").unwrap().contains("max-age=15"), "an empty answer is cached briefly");
    let r = http_call(api(&node), "GET", &with("filter-protocols=transport-bitswap"), &[], b"").await;
    assert_eq!(ids(&r.json(), "Providers"), Vec::<String>::new());
    let r = http_call(api(&node), "GET", &with("filter-protocols=transport-bitswap,unknown"), &[], b"").await;
    assert_eq!(ids(&r.json(), "Providers"), vec![me.clone()]);

    // Nobody provides a fresh CID: 200 with an empty list, never 404.
    let r = http_call(
        api(&node),
        "GET",
        &format!("/routing/v1/providers/{}", key_to_cid(&random_key())),
        &[],
        b"",
    )
    .await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({"Providers": []})));
    // A bad CID: 400 saying what is wrong.
    let r = http_call(api(&node), "GET", "/routing/v1/providers/bafk!!!", &[], b"").await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("base32"), "{}", r.text());

    // Peers: the stored addresses of the provider, by base58 or as a libp2p-key CID.
    for name in [me.clone(), ipns_name(&client.peer_id)] {
        let r = http_call(api(&node), "GET", &format!("/routing/v1/peers/{name}"), &[], b"").await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let v = r.json();
        assert_eq!(ids(&v, "Peers"), vec![me.clone()], "{name}");
        assert!(v["Peers"][0]["Addrs"].as_array().unwrap().contains(&client.addr.to_string().into()));
    }
    let stranger = libp2p::PeerId::random().to_base58();
    let r = http_call(api(&node), "GET", &format!("/routing/v1/peers/{stranger}"), &[], b"").await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({"Peers": []})));
    let r = http_call(api(&node), "GET", &format!("/routing/v1/peers/{cid}"), &[], b"").await;
    assert_eq!(r.status, 400, "a raw-codec CID names no peer");

    // Closest peers from the heads' routing knowledge: the heads themselves are DHT servers
    // near every key (siblings), with their addresses.
    let r = http_call(api(&node), "GET", &format!("/routing/v1/dht/closest/peers/{cid}"), &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = ids(&r.json(), "Peers");
    for (h, _) in &heads {
        assert!(got.contains(&h.to_base58()), "head {h} missing from {got:?}");
    }
    let r = http_call(api(&node), "GET", &format!("/routing/v1/dht/closest/peers/{me}"), &[], b"").await;
    assert_eq!(r.status, 200, "a peer ID is a key too");

    // CORS preflight.
    let r = http_call(
        api(&node),
        "OPTIONS",
        &format!("/routing/v1/providers/{cid}"),
        &[("Origin", "https://example.org"), ("Access-Control-Request-Method", "GET")],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-allow-methods").unwrap().contains("GET"));

    assert!(
        common::metric(
            &node,
            "hydra_routing_api_requests_total",
            &[("endpoint", "providers"), ("code", "200")]
        ) >= 6.0
    );
    assert!(
        common::metric(
            &node,
            "hydra_routing_api_requests_total",
            &[("endpoint", "providers"), ("code", "400")]
        ) >= 1.0
    );
    node.shutdown().await;
}

both_backends!(every_endpoint_answers_from_what_the_dht_side_stored);

/// A lookup the tier sheds is a 503 the client may retry, never a cacheable "no providers".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_lookup_is_a_503_never_a_cacheable_empty_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_api(dir.path(), 1, Backend::Sqlite, |c| {
        c.load.force_tier = Some(hydra::load::Tier::Refuse);
    })
    .await;
    let cid = key_to_cid(&random_key());
    let r = http_call(api(&node), "GET", &format!("/routing/v1/providers/{cid}"), &[], b"").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    // Closest peers never touch the datastore: served in every tier.
    let r = http_call(api(&node), "GET", &format!("/routing/v1/dht/closest/peers/{cid}"), &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(common::metric(&node, "hydra_load_shed_total", &[("tier", "refuse"), ("reason", "tier")]) >= 1.0);
    assert!(common::metric(&node, "hydra_routing_api_refused_total", &[("reason", "shed")]) >= 1.0);
    node.shutdown().await;
}

/// The public listener's limits: a per-IP rate (429, other addresses unaffected), a body cap
/// (413), a request-concurrency cap (503) and a header timeout that closes a silent connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_listener_limits_rate_bodies_concurrency_and_silent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_api(dir.path(), 1, Backend::Sqlite, |c| {
        c.routing_api.per_ip_requests_per_second = 1;
        c.routing_api.per_ip_burst = 3;
        c.routing_api.max_concurrent_requests = 1;
        c.routing_api.header_timeout = Duration::from_millis(500);
    })
    .await;
    let path = format!("/routing/v1/dht/closest/peers/{}", key_to_cid(&random_key()));
    let a = Ipv4Addr::new(127, 0, 3, 1);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(http_call_from(a, api(&node), "GET", &path, &[], b"").await.status);
    }
    assert_eq!(&codes[..3], &[200, 200, 200], "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 429), "{codes:?}");
    let r = http_call_from(a, api(&node), "GET", &path, &[], b"").await;
    assert!(r.header("retry-after").is_some());
    let b = Ipv4Addr::new(127, 0, 3, 2);
    assert_eq!(http_call_from(b, api(&node), "GET", &path, &[], b"").await.status, 200, "another address");
    assert!(common::metric(&node, "hydra_routing_api_refused_total", &[("reason", "rate")]) >= 2.0);

    // A body over 10 KiB.
    let name = ipns_name(&libp2p::PeerId::random());
    let c = Ipv4Addr::new(127, 0, 3, 3);
    let r =
        http_call_from(c, api(&node), "PUT", &format!("/routing/v1/ipns/{name}"), &[], &vec![7u8; 11 * 1024])
            .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        common::metric(&node, "hydra_routing_api_refused_total", &[("reason", "body_too_large")]),
        1.0
    );

    // One request at a time: a PUT whose body trickles in holds the only slot.
    use tokio::io::AsyncWriteExt as _;
    let d = Ipv4Addr::new(127, 0, 3, 4);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(d.into(), 0)).unwrap();
    let mut slow = sock.connect(api(&node)).await.unwrap();
    let head = format!("PUT /routing/v1/ipns/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc");
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = Ipv4Addr::new(127, 0, 3, 5);
    let r = http_call_from(e, api(&node), "GET", &path, &[], b"").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(common::metric(&node, "hydra_routing_api_refused_total", &[("reason", "concurrency")]) >= 1.0);
    drop(slow);

    // A client that connects and says nothing is closed after the header timeout.
    use tokio::io::AsyncReadExt as _;
    let f = Ipv4Addr::new(127, 0, 3, 6);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(f.into(), 0)).unwrap();
    let mut silent = sock.connect(api(&node)).await.unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(common::WAIT, silent.read_to_end(&mut buf)).await.expect("closed by the server");
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    node.shutdown().await;
}
