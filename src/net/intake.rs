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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

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
    /// The peer's stream slot, released when the stream is dropped.
    pub slot: PeerSlot,
    /// When it entered the queue (streams that waited too long are reset, not served late).
    pub queued_at: std::time::Instant,
}

const PEER_SHARDS: usize = 16;

/// Concurrent inbound streams per remote peer, over all heads. An entry exists only while its
/// count is positive, so the map is bounded by the streams queued and running.
pub struct PeerStreams {
    counts: Sharded<HashMap<PeerId, u32>>,
    limit: u32,
}

/// One of a peer's stream slots; dropping it frees the slot.
pub struct PeerSlot {
    owner: Arc<PeerStreams>,
    peer: PeerId,
}

impl PeerStreams {
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self { counts: Sharded::new(PEER_SHARDS, HashMap::new), limit })
    }

    /// A slot for `peer`, unless it already holds `limit` streams.
    pub fn try_acquire(self: &Arc<Self>, peer: PeerId) -> Option<PeerSlot> {
        let mut shard = self.counts.lock_for(&peer);
        let n = shard.entry(peer).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot { owner: self.clone(), peer })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut shard = self.owner.counts.lock_for(&self.peer);
        if let Some(n) = shard.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&self.peer);
            }
        }
    }
}

/// Shared intake state for all heads: the queue and whether new streams are accepted.
#[derive(Clone)]
pub struct Intake {
    queue: mpsc::Sender<InboundStream>,
    peers: Arc<PeerStreams>,
    /// False at the peak load level: new streams are reset at once.
    accepting: Arc<AtomicBool>,
    metrics: KadMetrics,
}

impl Intake {
    pub fn new(queue: mpsc::Sender<InboundStream>, max_streams_per_peer: u32, metrics: KadMetrics) -> Self {
        Self {
            queue,
            peers: PeerStreams::new(max_streams_per_peer),
            accepting: Arc::new(AtomicBool::new(true)),
            metrics,
        }
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

    fn offer(&self, head: usize, peer: PeerId, stream: Stream) {
        if !self.accepting.load(Ordering::Relaxed) {
            self.metrics.stream(StreamEvent::Refused);
            return; // dropped: the stream is reset
        }
        let Some(slot) = self.peers.try_acquire(peer) else {
            self.metrics.stream(StreamEvent::PeerLimit);
            return; // one peer may not hold every stream slot
        };
        let queued_at = std::time::Instant::now();
        match self.queue.try_send(InboundStream { head, peer, stream, slot, queued_at }) {
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

    fn handler(&self, peer: PeerId) -> Handler {
        Handler { head: self.head, peer, intake: self.intake.clone() }
    }
}

impl NetworkBehaviour for KadServer {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
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
            self.intake.offer(self.head, self.peer, stream);
        }
    }
}
