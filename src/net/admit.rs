//! Admission below negotiation: a stream muxer wrapper that resets new inbound streams the
//! admission gate ([`crate::load::Admission`]) does not admit, as the muxer hands them over —
//! yamux over TCP (through the [`Admitting`] upgrade) and QUIC connections alike.
//!
//! Why here and not in our kad handler: by the time a stream reaches a connection handler the
//! swarm has created an upgrade future (with its own timeout timer) for it and run multistream-
//! select on it — measured (`docs/benchmarks.md`), a stream refused after negotiation costs the
//! node about half the CPU of a served request, so refusing at that point cannot free the CPU.
//! A stream refused here costs the muxer's frames (its opening frame in, a reset out) and no
//! task, timer, negotiation or decode. The request's type is unknown this early, so the gate
//! applies to every protocol's new streams alike; open streams are untouched.
//!
//! The same wrapper closes its connection when the node sheds connections
//! ([`Admission::keep_connection`]): an inbound connection draws as its next new stream arrives,
//! and a connection not kept fails with [`AdmitError::Shed`], which makes the swarm close it at
//! once (every stream on it ends, the client learns in one round trip). Outbound connections —
//! the node's own lookups — are never shed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use futures::FutureExt as _;
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

use crate::load::Admission;
use crate::metrics::{KadMetrics, StreamEvent};

/// What the muxers ask and count with.
#[derive(Clone)]
pub struct Gatekeeper {
    pub admission: Arc<Admission>,
    pub metrics: KadMetrics,
}

/// A multiplexer upgrade (yamux) whose muxers admit new inbound streams through the gate.
#[derive(Clone)]
pub struct Admitting<U> {
    inner: U,
    gate: Gatekeeper,
}

impl<U> Admitting<U> {
    pub fn new(inner: U, gate: Gatekeeper) -> Self {
        Self { inner, gate }
    }
}

impl<U: UpgradeInfo> UpgradeInfo for Admitting<U> {
    type Info = U::Info;
    type InfoIter = U::InfoIter;

    fn protocol_info(&self) -> Self::InfoIter {
        self.inner.protocol_info()
    }
}

impl<C, U> InboundConnectionUpgrade<C> for Admitting<U>
where
    U: InboundConnectionUpgrade<C>,
    U::Future: Send + 'static,
    U::Output: 'static,
    U::Error: 'static,
{
    type Output = AdmittingMuxer<U::Output>;
    type Error = U::Error;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: C, info: Self::Info) -> Self::Future {
        wrap(self.inner.upgrade_inbound(io, info), self.gate, Direction::Inbound)
    }
}

impl<C, U> OutboundConnectionUpgrade<C> for Admitting<U>
where
    U: OutboundConnectionUpgrade<C>,
    U::Future: Send + 'static,
    U::Output: 'static,
    U::Error: 'static,
{
    type Output = AdmittingMuxer<U::Output>;
    type Error = U::Error;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: C, info: Self::Info) -> Self::Future {
        wrap(self.inner.upgrade_outbound(io, info), self.gate, Direction::Outbound)
    }
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A peer dialled us: shed when the node sheds connections.
    Inbound,
    /// We dialled (lookups): never shed.
    Outbound,
}

/// The muxer `upgrade` yields, wrapped.
fn wrap<M: 'static, E: 'static>(
    upgrade: impl std::future::Future<Output = Result<M, E>> + Send + 'static,
    gate: Gatekeeper,
    direction: Direction,
) -> BoxFuture<'static, Result<AdmittingMuxer<M>, E>> {
    upgrade.map(move |r| r.map(|inner| AdmittingMuxer::new(inner, gate, direction))).boxed()
}

/// Why an [`AdmittingMuxer`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError<E> {
    #[error(transparent)]
    Muxer(E),
    /// The node sheds connections and this one was not kept.
    #[error("connection shed: the node's CPU is short")]
    Shed,
}

/// A muxer whose new inbound streams pass the admission gate; the rest are dropped (the muxer
/// resets a stream dropped unread) and counted as `admission`. An inbound connection not kept
/// by connection shedding fails (and is closed by the swarm), counted as `shed`.
pub struct AdmittingMuxer<M> {
    inner: M,
    gate: Gatekeeper,
    direction: Direction,
    /// The shedding epoch this connection last drew in (it started in the current one).
    drawn: u64,
    shed: bool,
}

impl<M> AdmittingMuxer<M> {
    /// Wrap a muxer (yamux's from [`Admitting`]; a QUIC connection, which is its own muxer).
    pub fn new(inner: M, gate: Gatekeeper, direction: Direction) -> Self {
        let drawn = gate.admission.epoch();
        Self { inner, gate, direction, drawn, shed: false }
    }
}

impl<M: StreamMuxer + Unpin> StreamMuxer for AdmittingMuxer<M> {
    type Substream = M::Substream;
    type Error = AdmitError<M::Error>;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        loop {
            if this.shed {
                return Poll::Ready(Err(AdmitError::Shed));
            }
            let stream = ready!(Pin::new(&mut this.inner).poll_inbound(cx)).map_err(AdmitError::Muxer)?;
            if this.direction == Direction::Inbound && !this.gate.admission.keep_connection(&mut this.drawn) {
                this.shed = true;
                this.gate.metrics.connections_shed.inc();
                drop(stream);
                continue;
            }
            if this.gate.admission.admit() {
                return Poll::Ready(Ok(stream));
            }
            this.gate.metrics.stream(StreamEvent::Admission);
            drop(stream); // reset at once; the next one may be admitted
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_outbound(cx).map_err(AdmitError::Muxer)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx).map_err(AdmitError::Muxer)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        if this.shed {
            return Poll::Ready(Err(AdmitError::Shed));
        }
        Pin::new(&mut this.inner).poll(cx).map_err(AdmitError::Muxer)
    }
}
