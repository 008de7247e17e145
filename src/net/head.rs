//! A head: one libp2p swarm with its own identity and port, owned by one task.
//!
//! The swarm task only drives the swarm: it feeds kad (client mode) with addresses learned from
//! identify, republishes the routing-table snapshot when kad reports a change, and tracks listen
//! addresses. It never serves a request and never touches the datastore; inbound kad streams
//! leave it through [`super::intake`] straight into the shared queue.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{connection_limits, identify, kad, noise, ping, quic, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio_util::sync::CancellationToken;

use super::addrs::admitted;
use super::admit::{Admitting, AdmittingMuxer};
use super::intake::{Intake, KadServer, KAD_PROTOCOL};
use super::routing::{RoutingSnapshot, Siblings};
use crate::config::{AddressFilter, Config};
use crate::metrics::HeadMetrics;

/// How often a changed routing table is republished (changes are coalesced in between).
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(200);
/// Connections per remote peer per head.
const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// The part of a head that other tasks read: identity, addresses, routing snapshot.
pub struct HeadShared {
    /// Slot in this process (head i listens on port_base + i).
    pub index: usize,
    /// Index in the fleet's balanced identity sequence.
    pub identity: u32,
    pub peer_id: PeerId,
    /// Current listen addresses (without `/p2p`).
    pub listen_addrs: Arc<ArcSwap<Vec<Multiaddr>>>,
    /// What the head tells others to dial: the `announce` addresses if configured, else the
    /// listen addresses (the same `ArcSwap`). Shared with the sibling list.
    pub advertised: Arc<ArcSwap<Vec<Multiaddr>>>,
    /// Latest routing-table snapshot.
    pub routing: Arc<ArcSwap<RoutingSnapshot>>,
}

#[derive(NetworkBehaviour)]
pub struct HeadBehaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    server: KadServer,
}

/// A head whose swarm is listening but whose task has not started yet.
pub struct StartingHead {
    pub shared: Arc<HeadShared>,
    siblings: Arc<Siblings>,
    swarm: Swarm<HeadBehaviour>,
    filter: AddressFilter,
    metrics: HeadMetrics,
}

/// Build head `index`'s swarm and wait until its TCP and QUIC listeners are up.
pub async fn bind(
    index: usize,
    identity: u32,
    keypair: Keypair,
    cfg: &Config,
    intake: Intake,
    metrics: HeadMetrics,
) -> anyhow::Result<StartingHead> {
    let peer_id = keypair.public().to_peer_id();
    let max_conns = cfg.limits.max_connections_per_head;
    // New inbound streams pass the admission gate in the muxer, before any negotiation: yamux
    // over TCP, and QUIC connections (their own muxers) wrapped the same way.
    let mux = {
        let gate = intake.gatekeeper();
        move || Admitting::new(yamux::Config::default(), gate)
    };
    let quic_gate = intake.gatekeeper();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, mux)
        .context("set up TCP transport")?
        .with_other_transport(|key| {
            quic::tokio::Transport::new(quic::Config::new(key))
                .map(move |(peer, conn), _| (peer, StreamMuxerBox::new(AdmittingMuxer::new(conn, quic_gate))))
        })
        .context("set up QUIC transport")?
        // Resolves /dns* and /dnsaddr addresses (bootstrap presets) only when dialing them.
        .with_dns()
        .context("set up DNS resolution")?
        .with_behaviour(|key| {
            let mut kcfg = kad::Config::new(KAD_PROTOCOL);
            kcfg.set_query_timeout(Duration::from_secs(60));
            if cfg.bootstrap.is_empty() {
                // Nobody to bootstrap from: a periodic bootstrap would find no known peers every
                // 5 minutes per head. A peer entering the routing table (from identify) still
                // triggers kad's automatic bootstrap.
                kcfg.set_periodic_bootstrap_interval(None);
            }
            let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kcfg);
            // Pinned: in automatic mode kad would become a server and claim the kad protocol.
            kad.set_mode(Some(kad::Mode::Client));
            HeadBehaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_conns))
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER)),
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new("ipfs/0.1.0".into(), key.public())
                        .with_agent_version(format!("hydra/{}", env!("CARGO_PKG_VERSION")))
                        // With announce addresses, only they (external addresses) are told.
                        .with_hide_listen_addrs(!cfg.announce.is_empty()),
                ),
                ping: ping::Behaviour::default(),
                kad,
                server: KadServer::new(index, intake),
            }
        })
        .context("build head behaviour")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();

    let port = if cfg.port_base == 0 { 0 } else { cfg.port_base + index as u16 };
    let mut ips = vec![cfg.listen_ip];
    ips.extend(cfg.listen_ip6.map(IpAddr::V6));
    let mut pending = std::collections::HashSet::new();
    for ip in ips {
        let ip = match ip {
            IpAddr::V4(ip) => Protocol::Ip4(ip),
            IpAddr::V6(ip) => Protocol::Ip6(ip),
        };
        let tcp = Multiaddr::empty().with(ip.clone()).with(Protocol::Tcp(port));
        pending
            .insert(swarm.listen_on(tcp.clone()).with_context(|| format!("head {index}: listen on {tcp}"))?);
        if cfg.quic {
            let quic = Multiaddr::empty().with(ip).with(Protocol::Udp(port)).with(Protocol::QuicV1);
            pending.insert(
                swarm.listen_on(quic.clone()).with_context(|| format!("head {index}: listen on {quic}"))?,
            );
        }
    }

    // Wait for every listener to report an address (or fail).
    let mut addrs = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    while !pending.is_empty() {
        tokio::select! {
            _ = &mut deadline => anyhow::bail!("head {index}: listeners not up after 10 s"),
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    pending.remove(&listener_id);
                    addrs.push(address);
                }
                SwarmEvent::ListenerClosed { reason: Err(e), .. } | SwarmEvent::ListenerError { error: e, .. } => {
                    anyhow::bail!("head {index}: listener failed: {e}");
                }
                _ => {}
            },
        }
    }
    let listen_addrs = Arc::new(ArcSwap::from_pointee(addrs.clone()));
    let advertised = if cfg.announce.is_empty() {
        listen_addrs.clone()
    } else {
        let announced = announced(&cfg.announce, &addrs);
        for a in &announced {
            swarm.add_external_address(a.clone());
            tracing::info!(head = index, "head {index} announces {}", a.clone().with(Protocol::P2p(peer_id)));
        }
        Arc::new(ArcSwap::from_pointee(announced))
    };
    for a in &addrs {
        tracing::info!(
            head = index,
            identity,
            "head {index} listening on {}",
            a.clone().with(Protocol::P2p(peer_id))
        );
    }
    let shared = Arc::new(HeadShared {
        index,
        identity,
        peer_id,
        listen_addrs,
        advertised,
        routing: Arc::new(ArcSwap::from_pointee(RoutingSnapshot::default())),
    });
    Ok(StartingHead { shared, siblings: Arc::default(), swarm, filter: cfg.address_filter, metrics })
}

/// The announce templates with `{port}` filled in: a template naming `/udp/` gets the port of
/// the head's first UDP (QUIC) listener, any other its first TCP listener's. Templates whose
/// port cannot be known (no such listener) are left out.
fn announced(templates: &[String], listening: &[Multiaddr]) -> Vec<Multiaddr> {
    let port_of = |udp: bool| {
        listening.iter().find_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Udp(port) if udp => Some(port),
                Protocol::Tcp(port) if !udp => Some(port),
                _ => None,
            })
        })
    };
    templates
        .iter()
        .filter_map(|t| {
            let port = port_of(t.contains("/udp/"))?;
            t.replace("{port}", &port.to_string()).parse().ok()
        })
        .collect()
}

impl StartingHead {
    /// The process's heads, answered as closer peers but kept out of kad's routing table.
    pub fn set_siblings(&mut self, siblings: Arc<Siblings>) {
        self.siblings = siblings;
    }

    /// Add a known DHT server (a bootstrap peer) to the routing table.
    pub fn add_peer(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        for a in addrs {
            self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
    }

    /// Run the swarm until `cancel` fires. `bootstrap` starts a kad bootstrap query if peers are known.
    pub async fn run(mut self, bootstrap: bool, cancel: CancellationToken) {
        if bootstrap {
            if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                tracing::warn!(head = self.shared.index, error = %e, "bootstrap not started");
            }
        }
        let head_label = self.shared.index.to_string();
        self.metrics.up.with_label_values(&[&head_label]).set(1);
        let mut dirty = true;
        let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    if dirty {
                        self.publish_snapshot(&head_label);
                        dirty = false;
                    }
                    let conns = self.swarm.network_info().connection_counters().num_established();
                    self.metrics.connections.with_label_values(&[&head_label]).set(conns as i64);
                }
                ev = self.swarm.select_next_some() => {
                    if self.on_event(ev) {
                        dirty = true;
                    }
                }
            }
        }
        self.metrics.up.with_label_values(&[&head_label]).set(0);
        tracing::debug!(head = self.shared.index, "head stopped");
    }

    fn publish_snapshot(&mut self, head_label: &str) {
        let mut peers = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for e in bucket.iter() {
                peers.push((*e.node.key.preimage(), e.node.value.iter().cloned().collect::<Vec<_>>()));
            }
        }
        let snap = RoutingSnapshot::new(peers, self.siblings.clone());
        self.metrics.routing_table_peers.with_label_values(&[head_label]).set(snap.len() as i64);
        self.shared.routing.store(Arc::new(snap));
    }

    /// Handle one swarm event; returns true if the routing table may have changed.
    fn on_event(&mut self, ev: SwarmEvent<HeadBehaviourEvent>) -> bool {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = (**self.shared.listen_addrs.load()).clone();
                if !addrs.contains(&address) {
                    addrs.push(address);
                    self.shared.listen_addrs.store(Arc::new(addrs));
                }
                false
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let mut addrs = (**self.shared.listen_addrs.load()).clone();
                addrs.retain(|a| a != &address);
                self.shared.listen_addrs.store(Arc::new(addrs));
                false
            }
            SwarmEvent::Behaviour(HeadBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocols.contains(&KAD_PROTOCOL) {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    for a in admitted(self.filter, info.listen_addrs) {
                        kad.add_address(&peer_id, a);
                    }
                }
                false
            }
            SwarmEvent::Behaviour(HeadBehaviourEvent::Kad(ev)) => {
                matches!(ev, kad::Event::RoutingUpdated { .. } | kad::Event::UnroutablePeer { .. })
            }
            SwarmEvent::ConnectionClosed { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_templates_take_the_port_of_their_transport() {
        let listening: Vec<Multiaddr> = vec![
            "/ip4/10.0.0.5/tcp/4001".parse().unwrap(),
            "/ip4/10.0.0.5/udp/4101/quic-v1".parse().unwrap(),
        ];
        let got = announced(
            &["/dns4/a.example.org/tcp/{port}".into(), "/ip4/203.0.113.9/udp/{port}/quic-v1".into()],
            &listening,
        );
        assert_eq!(
            got,
            vec![
                "/dns4/a.example.org/tcp/4001".parse::<Multiaddr>().unwrap(),
                "/ip4/203.0.113.9/udp/4101/quic-v1".parse().unwrap()
            ]
        );
        assert!(
            announced(&["/ip4/1.2.3.4/udp/{port}/quic-v1".into()], &listening[..1]).is_empty(),
            "no UDP listener"
        );
        assert_eq!(announced(&["/ip4/1.2.3.4/tcp/4001".into()], &listening).len(), 1, "a fixed address");
    }
}
