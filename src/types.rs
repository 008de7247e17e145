//! Domain types shared by every layer: provider keys and records, the six DHT message types, and
//! the load tier with the signal vector it is computed from.
//!
//! This module depends on nothing else in the crate, so configuration, metrics, load control, the
//! stores and the request path can all use these types without depending on each other. Wire bytes
//! become these types once, in [`crate::net::wire`]; the stores persist them as bytes.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Longest provider key accepted (bytes). Multihashes of CIDs are ~34 bytes; go accepts up to 80.
pub const MAX_PROVIDER_KEY_LEN: usize = 80;

/// The key of a provider record: the multihash bytes of a CID, 1..=80 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderKey(Vec<u8>);

impl ProviderKey {
    pub fn new(bytes: Vec<u8>) -> Result<Self, &'static str> {
        if bytes.is_empty() {
            return Err("provider key is empty");
        }
        if bytes.len() > MAX_PROVIDER_KEY_LEN {
            return Err("provider key longer than 80 bytes");
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A peer and the addresses it can be reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

impl PeerRecord {
    /// Bytes this record holds in memory, allocator overhead aside: the struct, its address
    /// vector (by capacity) and each address's shared buffer (a `Multiaddr` is an
    /// `Arc<Vec<u8>>`). What byte budgets charge for it (`tests/memory_accounting.rs` checks
    /// this against the allocator).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.addrs.capacity() - self.addrs.len()) * std::mem::size_of::<Multiaddr>()
            + self.addrs.iter().map(addr_bytes).sum::<usize>()
    }
}

/// Bytes one address costs where it is held: its slot in a list and its shared buffer (a
/// `Multiaddr` is an `Arc<Vec<u8>>`: counts, vector, bytes), allocator overhead aside. Every byte
/// budget that holds addresses charges this.
pub fn addr_bytes(a: &Multiaddr) -> usize {
    std::mem::size_of::<Multiaddr>() + 16 + std::mem::size_of::<Vec<u8>>() + a.len()
}

/// A PUT_VALUE / GET_VALUE record (`/pk/…` or `/ipns/…` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// RFC 3339 time at which we received it, as go-libp2p-kad-dht writes it.
    pub time_received: String,
}

/// Which of two valid IPNS records of one name wins: the higher sequence, then the later end of
/// validity (the field order gives the comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ValueOrder {
    pub seq: u64,
    /// End of validity, ms since the Unix epoch.
    pub eol_ms: i64,
}

/// Encode a list of multiaddrs into one blob: each address as (u16 big-endian length, bytes).
pub fn encode_addrs(addrs: &[Multiaddr]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in addrs {
        let b = a.to_vec();
        let Ok(len) = u16::try_from(b.len()) else { continue };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&b);
    }
    out
}

/// Inverse of [`encode_addrs`]; malformed tails are dropped, never panicked on.
pub fn decode_addrs(mut blob: &[u8]) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    while blob.len() >= 2 {
        let len = u16::from_be_bytes([blob[0], blob[1]]) as usize;
        blob = &blob[2..];
        if blob.len() < len {
            break;
        }
        if let Ok(a) = Multiaddr::try_from(blob[..len].to_vec()) {
            out.push(a);
        }
        blob = &blob[len..];
    }
    out.shrink_to_fit(); // held in caches: no spare capacity
    out
}

/// Largest inbound message accepted, in bytes (go-libp2p-kad-dht's limit).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// The six DHT message types, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum MessageType {
    PutValue = 0,
    GetValue = 1,
    AddProvider = 2,
    GetProviders = 3,
    FindNode = 4,
    Ping = 5,
}

impl MessageType {
    pub const ALL: [MessageType; 6] = [
        MessageType::PutValue,
        MessageType::GetValue,
        MessageType::AddProvider,
        MessageType::GetProviders,
        MessageType::FindNode,
        MessageType::Ping,
    ];

    /// The type with this number on the wire, if any.
    pub fn from_i32(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as i32 == v)
    }

    /// Stable lower-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::PutValue => "put_value",
            MessageType::GetValue => "get_value",
            MessageType::AddProvider => "add_provider",
            MessageType::GetProviders => "get_providers",
            MessageType::FindNode => "find_node",
            MessageType::Ping => "ping",
        }
    }
}

/// How much work the node accepts, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Normal = 0,
    Degrade = 1,
    Refuse = 2,
    /// Refuse, and new inbound kad streams are reset at the handler.
    Peak = 3,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Normal, Tier::Degrade, Tier::Refuse, Tier::Peak];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Normal => "normal",
            Tier::Degrade => "degrade",
            Tier::Refuse => "refuse",
            Tier::Peak => "peak",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Tier {
        Tier::ALL.get(usize::from(v)).copied().unwrap_or(Tier::Peak)
    }

    pub(crate) fn below(self) -> Tier {
        Tier::from_u8((self as u8).saturating_sub(1))
    }
}

/// One value per signal: the measured signals ([`Signals`]) and the thresholds at which a tier is
/// entered ([`Thresholds`]; 0 disables that signal for the tier) share this shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerSignal {
    /// p99 of datastore lookups (`get_providers`) over the window, ms. Not of the buffered writes:
    /// their backlog is `write_buffer_fill_ratio`.
    pub datastore_p99_ms: f64,
    /// p99 of the wait for a pooled datastore connection over the window, ms.
    pub pool_wait_p99_ms: f64,
    /// Failed / all datastore lookups and writes over the window (0..1): a datastore that fails
    /// fast leaves latency low, so failures are a signal of their own.
    pub datastore_error_ratio: f64,
    /// The queue fills below are each the lowest sampled over the last second: a queue a burst
    /// filled and that drained within it is no distress (`load::signals::SampleWindow`).
    ///
    /// Write-behind buffer entries / `providers.write_buffer_entries` (0..1).
    pub write_buffer_fill_ratio: f64,
    /// Keys queued for or in a lookup / `providers.max_reads_in_flight` (0..1).
    pub reads_in_flight_ratio: f64,
    /// Inbound kad streams waiting for a stream task / `limits.inbound_queue` (0..1).
    pub inbound_queue_fill_ratio: f64,
    /// Resident memory of the process, MiB.
    pub rss_mib: f64,
    /// Mean scheduling delay of the runtime over the last second, ms: how much later than due a
    /// 5 ms timer's task ran (the lag probe). Every task — stream, timer, flush — waits this long
    /// for a CPU; it grows when the node's CPU (or its quota) is saturated.
    pub runtime_lag_ms: f64,
}

/// Thresholds at which a tier is entered.
pub type Thresholds = PerSignal;
/// One sample of the measured signals.
pub type Signals = PerSignal;

impl PerSignal {
    /// Every signal off (as thresholds).
    pub const fn disabled() -> Self {
        Self {
            datastore_p99_ms: 0.0,
            pool_wait_p99_ms: 0.0,
            datastore_error_ratio: 0.0,
            write_buffer_fill_ratio: 0.0,
            reads_in_flight_ratio: 0.0,
            inbound_queue_fill_ratio: 0.0,
            rss_mib: 0.0,
            runtime_lag_ms: 0.0,
        }
    }

    /// (signal name, value), in a fixed order (metric label values and status keys).
    pub fn values(&self) -> [(&'static str, f64); 8] {
        [
            ("datastore_p99_ms", self.datastore_p99_ms),
            ("pool_wait_p99_ms", self.pool_wait_p99_ms),
            ("datastore_error_ratio", self.datastore_error_ratio),
            ("write_buffer_fill_ratio", self.write_buffer_fill_ratio),
            ("reads_in_flight_ratio", self.reads_in_flight_ratio),
            ("inbound_queue_fill_ratio", self.inbound_queue_fill_ratio),
            ("rss_mib", self.rss_mib),
            ("runtime_lag_ms", self.runtime_lag_ms),
        ]
    }

    /// Whether any enabled signal is at or above `factor` × its threshold.
    pub(crate) fn reached(&self, s: &Signals, factor: f64) -> bool {
        self.values().iter().zip(s.values()).any(|((_, t), (_, v))| *t > 0.0 && v >= t * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addrs_round_trip_and_survive_garbage() {
        let addrs: Vec<Multiaddr> =
            vec!["/ip4/1.2.3.4/tcp/4001".parse().unwrap(), "/ip6/::1/udp/4001/quic-v1".parse().unwrap()];
        assert_eq!(decode_addrs(&encode_addrs(&addrs)), addrs);
        let mut blob = encode_addrs(&addrs);
        blob.extend_from_slice(&[0xff, 0xff, 1, 2]);
        assert_eq!(decode_addrs(&blob), addrs);
        assert!(decode_addrs(&[0, 5, 1]).is_empty());
    }
}
