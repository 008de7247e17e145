//! A head: one libp2p swarm with its own identity and port, owned by one task.
//!
//! The swarm task only drives the swarm: it feeds the process-wide routing table
//! ([`super::table`], which every head answers from) with what it learns — identify,
//! connections opened and closed, dials that failed — and tracks listen addresses. It never
//! serves a request and never touches the datastore; inbound kad streams leave it through
//! [`super::intake`] straight into the shared queue, and the outbound streams of the process's
//! lookups ([`super::discovery`]) through [`super::outbound`]. A head runs no `kad::Behaviour`
//! and has no routing table of its own.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::ListenerId;
use libp2p::core::upgrade;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{connection_limits, identify, noise, ping, quic, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio_util::sync::CancellationToken;

use super::addrs::admitted;
use super::admit::{Admitting, AdmittingMuxer, Direction};
use super::door::Door;
use super::intake::{Intake, KadServer, KAD_PROTOCOL};
use super::outbound::{Opener, Outbound};
use super::table::{TableFeed, Update};
use crate::config::{AddressFilter, Config};
use crate::metrics::HeadMetrics;

/// How often a fenced head looks at its lease again (a renewal wakes it sooner).
const FENCED_CHECK: Duration = Duration::from_secs(1);
/// How long a stopping head keeps driving its closing connections (flushing their last replies).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Connections per remote peer per head.
const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// The part of a head that other tasks read: identity, addresses, lease.
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
    /// Whether this head's lease lets it serve (fencing).
    pub lease: LeaseFence,
    /// Opens outbound kad streams from this head's identity (the process's lookups).
    pub outbound: Opener,
}

/// Fencing: whether this head may serve its identity. The lease in the datastore lasts `ttl`
/// from the datastore's clock at each renewal; the head serves only until `FENCE_SHARE` of `ttl`
/// after the renewal was *sent*, by this host's monotonic clock — before any other process can
/// see the lease expired and take the identity over — unless a later renewal succeeds. A renewal
/// that no longer finds the lease (taken over) makes the head stop for good. A paused or
/// partitioned process therefore stops serving before another may start, so two hosts never
/// serve one peer ID.
#[derive(Debug)]
pub struct LeaseFence {
    /// Milliseconds since [`mono_epoch`] until which the head may serve.
    until_ms: AtomicU64,
    lost: AtomicBool,
    /// Wakes the head when a renewal lifts a fence or the lease is lost; otherwise the head
    /// wakes only at the fence's deadline (no periodic tick: 10,000 heads polled five times a
    /// second took a quarter of a core while idle).
    changed: tokio::sync::Notify,
}

/// The part of the lease lifetime a head serves after a renewal was sent: the rest is margin
/// for the renewal's own latency and for clock-rate differences between hosts.
pub const FENCE_SHARE: f64 = 0.9;

fn mono_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn mono_ms(t: Instant) -> u64 {
    t.saturating_duration_since(mono_epoch()).as_millis() as u64
}

impl LeaseFence {
    /// A fence for a lease whose acquisition was sent at `sent`.
    pub fn new(sent: Instant, ttl: Duration) -> Self {
        let f = Self {
            until_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        };
        f.renewed(sent, ttl);
        f
    }

    /// A renewal sent at `sent` succeeded: serve until `FENCE_SHARE × ttl` after it.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        if !self.lost.load(Ordering::Acquire) {
            let before = self.until_ms.fetch_max(mono_ms(sent + ttl.mul_f64(FENCE_SHARE)), Ordering::AcqRel);
            if before <= mono_ms(Instant::now()) {
                self.changed.notify_one(); // it was fenced: the head may serve again
            }
        }
    }

    /// A renewal found the lease gone: another process owns the identity.
    pub fn lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.until_ms.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    /// When the head must look at its fence next: the fence's deadline while serving, soon
    /// while fenced (a renewal also wakes it, [`Self::changed`]).
    fn next_check(&self) -> tokio::time::Instant {
        let now = Instant::now();
        let until = mono_epoch() + Duration::from_millis(self.until_ms.load(Ordering::Acquire));
        let at = if until > now { until + Duration::from_millis(1) } else { now + FENCED_CHECK };
        tokio::time::Instant::from_std(at)
    }

    /// Resolves when a renewal lifted the fence or the lease was lost.
    async fn changed(&self) {
        self.changed.notified().await;
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Whether the head may serve now (one atomic load and a clock read).
    pub fn serving(&self) -> bool {
        mono_ms(Instant::now()) < self.until_ms.load(Ordering::Acquire)
    }
}

#[derive(NetworkBehaviour)]
pub struct HeadBehaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    server: KadServer,
    outbound: Outbound,
}

/// A head whose swarm is listening but whose task has not started yet.
pub struct StartingHead {
    pub shared: Arc<HeadShared>,
    /// Where what the head learns about peers goes (set before [`StartingHead::run`]).
    table: Option<TableFeed>,
    swarm: Swarm<HeadBehaviour>,
    /// The addresses the listeners bound (ports included): listened on again after a fence lifts.
    bound: Vec<Multiaddr>,
    listeners: Vec<ListenerId>,
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
    lease: LeaseFence,
) -> anyhow::Result<StartingHead> {
    let peer_id = keypair.public().to_peer_id();
    let max_conns = cfg.limits.max_connections_per_head;
    // New inbound streams pass the admission gate in the muxer, before any negotiation: yamux
    // over TCP, and QUIC connections (their own muxers) wrapped the same way.
    let mux = Admitting::new(yamux::Config::default(), intake.gatekeeper());
    let quic_gate = intake.gatekeeper();
    // TCP listeners close while no new connection is admitted (the kernel refuses dials).
    let door_gate = intake.gatekeeper();
    let (outbound, opener) = Outbound::new();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        // What `with_tcp` builds, with the door below the upgrades.
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Door::new(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)), door_gate)
                .upgrade(upgrade::Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(mux)
                .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn))))
        })
        .context("set up TCP transport")?
        .with_other_transport(|key| {
            quic::tokio::Transport::new(quic::Config::new(key)).map(move |(peer, conn), point| {
                let direction = if point.is_listener() { Direction::Inbound } else { Direction::Outbound };
                (peer, StreamMuxerBox::new(AdmittingMuxer::new(conn, quic_gate, direction)))
            })
        })
        .context("set up QUIC transport")?
        // Resolves /dns* and /dnsaddr addresses (bootstrap presets) only when dialing them.
        .with_dns()
        .context("set up DNS resolution")?
        .with_behaviour(|key| {
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
                server: KadServer::new(index, intake),
                outbound,
            }
        })
        .context("build head behaviour")?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();

    let port = if cfg.port_base == 0 { 0 } else { cfg.port_base + index as u16 };
    let mut ips = vec![cfg.listen_ip];
    ips.extend(cfg.listen_ip6.map(IpAddr::V6));
    let mut pending = std::collections::HashSet::new();
    let mut listeners = Vec::new();
    for ip in ips {
        let ip = match ip {
            IpAddr::V4(ip) => Protocol::Ip4(ip),
            IpAddr::V6(ip) => Protocol::Ip6(ip),
        };
        let tcp = Multiaddr::empty().with(ip.clone()).with(Protocol::Tcp(port));
        let id = swarm.listen_on(tcp.clone()).with_context(|| format!("head {index}: listen on {tcp}"))?;
        pending.insert(id);
        listeners.push(id);
        if cfg.quic {
            let quic = Multiaddr::empty().with(ip).with(Protocol::Udp(port)).with(Protocol::QuicV1);
            let id =
                swarm.listen_on(quic.clone()).with_context(|| format!("head {index}: listen on {quic}"))?;
            pending.insert(id);
            listeners.push(id);
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
    let shared =
        Arc::new(HeadShared { index, identity, peer_id, listen_addrs, advertised, lease, outbound: opener });
    Ok(StartingHead {
        shared,
        table: None,
        swarm,
        bound: addrs,
        listeners,
        filter: cfg.address_filter,
        metrics,
    })
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
    /// Feed what this head learns about peers into the process-wide routing table.
    pub fn set_table(&mut self, feed: TableFeed) {
        self.table = Some(feed);
    }

    fn learned(&self, update: Update) {
        if let Some(t) = &self.table {
            t.send(update);
        }
    }

    /// Run the swarm until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        let head_label = self.shared.index.to_string();
        self.metrics.up.with_label_values(&[&head_label]).set(1);
        self.metrics.connections.with_label_values(&[&head_label]).set(0);
        let mut fenced = false;
        let shared = self.shared.clone();
        let check = tokio::time::sleep_until(shared.lease.next_check());
        tokio::pin!(check);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = &mut check => {}
                _ = shared.lease.changed() => {}
                ev = self.swarm.select_next_some() => {
                    self.on_event(ev);
                    continue;
                }
            }
            match (shared.lease.serving(), fenced) {
                (false, false) => {
                    self.fence();
                    fenced = true;
                }
                (true, true) => fenced = !self.unfence(),
                _ => {}
            }
            if fenced && shared.lease.is_lost() {
                tracing::error!(
                    head = shared.index,
                    "head {} stopped for good: another process took over its identity {}",
                    shared.index,
                    shared.peer_id
                );
                break;
            }
            check.as_mut().reset(shared.lease.next_check());
        }
        self.metrics.up.with_label_values(&[&head_label]).set(0);
        self.close_connections().await;
        tracing::debug!(head = self.shared.index, "head stopped");
    }

    /// Close every connection gracefully and keep driving them until they are gone (at most
    /// [`CLOSE_GRACE`]): the muxer sends what its streams wrote before the socket closes —
    /// dropping the swarm instead would lose replies the drain just finished.
    async fn close_connections(&mut self) {
        self.disconnect_all();
        let closed = async {
            while self.swarm.network_info().num_peers() > 0 {
                let ev = self.swarm.select_next_some().await;
                self.on_event(ev);
            }
        };
        if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
            tracing::debug!(head = self.shared.index, "connections still closing after {CLOSE_GRACE:?}");
        }
    }

    /// Close the listeners and every connection.
    fn disconnect_all(&mut self) {
        for id in self.listeners.drain(..) {
            self.swarm.remove_listener(id);
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Stop serving this identity: close the listeners and every connection (streams arriving
    /// meanwhile are reset by the request path, which checks the fence itself).
    fn fence(&mut self) {
        tracing::error!(
            head = self.shared.index,
            "head {} stops serving {}: its lease was not renewed within identity.lease_ttl, so another \
             process may take the identity over",
            self.shared.index,
            self.shared.peer_id
        );
        self.metrics.up.with_label_values(&[&self.shared.index.to_string()]).set(0);
        self.disconnect_all();
    }

    /// The lease was renewed after a fence: listen on the same addresses again. Returns whether
    /// the head serves again.
    fn unfence(&mut self) -> bool {
        for a in self.bound.clone() {
            match self.swarm.listen_on(a.clone()) {
                Ok(id) => self.listeners.push(id),
                Err(e) => {
                    tracing::error!(head = self.shared.index, error = %e, "head {}: cannot listen on {a} again", self.shared.index);
                    return false;
                }
            }
        }
        tracing::info!(
            head = self.shared.index,
            "head {} serves again: its lease was renewed",
            self.shared.index
        );
        self.metrics.up.with_label_values(&[&self.shared.index.to_string()]).set(1);
        true
    }

    /// Handle one swarm event.
    fn on_event(&mut self, ev: SwarmEvent<HeadBehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = (**self.shared.listen_addrs.load()).clone();
                if !addrs.contains(&address) {
                    addrs.push(address);
                    self.shared.listen_addrs.store(Arc::new(addrs));
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let mut addrs = (**self.shared.listen_addrs.load()).clone();
                addrs.retain(|a| a != &address);
                self.shared.listen_addrs.store(Arc::new(addrs));
            }
            SwarmEvent::Behaviour(HeadBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                let addrs = admitted(self.filter, info.listen_addrs);
                self.learned(Update::Identified { peer: peer_id, addrs });
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. }
            | SwarmEvent::ConnectionClosed { peer_id, .. } => {
                self.learned(Update::Seen(peer_id));
                let conns = self.swarm.network_info().connection_counters().num_established();
                self.metrics
                    .connections
                    .with_label_values(&[&self.shared.index.to_string()])
                    .set(conns as i64);
            }
            // Every address failed (not a dial our own limits denied or a condition skipped).
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error: libp2p::swarm::DialError::Transport(_) | libp2p::swarm::DialError::WrongPeerId { .. },
                ..
            } => self.learned(Update::Unreachable(peer)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_serves_until_its_share_of_the_lease_and_a_lost_lease_never_again() {
        let ttl = Duration::from_secs(10);
        let now = Instant::now();
        let f = LeaseFence::new(now, ttl);
        assert!(f.serving());
        // A renewal sent long ago (a pause): its fence has passed.
        let f = LeaseFence::new(now - Duration::from_secs(9), ttl);
        assert!(!f.serving(), "9 s after the renewal was sent, past 0.9 × 10 s");
        f.renewed(now, ttl);
        assert!(f.serving(), "a later renewal lifts the fence");
        f.renewed(now - Duration::from_secs(20), ttl);
        assert!(f.serving(), "an older renewal never shortens it");
        f.lost();
        assert!(!f.serving() && f.is_lost());
        f.renewed(now, ttl);
        assert!(!f.serving(), "a lost identity is never served again");
    }

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
