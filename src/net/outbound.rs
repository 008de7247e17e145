//! Outbound `/ipfs/kad/1.0.0` streams from a head, for the process's own lookups
//! ([`super::discovery`]): a `NetworkBehaviour` that opens a stream to a peer on request —
//! dialling the addresses given if the head has no connection to it — and hands it back.
//!
//! Why not `kad::Behaviour`: it always owns a `KBucketsTable` (256 preallocated buckets per
//! head, the bulk of an idle head's memory) and runs its own bootstrap per head; the process
//! already has one routing table ([`super::table`]) and one lookup budget for every head.
//!
//! Every request is bounded: commands wait in a small per-head channel (full ⇒ the caller is
//! told at once), at most [`MAX_DIALS`] dials are in flight per head with at most
//! [`MAX_WAITING_PER_DIAL`] requests each, and a connection dialled only for a lookup is closed
//! when the lookup says it is done with the peer ([`Command::Done`]) instead of idling for the
//! swarm's 60 s.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libp2p::core::upgrade::{DeniedUpgrade, ReadyUpgrade};
use libp2p::core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedOutbound};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::intake::KAD_PROTOCOL;

/// Commands waiting for a head's swarm task; beyond, [`Command::Open`] is refused at once.
pub const COMMAND_CAPACITY: usize = 64;
/// Dials in flight per head.
const MAX_DIALS: usize = 64;
/// Requests waiting for one dial.
const MAX_WAITING_PER_DIAL: usize = 8;
/// Protocol negotiation of an outbound stream.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no stream was opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("the head has too many dials or requests in flight")]
    Busy,
    #[error("dial failed: {0}")]
    Dial(String),
    #[error("stream negotiation failed: {0}")]
    Negotiation(String),
    #[error("the connection closed before the stream opened")]
    Closed,
}

type Reply = oneshot::Sender<Result<Stream, OpenError>>;

/// What a lookup asks of a head.
pub enum Command {
    /// Open a kad stream to `peer`, dialling `addrs` if not connected.
    Open { peer: PeerId, addrs: Vec<Multiaddr>, reply: Reply },
    /// The lookup is done with `peer`: a connection this behaviour dialled for it is closed.
    Done(PeerId),
}

/// A head's handle for its lookups (in [`super::HeadShared`]). Never waits.
#[derive(Clone, Debug)]
pub struct Opener(mpsc::Sender<Command>);

impl Opener {
    /// Ask for a stream; `Err(Busy)` at once if the head's command queue is full.
    pub fn open(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<oneshot::Receiver<Result<Stream, OpenError>>, OpenError> {
        let (reply, rx) = oneshot::channel();
        self.0.try_send(Command::Open { peer, addrs, reply }).map_err(|_| OpenError::Busy)?;
        Ok(rx)
    }

    /// Done with `peer` (best effort: a full queue leaves the connection to the idle timeout).
    pub fn done(&self, peer: PeerId) {
        let _ = self.0.try_send(Command::Done(peer));
    }
}

/// The behaviour of one head.
pub struct Outbound {
    rx: mpsc::Receiver<Command>,
    /// Established connections by peer (any direction), bounded by the swarm's connection limits.
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Dials this behaviour started, with the requests waiting for them.
    dialing: HashMap<PeerId, (ConnectionId, Vec<Reply>)>,
    /// Established connections this behaviour dialled, closed on [`Command::Done`].
    ours: HashMap<PeerId, ConnectionId>,
    events: VecDeque<ToSwarm<Infallible, Reply>>,
}

impl Outbound {
    /// The behaviour and the handle lookups use.
    pub fn new() -> (Self, Opener) {
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let b = Self {
            rx,
            connections: HashMap::new(),
            dialing: HashMap::new(),
            ours: HashMap::new(),
            events: VecDeque::new(),
        };
        (b, Opener(tx))
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Open { peer, addrs, reply } => {
                if let Some(c) = self.connections.get(&peer).and_then(|c| c.first()) {
                    self.events.push_back(ToSwarm::NotifyHandler {
                        peer_id: peer,
                        handler: NotifyHandler::One(*c),
                        event: reply,
                    });
                } else if let Some((_, waiting)) = self.dialing.get_mut(&peer) {
                    waiting.retain(|r| !r.is_closed());
                    if waiting.len() < MAX_WAITING_PER_DIAL {
                        waiting.push(reply);
                    } else {
                        let _ = reply.send(Err(OpenError::Busy));
                    }
                } else if self.dialing.len() >= MAX_DIALS || addrs.is_empty() {
                    let _ = reply.send(Err(if addrs.is_empty() {
                        OpenError::Dial("no address".into())
                    } else {
                        OpenError::Busy
                    }));
                } else {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    self.dialing.insert(peer, (opts.connection_id(), vec![reply]));
                    self.events.push_back(ToSwarm::Dial { opts });
                }
            }
            Command::Done(peer) => {
                if let Some(c) = self.ours.remove(&peer) {
                    self.events.push_back(ToSwarm::CloseConnection {
                        peer_id: peer,
                        connection: CloseConnection::One(c),
                    });
                }
            }
        }
    }
}

impl NetworkBehaviour for Outbound {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn on_swarm_event(&mut self, ev: FromSwarm) {
        match ev {
            FromSwarm::ConnectionEstablished(c) => {
                self.connections.entry(c.peer_id).or_default().push(c.connection_id);
                // Any connection to the peer serves the requests waiting for a dial (the dial
                // itself may lose a race with an inbound connection).
                if let Some((dialled, waiting)) = self.dialing.remove(&c.peer_id) {
                    if dialled == c.connection_id {
                        self.ours.insert(c.peer_id, c.connection_id);
                    }
                    for reply in waiting.into_iter().filter(|r| !r.is_closed()) {
                        self.events.push_back(ToSwarm::NotifyHandler {
                            peer_id: c.peer_id,
                            handler: NotifyHandler::One(c.connection_id),
                            event: reply,
                        });
                    }
                }
            }
            FromSwarm::ConnectionClosed(c) => {
                if let Some(list) = self.connections.get_mut(&c.peer_id) {
                    list.retain(|id| *id != c.connection_id);
                    if list.is_empty() {
                        self.connections.remove(&c.peer_id);
                    }
                }
                if self.ours.get(&c.peer_id) == Some(&c.connection_id) {
                    self.ours.remove(&c.peer_id);
                }
            }
            FromSwarm::DialFailure(f) => {
                let Some(peer) = f.peer_id else { return };
                if self.dialing.get(&peer).is_some_and(|(id, _)| *id == f.connection_id) {
                    let (_, waiting) = self.dialing.remove(&peer).expect("just seen");
                    let why = f.error.to_string();
                    for reply in waiting {
                        let _ = reply.send(Err(OpenError::Dial(why.clone())));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, ev: THandlerOutEvent<Self>) {
        match ev {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Poll::Ready(ev);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => self.command(cmd),
                // The lookups are gone (the node is stopping) or have nothing to ask.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Per-connection handler: opens the outbound kad streams its behaviour asks for; accepts
/// nothing (inbound kad streams are [`super::intake`]'s).
#[derive(Default)]
pub struct Handler {
    pending: VecDeque<Reply>,
    waker: Option<Waker>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        for reply in self.pending.drain(..) {
            let _ = reply.send(Err(OpenError::Closed));
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Reply;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Reply, Self::ToBehaviour>> {
        while let Some(reply) = self.pending.pop_front() {
            if reply.is_closed() {
                continue; // the lookup gave up on it
            }
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(KAD_PROTOCOL), reply)
                    .with_timeout(NEGOTIATION_TIMEOUT),
            });
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, reply: Reply) {
        self.pending.push_back(reply);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Reply>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, info }) => {
                let _ = info.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info, error }) => {
                let _ = info.send(Err(OpenError::Negotiation(error.to_string())));
            }
            _ => {}
        }
    }
}
