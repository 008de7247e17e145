//! The TCP door: while the node admits no new inbound connection at all, its TCP listeners are
//! closed, so the kernel refuses a new dial by itself.
//!
//! Why: a dial the node accepts only to close it before the handshake is not free — an accept, a
//! socket registered with the reactor, a swarm event and a close, 0.3–0.6 × a served request
//! measured (`docs/benchmarks.md`) — and under a CPU quota it waits behind everything else the
//! throttled node has to do, so the client learns late. With the listener closed, a SYN is
//! answered by the kernel with a reset: the client learns in one round trip ("connection
//! refused", which DHT clients treat as an unreachable peer and back off from), and the node
//! spends nothing.
//!
//! The admission controller decides ([`crate::load::Admission::set_listeners`]: closed while no
//! new connection is admitted — shedding, or the CPU short without room — and
//! `load.admission_close_listeners` is on). This wrapper of the TCP transport applies it: it
//! closes each listener in the inner transport, and binds it again on the same address and port
//! (the port the kernel chose, if it was 0) when connections are admitted again, retrying every
//! second if the port was taken meanwhile. The swarm never sees it: the listener keeps its id and
//! its addresses, so identify, the heads' advertised addresses and the leases do not change.
//! Established connections are untouched. QUIC connections are refused before their handshake
//! instead (one UDP socket serves them all, so it cannot be closed for new ones alone).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::Multiaddr;
use tokio::sync::watch;

use super::admit::Gatekeeper;
use crate::metrics::KadMetrics;

/// How soon a listener that could not be bound again is tried again.
const REOPEN_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Listening in the inner transport.
    Open,
    /// Closed by the door; the inner listener is still closing (its expired addresses and its
    /// end are not passed on).
    Closing,
    /// Closed by the door: no inner listener.
    Closed,
}

struct Listener {
    /// Where to bind again: the address asked for, with the port the kernel chose.
    addr: Multiaddr,
    state: State,
    /// Addresses the swarm has been told of: after a reopen only new ones are passed on.
    told: HashSet<Multiaddr>,
    /// Removed by the swarm while closed by the door (its end already reported).
    removed: bool,
}

/// A TCP transport whose listeners close while the node admits no new connection.
pub struct Door<T: Transport> {
    inner: T,
    metrics: KadMetrics,
    /// The admission's word on the listeners: open (true) or closed.
    open: watch::Receiver<bool>,
    /// Completes when the admission changes its mind about the listeners.
    changed: Option<BoxFuture<'static, ()>>,
    /// Set while a listener waits to be bound again after a failure.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    listeners: HashMap<ListenerId, Listener>,
    events: VecDeque<TransportEvent<T::ListenerUpgrade, T::Error>>,
}

// Nothing in a door is pinned in place: events are moved out, the inner transport is polled
// through `Pin::new` (it is `Unpin`).
impl<T: Transport + Unpin> Unpin for Door<T> {}

impl<T: Transport> Door<T> {
    pub fn new(inner: T, gate: Gatekeeper) -> Self {
        Self {
            inner,
            open: gate.admission.listeners(),
            metrics: gate.metrics,
            changed: None,
            retry: None,
            listeners: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Close the open listeners or bind the closed ones again, as the admission says now.
    fn reconcile(&mut self) {
        let open = *self.open.borrow();
        let retry_due = self.retry.is_none();
        let m = &self.metrics;
        for (id, l) in self.listeners.iter_mut().filter(|(_, l)| !l.removed) {
            match (open, l.state) {
                // A listener whose port is not known yet (no address reported) stays open.
                (false, State::Open)
                    if port_of(&l.addr).is_some_and(|p| p != 0) && self.inner.remove_listener(*id) =>
                {
                    l.state = State::Closing;
                    m.listeners_closed.inc();
                    m.listener_closes.inc();
                }
                (true, State::Closed) if retry_due => match self.inner.listen_on(*id, l.addr.clone()) {
                    Ok(()) => {
                        l.state = State::Open;
                        m.listeners_closed.dec();
                    }
                    Err(e) => {
                        m.listener_reopen_failures.inc();
                        tracing::warn!(error = %e, "cannot listen on {} again; retrying in {REOPEN_RETRY:?}", l.addr);
                        self.retry = Some(Box::pin(tokio::time::sleep(REOPEN_RETRY)));
                    }
                },
                _ => {}
            }
        }
    }

    /// What of an inner event the swarm is told (None: nothing).
    fn pass(
        &mut self,
        ev: TransportEvent<T::ListenerUpgrade, T::Error>,
    ) -> Option<TransportEvent<T::ListenerUpgrade, T::Error>> {
        let id = match &ev {
            TransportEvent::NewAddress { listener_id, .. }
            | TransportEvent::AddressExpired { listener_id, .. }
            | TransportEvent::Incoming { listener_id, .. }
            | TransportEvent::ListenerClosed { listener_id, .. }
            | TransportEvent::ListenerError { listener_id, .. } => *listener_id,
        };
        let Some(l) = self.listeners.get_mut(&id) else { return Some(ev) };
        match &ev {
            TransportEvent::NewAddress { listen_addr, .. } => {
                if let (Some(0), Some(port)) = (port_of(&l.addr), port_of(listen_addr)) {
                    l.addr = with_port(&l.addr, port);
                }
                (l.state == State::Open && l.told.insert(listen_addr.clone())).then_some(ev)
            }
            // The door is closing it: the swarm keeps the address.
            TransportEvent::AddressExpired { .. } if l.state == State::Closing => None,
            TransportEvent::AddressExpired { listen_addr, .. } => {
                l.told.remove(listen_addr);
                Some(ev)
            }
            TransportEvent::ListenerClosed { reason, .. } if l.state == State::Closing => {
                if let Err(e) = reason {
                    tracing::debug!(error = %e, "listener closed by the door ended with an error");
                }
                if l.removed {
                    self.listeners.remove(&id);
                } else {
                    l.state = State::Closed;
                }
                None
            }
            TransportEvent::ListenerClosed { .. } => {
                self.listeners.remove(&id);
                Some(ev)
            }
            TransportEvent::Incoming { .. } | TransportEvent::ListenerError { .. } => Some(ev),
        }
    }

    /// Poll the wake-ups (a change of mind, a retry due); true if one fired.
    fn poll_wakeups(&mut self, cx: &mut Context<'_>) -> bool {
        let mut fired = false;
        if self.retry.as_mut().is_some_and(|r| r.as_mut().poll(cx).is_ready()) {
            self.retry = None;
            fired = true;
        }
        // Re-armed until pending: a change between reading and re-arming is not missed.
        while self.changed.as_mut().is_none_or(|c| c.poll_unpin(cx).is_ready()) {
            self.open.borrow_and_update();
            // The clone has seen what `open` has: it completes at the next change.
            let mut rx = self.open.clone();
            self.changed = Some(
                async move {
                    if rx.changed().await.is_err() {
                        futures::future::pending::<()>().await; // the admission is gone: never again
                    }
                }
                .boxed(),
            );
            fired = true;
        }
        fired
    }
}

fn port_of(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

fn with_port(addr: &Multiaddr, port: u16) -> Multiaddr {
    addr.iter()
        .map(|p| match p {
            Protocol::Tcp(_) => Protocol::Tcp(port),
            p => p,
        })
        .collect()
}

impl<T> Transport for Door<T>
where
    T: Transport + Unpin,
{
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr.clone())?;
        self.listeners
            .insert(id, Listener { addr, state: State::Open, told: HashSet::new(), removed: false });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        let Some(l) = self.listeners.get_mut(&id) else { return self.inner.remove_listener(id) };
        if l.removed {
            return false;
        }
        l.removed = true;
        match l.state {
            State::Open => self.inner.remove_listener(id),
            closed => {
                // Closed by the door: the swarm learns its end now, as the inner transport
                // would have told it.
                for listen_addr in l.told.drain() {
                    self.events.push_back(TransportEvent::AddressExpired { listener_id: id, listen_addr });
                }
                self.events.push_back(TransportEvent::ListenerClosed { listener_id: id, reason: Ok(()) });
                self.metrics.listeners_closed.dec();
                if closed == State::Closed {
                    self.listeners.remove(&id);
                }
                true
            }
        }
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.inner.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        loop {
            if this.poll_wakeups(cx) {
                this.reconcile();
            }
            if let Some(ev) = this.events.pop_front() {
                return Poll::Ready(ev);
            }
            match Pin::new(&mut this.inner).poll(cx) {
                Poll::Ready(ev) => {
                    // A listener's port became known (one added while the door is closed is
                    // closed now), or a listener the door closed is gone (bound again if the
                    // door opened meanwhile).
                    let settles = matches!(
                        ev,
                        TransportEvent::NewAddress { .. } | TransportEvent::ListenerClosed { .. }
                    );
                    let passed = this.pass(ev);
                    if settles {
                        this.reconcile();
                    }
                    if let Some(ev) = passed {
                        return Poll::Ready(ev);
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::future::poll_fn;
    use libp2p::tcp;

    use super::*;
    use crate::load::Admission;
    use crate::metrics::Metrics;

    type Event = TransportEvent<<tcp::tokio::Transport as Transport>::ListenerUpgrade, std::io::Error>;

    async fn next(door: &mut Door<tcp::tokio::Transport>, within: Duration) -> Option<Event> {
        tokio::time::timeout(within, poll_fn(|cx| Pin::new(&mut *door).poll(cx))).await.ok()
    }

    /// Listen on a free loopback port; the address the swarm is told.
    async fn listen(door: &mut Door<tcp::tokio::Transport>, id: ListenerId) -> Multiaddr {
        door.listen_on(id, "/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
        match next(door, Duration::from_secs(5)).await {
            Some(TransportEvent::NewAddress { listen_addr, .. }) => listen_addr,
            other => panic!("no address reported: {other:?}"),
        }
    }

    fn dial(port: u16) -> std::io::Result<std::net::TcpStream> {
        std::net::TcpStream::connect(("127.0.0.1", port))
    }

    #[tokio::test]
    async fn a_closed_door_refuses_dials_in_the_kernel_and_reopens_on_its_port_unseen_by_the_swarm() {
        let admission = Arc::new(Admission::default());
        let metrics = Metrics::new(&prometheus::Registry::new(), 1).kad;
        let gate = Gatekeeper { admission: admission.clone(), metrics: metrics.clone() };
        let mut door = Door::new(tcp::tokio::Transport::new(tcp::Config::default()), gate);
        let id = ListenerId::next();
        let listen_addr = listen(&mut door, id).await;
        let port = port_of(&listen_addr).unwrap();
        let _first = dial(port).expect("the door is open");
        assert!(matches!(
            next(&mut door, Duration::from_secs(5)).await,
            Some(TransportEvent::Incoming { .. })
        ));

        admission.set_listeners(false);
        // The swarm hears nothing: no expired address, no closed listener.
        assert!(next(&mut door, Duration::from_millis(300)).await.is_none());
        let refused = dial(port).expect_err("the kernel refuses while the door is closed");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!((metrics.listeners_closed.get(), metrics.listener_closes.get()), (1, 1));

        admission.set_listeners(true);
        // Bound again on the same port, and the known address is not told again.
        assert!(next(&mut door, Duration::from_millis(300)).await.is_none());
        let _again = dial(port).expect("open again on the same port");
        match next(&mut door, Duration::from_secs(5)).await {
            Some(TransportEvent::Incoming { listener_id, .. }) => assert_eq!(listener_id, id),
            other => panic!("expected the dial on the same listener, got {other:?}"),
        }
        assert_eq!(metrics.listeners_closed.get(), 0);

        // Removed by the swarm while closed: it learns the address expired and the listener
        // closed, as from an open one, and nothing is bound again when the door opens.
        admission.set_listeners(false);
        assert!(next(&mut door, Duration::from_millis(300)).await.is_none());
        assert!(door.remove_listener(id));
        assert!(
            matches!(next(&mut door, Duration::from_secs(1)).await, Some(TransportEvent::AddressExpired { listen_addr: a, .. }) if a == listen_addr)
        );
        assert!(matches!(
            next(&mut door, Duration::from_secs(1)).await,
            Some(TransportEvent::ListenerClosed { reason: Ok(()), .. })
        ));
        admission.set_listeners(true);
        assert!(next(&mut door, Duration::from_millis(300)).await.is_none());
        assert!(dial(port).is_err(), "a listener the swarm removed is not bound again");
        assert_eq!(metrics.listeners_closed.get(), 0);

        // A listener added while the door is closed (a head unfenced): the swarm learns its
        // address, then it is closed too.
        admission.set_listeners(false);
        assert!(next(&mut door, Duration::from_millis(100)).await.is_none());
        let listen_addr = listen(&mut door, ListenerId::next()).await;
        assert!(next(&mut door, Duration::from_millis(300)).await.is_none());
        let refused = dial(port_of(&listen_addr).unwrap()).expect_err("closed once its port was known");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(metrics.listeners_closed.get(), 1);
    }
}
