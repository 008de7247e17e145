//! The public listener's door: every limit of `[routing_api]`, applied before a handler runs.
//!
//! Connections: at most `max_connections` open (beyond, closed at once), each with
//! `header_timeout` to send a request's headers — also an idle keep-alive connection's limit
//! before its next request, so a silent client holds memory for a bounded time and never a
//! request slot. Requests: a per-IP GCRA rate (429 with `Retry-After`, over a map bounded in
//! entries), at most `max_concurrent_requests` being served (503), each within `request_timeout`
//! (503). Every refusal is counted by reason; every answer by endpoint and status code. CORS
//! (`*`) is answered here too, preflights included, so every response carries it.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::RoutingApiSection;
use crate::load::BoundedKeys;
use crate::metrics::RoutingApiMetrics;

/// The per-request limits, shared by every connection of the listener.
pub(super) struct Guard {
    rate: Option<RateLimiter<IpAddr, BoundedKeys<IpAddr>, DefaultClock, NoOpMiddleware>>,
    requests: Semaphore,
    cfg: RoutingApiSection,
    pub(super) metrics: RoutingApiMetrics,
}

impl Guard {
    pub(super) fn new(cfg: &RoutingApiSection, metrics: RoutingApiMetrics) -> Arc<Self> {
        let rate = NonZeroU32::new(cfg.per_ip_requests_per_second).map(|r| {
            let burst = NonZeroU32::new(cfg.per_ip_burst).unwrap_or(r);
            RateLimiter::new(
                Quota::per_second(r).allow_burst(burst),
                BoundedKeys::new(cfg.max_tracked_ips),
                DefaultClock::default(),
            )
        });
        Arc::new(Self {
            rate,
            requests: Semaphore::new(cfg.max_concurrent_requests),
            cfg: cfg.clone(),
            metrics,
        })
    }
}

/// The label of the endpoint `path` belongs to.
pub(super) fn endpoint(method: &Method, path: &str) -> &'static str {
    let rest = path.strip_prefix("/routing/v1/").unwrap_or("");
    if rest.starts_with("providers/") {
        "providers"
    } else if rest.starts_with("peers/") {
        "peers"
    } else if rest.starts_with("dht/closest/peers/") {
        "closest_peers"
    } else if rest.starts_with("ipns/") && method == Method::PUT {
        "ipns_put"
    } else if rest.starts_with("ipns/") {
        "ipns_get"
    } else {
        "other"
    }
}

/// A refusal the client may retry: `status` with `Retry-After` and no caching.
pub(super) fn retry_later(status: StatusCode, retry_after_s: u64, why: &str) -> Response {
    (
        status,
        [(header::RETRY_AFTER, retry_after_s.to_string()), (header::CACHE_CONTROL, "no-store".to_string())],
        format!("{why}\n"),
    )
        .into_response()
}

fn cors(resp: &mut Response) {
    resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
}

/// The middleware: CORS preflight, rate, concurrency, timeout, and counting.
pub(super) async fn limits(
    State(g): State<Arc<Guard>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let ep = endpoint(req.method(), req.uri().path());
    let mut resp = if req.method() == Method::OPTIONS {
        (
            StatusCode::NO_CONTENT,
            [
                (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, PUT, OPTIONS"),
                (header::ACCESS_CONTROL_ALLOW_HEADERS, "Accept, Content-Type"),
                (header::ACCESS_CONTROL_MAX_AGE, "86400"),
            ],
        )
            .into_response()
    } else if g.rate.as_ref().is_some_and(|r| r.check_key(&peer.ip()).is_err()) {
        g.metrics.refuse("rate");
        retry_later(StatusCode::TOO_MANY_REQUESTS, 1, "too many requests from this address")
    } else {
        match g.requests.try_acquire() {
            Err(_) => {
                g.metrics.refuse("concurrency");
                retry_later(StatusCode::SERVICE_UNAVAILABLE, 1, "too many requests in progress")
            }
            Ok(_permit) => match tokio::time::timeout(g.cfg.request_timeout, next.run(req)).await {
                Ok(r) => {
                    // The handlers' own refusals: a body over the cap, a lookup shed by the tier
                    // (or its deadline, or a failing datastore).
                    match r.status() {
                        StatusCode::PAYLOAD_TOO_LARGE => g.metrics.refuse("body_too_large"),
                        StatusCode::SERVICE_UNAVAILABLE => g.metrics.refuse("shed"),
                        _ => {}
                    }
                    r
                }
                Err(_) => {
                    g.metrics.refuse("timeout");
                    retry_later(StatusCode::SERVICE_UNAVAILABLE, 1, "request took too long")
                }
            },
        }
    };
    cors(&mut resp);
    g.metrics.requests.with_label_values(&[ep, resp.status().as_str()]).inc();
    g.metrics.duration.with_label_values(&[ep]).observe(started.elapsed().as_secs_f64());
    resp
}

/// Serve `app` on `listener` until `cancel`, with the connection limits of [`Guard`].
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    g: Arc<Guard>,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let connections = Arc::new(Semaphore::new(g.cfg.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "routing API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            g.metrics.refuse("connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(Body::new))
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(g.cfg.header_timeout);
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let (cancel, metrics) = (cancel.clone(), g.metrics.clone());
        metrics.connections.inc();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            metrics.connections.dec();
            drop(slot);
        });
    }
}
