//! Validation: the one place a [`ConfigFile`] becomes a runtime [`Config`]; every error names
//! the field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr, PeerId};

use super::{
    host_name, redact_url, AddressFilter, ConfigFile, LimitsSection, LoadSection, LogFormat, PostgresSection,
    ProfilesSection, ProvidersSection, RoutingApiSection,
};

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

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
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
    /// A second (IPv6) listen address, if asked for.
    pub listen_ip6: Option<std::net::Ipv6Addr>,
    /// Advertised address templates (`{port}`: the head's port), validated.
    pub announce: Vec<String>,
    pub port_base: u16,
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz` only, for scrapes from other hosts.
    pub metrics_listen: Option<SocketAddr>,
    /// The Delegated Routing V1 API.
    pub routing_listen: Option<SocketAddr>,
    pub routing_api: RoutingApiSection,
    pub quic: bool,
    /// Runtime worker threads; 0: one per core, at least two ([`crate::config::runtime_workers`]).
    pub worker_threads: usize,
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    pub store: StoreKind,
    pub log_format: LogFormat,
    pub address_filter: AddressFilter,
    /// `[routing]`: the process-wide routing table's bounds.
    pub routing: crate::config::RoutingSection,
    pub node_name: String,
    pub identity_seed_file: Option<PathBuf>,
    pub lease_ttl: Duration,
    pub limits: LimitsSection,
    pub providers: ProvidersSection,
    pub postgres: PostgresSection,
    pub load: LoadSection,
    pub profiles: ProfilesSection,
    /// The file this configuration was read from (reloads of `[load]` read it again).
    pub config_file: Option<PathBuf>,
}

impl ConfigFile {
    /// Check every field and build the runtime configuration.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if !(1..=10_000).contains(&self.heads) {
            return Err(invalid("heads", format!("must be between 1 and 10000, got {}", self.heads)));
        }
        if self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                format!("must be at most 1024 (0: one per core, at least two), got {}", self.worker_threads),
            ));
        }
        let listen_ip: IpAddr = self
            .listen_ip
            .parse()
            .map_err(|_| invalid("listen_ip", format!("not an IP address: {:?}", self.listen_ip)))?;
        let listen_ip6 = match self.listen_ip6.as_str() {
            "" => None,
            v => Some(v.parse().map_err(|_| invalid("listen_ip6", format!("not an IPv6 address: {v:?}")))?),
        };
        for t in &self.announce {
            let a: Multiaddr = t
                .replace("{port}", "1")
                .parse()
                .map_err(|e| invalid("announce", format!("{t:?} is not a multiaddr template: {e}")))?;
            if !a.iter().any(|p| matches!(p, Protocol::Tcp(_) | Protocol::Udp(_))) {
                return Err(invalid("announce", format!("{t:?} names no tcp or udp port")));
            }
            if a.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                return Err(invalid("announce", format!("{t:?}: leave out /p2p (each head adds its own)")));
            }
        }
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
        let optional_addr = |field: &'static str, v: &str| -> Result<Option<SocketAddr>, ConfigError> {
            if v.is_empty() {
                return Ok(None);
            }
            v.parse().map(Some).map_err(|_| {
                invalid(field, format!("not an address like 0.0.0.0:8080 (or empty: off): {v:?}"))
            })
        };
        let metrics_listen = optional_addr("metrics_listen", &self.metrics_listen)?;
        let routing_listen = optional_addr("routing_listen", &self.routing_listen)?;
        positive("routing.max_peers", self.routing.max_peers)?;
        positive("routing.max_bytes", self.routing.max_bytes)?;
        nonzero_duration("routing.peer_ttl", self.routing.peer_ttl)?;
        positive("routing.max_lookups_in_flight", self.routing.max_lookups_in_flight)?;
        let r = &self.routing_api;
        positive("routing_api.max_tracked_ips", r.max_tracked_ips)?;
        positive("routing_api.max_concurrent_requests", r.max_concurrent_requests)?;
        positive("routing_api.max_connections", r.max_connections)?;
        nonzero_duration("routing_api.header_timeout", r.header_timeout)?;
        nonzero_duration("routing_api.request_timeout", r.request_timeout)?;
        let pr = &self.profiles;
        if !(pr.heap_dump_at_memory_fraction > 0.0 && pr.heap_dump_at_memory_fraction <= 1.0) {
            return Err(invalid("profiles.heap_dump_at_memory_fraction", "must be in (0, 1]"));
        }
        positive("profiles.max_files", pr.max_files)?;
        nonzero_duration("profiles.cooldown", pr.cooldown)?;
        nonzero_duration("profiles.check_interval", pr.check_interval)?;
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
        positive("limits.max_concurrent_requests", l.max_concurrent_requests)?;
        positive("limits.max_open_streams", l.max_open_streams)?;
        positive("limits.max_streams_per_peer_per_head", l.max_streams_per_peer_per_head)?;
        positive("limits.max_streams_per_ip", l.max_streams_per_ip)?;
        positive("limits.max_connections_per_ip", l.max_connections_per_ip as usize)?;
        positive("limits.max_connections_per_head", l.max_connections_per_head as usize)?;
        positive("limits.max_providers_per_reply", l.max_providers_per_reply)?;
        if l.max_reply_bytes < 16 * 1024 {
            return Err(invalid(
                "limits.max_reply_bytes",
                "must be at least 16384 (20 closer peers with their addresses)",
            ));
        }
        nonzero_duration("limits.stream_idle_timeout", l.stream_idle_timeout)?;
        nonzero_duration("limits.io_timeout", l.io_timeout)?;
        if l.large_message_budget_bytes < crate::types::MAX_MESSAGE_SIZE {
            return Err(invalid(
                "limits.large_message_budget_bytes",
                "must be at least 4194304 (one message of the largest size)",
            ));
        }
        let p = &self.providers;
        positive("providers.write_buffer_entries", p.write_buffer_entries)?;
        if p.write_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "providers.write_buffer_bytes",
                "must be at least 65536 (two records of the largest size)",
            ));
        }
        positive("providers.flush_batch", p.flush_batch)?;
        positive("providers.max_flushes_in_flight", p.max_flushes_in_flight)?;
        positive("providers.max_reads_in_flight", p.max_reads_in_flight)?;
        positive("providers.gc_chunk_rows", p.gc_chunk_rows)?;
        positive("providers.gc_chunk_pages", p.gc_chunk_pages)?;
        positive("providers.cache_entries", p.cache_entries)?;
        positive("providers.cache_bytes", usize::try_from(p.cache_bytes).unwrap_or(usize::MAX))?;
        if p.sample_per_key < l.max_providers_per_reply {
            return Err(invalid(
                "providers.sample_per_key",
                "must be at least limits.max_providers_per_reply (each reply samples from it)",
            ));
        }
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
            listen_ip6,
            announce: self.announce.clone(),
            port_base: self.port_base,
            data_dir: self.data_dir.clone(),
            http_listen,
            metrics_listen,
            routing_listen,
            routing_api: self.routing_api.clone(),
            quic: self.quic,
            worker_threads: self.worker_threads,
            bootstrap,
            store,
            log_format: self.log_format,
            address_filter: self.routing.address_filter,
            routing: self.routing.clone(),
            limits: self.limits.clone(),
            providers: self.providers.clone(),
            postgres: self.postgres.clone(),
            load: self.load.clone(),
            profiles: self.profiles.clone(),
            config_file: None,
        })
    }
}

pub(super) fn positive(field: &'static str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(field, "must be greater than 0"));
    }
    Ok(())
}

pub(super) fn nonzero_duration(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(field, "must be longer than 0s"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{redact_url, Overrides};

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
        let f = ConfigFile { listen_ip6: "10.0.0.1".into(), ..Default::default() };
        assert!(f.validate().unwrap_err().to_string().starts_with("listen_ip6:"));
        for bad in [
            "/dns4/x.example.org",
            "/dns4/x/tcp/{port}/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "nope",
        ] {
            let f = ConfigFile { announce: vec![bad.into()], ..Default::default() };
            assert!(f.validate().unwrap_err().to_string().starts_with("announce:"), "{bad}");
        }
        let f = ConfigFile { announce: vec!["/dns4/x.example.org/tcp/{port}".into()], ..Default::default() };
        assert!(f.validate().is_ok());
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
        let e = ConfigFile::from_toml("[load]\nlatency_stall_tolerance = \"5s\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("load.latency_stall_tolerance:"), "{e}");
        let f = ConfigFile::from_toml("[load]\nforce_tier = \"refuse\"\n").unwrap();
        assert_eq!(f.validate().unwrap().load.force_tier, Some(crate::types::Tier::Refuse));
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
