//! Configuration: a serde file type with defaults ([`ConfigFile`]) and a validated runtime type
//! ([`Config`]) built in exactly one place, [`ConfigFile::validate`], whose errors name the field.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < `HYDRA_*` environment <
//! command-line flags. The binary applies the last two through [`Overrides`] (clap reads each flag
//! from its `HYDRA_*` variable when the flag is absent, so a flag beats its variable).
//!
//! The database URL may carry a password: it is only ever printed through [`redact_url`].

//!
//! Files: this one holds the file type and its sections; [`LoadSection`] (the reloadable part) is
//! in `config/load.rs`, validation into [`Config`] in `config/validate.rs`, URL redaction in
//! `config/redact.rs`. Configuration depends only on [`crate::types`]; every subsystem reads its
//! own section from here.

mod load;
mod redact;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use load::{default_thresholds, LoadSection};
pub use redact::redact_url;
pub use validate::{Config, ConfigError, StoreKind};

/// The configuration file as written by an operator. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// Number of DHT heads this process runs.
    pub heads: usize,
    /// IP address the heads listen on.
    pub listen_ip: String,
    /// An IPv6 address the heads also listen on (same ports), e.g. `::`. Empty: IPv4 only (or
    /// whatever family `listen_ip` is).
    pub listen_ip6: String,
    /// Addresses the heads advertise instead of their listen addresses (identify, sibling
    /// answers, the routing API, the fleet's head list): multiaddr templates in which `{port}`
    /// is the head's port, e.g. `/dns4/node-a.example.org/tcp/{port}` and
    /// `/dns4/node-a.example.org/udp/{port}/quic-v1`. For NAT and containers, where the listen
    /// address is a private one. Empty: the listen addresses.
    pub announce: Vec<String>,
    /// Head i listens on TCP and UDP (QUIC) port `port_base + i`; 0 means ephemeral ports.
    pub port_base: u16,
    /// Directory for the embedded store and other local state.
    pub data_dir: PathBuf,
    /// Address of the HTTP server (metrics, health, operator API). Loopback by default; bound
    /// wider, its admin paths (config reload) still answer loopback clients only.
    pub http_listen: String,
    /// A second listener with only `/metrics`, `/healthz` and `/readyz`, for a Prometheus on
    /// another host while `http_listen` stays on loopback. Empty: off.
    pub metrics_listen: String,
    /// The IPFS Delegated Routing V1 API (`/routing/v1/…`), meant to be public. Empty: off.
    pub routing_listen: String,
    /// Also listen on QUIC (UDP, same port number as TCP). Each QUIC endpoint costs memory for
    /// its receive buffers; see docs/benchmarks.md.
    pub quic: bool,
    /// Runtime worker threads (0: one per core the process may use, at least two — see
    /// [`runtime_workers`]). Fewer workers wake each other less: one worker served the same load
    /// with 8–18 % less CPU per request than two on two cores (docs/profile.md), at the price of
    /// the node's peak being one core (plus the embedded store's threads); under a CPU quota
    /// below one core it served less than two did (docs/benchmarks.md, "Capacity searched
    /// finer"). Read at start-up only.
    pub worker_threads: usize,
    /// Bootstrap peers as multiaddrs ending in `/p2p/<peer id>`. Empty by default.
    pub bootstrap: Vec<String>,
    /// `postgres://…` selects PostgreSQL (fleet store); empty selects the embedded SQLite store.
    pub database_url: String,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// This process's name in the fleet; it gets back the same head identities after a restart.
    /// Empty: the host name.
    pub node_name: String,
    /// File holding the fleet's secret identity seed (64 hex characters). Empty: a seed generated
    /// into `data_dir/identity.seed` on first start (fine for a single node; a fleet needs one
    /// shared file).
    pub identity_seed_file: String,
    pub identity: IdentitySection,
    pub routing: RoutingSection,
    pub routing_api: RoutingApiSection,
    pub limits: LimitsSection,
    pub providers: ProvidersSection,
    pub postgres: PostgresSection,
    pub load: LoadSection,
    pub profiles: ProfilesSection,
}

/// Heap and CPU profiles (`GET /debug/pprof/…`, loopback clients only) and automatic heap
/// profiles when memory runs high.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilesSection {
    /// A heap profile is written when RSS reaches this fraction of the memory limit.
    pub heap_dump_at_memory_fraction: f64,
    /// The memory limit, MiB, where the process has no cgroup limit (or a lower one than the
    /// cgroup's). 0: the cgroup's limit only (none found: no automatic profiles).
    pub memory_limit_mib: u64,
    /// Where automatic heap profiles go. Empty: `data_dir/profiles`.
    pub dir: String,
    /// Profiles kept in `dir`; the oldest are removed beyond it.
    pub max_files: usize,
    /// At most one automatic profile per this long.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// How often RSS is compared with the threshold.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for ProfilesSection {
    fn default() -> Self {
        Self {
            heap_dump_at_memory_fraction: 0.9,
            memory_limit_mib: 0,
            dir: String::new(),
            max_files: 10,
            cooldown: Duration::from_secs(600),
            check_interval: Duration::from_secs(5),
        }
    }
}

/// Head-identity leases.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitySection {
    /// A process's leases expire this long after its last heartbeat (renewed every third of it);
    /// then other processes may take its identities over.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for IdentitySection {
    fn default() -> Self {
        Self { lease_ttl: Duration::from_secs(60) }
    }
}

/// The runtime's worker threads for `worker_threads = 0` on a process allowed `cores` whole
/// cores (std's `available_parallelism`, which reads a cgroup CPU quota: one below two cores):
/// one per core, and at least two. Under a 0.2-core quota two workers served a median 1,144
/// requests/s within the GET_PROVIDERS p99 target, one worker 844 (three alternated runs each;
/// two later runs of two workers 1,033 and 623 — the spread between runs is as large as the
/// difference; docs/benchmarks.md). The CPU per request was the same, so the second worker
/// costs nothing measurable; with one, the timers and the sockets wait behind whatever that
/// worker is running.
pub fn runtime_workers(cores: usize) -> usize {
    cores.max(2)
}

/// The host name, for the default `node_name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "hydra".into())
}

/// Settings of the PostgreSQL store (used when `database_url` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    /// Connections in the pool. Flushes and batched reads are the only users; past ~4 writers
    /// and a few readers PostgreSQL gains nothing on a small machine and 64 connections are
    /// slower than 16 (shared/pg-ceiling.md), so the default is 16.
    pub pool_size: usize,
    /// How long to keep retrying an unreachable database at start before giving up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side limit on any one statement (a safety net behind the per-request deadlines).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which peer addresses learned from identify enter the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressFilter {
    /// Only globally routable addresses (what the public Amino DHT wants).
    Public,
    /// Any address, including loopback and private ranges (tests, private networks).
    Any,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    pub address_filter: AddressFilter,
    /// Peers the process-wide routing table holds (all heads share it). Beyond, a new peer
    /// replaces the one farthest from every head, or is refused if it is the farthest itself.
    pub max_peers: usize,
    /// Bytes the routing table may hold (its entries, their addresses and their copy in the
    /// published snapshot), bounded like `max_peers`.
    pub max_bytes: usize,
    /// A peer not seen alive for this long (no identify, no connection opened or closed) is
    /// removed.
    #[serde(with = "humantime_serde")]
    pub peer_ttl: Duration,
    /// Lookups the process starts per minute, for all heads together: each looks up one head's
    /// own ID from that head's identity, the heads in turn (`net/discovery.rs`); a head whose
    /// last lookup converged waits 5 minutes. 0: none.
    pub lookups_per_minute: u32,
    /// Lookups running at once; a lookup due while this many run is skipped (counted).
    pub max_lookups_in_flight: usize,
}

/// Limits of the public Delegated Routing V1 listener (`routing_listen`). Every refusal is
/// counted in `hydra_routing_api_refused_total{reason}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingApiSection {
    /// Requests per second from one IP address (GCRA); beyond: 429 with `Retry-After`. 0: off.
    pub per_ip_requests_per_second: u32,
    /// Burst of requests one IP address may send at once.
    pub per_ip_burst: u32,
    /// IP addresses with their own rate bucket; beyond, new addresses share one bucket.
    pub max_tracked_ips: usize,
    /// Requests being served at once; beyond: 503 with `Retry-After`.
    pub max_concurrent_requests: usize,
    /// Open connections; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also an idle keep-alive connection's
    /// limit before its next request).
    #[serde(with = "humantime_serde")]
    pub header_timeout: std::time::Duration,
    /// Time for a whole request, body and answer included; beyond: 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: std::time::Duration,
    /// `Cache-Control: max-age` of an answer with results.
    #[serde(with = "humantime_serde")]
    pub cache_max_age: std::time::Duration,
    /// `Cache-Control: max-age` of an empty answer (a provider may appear any moment).
    #[serde(with = "humantime_serde")]
    pub cache_max_age_empty: std::time::Duration,
}

impl Default for RoutingApiSection {
    fn default() -> Self {
        Self {
            per_ip_requests_per_second: 50,
            per_ip_burst: 100,
            max_tracked_ips: 65_536,
            max_concurrent_requests: 256,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            cache_max_age: Duration::from_secs(300),
            cache_max_age_empty: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Inbound kad streams waiting for a stream task (all heads). Full queue: stream reset, counted.
    pub inbound_queue: usize,
    /// Requests being served at once (all heads). A slot is taken per request, after its
    /// length prefix arrives, and given back with the reply: an idle stream holds none.
    #[serde(alias = "max_concurrent_streams")]
    pub max_concurrent_requests: usize,
    /// Open inbound kad streams, idle or not, in the whole process. A new stream past a cap
    /// closes the longest-idle stream of that scope (`hydra_kad_streams_total{event="evicted"}`);
    /// only if all of them are serving a request is it reset (`event="peer_limit"`).
    pub max_open_streams: usize,
    /// Open inbound kad streams per remote peer on one head (rust-libp2p's kad allows 32 per
    /// connection). Requests on one stream are sequential, so bursts on a stream are unaffected.
    pub max_streams_per_peer_per_head: usize,
    /// Open inbound kad streams per remote IP address, over all heads and peers.
    pub max_streams_per_ip: usize,
    /// Inbound connections per remote IP address, over all heads. Past it a new connection is
    /// refused before its handshake (cheap), counted in `hydra_kad_connections_denied_total`.
    pub max_connections_per_ip: u32,
    /// Established connections per head.
    pub max_connections_per_head: u32,
    /// An inbound stream with no new request for this long is reset.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Deadline for reading the rest of a started message, writing a reply, and closing a stream.
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// Bytes that messages larger than 64 KiB may hold in memory at once (all streams).
    pub large_message_budget_bytes: usize,
    /// Largest number of providers returned in one GET_PROVIDERS reply.
    pub max_providers_per_reply: usize,
    /// Bytes one reply may hold (closer peers first, then providers, with their addresses):
    /// a small request never draws a multi-megabyte reply (100 providers × 32 addresses × 1 KiB
    /// would be 3.2 MiB). Peers left out are counted.
    pub max_reply_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersSection {
    /// Distinct (key, provider) entries the write-behind buffer may hold. Full: ADD_PROVIDER shed.
    pub write_buffer_entries: usize,
    /// Bytes the write-behind buffer may hold, each entry charged its key and the full size of
    /// its addresses. Full: ADD_PROVIDER shed.
    pub write_buffer_bytes: usize,
    /// A buffer shard flushes when it holds this many entries…
    pub flush_batch: usize,
    /// …or when its oldest entry is this old.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Batched write statements in flight at once (on PostgreSQL; the embedded store has one writer
    /// connection and runs one).
    pub max_flushes_in_flight: usize,
    /// Datastore reads in flight at once; beyond it a read is shed (closer peers only).
    pub max_reads_in_flight: usize,
    /// A GET_PROVIDERS read that takes longer is answered with closer peers only. 40 ms keeps
    /// answered GET_PROVIDERS, transport included, under a 50 ms p99 (docs/benchmarks.md).
    #[serde(with = "humantime_serde")]
    pub read_deadline: Duration,
    /// How long a provider record lives.
    #[serde(with = "humantime_serde")]
    pub record_ttl: Duration,
    /// How long provider addresses are kept.
    #[serde(with = "humantime_serde")]
    pub address_ttl: Duration,
    /// How long a PUT_VALUE record lives.
    #[serde(with = "humantime_serde")]
    pub value_ttl: Duration,
    /// How often expired rows are collected.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Rows deleted per garbage-collection statement (embedded store).
    pub gc_chunk_rows: usize,
    /// Heap pages swept per garbage-collection statement (PostgreSQL; 8 KiB each).
    pub gc_chunk_pages: usize,
    /// Expected number of keys whose providers are cached (sizes the cache's index; one cache
    /// shared by all heads). The bound is `cache_bytes`.
    pub cache_entries: usize,
    /// Bytes the provider cache may hold (keys, records and their addresses); entries are
    /// evicted before it is exceeded.
    pub cache_bytes: u64,
    /// Providers read from the datastore and cached per key: a random window of the key's live
    /// providers. Each reply is a fresh random sample of `limits.max_providers_per_reply` of
    /// them, so a popular key's providers are all served over repeated lookups.
    pub sample_per_key: usize,
    /// How long a cached provider set is served without asking the datastore again.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no providers" is cached.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Distinct keys looked up in one statement.
    pub read_batch_keys: usize,
    /// Lookup statements in flight at once.
    pub max_read_queries: usize,
    /// How often record counts are re-estimated from the catalogue.
    #[serde(with = "humantime_serde")]
    pub count_interval: Duration,
    /// (key, provider) pairs whose last written expiry is remembered, so `degrade` can skip
    /// refreshes of records far from expiry (about 80 bytes each: 20 MiB at the default).
    pub recent_writes_entries: usize,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            heads: 1,
            listen_ip: "0.0.0.0".into(),
            listen_ip6: String::new(),
            announce: Vec::new(),
            port_base: 0,
            data_dir: PathBuf::from("./hydra-data"),
            http_listen: "127.0.0.1:7779".into(),
            metrics_listen: String::new(),
            routing_listen: String::new(),
            quic: true,
            worker_threads: 0,
            bootstrap: Vec::new(),
            database_url: String::new(),
            log_format: LogFormat::Text,
            node_name: String::new(),
            identity_seed_file: String::new(),
            identity: IdentitySection::default(),
            routing: RoutingSection::default(),
            routing_api: RoutingApiSection::default(),
            limits: LimitsSection::default(),
            providers: ProvidersSection::default(),
            postgres: PostgresSection::default(),
            load: LoadSection::default(),
            profiles: ProfilesSection::default(),
        }
    }
}

impl Default for PostgresSection {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(60),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for RoutingSection {
    fn default() -> Self {
        Self {
            address_filter: AddressFilter::Public,
            max_peers: 100_000,
            max_bytes: 64 * 1024 * 1024,
            peer_ttl: Duration::from_secs(3600),
            lookups_per_minute: 120,
            max_lookups_in_flight: 8,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            inbound_queue: 1024,
            max_concurrent_requests: 4096,
            max_open_streams: 32_768,
            max_streams_per_peer_per_head: 64,
            max_streams_per_ip: 1024,
            max_connections_per_ip: 256,
            max_connections_per_head: 2048,
            stream_idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(10),
            large_message_budget_bytes: 64 * 1024 * 1024,
            max_providers_per_reply: 100,
            max_reply_bytes: 256 * 1024,
        }
    }
}

impl Default for ProvidersSection {
    fn default() -> Self {
        Self {
            write_buffer_entries: 200_000,
            write_buffer_bytes: 128 * 1024 * 1024,
            flush_batch: 1000,
            flush_interval: Duration::from_secs(1),
            max_flushes_in_flight: 4,
            max_reads_in_flight: 256,
            read_deadline: Duration::from_millis(40),
            record_ttl: Duration::from_secs(48 * 3600),
            address_ttl: Duration::from_secs(24 * 3600),
            value_ttl: Duration::from_secs(36 * 3600),
            gc_interval: Duration::from_secs(600),
            gc_chunk_rows: 10_000,
            gc_chunk_pages: 1000,
            cache_entries: 100_000,
            cache_bytes: 128 * 1024 * 1024,
            sample_per_key: 200,
            cache_ttl: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(5),
            read_batch_keys: 128,
            max_read_queries: 4,
            count_interval: Duration::from_secs(60),
            recent_writes_entries: 262_144,
        }
    }
}

/// Values from `HYDRA_*` variables and flags; `None` leaves the lower layer's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub heads: Option<usize>,
    pub listen_ip: Option<String>,
    pub listen_ip6: Option<String>,
    pub announce: Option<Vec<String>>,
    pub port_base: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub routing_listen: Option<String>,
    pub bootstrap: Option<Vec<String>>,
    pub database_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub address_filter: Option<AddressFilter>,
    pub node_name: Option<String>,
    pub identity_seed_file: Option<String>,
    pub quic: Option<bool>,
}

impl ConfigFile {
    /// Parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    pub fn from_toml(text: &str) -> Result<Self, Box<toml::de::Error>> {
        toml::from_str(text).map_err(Box::new)
    }

    /// Apply the environment and flag layer.
    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.heads {
            self.heads = v;
        }
        if let Some(v) = o.listen_ip {
            self.listen_ip = v;
        }
        if let Some(v) = o.listen_ip6 {
            self.listen_ip6 = v;
        }
        if let Some(v) = o.announce {
            self.announce = v;
        }
        if let Some(v) = o.port_base {
            self.port_base = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.http_listen {
            self.http_listen = v;
        }
        if let Some(v) = o.metrics_listen {
            self.metrics_listen = v;
        }
        if let Some(v) = o.routing_listen {
            self.routing_listen = v;
        }
        if let Some(v) = o.bootstrap {
            self.bootstrap = v;
        }
        if let Some(v) = o.database_url {
            self.database_url = v;
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = o.address_filter {
            self.routing.address_filter = v;
        }
        if let Some(v) = o.quic {
            self.quic = v;
        }
        if let Some(v) = o.node_name {
            self.node_name = v;
        }
        if let Some(v) = o.identity_seed_file {
            self.identity_seed_file = v;
        }
    }

    /// The effective configuration as TOML, with any password in the database URL redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(&self.redacted()).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The same as JSON (`hydra config check --json`).
    pub fn to_redacted_json(&self) -> String {
        serde_json::to_string_pretty(&self.redacted())
            .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }

    fn redacted(&self) -> Self {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        shown
    }
}
