//! **Reference server, not hydra:** a stock rust-libp2p Kademlia node, as a Rust developer would
//! write one without this project — what `hydra-bench compare` measures hydra against.
//!
//! `hydra-bench stock-rust-kad --nodes N --records R` runs N swarms in this one process on one
//! tokio multi-thread runtime: TCP + Noise + Yamux, identify, ping and `kad::Behaviour` in server
//! mode with a `MemoryStore`, each swarm driven by its own task. Its only departures from stock:
//! - `kad::Config::set_max_packet_size(4 MiB)` (hydra's message limit; stock is 16 KiB);
//! - `MemoryStoreConfig::max_provided_keys` = [`MAX_PROVIDER_KEYS`] (stock 1,024 keys), so the
//!   benchmark's records fit.
//!
//! Set-up, not configuration: every node is told the addresses of its next 3 siblings (a ring),
//! as stock nodes would learn them by bootstrapping from each other, so FIND_NODE has something
//! to answer; the R preloaded provider records ([`super::preload_key`]) go into the store of
//! their home node ([`super::home`]) before the node listens. Then one JSON line on stdout names
//! every node (`[{"peer_id":…,"addrs":[…]}]`) and the process serves until it is killed.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore as _};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity, kad, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol};

/// Provider keys one node may hold (stock: 1,024): above any record count the benchmark uses.
pub(crate) const MAX_PROVIDER_KEYS: usize = 4_000_000;
/// Synthetic providers the preloaded records name (one each, round robin).
const PRELOAD_PROVIDERS: u64 = 64;

#[derive(NetworkBehaviour)]
struct Stock {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn swarm(key: identity::Keypair) -> anyhow::Result<libp2p::Swarm<Stock>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut cfg = kad::Config::new(StreamProtocol::new("/ipfs/kad/1.0.0"));
            cfg.set_max_packet_size(4 << 20);
            let store = MemoryStore::with_config(
                peer,
                MemoryStoreConfig { max_provided_keys: MAX_PROVIDER_KEYS, ..Default::default() },
            );
            let mut kad = kad::Behaviour::with_config(peer, store, cfg);
            kad.set_mode(Some(kad::Mode::Server));
            Stock {
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/ipfs/id/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
            }
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// A synthetic provider `j` of preloaded records: its peer ID and one address.
pub(crate) fn preload_provider(j: u64) -> (PeerId, Multiaddr) {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(j + 1).to_le_bytes());
    let key = identity::Keypair::ed25519_from_bytes(seed).expect("32 bytes");
    (key.public().to_peer_id(), format!("/ip4/127.0.0.9/tcp/{}", 4001 + j).parse().expect("address"))
}

/// Run `nodes` stock nodes with `records` preloaded provider records; never returns on success.
pub(crate) async fn serve(nodes: usize, records: u64) -> anyhow::Result<()> {
    let mut swarms = Vec::with_capacity(nodes);
    for _ in 0..nodes {
        let mut s = swarm(identity::Keypair::generate_ed25519())?;
        s.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        swarms.push(s);
    }
    let providers: Vec<(PeerId, Multiaddr)> = (0..PRELOAD_PROVIDERS).map(preload_provider).collect();
    for i in 0..records {
        let key = super::preload_key(i);
        let (peer, addr) = &providers[(i % PRELOAD_PROVIDERS) as usize];
        let rec = kad::ProviderRecord::new(kad::RecordKey::new(&key), *peer, vec![addr.clone()]);
        swarms[super::home(&key, nodes)]
            .behaviour_mut()
            .kad
            .store_mut()
            .add_provider(rec)
            .context("preload a provider record")?;
    }
    let mut listening = Vec::with_capacity(nodes);
    for s in &mut swarms {
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = s.select_next_some().await {
                break address;
            }
        };
        listening.push((*s.local_peer_id(), addr));
    }
    for (i, s) in swarms.iter_mut().enumerate() {
        for d in 1..=3.min(nodes - 1) {
            let (peer, addr) = &listening[(i + d) % nodes];
            s.behaviour_mut().kad.add_address(peer, addr.clone());
        }
    }
    let list: Vec<serde_json::Value> = listening
        .iter()
        .map(|(p, a)| serde_json::json!({"peer_id": p.to_string(), "addrs": [a.to_string()]}))
        .collect();
    println!("{}", serde_json::Value::Array(list));
    let tasks: Vec<_> = swarms
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                loop {
                    s.select_next_some().await;
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
    Ok(())
}
