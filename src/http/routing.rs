//! The IPFS Delegated Routing V1 API (`/routing/v1/…`) on `routing_listen`: the fleet's records
//! for HTTP clients (Helia, Kubo, gateways) without a DHT walk.
//!
//! - `GET /routing/v1/providers/{cid}`: through the provider manager (cache, single-flight,
//!   batching) and the load tier, by the same rule as GET_PROVIDERS
//!   ([`crate::net::requests::providers_in_tier`]); JSON (at most 100) or ndjson, one flushed
//!   chunk per record, with `Accept: application/x-ndjson`.
//! - `GET /routing/v1/peers/{peer-id}`: stored addresses, else the process's routing table.
//! - `GET /routing/v1/dht/closest/peers/{key}`: the process's routing table only (never the
//!   datastore).
//! - `GET` / `PUT /routing/v1/ipns/{name}`: `application/vnd.ipfs.ipns-record`, validated by
//!   [`crate::providers::records`] as PUT_VALUE is.
//!
//! An empty result is 200 with an empty list (IPIP-0513), cached briefly — for IPNS, 200 with a
//! `text/plain` body, since only the IPNS content type means a record; a bad CID or peer ID is
//! 400; a request the tier sheds is 503 with `Retry-After` and `Cache-Control: no-store`, never a
//! cacheable empty answer (a gateway would keep that as a false "no providers"). An IPNS PUT that
//! would replace a better record (higher sequence, or the same and a later validity) is 409.
//! `Protocols` is always empty (the DHT does not carry them).

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::guard::{retry_later, Guard};
use crate::config::RoutingApiSection;
use crate::keys::{parse_peer_id, parse_provider_key};
use crate::load::LoadControl;
use crate::metrics::RoutingApiMetrics;
use crate::net::routing::{RoutingSnapshot, K_VALUE};
use crate::providers::ProviderManager;
use crate::store::{now_ms, Store};
use crate::types::{PeerRecord, ValueRecord};

/// Records in a JSON (not streamed) answer, as the spec allows.
const MAX_JSON_RECORDS: usize = 100;
/// How long a client is asked to wait after a shed.
const RETRY_AFTER_S: u64 = 5;
/// `stale-while-revalidate` and `stale-if-error` of cacheable answers (boxo's 48 h).
const MAX_STALE_S: u64 = 48 * 3600;

const NDJSON: &str = "application/x-ndjson";
const IPNS_RECORD: &str = "application/vnd.ipfs.ipns-record";

/// What the routing handlers read.
#[derive(Clone)]
pub struct RoutingState {
    /// The process-wide routing table's snapshot (every head's).
    pub routing: Arc<arc_swap::ArcSwap<RoutingSnapshot>>,
    pub providers: ProviderManager,
    pub store: Store,
    pub load: Arc<LoadControl>,
    pub cfg: RoutingApiSection,
}

/// The routing API on `listener`: its address and the future serving it until `cancel`.
pub fn serve(
    listener: tokio::net::TcpListener,
    state: RoutingState,
    metrics: RoutingApiMetrics,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, impl std::future::Future<Output = ()>)> {
    let local = listener.local_addr()?;
    let guard = Guard::new(&state.cfg, metrics);
    let app = Router::new()
        .route("/routing/v1/providers/{cid}", get(providers))
        .route("/routing/v1/peers/{peer}", get(peers))
        .route("/routing/v1/dht/closest/peers/{key}", get(closest))
        .route("/routing/v1/ipns/{name}", get(ipns_get).put(ipns_put))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(guard.clone(), super::guard::limits));
    Ok((local, super::guard::serve(listener, app, guard, cancel)))
}

/// One record of an answer (the spec's "peer" schema).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerSchema {
    #[serde(rename = "Schema")]
    pub schema: String,
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Addrs")]
    pub addrs: Vec<String>,
    #[serde(rename = "Protocols")]
    pub protocols: Vec<String>,
}

impl PeerSchema {
    fn of(r: &PeerRecord) -> Self {
        Self {
            schema: "peer".into(),
            id: r.peer.to_base58(),
            addrs: r.addrs.iter().map(|a| a.to_string()).collect(),
            protocols: Vec::new(),
        }
    }
}

#[derive(Deserialize, Default)]
struct Filters {
    #[serde(rename = "filter-addrs")]
    addrs: Option<String>,
    #[serde(rename = "filter-protocols")]
    protocols: Option<String>,
}

/// A multiaddr protocol's name as `filter-addrs` spells it (`ip4`, `tcp`, `quic-v1`, …).
fn protocol_name(p: &Protocol<'_>) -> String {
    let s = p.to_string(); // "/tcp/4001", "/quic-v1", "/p2p-circuit"
    s.trim_start_matches('/').split('/').next().unwrap_or("").to_string()
}

impl Filters {
    /// Apply `filter-addrs` (IPIP-484: names to keep, `!name` to drop, `unknown` to keep
    /// peers without addresses) and `filter-protocols` (`Protocols` is always empty, so only
    /// `unknown` keeps a record). `None`: the record is filtered out.
    fn apply(&self, mut r: PeerRecord) -> Option<PeerRecord> {
        if let Some(p) = &self.protocols {
            if !p.split(',').any(|x| x.trim() == "unknown") {
                return None;
            }
        }
        let Some(f) = &self.addrs else { return Some(r) };
        let terms: Vec<&str> = f.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
        if r.addrs.is_empty() {
            return terms.contains(&"unknown").then_some(r);
        }
        let (neg, pos): (Vec<&str>, Vec<&str>) = terms.iter().partition(|t| t.starts_with('!'));
        let pos: Vec<&str> = pos.into_iter().filter(|t| *t != "unknown").collect();
        r.addrs.retain(|a: &Multiaddr| {
            let names: Vec<String> = a.iter().map(|p| protocol_name(&p)).collect();
            let excluded = neg.iter().any(|n| names.iter().any(|x| x == &n[1..]));
            let included = pos.is_empty() || pos.iter().any(|n| names.iter().any(|x| x == n));
            included && !excluded
        });
        (!r.addrs.is_empty()).then_some(r)
    }
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_REQUEST, [(header::CACHE_CONTROL, "no-store")], format!("{what}: {e}\n")).into_response()
}

fn shed(why: &str) -> Response {
    retry_later(StatusCode::SERVICE_UNAVAILABLE, RETRY_AFTER_S, &format!("shed: {why}; retry later"))
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(NDJSON))
}

/// A list answer: the records that pass the request's filters, as `{"<field>":[…]}` or ndjson
/// (per `Accept`), with the cache headers the spec asks for.
fn list(
    cfg: &RoutingApiSection,
    field: &str,
    recs: Vec<PeerRecord>,
    f: &Filters,
    headers: &HeaderMap,
) -> Response {
    let recs: Vec<PeerRecord> = recs.into_iter().filter_map(|r| f.apply(r)).collect();
    let ndjson = wants_ndjson(headers);
    let max_age = if recs.is_empty() { cfg.cache_max_age_empty } else { cfg.cache_max_age };
    let cache = format!(
        "public, max-age={}, stale-while-revalidate={MAX_STALE_S}, stale-if-error={MAX_STALE_S}",
        max_age.as_secs()
    );
    let headers = [
        (header::CACHE_CONTROL, cache),
        (header::VARY, "Accept".to_string()),
        (header::LAST_MODIFIED, httpdate(SystemTime::now())),
    ];
    if ndjson {
        // One chunk per record: hyper writes (and flushes) each as it comes.
        let lines = recs.into_iter().map(|r| {
            let mut line = serde_json::to_vec(&PeerSchema::of(&r)).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, std::convert::Infallible>(Bytes::from(line))
        });
        let body = Body::from_stream(futures::stream::iter(lines));
        return (headers, [(header::CONTENT_TYPE, NDJSON)], body).into_response();
    }
    let recs: Vec<PeerSchema> = recs.iter().take(MAX_JSON_RECORDS).map(PeerSchema::of).collect();
    let body = serde_json::json!({ field: recs });
    (headers, axum::Json(body)).into_response()
}

/// An HTTP date (RFC 9110 IMF-fixdate).
fn httpdate(t: SystemTime) -> String {
    // humantime's RFC 3339 → the fields of an IMF-fixdate.
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let rfc = humantime::format_rfc3339_seconds(t).to_string(); // 2026-12-01T13:32:26Z
    let (y, mo, d) = (&rfc[0..4], &rfc[5..7], &rfc[8..10]);
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        [mo.parse::<usize>().unwrap_or(1) - 1];
    format!("{weekday}, {d} {month} {y} {h:02}:{m:02}:{s:02} GMT")
}

/// `GET /routing/v1/providers/{cid}`.
async fn providers(
    State(s): State<RoutingState>,
    Path(cid): Path<String>,
    Query(f): Query<Filters>,
    headers: HeaderMap,
) -> Response {
    let key = match parse_provider_key(&cid) {
        Ok(k) => k,
        Err(e) => return bad_request("not a CID", e),
    };
    let policy = s.load.policy();
    // "Far" for this process: no head of it is among the k closest it knows to the key.
    let far = || {
        let snap = s.routing.load();
        !snap.closest(key.as_bytes(), K_VALUE, &[]).iter().any(|r| snap.is_head(&r.peer))
    };
    // The per-IP rate was charged at the door.
    match crate::net::requests::providers_in_tier(&s.providers, &s.load, policy, &key, far, || true).await {
        Ok(mut recs) => {
            use rand::seq::SliceRandom;
            recs.shuffle(&mut rand::thread_rng());
            list(&s.cfg, "Providers", recs, &f, &headers)
        }
        Err(reason) => {
            s.load.shed(policy.tier, reason);
            shed(reason.as_str())
        }
    }
}

/// `GET /routing/v1/peers/{peer-id}`.
async fn peers(
    State(s): State<RoutingState>,
    Path(peer): Path<String>,
    Query(f): Query<Filters>,
    headers: HeaderMap,
) -> Response {
    let peer: PeerId = match parse_peer_id(&peer) {
        Ok(p) => p,
        Err(e) => return bad_request("not a peer ID", e),
    };
    let known = s.routing.load().addrs_of(&peer);
    let policy = s.load.policy();
    let stored = if policy.datastore {
        match tokio::time::timeout(s.cfg.request_timeout, s.store.peer_addrs(&peer)).await {
            Ok(Ok(a)) => a.map(|(addrs, _)| addrs),
            Ok(Err(_)) | Err(_) if known.is_some() => None,
            Ok(Err(_)) | Err(_) => return shed("datastore_error"),
        }
    } else if known.is_none() {
        s.load.shed(policy.tier, crate::metrics::ShedReason::Tier);
        return shed("tier");
    } else {
        None
    };
    let mut addrs = stored.unwrap_or_default();
    for a in known.unwrap_or_default() {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let found = if addrs.is_empty() { Vec::new() } else { vec![PeerRecord { peer, addrs }] };
    list(&s.cfg, "Peers", found, &f, &headers)
}

/// `GET /routing/v1/dht/closest/peers/{key}` (a CID or a peer ID).
async fn closest(
    State(s): State<RoutingState>,
    Path(key): Path<String>,
    Query(f): Query<Filters>,
    headers: HeaderMap,
) -> Response {
    let target = match parse_provider_key(&key) {
        Ok(k) => k,
        Err(e) => return bad_request("not a CID or peer ID", e),
    };
    let recs = s.routing.load().closest(target.as_bytes(), K_VALUE, &[]);
    list(&s.cfg, "Peers", recs, &f, &headers)
}

/// The DHT key of an IPNS name: `/ipns/` + the peer ID's bytes.
fn ipns_key(name: &str) -> Result<(PeerId, Vec<u8>), Box<Response>> {
    let peer = parse_peer_id(name).map_err(|e| Box::new(bad_request("not an IPNS name", e)))?;
    Ok((peer, [b"/ipns/".as_slice(), &peer.to_bytes()].concat()))
}

/// `GET /routing/v1/ipns/{name}`.
async fn ipns_get(State(s): State<RoutingState>, Path(name): Path<String>) -> Response {
    let (_, key) = match ipns_key(&name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let policy = s.load.policy();
    if !policy.datastore {
        s.load.shed(policy.tier, crate::metrics::ShedReason::Tier);
        return shed("tier");
    }
    match s.providers.get_value(&key).await {
        Ok(Some(rec)) => (
            [
                (header::CONTENT_TYPE, IPNS_RECORD.to_string()),
                (header::CACHE_CONTROL, format!("public, max-age={}", s.cfg.cache_max_age_empty.as_secs())),
                (header::VARY, "Accept".to_string()),
            ],
            rec.value,
        )
            .into_response(),
        // IPIP-0513: 200, and only the IPNS content type means a record.
        Ok(None) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
                (header::CACHE_CONTROL, format!("public, max-age={}", s.cfg.cache_max_age_empty.as_secs())),
                (header::VARY, "Accept".to_string()),
            ],
            "no IPNS record for this name\n",
        )
            .into_response(),
        Err(e) => shed(e.0.as_str()),
    }
}

/// `PUT /routing/v1/ipns/{name}`: the body is the record, at most 10 KiB.
async fn ipns_put(State(s): State<RoutingState>, Path(name): Path<String>, body: Body) -> Response {
    let (_, key) = match ipns_key(&name) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let value = match axum::body::to_bytes(body, crate::providers::records::MAX_IPNS_RECORD).await {
        Ok(b) => b.to_vec(),
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "an IPNS record is at most 10 KiB\n").into_response();
        }
    };
    let record = ValueRecord {
        key,
        value,
        time_received: humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
    };
    let valid = match crate::providers::records::validate(&record, now_ms()) {
        Ok(v) => v,
        Err(e) => return bad_request("invalid IPNS record", e),
    };
    let policy = s.load.policy();
    if !policy.datastore {
        s.load.shed(policy.tier, crate::metrics::ShedReason::Tier);
        return shed("tier");
    }
    match s.providers.put_value(&record, valid).await {
        Ok(true) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")], "").into_response(),
        Ok(false) => (
            StatusCode::CONFLICT,
            [(header::CACHE_CONTROL, "no-store")],
            "a better record of this name is stored (a higher sequence, or the same and a later validity)\n",
        )
            .into_response(),
        Err(e) => shed(e.0.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(addrs: &[&str]) -> PeerRecord {
        PeerRecord { peer: PeerId::random(), addrs: addrs.iter().map(|a| a.parse().unwrap()).collect() }
    }

    fn filters(addrs: Option<&str>, protocols: Option<&str>) -> Filters {
        Filters { addrs: addrs.map(Into::into), protocols: protocols.map(Into::into) }
    }

    #[test]
    fn filter_addrs_keeps_named_drops_negated_and_unknown_keeps_addressless() {
        let r = rec(&[
            "/ip4/1.2.3.4/tcp/4001",
            "/ip4/1.2.3.4/udp/4001/quic-v1",
            "/ip4/1.2.3.4/tcp/1/p2p-circuit",
        ]);
        let kept = filters(Some("tcp"), None).apply(r.clone()).unwrap();
        assert_eq!(kept.addrs.len(), 2);
        let kept = filters(Some("tcp,!p2p-circuit"), None).apply(r.clone()).unwrap();
        assert_eq!(kept.addrs, vec!["/ip4/1.2.3.4/tcp/4001".parse::<Multiaddr>().unwrap()]);
        let kept = filters(Some("!tcp"), None).apply(r.clone()).unwrap();
        assert_eq!(kept.addrs.len(), 1, "only the QUIC address has no tcp");
        assert!(filters(Some("webtransport"), None).apply(r.clone()).is_none());
        assert!(filters(Some("tcp"), None).apply(rec(&[])).is_none());
        assert!(filters(Some("tcp,unknown"), None).apply(rec(&[])).is_some());
        assert_eq!(filters(None, None).apply(r.clone()), Some(r));
    }

    #[test]
    fn filter_protocols_keeps_records_without_protocols_only_for_unknown() {
        let r = rec(&["/ip4/1.2.3.4/tcp/4001"]);
        assert!(filters(None, Some("transport-bitswap")).apply(r.clone()).is_none());
        assert!(filters(None, Some("transport-bitswap,unknown")).apply(r).is_some());
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(httpdate(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
