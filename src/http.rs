//! The HTTP servers: health, Prometheus metrics, the operator API, and (in [`routing`]) the
//! public Delegated Routing V1 API.
//!
//! The operator API is bound to `http_listen` (loopback by default). Bound wider, its admin
//! paths (`POST /v1/config/reload`, `/debug/pprof/…`) still answer loopback clients only; for a Prometheus on
//! another host, `metrics_listen` serves `/metrics`, `/healthz` and `/readyz` and nothing else.
//! Handlers read published state only (head addresses, the metrics registry); none of them
//! touches a swarm. Only `/v1/heads?fleet=true`, `/v1/providers/{cid}` (operator queries, rare)
//! and `/readyz` read the datastore (`/readyz` at most once a second, one probe at a time,
//! whatever the rate of readiness checks).

mod guard;
pub mod routing;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::keys::{key_to_cid, parse_provider_key};
use crate::load::{LoadControl, Reloader, Status};
use crate::net::HeadShared;
use crate::providers::ProviderManager;
use crate::store::{Store, StoredProvider};

/// Called before each scrape to refresh sampled gauges.
pub type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// How long a readiness answer is reused, and how long the datastore may take to answer.
const READY_CACHE: std::time::Duration = std::time::Duration::from_secs(1);
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The last datastore probe of `/readyz`: when, and why not ready (None: ready).
type Probe = tokio::sync::Mutex<Option<(std::time::Instant, Option<String>)>>;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub heads: Arc<Vec<Arc<HeadShared>>>,
    pub store: Store,
    pub providers: ProviderManager,
    pub registry: Registry,
    pub on_scrape: ScrapeHook,
    pub load: Arc<LoadControl>,
    pub reloader: Reloader,
    /// Single-flight, cached datastore probe for `/readyz`.
    pub probe: Arc<Probe>,
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
    /// Listen addresses.
    pub addrs: Vec<String>,
    /// What the head advertises: `announce` addresses if configured, else `addrs`.
    #[serde(default)]
    pub advertised: Vec<String>,
}

#[derive(serde::Deserialize)]
struct HeadsQuery {
    #[serde(default)]
    fleet: bool,
}

/// Bind a listener named by its setting (`http_listen`, …). Done first at start-up, so a
/// taken port fails before anything runs.
pub async fn listen(setting: &str, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("{setting} {addr}: {e}"))
}

/// The operator API on `listener`; returns its address and the future that serves until `cancel`.
pub fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let app = health_routes()
        .route("/v1/heads", get(heads_list))
        .route("/v1/status", get(status))
        .route("/v1/providers/{cid}", get(providers))
        .route("/v1/config/reload", post(reload))
        .route("/debug/pprof/heap", get(heap_profile))
        .route("/debug/pprof/profile", get(cpu_profile));
    serve_router(listener, app.with_state(state), cancel, "HTTP server")
}

/// The metrics-only server (`metrics_listen`): `/metrics`, `/healthz`, `/readyz`.
pub fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    serve_router(listener, health_routes().with_state(state), cancel, "metrics server")
}

/// `/healthz`, `/readyz`, `/metrics`: on both listeners.
fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
    what: &'static str,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let local = listener.local_addr()?;
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let fut = async move {
        let res = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
        if let Err(e) = res {
            tracing::error!(error = %e, "{what} failed");
        }
    };
    Ok((local, fut))
}

/// `GET /readyz`: 200 when every head listens and the datastore answers, else 503 naming why.
/// Never cached by clients; the datastore probe is reused for [`READY_CACHE`].
async fn readyz(State(s): State<AppState>) -> Response {
    let not_ready = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CACHE_CONTROL, "no-store")],
            format!("not ready: {why}\n"),
        )
            .into_response()
    };
    if let Some(h) = s.heads.iter().find(|h| h.listen_addrs.load().is_empty()) {
        return not_ready(format!("head {} has no listen address", h.index));
    }
    let mut last = s.probe.lock().await;
    let fresh = last.as_ref().filter(|(at, _)| at.elapsed() < READY_CACHE).map(|(_, r)| r.clone());
    let failure = match fresh {
        Some(r) => r,
        None => {
            let r = match tokio::time::timeout(READY_TIMEOUT, s.store.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("datastore: {e}")),
                Err(_) => Some(format!("datastore did not answer within {READY_TIMEOUT:?}")),
            };
            *last = Some((std::time::Instant::now(), r.clone()));
            r
        }
    };
    drop(last);
    match failure {
        None => ([(header::CACHE_CONTROL, "no-store")], "ready\n").into_response(),
        Some(why) => not_ready(why),
    }
}

/// What `GET /v1/status` answers (and `hydra status` shows).
#[derive(Serialize)]
pub struct NodeStatus {
    /// The tier, its signals and thresholds.
    #[serde(flatten)]
    pub load: Status,
    pub heads: usize,
    /// Provider records and peers with addresses in the datastore (catalogue estimates).
    pub records_estimate: f64,
    pub peers_estimate: f64,
    /// Records accepted and not yet written, and the bound.
    pub write_buffer_entries: usize,
    pub write_buffer_capacity: usize,
}

/// `GET /v1/status`: the load tier, the signals it was computed from, the thresholds, fills and
/// record estimates.
async fn status(State(s): State<AppState>) -> Response {
    match s.load.status() {
        Some(load) => {
            let (entries, capacity) = s.providers.write_buffer_fill();
            let (records_estimate, peers_estimate) = s.providers.estimates();
            Json(NodeStatus {
                load,
                heads: s.heads.len(),
                records_estimate,
                peers_estimate,
                write_buffer_entries: entries,
                write_buffer_capacity: capacity,
            })
            .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no load sample yet\n").into_response(),
    }
}

/// Records of one key as `GET /v1/providers/{cid}` and `hydra providers --json` show them.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProvidersReport {
    /// What was asked for, as given (a CID of any version and codec, or a multihash).
    pub query: String,
    /// The key as a CIDv1 (raw codec, base32): the DHT keys records by multihash only, so a
    /// dag-pb `bafy…` or a `Qm…` asked for is shown here as the `bafk…` of its multihash.
    pub cid: String,
    /// The multihash, hex.
    pub multihash: String,
    pub providers: Vec<ProviderEntry>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProviderEntry {
    pub peer_id: String,
    pub addrs: Vec<String>,
    /// RFC 3339.
    pub expires_at: String,
    /// RFC 3339; absent when no addresses are stored.
    pub addrs_expire_at: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ProvidersReport {
    pub fn new(query: &str, key: &crate::types::ProviderKey, rows: Vec<StoredProvider>) -> Self {
        Self {
            query: query.to_string(),
            cid: key_to_cid(key),
            multihash: hex::encode(key.as_bytes()),
            providers: rows
                .into_iter()
                .map(|r| ProviderEntry {
                    peer_id: r.peer.to_base58(),
                    addrs: r.addrs.iter().map(|a| a.to_string()).collect(),
                    expires_at: rfc3339(r.expires_at),
                    addrs_expire_at: r.addrs_expire_at.map(rfc3339),
                })
                .collect(),
        }
    }
}

/// Most records one operator query returns.
pub const MAX_INSPECT: usize = 10_000;

#[derive(serde::Deserialize)]
struct ProvidersQuery {
    limit: Option<usize>,
}

/// `GET /v1/providers/{cid}[?limit=N]`: every stored, unexpired record of the key with its
/// addresses and expiry, straight from the datastore (latest expiry first, at most `limit`,
/// default 1000, at most 10000). 400 names what is wrong with a bad CID.
async fn providers(
    State(s): State<AppState>,
    Path(cid): Path<String>,
    Query(q): Query<ProvidersQuery>,
) -> Response {
    let key = match parse_provider_key(&cid) {
        Ok(k) => k,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not a CID or multihash: {e}\n")).into_response(),
    };
    let limit = q.limit.unwrap_or(1000).min(MAX_INSPECT);
    match s.store.inspect_providers(&key, limit).await {
        Ok(rows) => Json(ProvidersReport::new(&cid, &key, rows)).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("datastore: {e}\n")).into_response(),
    }
}

fn loopback_only(peer: &SocketAddr, what: &str) -> Option<Response> {
    (!peer.ip().is_loopback())
        .then(|| (StatusCode::FORBIDDEN, format!("{what} is allowed from loopback only\n")).into_response())
}

fn profile_response(res: Result<Vec<u8>, crate::profiles::ProfileError>, name: &str) -> Response {
    use crate::profiles::ProfileError;
    match res {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")),
            ],
            bytes,
        )
            .into_response(),
        Err(e @ ProfileError::HeapInactive) => {
            (StatusCode::NOT_IMPLEMENTED, format!("{e}\n")).into_response()
        }
        Err(e @ ProfileError::Busy) => (StatusCode::CONFLICT, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// `GET /debug/pprof/heap` (loopback clients only): live allocations, sampled, gzipped pprof.
async fn heap_profile(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    if let Some(r) = loopback_only(&peer, "profiling") {
        return r;
    }
    profile_response(crate::profiles::heap_pprof().await, "heap.pb.gz")
}

#[derive(serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

/// `GET /debug/pprof/profile?seconds=N` (loopback clients only; 1..=60, default 10): a CPU
/// profile, pprof protobuf; 409 while another is being taken.
async fn cpu_profile(ConnectInfo(peer): ConnectInfo<SocketAddr>, Query(q): Query<ProfileQuery>) -> Response {
    if let Some(r) = loopback_only(&peer, "profiling") {
        return r;
    }
    let seconds = q.seconds.unwrap_or(10).clamp(1, 60);
    profile_response(crate::profiles::cpu_pprof(seconds).await, "cpu.pb")
}

/// `POST /v1/config/reload` (loopback clients only): re-read `[load]` from the config file.
/// 200 with the applied section, or 400 with the reason the old settings stay.
async fn reload(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    if let Some(r) = loopback_only(&peer, "config reload") {
        return r;
    }
    match s.reloader.reload() {
        Ok(section) => Json(section).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("reload rejected, previous settings kept: {e}\n"))
            .into_response(),
    }
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
                advertised: h.advertised.load().iter().map(|a| a.to_string()).collect(),
            })
            .collect::<Vec<_>>(),
    )
    .into_response()
}
