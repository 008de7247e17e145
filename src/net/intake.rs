//! Our inbound `/ipfs/kad/1.0.0` listener: a `NetworkBehaviour` whose per-connection handler
//! accepts inbound kad streams and hands each one, with its authenticated peer, to a bounded queue.
//!
//! Why not kad's own server: `kad::Behaviour` answers inbound requests from a synchronous
//! `RecordStore` inside the swarm's poll, so a slow datastore would stall the whole head (the
//! single-loop failure of go-libp2p-kad-dht #729/#736). kad runs in client mode beside this.
//! Why not `libp2p-stream`: its accept channel has one slot and drops streams under burst.
//!
//! The handler never awaits: a full queue resets the stream (dropping it) and counts it. Because
//! the handler listens on the kad protocol, identify advertises `/ipfs/kad/1.0.0`, which is how
//! go and js peers recognise a DHT server. Accepted streams leave the connection's stream budget
//! at once, so a burst of requests on one connection is limited only by the queue.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::admit::Gatekeeper;
use super::open_streams::{OpenStream, OpenStreams, Refusal, StreamCaps};
use crate::load::Admission;
use crate::metrics::{KadMetrics, StreamEvent};
use crate::sharded::Sharded;

/// The Amino DHT protocol.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/kad/1.0.0");

/// An accepted inbound kad stream, waiting for a stream task.
pub struct InboundStream {
    /// Index of the head that accepted it.
    pub head: usize,
    /// The authenticated remote peer.
    pub peer: PeerId,
    pub stream: Stream,
    /// Its place under the open-stream caps, released when the stream is dropped.
    pub open: OpenStream,
    /// When it entered the queue (streams that waited too long are reset, not served late).
    pub queued_at: std::time::Instant,
}

/// Inbound connections per remote IP address over all heads. An entry exists only while its
/// count is positive, so the map is bounded by the connections themselves.
pub struct IpConnections {
    counts: Sharded<HashMap<IpAddr, u32>>,
    cap: u32,
}

impl IpConnections {
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(Self { counts: Sharded::new(16, HashMap::new), cap })
    }

    fn full(&self, ip: &IpAddr) -> bool {
        self.counts.lock_for(ip).get(ip).is_some_and(|n| *n >= self.cap)
    }

    fn try_add(&self, ip: IpAddr) -> bool {
        let mut shard = self.counts.lock_for(&ip);
        let n = shard.entry(ip).or_insert(0);
        if *n >= self.cap {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, ip: &IpAddr) {
        let mut shard = self.counts.lock_for(ip);
        if let Some(n) = shard.get_mut(ip) {
            *n -= 1;
            if *n == 0 {
                shard.remove(ip);
            }
        }
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0} already has limits.max_connections_per_ip inbound connections")]
struct IpLimit(IpAddr);

/// Why an inbound connection was refused: the CPU is short (connections are shed, or more are
/// arriving than the admitted connection rate).
#[derive(Debug, thiserror::Error)]
#[error("the CPU is short: new connections are refused")]
struct CpuShort;

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Shared intake state for all heads: the queue and whether new streams are accepted.
#[derive(Clone)]
pub struct Intake {
    queue: mpsc::Sender<InboundStream>,
    open: Arc<OpenStreams>,
    /// False at the peak load level: new streams are reset at once.
    accepting: Arc<AtomicBool>,
    /// Inbound connections per remote IP, all heads.
    ips: Arc<IpConnections>,
    /// New streams admitted by rate while the CPU is short (asked by the muxers, [`super::admit`]).
    admission: Arc<Admission>,
    metrics: KadMetrics,
}

impl Intake {
    pub fn new(
        queue: mpsc::Sender<InboundStream>,
        caps: StreamCaps,
        max_connections_per_ip: u32,
        admission: Arc<Admission>,
        metrics: KadMetrics,
    ) -> Self {
        Self {
            queue,
            open: OpenStreams::new(caps),
            accepting: Arc::new(AtomicBool::new(true)),
            ips: IpConnections::new(max_connections_per_ip),
            admission,
            metrics,
        }
    }

    /// Stop (or resume) accepting new inbound kad streams.
    pub fn set_accepting(&self, yes: bool) {
        self.accepting.store(yes, Ordering::Relaxed);
    }

    /// What the heads' stream muxers admit new inbound streams with.
    pub fn gatekeeper(&self) -> Gatekeeper {
        Gatekeeper { admission: self.admission.clone(), metrics: self.metrics.clone() }
    }

    /// Requests answered so far, all heads and types (the controller's measure of what the node
    /// serves).
    pub fn requests_served(&self) -> u64 {
        crate::types::MessageType::ALL
            .iter()
            .map(|t| self.metrics.request_duration.with_label_values(&[t.as_str()]).get_sample_count())
            .sum()
    }

    /// Streams admitted and then reset unserved: the intake queue was full, or they waited longer
    /// than `load.stream_queue_max_wait` for a task.
    pub fn streams_reset_late(&self) -> u64 {
        [crate::metrics::StreamEvent::QueueFull, crate::metrics::StreamEvent::QueueWait]
            .iter()
            .map(|e| self.metrics.streams.with_label_values(&[e.as_str()]).get())
            .sum()
    }

    /// (streams queued, queue capacity).
    pub fn queue_fill(&self) -> (usize, usize) {
        let max = self.queue.max_capacity();
        (max - self.queue.capacity(), max)
    }

    fn offer(&self, head: usize, peer: PeerId, ip: Option<IpAddr>, stream: Stream) {
        if !self.accepting.load(Ordering::Relaxed) {
            self.metrics.stream(StreamEvent::Refused);
            return; // dropped: the stream is reset
        }
        let open = match self.open.open(peer, head, ip) {
            Ok((open, evicted)) => {
                for _ in 0..evicted {
                    self.metrics.stream(StreamEvent::Evicted);
                }
                open
            }
            Err(Refusal::AllBusy) => {
                self.metrics.stream(StreamEvent::PeerLimit);
                return; // every stream of a full scope is busy: this one is reset
            }
        };
        let queued_at = std::time::Instant::now();
        match self.queue.try_send(InboundStream { head, peer, stream, open, queued_at }) {
            Ok(()) => self.metrics.stream(StreamEvent::Queued),
            Err(_) => self.metrics.stream(StreamEvent::QueueFull),
        }
    }
}

/// The behaviour of one head.
pub struct KadServer {
    head: usize,
    intake: Intake,
    /// This head's inbound connections counted under the per-IP cap, by connection.
    inbound: HashMap<ConnectionId, IpAddr>,
}

impl KadServer {
    pub fn new(head: usize, intake: Intake) -> Self {
        Self { head, intake, inbound: HashMap::new() }
    }

    fn handler(&self, peer: PeerId, remote: &Multiaddr) -> Handler {
        Handler { head: self.head, peer, ip: ip_of(remote), intake: self.intake.clone() }
    }

    fn deny(&self, ip: IpAddr) -> ConnectionDenied {
        self.intake.metrics.connections_denied.inc();
        ConnectionDenied::new(IpLimit(ip))
    }
}

impl NetworkBehaviour for KadServer {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        // Refused before the Noise handshake: the cheapest place to turn a connection away.
        match ip_of(remote) {
            Some(ip) if self.intake.ips.full(&ip) => Err(self.deny(ip)),
            _ if !self.intake.admission.admit_connection() => {
                self.intake.metrics.connections_refused.inc();
                Err(ConnectionDenied::new(CpuShort))
            }
            _ => Ok(()),
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // This behaviour is the head's last: once it accepts, the connection is established
        // and its ConnectionClosed will come.
        if let Some(ip) = ip_of(remote) {
            if !self.intake.ips.try_add(ip) {
                return Err(self.deny(ip));
            }
            self.inbound.insert(id, ip);
        }
        Ok(self.handler(peer, remote))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, addr))
    }

    fn on_swarm_event(&mut self, ev: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = ev {
            if let Some(ip) = self.inbound.remove(&c.connection_id) {
                self.intake.ips.remove(&ip);
            }
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, ev: THandlerOutEvent<Self>) {
        match ev {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Per-connection handler: listens on the kad protocol, forwards negotiated streams.
pub struct Handler {
    head: usize,
    peer: PeerId,
    /// The remote IP address of the connection (for the per-IP stream cap).
    ip: Option<IpAddr>,
    intake: Intake,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(KAD_PROTOCOL), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, ev: Self::FromBehaviour) {
        match ev {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), ()>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. }) =
            event
        {
            self.intake.offer(self.head, self.peer, self.ip, stream);
        }
    }
}
