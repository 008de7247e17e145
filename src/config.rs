//! Configuration: a serde file type with defaults ([`ConfigFile`]) and a validated runtime type
//! ([`Config`]) built in exactly one place, [`ConfigFile::validate`], whose errors name the field.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < `HYDRA_*` environment <
//! command-line flags. The binary applies the last two through [`Overrides`] (clap reads each flag
//! from its `HYDRA_*` variable when the flag is absent, so a flag beats its variable).
//!
//! The database URL may carry a password: it is only ever printed through [`redact_url`].

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// The configuration file as written by an operator. Every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// Number of DHT heads this process runs.
    pub heads: usize,
    /// IP address the heads listen on.
    pub listen_ip: String,
    /// Head i listens on TCP and UDP (QUIC) port `port_base + i`; 0 means ephemeral ports.
    pub port_base: u16,
    /// Directory for the embedded store and other local state.
    pub data_dir: PathBuf,
    /// Address of the HTTP server (metrics, health, operator API). Loopback by default.
    pub http_listen: String,
    /// Also listen on QUIC (UDP, same port number as TCP). Each QUIC endpoint costs memory for
    /// its receive buffers; see docs/benchmarks.md.
    pub quic: bool,
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
    pub limits: LimitsSection,
    pub providers: ProvidersSection,
    pub postgres: PostgresSection,
    pub load: LoadSection,
}

/// Load tiers, rate limits and the datastore statement budget (see `src/load.rs`). The only
/// section reloaded without a restart: on SIGHUP and `POST /v1/config/reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadSection {
    /// How often the signals are sampled and the tier recomputed.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Latency signals are percentiles over this recent window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A tier is held at least this long before the node steps down from it.
    #[serde(with = "humantime_serde")]
    pub min_dwell: Duration,
    /// A tier is left only when every signal is below `exit_ratio` × its threshold for that tier.
    pub exit_ratio: f64,
    /// Pin the tier ("normal", "degrade", "refuse", "peak") instead of computing it: for
    /// emergencies and drills. Absent: computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_tier: Option<crate::load::Tier>,
    /// Hard ceiling on datastore statements per second issued by this process for requests
    /// (flushes: 2 per batch; lookups and value operations: 1). Statements wait for it; 0: no limit.
    pub datastore_statements_per_second: u32,
    /// Datastore-touching requests (GET_PROVIDERS, ADD_PROVIDER, GET_VALUE, PUT_VALUE) one peer
    /// may make per second over all heads; 0: no limit.
    pub per_peer_requests_per_second: u32,
    /// Requests one peer may make in a burst.
    pub per_peer_burst: u32,
    /// In `degrade` and above one request costs this many of a peer's requests.
    pub degrade_per_peer_cost: u32,
    /// Peers with their own rate bucket (memory bound); beyond it new peers share one bucket.
    pub max_tracked_peers: usize,
    /// In `degrade`, an ADD_PROVIDER refreshing a record this process wrote that still has more
    /// than this long to live is acknowledged without a write.
    #[serde(with = "humantime_serde")]
    pub degrade_skip_refresh_if_remaining: Duration,
    /// An inbound kad stream that waited longer than this for a stream task is reset instead of
    /// served late; this bounds queueing delay whatever the offered load.
    #[serde(with = "humantime_serde")]
    pub stream_queue_max_wait: Duration,
    /// Thresholds to enter `degrade`, `refuse` and `peak` (0 disables a signal).
    pub degrade: crate::load::Thresholds,
    pub refuse: crate::load::Thresholds,
    pub peak: crate::load::Thresholds,
}

impl Default for LoadSection {
    fn default() -> Self {
        let [degrade, refuse, peak] = crate::load::default_thresholds();
        Self {
            sample_interval: Duration::from_millis(250),
            window: Duration::from_secs(10),
            min_dwell: Duration::from_secs(15),
            exit_ratio: 0.7,
            force_tier: None,
            datastore_statements_per_second: 2000,
            per_peer_requests_per_second: 200,
            per_peer_burst: 400,
            degrade_per_peer_cost: 4,
            max_tracked_peers: 100_000,
            degrade_skip_refresh_if_remaining: Duration::from_secs(24 * 3600),
            stream_queue_max_wait: Duration::from_millis(25),
            degrade,
            refuse,
            peak,
        }
    }
}

impl LoadSection {
    /// Check the section; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero_duration("load.sample_interval", self.sample_interval)?;
        nonzero_duration("load.min_dwell", self.min_dwell)?;
        nonzero_duration("load.stream_queue_max_wait", self.stream_queue_max_wait)?;
        if self.window < self.sample_interval * 2 {
            return Err(invalid("load.window", "must be at least two sample intervals"));
        }
        if !(self.exit_ratio > 0.0 && self.exit_ratio < 1.0) {
            return Err(invalid(
                "load.exit_ratio",
                format!("must be between 0 and 1, got {}", self.exit_ratio),
            ));
        }
        positive("load.max_tracked_peers", self.max_tracked_peers)?;
        positive("load.degrade_per_peer_cost", self.degrade_per_peer_cost as usize)?;
        if self.per_peer_requests_per_second > 0 && self.per_peer_burst < self.degrade_per_peer_cost {
            return Err(invalid("load.per_peer_burst", "must be at least load.degrade_per_peer_cost"));
        }
        let tiers = [("degrade", &self.degrade), ("refuse", &self.refuse), ("peak", &self.peak)];
        for (tier, t) in tiers {
            for (signal, v) in t.values() {
                let bad = !v.is_finite() || v < 0.0 || (signal.ends_with("_ratio") && v > 1.0);
                if bad {
                    return Err(ConfigError::Field {
                        field: format!("load.{tier}.{signal}"),
                        reason: format!(
                            "must be {}, got {v}",
                            if signal.ends_with("_ratio") { "between 0 and 1" } else { "0 or more" }
                        ),
                    });
                }
            }
        }
        // A higher tier must not be entered before a lower one on the same signal.
        for pair in tiers.windows(2) {
            let ((lo_name, lo), (hi_name, hi)) = (pair[0], pair[1]);
            for ((signal, l), (_, h)) in lo.values().into_iter().zip(hi.values()) {
                if l > 0.0 && h > 0.0 && h < l {
                    return Err(ConfigError::Field {
                        field: format!("load.{hi_name}.{signal}"),
                        reason: format!("{h} is below load.{lo_name}.{signal} = {l}"),
                    });
                }
            }
        }
        Ok(())
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Inbound kad streams waiting for a stream task (all heads). Full queue: stream reset, counted.
    pub inbound_queue: usize,
    /// Stream tasks serving inbound kad streams at once (all heads).
    pub max_concurrent_streams: usize,
    /// Inbound kad streams one peer may have queued or open at once (all heads). Requests on one
    /// stream are sequential, so bursts on a stream are unaffected.
    pub max_streams_per_peer: u32,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersSection {
    /// Distinct (key, provider) entries the write-behind buffer may hold. Full: ADD_PROVIDER shed.
    pub write_buffer_entries: usize,
    /// A buffer shard flushes when it holds this many entries…
    pub flush_batch: usize,
    /// …or when its oldest entry is this old.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Batched write statements in flight at once.
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
    /// Keys whose providers are cached (one cache shared by all heads).
    pub cache_entries: usize,
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
    /// refreshes of records far from expiry (about 40 bytes each).
    pub recent_writes_entries: usize,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            heads: 1,
            listen_ip: "0.0.0.0".into(),
            port_base: 0,
            data_dir: PathBuf::from("./hydra-data"),
            http_listen: "127.0.0.1:7779".into(),
            quic: true,
            bootstrap: Vec::new(),
            database_url: String::new(),
            log_format: LogFormat::Text,
            node_name: String::new(),
            identity_seed_file: String::new(),
            identity: IdentitySection::default(),
            routing: RoutingSection::default(),
            limits: LimitsSection::default(),
            providers: ProvidersSection::default(),
            postgres: PostgresSection::default(),
            load: LoadSection::default(),
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
        Self { address_filter: AddressFilter::Public }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            inbound_queue: 1024,
            max_concurrent_streams: 4096,
            max_streams_per_peer: 64,
            max_connections_per_head: 2048,
            stream_idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(10),
            large_message_budget_bytes: 64 * 1024 * 1024,
            max_providers_per_reply: 100,
        }
    }
}

impl Default for ProvidersSection {
    fn default() -> Self {
        Self {
            write_buffer_entries: 200_000,
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
    pub port_base: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub bootstrap: Option<Vec<String>>,
    pub database_url: Option<String>,
    pub log_format: Option<LogFormat>,
    pub address_filter: Option<AddressFilter>,
    pub node_name: Option<String>,
    pub identity_seed_file: Option<String>,
    pub quic: Option<bool>,
}

/// A configuration error that names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

/// Which datastore backs the provider manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded SQLite file at this path.
    Sqlite(PathBuf),
    /// PostgreSQL at this URL (the fleet store).
    Postgres(String),
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub heads: usize,
    pub listen_ip: IpAddr,
    pub port_base: u16,
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub quic: bool,
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    pub store: StoreKind,
    pub log_format: LogFormat,
    pub address_filter: AddressFilter,
    pub node_name: String,
    pub identity_seed_file: Option<PathBuf>,
    pub lease_ttl: Duration,
    pub limits: LimitsSection,
    pub providers: ProvidersSection,
    pub postgres: PostgresSection,
    pub load: LoadSection,
    /// The file this configuration was read from (reloads of `[load]` read it again).
    pub config_file: Option<PathBuf>,
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
        if let Some(v) = o.port_base {
            self.port_base = v;
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.http_listen {
            self.http_listen = v;
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

    /// Check every field and build the runtime configuration.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if !(1..=10_000).contains(&self.heads) {
            return Err(invalid("heads", format!("must be between 1 and 10000, got {}", self.heads)));
        }
        let listen_ip: IpAddr = self
            .listen_ip
            .parse()
            .map_err(|_| invalid("listen_ip", format!("not an IP address: {:?}", self.listen_ip)))?;
        if self.port_base != 0 && usize::from(self.port_base) + self.heads - 1 > usize::from(u16::MAX) {
            return Err(invalid(
                "port_base",
                format!("port_base {} + {} heads runs past port 65535", self.port_base, self.heads),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let http_listen: SocketAddr = self.http_listen.parse().map_err(|_| {
            invalid("http_listen", format!("not an address like 127.0.0.1:7779: {:?}", self.http_listen))
        })?;
        let mut bootstrap = Vec::with_capacity(self.bootstrap.len());
        for s in &self.bootstrap {
            let addr: Multiaddr =
                s.parse().map_err(|e| invalid("bootstrap", format!("{s:?} is not a multiaddr: {e}")))?;
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(invalid("bootstrap", format!("{s:?} must end in /p2p/<peer id>")));
            };
            bootstrap.push((peer, addr));
        }
        let store = if self.database_url.is_empty() {
            StoreKind::Sqlite(self.data_dir.join("hydra.sqlite"))
        } else if self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
        {
            StoreKind::Postgres(self.database_url.clone())
        } else {
            return Err(invalid(
                "database_url",
                format!("must start with postgres:// or be empty, got {}", redact_url(&self.database_url)),
            ));
        };
        let l = &self.limits;
        positive("limits.inbound_queue", l.inbound_queue)?;
        positive("limits.max_concurrent_streams", l.max_concurrent_streams)?;
        positive("limits.max_streams_per_peer", l.max_streams_per_peer as usize)?;
        positive("limits.max_connections_per_head", l.max_connections_per_head as usize)?;
        positive("limits.max_providers_per_reply", l.max_providers_per_reply)?;
        nonzero_duration("limits.stream_idle_timeout", l.stream_idle_timeout)?;
        nonzero_duration("limits.io_timeout", l.io_timeout)?;
        if l.large_message_budget_bytes < crate::wire::MAX_MESSAGE_SIZE {
            return Err(invalid(
                "limits.large_message_budget_bytes",
                "must be at least 4194304 (one message of the largest size)",
            ));
        }
        let p = &self.providers;
        positive("providers.write_buffer_entries", p.write_buffer_entries)?;
        positive("providers.flush_batch", p.flush_batch)?;
        positive("providers.max_flushes_in_flight", p.max_flushes_in_flight)?;
        positive("providers.max_reads_in_flight", p.max_reads_in_flight)?;
        positive("providers.gc_chunk_rows", p.gc_chunk_rows)?;
        positive("providers.gc_chunk_pages", p.gc_chunk_pages)?;
        positive("providers.cache_entries", p.cache_entries)?;
        positive("providers.read_batch_keys", p.read_batch_keys)?;
        positive("providers.max_read_queries", p.max_read_queries)?;
        positive("postgres.pool_size", self.postgres.pool_size)?;
        if p.max_read_queries + p.max_flushes_in_flight > self.postgres.pool_size
            && matches!(store, StoreKind::Postgres(_))
        {
            return Err(invalid(
                "postgres.pool_size",
                "must be at least providers.max_read_queries + providers.max_flushes_in_flight",
            ));
        }
        if p.flush_batch > p.write_buffer_entries {
            return Err(invalid("providers.flush_batch", "must not exceed providers.write_buffer_entries"));
        }
        for (field, d) in [
            ("providers.flush_interval", p.flush_interval),
            ("providers.read_deadline", p.read_deadline),
            ("providers.record_ttl", p.record_ttl),
            ("providers.address_ttl", p.address_ttl),
            ("providers.value_ttl", p.value_ttl),
            ("providers.gc_interval", p.gc_interval),
            ("providers.cache_ttl", p.cache_ttl),
            ("providers.negative_cache_ttl", p.negative_cache_ttl),
            ("providers.count_interval", p.count_interval),
            ("postgres.connect_timeout", self.postgres.connect_timeout),
            ("postgres.statement_timeout", self.postgres.statement_timeout),
        ] {
            nonzero_duration(field, d)?;
        }
        self.load.validate()?;
        positive("providers.recent_writes_entries", p.recent_writes_entries)?;
        if self.identity.lease_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "identity.lease_ttl",
                "must be at least 1s (leases are renewed every third of it)",
            ));
        }
        let node_name = if self.node_name.is_empty() { host_name() } else { self.node_name.clone() };
        if node_name.len() > 255 || node_name.chars().any(char::is_whitespace) {
            return Err(invalid("node_name", "must be at most 255 characters without white space"));
        }
        Ok(Config {
            node_name,
            identity_seed_file: (!self.identity_seed_file.is_empty())
                .then(|| PathBuf::from(&self.identity_seed_file)),
            lease_ttl: self.identity.lease_ttl,
            heads: self.heads,
            listen_ip,
            port_base: self.port_base,
            data_dir: self.data_dir.clone(),
            http_listen,
            quic: self.quic,
            bootstrap,
            store,
            log_format: self.log_format,
            address_filter: self.routing.address_filter,
            limits: self.limits.clone(),
            providers: self.providers.clone(),
            postgres: self.postgres.clone(),
            load: self.load.clone(),
            config_file: None,
        })
    }

    /// The effective configuration as TOML, with any password in the database URL redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn positive(field: &'static str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(field, "must be greater than 0"));
    }
    Ok(())
}

fn nonzero_duration(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(field, "must be longer than 0s"));
    }
    Ok(())
}

/// The database URL with every password masked: `user:password@` and `password=` parameters.
/// Anything that is not a `scheme://` URL is not echoed at all.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return "<redacted: not a URL>".into() };
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let (authority_and_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    // The userinfo ends at the *last* '@' before the path (a password may contain '@').
    let path_start = authority_and_path.find('/').unwrap_or(authority_and_path.len());
    let authority = &authority_and_path[..path_start];
    let path = &authority_and_path[path_start..];
    let authority = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
            format!("{masked}{}", &authority[at..])
        }
        None => authority.to_string(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_have_no_bootstrap_peers() {
        let c = ConfigFile::default().validate().unwrap();
        assert!(c.bootstrap.is_empty());
        assert_eq!(c.http_listen, "127.0.0.1:7779".parse().unwrap());
        assert_eq!(c.store, StoreKind::Sqlite(PathBuf::from("./hydra-data/hydra.sqlite")));
    }

    #[test]
    fn errors_name_the_field() {
        let f = ConfigFile { heads: 0, ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().starts_with("heads:"));
        let f = ConfigFile { listen_ip: "nope".into(), ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().starts_with("listen_ip:"));
        let f = ConfigFile { bootstrap: vec!["/ip4/127.0.0.1/tcp/1".into()], ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().starts_with("bootstrap:"));
        let f = ConfigFile { database_url: "mysql://u:secret@h/db".into(), ..Default::default() };
        let e = f.validate().unwrap_err().to_string();
        assert!(e.starts_with("database_url:") && !e.contains("secret"), "{e}");
        let f = ConfigFile { port_base: 65000, heads: 1000, ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().starts_with("port_base:"));
    }

    #[test]
    fn layers_apply_in_order() {
        let mut f = ConfigFile::from_toml("heads = 3\nport_base = 4000\n").unwrap();
        f.apply(Overrides { heads: Some(5), ..Default::default() });
        let c = f.validate().unwrap();
        assert_eq!((c.heads, c.port_base), (5, 4000));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = ConfigFile::from_toml("haeds = 3\n").unwrap_err().to_string();
        assert!(e.contains("haeds"), "{e}");
    }

    #[test]
    fn load_section_errors_name_the_field() {
        let e =
            ConfigFile::from_toml("[load.refuse]\ndatastore_p99_ms = 10\n").unwrap().validate().unwrap_err();
        assert!(e.to_string().starts_with("load.refuse.datastore_p99_ms: 10 is below"), "{e}");
        let e = ConfigFile::from_toml("[load.degrade]\nwrite_buffer_fill_ratio = 1.5\n").unwrap().validate();
        assert!(e.unwrap_err().to_string().starts_with("load.degrade.write_buffer_fill_ratio:"));
        let e = ConfigFile::from_toml("[load]\nexit_ratio = 1.0\n").unwrap().validate().unwrap_err();
        assert!(e.to_string().starts_with("load.exit_ratio:"), "{e}");
        let f = ConfigFile::from_toml("[load]\nforce_tier = \"refuse\"\n").unwrap();
        assert_eq!(f.validate().unwrap().load.force_tier, Some(crate::load::Tier::Refuse));
        assert!(ConfigFile::from_toml("[load]\nforce_tier = \"panic\"\n").is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=off&password=s3cret"),
            "postgres://u@h/db?sslmode=off&password=***"
        );
        assert!(!redact_url("host=h password=s3cret").contains("s3cret"));
        let f = ConfigFile { database_url: "postgres://u:topsecret@h/db".into(), ..Default::default() };
        assert!(!f.to_redacted_toml().contains("topsecret"));
    }
}
