//! Domain identifiers shared by the server, the provider manager and the stores.
//!
//! Wire bytes become these types once, in [`crate::wire`]; the stores persist them as bytes.

use libp2p::{Multiaddr, PeerId};

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

/// A PUT_VALUE / GET_VALUE record (`/pk/…` or `/ipns/…` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// RFC 3339 time at which we received it, as go-libp2p-kad-dht writes it.
    pub time_received: String,
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
    out
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
