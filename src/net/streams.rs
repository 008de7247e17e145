//! Serving inbound kad streams: the dispatcher and the per-stream request loop.
//!
//! The dispatcher takes streams from the intake queue ([`super::intake`]) and runs each in its
//! own task. An open stream costs memory, not a worker slot: it is bounded by the open-stream
//! caps ([`super::open_streams`]) and takes one of `max_concurrent_requests` slots only while it
//! serves a request — from the request's length prefix to its reply. A stream task serves many
//! requests in sequence: every read has a deadline (`stream_idle_timeout` between requests,
//! `io_timeout` within one), as do every write and the final close, so a slow or silent peer
//! never holds a task for long, and an idle one holds no slot at all.
//!
//! Each decoded request is answered by [`super::requests`]; nothing here touches a swarm.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use futures::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::head::HeadShared;
use super::intake::InboundStream;
use super::requests::{handle, Reply};
use super::routing::RoutingSnapshot;
use super::wire::{self, FrameError, MAX_MESSAGE_SIZE};
use crate::config::LimitsSection;
use crate::load::LoadControl;
use crate::metrics::{KadMetrics, Outcome, ShedReason, StreamEvent};
use crate::providers::ProviderManager;
use crate::types::Tier;

/// Messages up to this size are read without touching the large-message budget.
const SMALL_MESSAGE: usize = 64 * 1024;

/// Everything the stream tasks share.
pub struct Service {
    /// The process's heads, by slot: identity, addresses, lease.
    pub heads: Arc<Vec<Arc<HeadShared>>>,
    /// The process-wide routing table's snapshot, which every head answers from.
    pub routing: Arc<ArcSwap<RoutingSnapshot>>,
    pub providers: ProviderManager,
    pub metrics: KadMetrics,
    pub limits: LimitsSection,
    pub load: Arc<LoadControl>,
    /// Budget, in KiB, for bodies of messages larger than [`SMALL_MESSAGE`] held at once.
    large_budget: Semaphore,
    /// One permit per request being served (`limits.max_concurrent_requests`).
    requests: Semaphore,
}

impl Service {
    pub fn new(
        heads: Arc<Vec<Arc<HeadShared>>>,
        routing: Arc<ArcSwap<RoutingSnapshot>>,
        providers: ProviderManager,
        metrics: KadMetrics,
        limits: LimitsSection,
        load: Arc<LoadControl>,
    ) -> Self {
        let kib = limits.large_message_budget_bytes / 1024;
        let requests = Semaphore::new(limits.max_concurrent_requests);
        Self { heads, routing, providers, metrics, limits, load, large_budget: Semaphore::new(kib), requests }
    }

    /// Count a shed request and return its outcome.
    pub(super) fn shed(&self, tier: Tier, reason: ShedReason) -> Outcome {
        self.load.shed(tier, reason);
        Outcome::Shed
    }
}

/// Run until `drain`: take queued streams and serve each in a task (bounded by the open-stream
/// caps the intake applied). On `drain` every stream task finishes the request it is serving,
/// if any, and closes its stream; streams still queued are reset.
pub async fn dispatch(
    svc: Arc<Service>,
    mut queue: mpsc::Receiver<InboundStream>,
    drain: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let s = tokio::select! {
            _ = drain.cancelled() => return,
            s = queue.recv() => match s { Some(s) => s, None => return },
        };
        if too_late(&svc, &s, &queue) {
            continue;
        }
        let svc = svc.clone();
        let drain = drain.clone();
        tasks.spawn(async move {
            svc.metrics.active_streams.inc();
            serve_stream(&svc, s, &drain).await;
            svc.metrics.active_streams.dec();
        });
    }
}

/// Whether `s` waited longer than `load.stream_queue_max_wait` while others wait behind it: then
/// it is dropped (reset) and counted. Served late is worse than refused when there is a backlog —
/// the peer has likely given up, and serving it makes every stream behind it late too (CoDel's
/// lesson). Without a backlog serving it delays nobody, so a lone late stream (a scheduling
/// hiccup) is still served.
fn too_late(svc: &Service, s: &InboundStream, queue: &mpsc::Receiver<InboundStream>) -> bool {
    if queue.is_empty() || s.queued_at.elapsed() <= svc.load.config().stream_queue_max_wait {
        return false;
    }
    svc.metrics.stream(StreamEvent::QueueWait);
    true
}

/// Serve requests on one stream until EOF, idle timeout, an error, or `drain` (which a request
/// being served finishes first). Dropping a stream that was not closed resets it.
async fn serve_stream(svc: &Service, s: InboundStream, drain: &CancellationToken) {
    let InboundStream { head, peer, mut stream, open, queued_at } = s;
    let mut first = Some(queued_at);
    svc.metrics.unique.observe(&peer);
    let l = &svc.limits;
    loop {
        // Idle: no request slot held; a newer stream may close this one (at a stream cap).
        let read = tokio::select! {
            _ = open.evicted() => {
                let _ = tokio::time::timeout(l.io_timeout, stream.close()).await;
                return; // counted as `evicted` by the intake that closed it
            }
            _ = drain.cancelled() => {
                let _ = tokio::time::timeout(l.io_timeout, stream.close()).await;
                return; // shutting down: idle streams close, busy ones finished their request
            }
            r = tokio::time::timeout(l.stream_idle_timeout, wire::read_length(&mut stream)) => r,
        };
        if !open.set_busy() {
            return; // evicted just as its next request began
        }
        let len = match read {
            Err(_) => return svc.metrics.stream(StreamEvent::IdleTimeout),
            Ok(Ok(None)) => {
                svc.metrics.stream(StreamEvent::Closed);
                let _ = tokio::time::timeout(l.io_timeout, stream.close()).await;
                return;
            }
            Ok(Ok(Some(n))) => n,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "kad stream read failed");
                return svc.metrics.stream(StreamEvent::Error);
            }
        };
        if len > MAX_MESSAGE_SIZE {
            tracing::debug!(%peer, len, "kad message over the size limit");
            return svc.metrics.stream(StreamEvent::Oversized);
        }
        // One request slot, from the length prefix to the reply.
        let max_wait = svc.load.config().stream_queue_max_wait;
        let slot = match tokio::time::timeout(max_wait, svc.requests.acquire()).await {
            Ok(Ok(p)) => p,
            _ => return svc.metrics.stream(StreamEvent::SlotWait),
        };
        let _in_flight = InFlight::new(&svc.metrics.requests_in_flight);
        let _budget = if len > SMALL_MESSAGE {
            match svc.large_budget.try_acquire_many(len.div_ceil(1024) as u32) {
                Ok(p) => Some(p),
                Err(_) => return svc.metrics.stream(StreamEvent::Oversized),
            }
        } else {
            None
        };
        let body = match tokio::time::timeout(l.io_timeout, wire::read_body(&mut stream, len)).await {
            Ok(Ok(b)) => b,
            Ok(Err(FrameError::Io(e))) => {
                tracing::debug!(%peer, error = %e, "kad stream body read failed");
                return svc.metrics.stream(StreamEvent::Error);
            }
            Ok(Err(_)) | Err(_) => return svc.metrics.stream(StreamEvent::Error),
        };
        drop(_budget);
        let start = Instant::now();
        let req = match wire::decode_request(&body, &peer) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "invalid kad message");
                return svc.metrics.stream(StreamEvent::Error);
            }
        };
        if !svc.heads[head].lease.serving() {
            return svc.metrics.stream(StreamEvent::Fenced); // another process may own this identity
        }
        let ty = req.message_type();
        let (reply, outcome) = handle(svc, head, peer, req).await;
        svc.metrics.request(head, ty, outcome);
        let resp = match reply {
            Reply::Reset => return svc.metrics.stream(StreamEvent::Error),
            Reply::Nothing => None,
            Reply::Send(r) => Some(r),
        };
        if let Some(resp) = resp {
            let bytes = wire::encode_response(&resp);
            match tokio::time::timeout(l.io_timeout, wire::write_frame(&mut stream, &bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "kad reply write failed");
                    return svc.metrics.stream(StreamEvent::Error);
                }
                Err(_) => return svc.metrics.stream(StreamEvent::Error),
            }
        }
        svc.metrics.request_duration.with_label_values(&[ty.as_str()]).observe(start.elapsed().as_secs_f64());
        if let Some(t) = first.take() {
            svc.metrics.stream_sojourn.with_label_values(&[ty.as_str()]).observe(t.elapsed().as_secs_f64());
        }
        drop(_in_flight);
        drop(slot);
        open.set_idle();
    }
}

/// Counts one request in `hydra_kad_requests_in_flight` while it lives (every return included).
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
