//! The HTTP server: health, Prometheus metrics, and the operator API.
//!
//! Bound to `http_listen` (loopback by default). Handlers read published state only (head
//! addresses, the metrics registry); none of them touches a swarm or waits on the datastore.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::head::HeadShared;
use crate::store::Store;

/// Called before each scrape to refresh sampled gauges.
pub type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct AppState {
    heads: Arc<Vec<Arc<HeadShared>>>,
    store: Store,
    registry: Registry,
    on_scrape: ScrapeHook,
}

/// One head of this process as listed by `GET /v1/heads`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HeadInfo {
    /// Slot in this process (port_base + index).
    pub index: usize,
    /// Index in the fleet's identity sequence.
    #[serde(default)]
    pub identity: u32,
    pub peer_id: String,
    pub addrs: Vec<String>,
}

#[derive(serde::Deserialize)]
struct HeadsQuery {
    #[serde(default)]
    fleet: bool,
}

/// Bind the HTTP listener. Done first at start-up, so a taken port fails before anything runs.
pub async fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("http_listen {addr}: {e}"))
}

/// The server on `listener`; returns its address and the future that serves until `cancel`.
pub fn serve(
    listener: tokio::net::TcpListener,
    heads: Arc<Vec<Arc<HeadShared>>>,
    store: Store,
    registry: Registry,
    on_scrape: ScrapeHook,
    cancel: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/heads", get(heads_list))
        .with_state(AppState { heads, store, registry, on_scrape });
    let fut = async move {
        let res = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
        if let Err(e) = res {
            tracing::error!(error = %e, "HTTP server failed");
        }
    };
    Ok((local, fut))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (s.on_scrape)();
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
}

/// `GET /v1/heads`: this process's heads; with `?fleet=true`, every identity of the fleet with
/// its node, addresses and lease (read from the datastore).
async fn heads_list(State(s): State<AppState>, Query(q): Query<HeadsQuery>) -> Response {
    if q.fleet {
        return match s.store.list_heads().await {
            Ok(all) => Json(all).into_response(),
            Err(e) => {
                tracing::warn!(error = %e, "listing fleet heads failed");
                (StatusCode::SERVICE_UNAVAILABLE, format!("datastore: {e}\n")).into_response()
            }
        };
    }
    Json(
        s.heads
            .iter()
            .map(|h| HeadInfo {
                index: h.index,
                identity: h.identity,
                peer_id: h.peer_id.to_string(),
                addrs: h.listen_addrs.load().iter().map(|a| a.to_string()).collect(),
            })
            .collect::<Vec<_>>(),
    )
    .into_response()
}
