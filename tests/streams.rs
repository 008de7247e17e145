//! Open streams cost memory, not worker slots: idle streams never block new ones, a full stream
//! cap closes its longest-idle stream, a cap full of busy streams refuses, and the per-IP cap
//! holds for clients on distinct loopback source addresses, and so does the per-IP connection
//! cap — over real libp2p connections.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::{head_addrs, metric, Backend, RawClient, WAIT};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use hydra::net::wire::{self, MessageType};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Stream, Swarm};

fn ping() -> Vec<u8> {
    wire::encode_request(MessageType::Ping, &[], &[])
}

async fn node_with(
    limits: impl FnOnce(&mut hydra::config::LimitsSection),
) -> (tempfile::TempDir, hydra::Node) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config_on(dir.path(), 2, Backend::Sqlite).await;
    limits(&mut cfg.limits);
    let node = hydra::Node::start(cfg).await.expect("node starts");
    (dir, node)
}

/// The server ended `s`: EOF or reset on the next read.
async fn ended(s: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(WAIT, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_do_not_hold_request_slots() {
    // Two request slots for the whole process, and ten idle streams: before, each stream held a
    // slot for its whole life and the eleventh was reset.
    let (_dir, node) = node_with(|l| l.max_concurrent_requests = 2).await;
    let heads = head_addrs(&node);
    let holder = RawClient::connect(&heads).await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut s = holder.open(heads[0].0).await;
        RawClient::request(&mut s, &ping()).await.expect("ping on a new stream");
        idle.push(s);
    }
    let fresh = RawClient::connect(&heads).await;
    for head in [heads[0].0, heads[1].0] {
        let mut s = fresh.open(head).await;
        let find = wire::encode_request(MessageType::FindNode, &[7; 32], &[]);
        let resp = RawClient::request(&mut s, &find).await.expect("FIND_NODE answered beside idle streams");
        assert_eq!(resp.r#type, MessageType::FindNode as i32);
    }
    // The idle streams were kept, not closed, and still serve.
    for s in &mut idle {
        RawClient::request(s, &ping()).await.expect("an idle stream serves its next request");
    }
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "evicted")]), 0.0);
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "slot_wait")]), 0.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_peer_cap_closes_the_longest_idle_stream() {
    let (_dir, node) = node_with(|l| l.max_streams_per_peer_per_head = 2).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let mut s1 = client.open(heads[0].0).await;
    RawClient::request(&mut s1, &ping()).await.unwrap();
    let mut s2 = client.open(heads[0].0).await;
    RawClient::request(&mut s2, &ping()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // s1 served again, so s2 is now the longest idle.
    RawClient::request(&mut s1, &ping()).await.unwrap();
    // The cap is per head: a stream on the other head evicts nothing.
    let mut other = client.open(heads[1].0).await;
    RawClient::request(&mut other, &ping()).await.unwrap();
    let mut s3 = client.open(heads[0].0).await;
    RawClient::request(&mut s3, &ping()).await.expect("a new stream takes the longest-idle one's place");
    assert!(ended(&mut s2).await, "the longest-idle stream is closed");
    RawClient::request(&mut s1, &ping()).await.expect("the more recently used stream stays");
    RawClient::request(&mut other, &ping()).await.unwrap();
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "evicted")]), 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_full_of_busy_streams_refuses_new_ones() {
    let (_dir, node) = node_with(|l| l.max_streams_per_peer_per_head = 1).await;
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads).await;
    let mut busy = client.open(heads[0].0).await;
    // A length prefix and part of the body: the stream is busy with a request until io_timeout.
    busy.write_all(&[10, 8, 5]).await.unwrap();
    busy.flush().await.unwrap();
    let start = std::time::Instant::now();
    while metric(&node, "hydra_kad_requests_in_flight", &[]) < 1.0 {
        assert!(start.elapsed() < WAIT, "the partial request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = std::time::Instant::now();
    while metric(&node, "hydra_kad_streams_total", &[("event", "peer_limit")]) == 0.0 {
        let mut s = client.open(heads[0].0).await;
        assert!(RawClient::request(&mut s, &ping()).await.is_err(), "a stream past a busy cap is reset");
        assert!(start.elapsed() < WAIT, "never refused");
    }
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "evicted")]), 0.0, "busy: never evicted");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_cap_holds_across_identities_on_one_address() {
    let (_dir, node) = node_with(|l| l.max_streams_per_ip = 2).await;
    let heads = head_addrs(&node);
    let a = RawClient::connect_from(Ipv4Addr::new(127, 0, 0, 2), &heads).await;
    let b = RawClient::connect_from(Ipv4Addr::new(127, 0, 0, 2), &heads).await;
    let c = RawClient::connect_from(Ipv4Addr::new(127, 0, 0, 3), &heads).await;
    let mut a1 = a.open(heads[0].0).await;
    RawClient::request(&mut a1, &ping()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut b1 = b.open(heads[1].0).await;
    RawClient::request(&mut b1, &ping()).await.unwrap();
    let mut c_streams = Vec::new();
    for head in [heads[0].0, heads[1].0] {
        let mut s = c.open(head).await;
        RawClient::request(&mut s, &ping()).await.unwrap();
        c_streams.push(s);
    }
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "evicted")]), 0.0, "two per address");
    // A third stream from 127.0.0.2, by another identity and on another head than a1: the
    // address's longest-idle stream (a1) makes room.
    let mut b2 = b.open(heads[1].0).await;
    RawClient::request(&mut b2, &ping()).await.expect("admitted in a1's place");
    assert!(ended(&mut a1).await, "127.0.0.2's longest-idle stream is closed");
    assert_eq!(metric(&node, "hydra_kad_streams_total", &[("event", "evicted")]), 1.0);
    for s in &mut c_streams {
        RawClient::request(s, &ping()).await.expect("another address is not affected");
    }
    RawClient::request(&mut b1, &ping()).await.unwrap();
    node.shutdown().await;
}

/// A new identity on `src` dials every head; the swarm once each dial has ended, and how many
/// connections were established (a refused one fails its handshake).
async fn dial_from(src: Ipv4Addr, heads: &[(PeerId, Multiaddr)]) -> (Swarm<libp2p_stream::Behaviour>, usize) {
    let mut swarm = hydra_testkit::bound_swarm(src, |_| libp2p_stream::Behaviour::new());
    for (p, a) in heads {
        swarm.dial(a.clone().with(Protocol::P2p(*p))).unwrap();
    }
    let (mut ok, mut ended) = (0, 0);
    tokio::time::timeout(WAIT, async {
        while ended < heads.len() {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => (ok, ended) = (ok + 1, ended + 1),
                SwarmEvent::OutgoingConnectionError { .. } => ended += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("every dial ends");
    (swarm, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_connection_cap_refuses_before_the_handshake_and_frees_on_close() {
    let (_dir, node) = node_with(|l| l.max_connections_per_ip = 2).await;
    let heads = head_addrs(&node);
    let a = Ipv4Addr::new(127, 0, 0, 7);
    let (held, n) = dial_from(a, &heads).await;
    assert_eq!(n, 2, "two connections from 127.0.0.7, one per head");
    // A dialer's handshake ends before the listener's (it sends Noise's last message and
    // assumes yamux), so wait until both heads have counted theirs: otherwise the third dial
    // can reach head 0 while head 1 is still handshaking, take the second place, and have the
    // cap refuse head 1's instead.
    let start = std::time::Instant::now();
    while metric(&node, "hydra_head_connections", &[]) < 2.0 {
        assert!(start.elapsed() < WAIT, "the heads never counted the two connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_refused, n) = dial_from(a, &heads[..1]).await;
    assert_eq!(n, 0, "a third from the same address is refused, whatever the identity");
    assert!(metric(&node, "hydra_kad_connections_denied_total", &[]) >= 1.0);
    let (_other, n) = dial_from(Ipv4Addr::new(127, 0, 0, 8), &heads).await;
    assert_eq!(n, 2, "another address is not affected");
    // Closing connections frees the address's places.
    drop(held);
    let start = std::time::Instant::now();
    loop {
        let (_s, n) = dial_from(a, &heads[..1]).await;
        if n == 1 {
            break;
        }
        assert!(start.elapsed() < WAIT, "the closed connections never freed their places");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}
