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

use super::open_streams::{OpenStream, OpenStreams, Refusal, StreamCaps};
use crate::metrics::{KadMetrics, StreamEvent};

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

/// Shared intake state for all heads: the queue and whether new streams are accepted.
#[derive(Clone)]
pub struct Intake {
    queue: mpsc::Sender<InboundStream>,
    open: Arc<OpenStreams>,
    /// False at the peak load level: new streams are reset at once.
    accepting: Arc<AtomicBool>,
    metrics: KadMetrics,
}

impl Intake {
    pub fn new(queue: mpsc::Sender<InboundStream>, caps: StreamCaps, metrics: KadMetrics) -> Self {
        Self { queue, open: OpenStreams::new(caps), accepting: Arc::new(AtomicBool::new(true)), metrics }
    }

    /// Stop (or resume) accepting new inbound kad streams.
    pub fn set_accepting(&self, yes: bool) {
        self.accepting.store(yes, Ordering::Relaxed);
    }

    /// (streams queued, queue capacity).
    pub fn queue_fill(&self) -> (usize, usize) {
        let max = self.queue.max_capacity();
        (max - self.queue.capacity(), max)
    }

    /// Open inbound streams (idle or serving a request), all heads.
    pub fn open_streams(&self) -> usize {
        self.open.len()
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
}

impl KadServer {
    pub fn new(head: usize, intake: Intake) -> Self {
        Self { head, intake }
    }

    fn handler(&self, peer: PeerId, remote: &Multiaddr) -> Handler {
        let ip = remote.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        });
        Handler { head: self.head, peer, ip, intake: self.intake.clone() }
    }
}

impl NetworkBehaviour for KadServer {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
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

    fn on_swarm_event(&mut self, _: FromSwarm) {}

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
