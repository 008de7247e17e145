//! Serving inbound kad streams: the dispatcher and the per-stream request loop.
//!
//! The dispatcher takes streams from the intake queue ([`crate::kad_server`]) and runs each in its
//! own task, at most `max_concurrent_streams` at once; while that many run, the queue fills and
//! the handlers reset new streams (counted). A stream task serves many requests in sequence:
//! every read has a deadline (`stream_idle_timeout` between requests, `io_timeout` within one), as
//! do every write and the final close, so a slow or silent peer never holds a task for long.
//!
//! Requests are answered from the head's routing snapshot (FIND_NODE, closer peers) and from the
//! provider manager (providers, values); nothing here touches a swarm. How much datastore work a
//! request may cause depends on the load tier ([`crate::load`]), read once per request.

use std::sync::Arc;
use std::time::Instant;

use futures::AsyncWriteExt;
use libp2p::PeerId;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::LimitsSection;
use crate::head::HeadShared;
use crate::kad_server::InboundStream;
use crate::load::{LoadControl, Tier};
use crate::metrics::{KadMetrics, Outcome, ShedReason, StreamEvent};
use crate::providers::ProviderManager;
use crate::routing::K_VALUE;
use crate::wire::{self, FrameError, Request, Response, MAX_MESSAGE_SIZE};

/// Messages up to this size are read without touching the large-message budget.
const SMALL_MESSAGE: usize = 64 * 1024;

/// Everything the stream tasks share.
pub struct Service {
    /// The process's heads, by slot: identity and routing snapshot.
    pub heads: Arc<Vec<Arc<HeadShared>>>,
    pub providers: ProviderManager,
    pub metrics: KadMetrics,
    pub limits: LimitsSection,
    pub load: Arc<LoadControl>,
    /// Budget, in KiB, for bodies of messages larger than [`SMALL_MESSAGE`] held at once.
    large_budget: Semaphore,
}

impl Service {
    pub fn new(
        heads: Arc<Vec<Arc<HeadShared>>>,
        providers: ProviderManager,
        metrics: KadMetrics,
        limits: LimitsSection,
        load: Arc<LoadControl>,
    ) -> Self {
        let kib = limits.large_message_budget_bytes / 1024;
        Self { heads, providers, metrics, limits, load, large_budget: Semaphore::new(kib) }
    }

    /// Count a shed request and return its outcome.
    fn shed(&self, tier: Tier, reason: ShedReason) -> Outcome {
        self.load.shed(tier, reason);
        Outcome::Shed
    }
}

/// Run until cancelled: take queued streams and serve each in a task, bounded.
pub async fn dispatch(
    svc: Arc<Service>,
    mut queue: mpsc::Receiver<InboundStream>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(svc.limits.max_concurrent_streams));
    loop {
        let s = tokio::select! {
            _ = cancel.cancelled() => return,
            s = queue.recv() => match s { Some(s) => s, None => return },
        };
        if too_late(&svc, &s, &queue) {
            continue;
        }
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        if too_late(&svc, &s, &queue) {
            continue;
        }
        let svc = svc.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            svc.metrics.active_streams.inc();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve_stream(&svc, s) => {}
            }
            svc.metrics.active_streams.dec();
            drop(permit);
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

/// Serve requests on one stream until EOF, idle timeout, or an error. Dropping a stream that was
/// not closed resets it.
async fn serve_stream(svc: &Service, s: InboundStream) {
    let InboundStream { head, peer, mut stream, slot: _slot, queued_at: _ } = s;
    svc.metrics.unique.observe(&peer);
    let l = &svc.limits;
    loop {
        let len = match tokio::time::timeout(l.stream_idle_timeout, wire::read_length(&mut stream)).await {
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
    }
}

/// What to do on the stream after a request.
enum Reply {
    Send(Response),
    /// No reply (ADD_PROVIDER never has one).
    Nothing,
    /// Reset the stream: the request failed in a way the peer must notice.
    Reset,
}

/// Answer one request.
async fn handle(svc: &Service, head: usize, peer: PeerId, req: Request) -> (Reply, Outcome) {
    let me = svc.heads[head].peer_id;
    let closer = |key: &[u8]| svc.heads[head].routing.load().closest(key, K_VALUE, &[peer, me]);
    let tier = svc.load.tier();
    // For requests that touch the datastore: refused by the tier or the peer's rate?
    let refused = || {
        if tier >= Tier::Refuse {
            Some(ShedReason::Tier)
        } else if !svc.load.allow_peer(&peer, tier) {
            Some(ShedReason::PeerRate)
        } else {
            None
        }
    };
    match req {
        // Never touch the datastore: served in every tier, not rate limited.
        Request::Ping => (Reply::Send(Response::Ping), Outcome::Ok),
        Request::FindNode { key } => {
            let closer = closer(&key);
            (Reply::Send(Response::FindNode { key, closer }), Outcome::Ok)
        }
        Request::GetProviders { key } => {
            let served = match refused() {
                Some(reason) => Err(reason),
                // Degrade: the datastore only for keys this head is responsible for.
                None if tier == Tier::Degrade
                    && !svc.heads[head].routing.load().is_among_closest(key.as_bytes(), &me, K_VALUE) =>
                {
                    svc.providers.get_providers_cached(&key).ok_or(ShedReason::CacheOnly)
                }
                None => svc.providers.get_providers(&key).await.map_err(|s| s.0),
            };
            let (mut providers, outcome) = match served {
                Ok(p) => (p, Outcome::Ok),
                Err(reason) => (Vec::new(), svc.shed(tier, reason)),
            };
            providers.shuffle(&mut rand::thread_rng());
            providers.truncate(svc.limits.max_providers_per_reply);
            let closer = closer(key.as_bytes());
            (Reply::Send(Response::GetProviders { key, providers, closer }), outcome)
        }
        Request::AddProvider { key, providers, rejected } => {
            if providers.is_empty() {
                tracing::debug!(%peer, rejected, "ADD_PROVIDER without a valid entry for the sender");
                // Counted, but not worth a reset: go ignores such entries too.
                return (Reply::Nothing, Outcome::Invalid);
            }
            if let Some(reason) = refused() {
                return (Reply::Nothing, svc.shed(tier, reason));
            }
            let skip = (tier == Tier::Degrade).then(|| svc.load.config().degrade_skip_refresh_if_remaining);
            let mut outcome = Outcome::Ok;
            for rec in providers {
                if let Err(s) = svc.providers.add_provider_unless_fresh(key.clone(), rec, skip) {
                    outcome = svc.shed(tier, s.0);
                }
            }
            (Reply::Nothing, outcome)
        }
        Request::GetValue { key } => {
            let got = match refused() {
                Some(reason) => Err(reason),
                None => svc.providers.get_value(&key).await.map_err(|s| s.0),
            };
            let (record, outcome) = match got {
                Ok(r) => (r, Outcome::Ok),
                Err(reason) => (None, svc.shed(tier, reason)),
            };
            let closer = closer(&key);
            (Reply::Send(Response::GetValue { key, record, closer }), outcome)
        }
        Request::PutValue { key, mut record } => {
            if let Err(e) = crate::records::validate(&record) {
                tracing::debug!(%peer, error = %e, "PUT_VALUE rejected");
                return (Reply::Reset, Outcome::Invalid);
            }
            if let Some(reason) = refused() {
                return (Reply::Reset, svc.shed(tier, reason));
            }
            record.time_received = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
            match svc.providers.put_value(&record).await {
                Ok(()) => (Reply::Send(Response::PutValue { key, record }), Outcome::Ok),
                Err(s) => (Reply::Reset, svc.shed(tier, s.0)),
            }
        }
    }
}
