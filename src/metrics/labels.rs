//! Label values of the node's metrics: fixed enums, so no series is ever named after a peer or a key.

/// Outcome of one inbound request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (or, for ADD_PROVIDER, accepted).
    Ok,
    /// Malformed or invalid; the stream was reset.
    Invalid,
    /// Deliberately not served in full (load, limits, deadlines).
    Shed,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Invalid, Outcome::Shed];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::Shed => "shed",
        }
    }
}

/// Things that happen to an inbound kad stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// Handed to the queue.
    Queued,
    /// Queue full: reset and dropped.
    QueueFull,
    /// A stream cap (per peer and head, per IP, per process) was full and every stream under it
    /// was serving a request: the new stream was reset.
    PeerLimit,
    /// An idle stream closed to make room for a newer one at a stream cap.
    Evicted,
    /// No request slot (`limits.max_concurrent_requests`) within `load.stream_queue_max_wait`:
    /// the stream was reset.
    SlotWait,
    /// Ended by the peer with EOF.
    Closed,
    /// Refused at the handler because the load tier is `peak`.
    Refused,
    /// Reset at the handler by admission: the CPU is short and new streams are admitted at the
    /// rate the node can serve (`hydra_load_admission_streams_per_second`).
    Admission,
    /// Waited in the queue longer than `load.stream_queue_max_wait`: reset, not served late.
    QueueWait,
    /// Reset after the idle timeout.
    IdleTimeout,
    /// A message over the size limit (or the large-message budget): reset.
    Oversized,
    /// Any read, write or decode failure.
    Error,
    /// Reset because the head's lease was not renewed in time: another process may own its
    /// identity now (fencing).
    Fenced,
}

impl StreamEvent {
    pub const ALL: [StreamEvent; 13] = [
        StreamEvent::Queued,
        StreamEvent::QueueFull,
        StreamEvent::PeerLimit,
        StreamEvent::Evicted,
        StreamEvent::SlotWait,
        StreamEvent::Refused,
        StreamEvent::Admission,
        StreamEvent::QueueWait,
        StreamEvent::Closed,
        StreamEvent::IdleTimeout,
        StreamEvent::Oversized,
        StreamEvent::Error,
        StreamEvent::Fenced,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEvent::Queued => "queued",
            StreamEvent::QueueFull => "queue_full",
            StreamEvent::PeerLimit => "peer_limit",
            StreamEvent::Evicted => "evicted",
            StreamEvent::SlotWait => "slot_wait",
            StreamEvent::Refused => "refused",
            StreamEvent::Admission => "admission",
            StreamEvent::QueueWait => "queue_wait",
            StreamEvent::Closed => "closed",
            StreamEvent::IdleTimeout => "idle_timeout",
            StreamEvent::Oversized => "oversized",
            StreamEvent::Error => "error",
            StreamEvent::Fenced => "fenced",
        }
    }
}

/// Datastore operations, each timed by [`DatastoreMetrics::time`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbOp {
    PutProviders,
    GetProviders,
    PutValue,
    GetValue,
    Gc,
    Migrate,
    Estimate,
    Leases,
    /// `SELECT 1` for readiness (`GET /readyz`).
    Ping,
    /// Operator and routing-API queries: one key's records with their expiry, one peer's
    /// addresses (`hydra providers`, `GET /v1/providers`, `GET /routing/v1/peers`).
    Inspect,
}

impl DbOp {
    pub const ALL: [DbOp; 10] = [
        DbOp::PutProviders,
        DbOp::GetProviders,
        DbOp::PutValue,
        DbOp::GetValue,
        DbOp::Gc,
        DbOp::Migrate,
        DbOp::Estimate,
        DbOp::Leases,
        DbOp::Ping,
        DbOp::Inspect,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DbOp::PutProviders => "put_providers",
            DbOp::GetProviders => "get_providers",
            DbOp::PutValue => "put_value",
            DbOp::GetValue => "get_value",
            DbOp::Gc => "gc",
            DbOp::Migrate => "migrate",
            DbOp::Estimate => "estimate",
            DbOp::Leases => "leases",
            DbOp::Ping => "ping",
            DbOp::Inspect => "inspect",
        }
    }
}

/// Why a request was shed (not served in full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The write-behind buffer is full.
    WriteBufferFull,
    /// Too many datastore reads in flight.
    ReadsInFlight,
    /// The read missed its deadline.
    ReadDeadline,
    /// The datastore returned an error.
    DatastoreError,
    /// The peer is over its per-peer request rate.
    PeerRate,
    /// `degrade`: a key far from this head missed the cache (closer peers only).
    CacheOnly,
    /// `refuse` or `peak`: datastore work refused outright.
    Tier,
}

impl ShedReason {
    pub const ALL: [ShedReason; 7] = [
        ShedReason::WriteBufferFull,
        ShedReason::ReadsInFlight,
        ShedReason::ReadDeadline,
        ShedReason::DatastoreError,
        ShedReason::PeerRate,
        ShedReason::CacheOnly,
        ShedReason::Tier,
    ];
    /// The reasons the provider manager itself sheds for.
    pub const MANAGER: [ShedReason; 4] = [
        ShedReason::WriteBufferFull,
        ShedReason::ReadsInFlight,
        ShedReason::ReadDeadline,
        ShedReason::DatastoreError,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::WriteBufferFull => "write_buffer_full",
            ShedReason::ReadsInFlight => "reads_in_flight",
            ShedReason::ReadDeadline => "read_deadline",
            ShedReason::DatastoreError => "datastore_error",
            ShedReason::PeerRate => "peer_rate",
            ShedReason::CacheOnly => "cache_only",
            ShedReason::Tier => "tier",
        }
    }
}

/// Result of a provider-cache lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    NegativeHit,
    Miss,
}

impl CacheResult {
    pub const ALL: [CacheResult; 3] = [CacheResult::Hit, CacheResult::NegativeHit, CacheResult::Miss];
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::NegativeHit => "negative_hit",
            CacheResult::Miss => "miss",
        }
    }
}

/// `hydra_routing_table_changes_total{change}`: what an update of the process-wide routing table
/// did (`net/table.rs`), and `dropped_update` for one the full feed dropped.
pub const TABLE_CHANGES: [&str; 8] =
    ["inserted", "updated", "evicted", "refused", "expired", "unreachable", "ignored", "dropped_update"];

/// `hydra_discovery_lookups_total{result}`: how a lookup of the process's discovery ended
/// (`net/discovery.rs`).
pub const LOOKUP_ENDS: [&str; 3] = ["converged", "exhausted", "no_peers"];

/// `hydra_discovery_requests_total{result}`: one FIND_NODE a lookup sent — answered, busy (the
/// head had too many dials or requests in flight), failed (dial, negotiation or stream),
/// bad_answer (oversized or undecodable), timeout.
pub const DISCOVERY_REQUESTS: [&str; 5] = ["answered", "busy", "failed", "bad_answer", "timeout"];
