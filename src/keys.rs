//! Text forms of what operators and HTTP clients name: CIDs, multihashes and peer IDs.
//!
//! A provider record is keyed by the **multihash** of a CID (any version, any codec: the DHT
//! ignores the codec), so `hydra providers`, `GET /v1/providers/{cid}` and the Delegated Routing
//! API all reduce their argument to a [`ProviderKey`] here. Peer IDs come in base58 (`12D3KooW…`,
//! `Qm…`) or as a CIDv1 with the `libp2p-key` codec (`k51…`, `bafz…`), as IPNS names do.
//! Errors say what is wrong with the text, for a person to fix it.

use libp2p::PeerId;

use crate::types::ProviderKey;

/// The multicodec of a CIDv1 naming a peer (`libp2p-key`).
const LIBP2P_KEY: u64 = 0x72;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty")]
    Empty,
    #[error("not base58btc, and {0:?} is not a known multibase prefix")]
    Multibase(char),
    #[error("not valid {0} text")]
    Encoding(&'static str),
    #[error("CID version {0} is not supported (0 and 1 are)")]
    Version(u64),
    #[error("truncated varint")]
    Varint,
    #[error("bad multihash: {0}")]
    Multihash(String),
    #[error("multicodec 0x{0:x} of this CID is not libp2p-key (0x72), so it does not name a peer")]
    NotAPeer(u64),
    #[error("not a peer ID: {0}")]
    PeerId(String),
    #[error("{0}")]
    Key(&'static str),
}

/// Read one unsigned LEB128 varint (multiformats' varint, at most 9 bytes).
fn varint(bytes: &[u8]) -> Result<(u64, &[u8]), KeyError> {
    let mut v: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(9) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((v, &bytes[i + 1..]));
        }
    }
    Err(KeyError::Varint)
}

/// Check that `bytes` is exactly one multihash (code, length, digest of that length).
fn check_multihash(bytes: &[u8]) -> Result<(), KeyError> {
    let (_code, rest) = varint(bytes).map_err(|_| KeyError::Multihash("truncated code".into()))?;
    let (len, digest) = varint(rest).map_err(|_| KeyError::Multihash("truncated length".into()))?;
    if digest.len() as u64 != len {
        return Err(KeyError::Multihash(format!(
            "says its digest has {len} bytes, but {} follow",
            digest.len()
        )));
    }
    Ok(())
}

/// A CID's (codec, multihash bytes), or the bytes of a bare multihash (codec `None`).
fn decode(text: &str) -> Result<(Option<u64>, Vec<u8>), KeyError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    let bytes = if text.len().is_multiple_of(2) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Hex of a multihash (as `hydra providers` prints keys), e.g. 1220…
        hex::decode(text).map_err(|_| KeyError::Encoding("hex"))?
    } else if text.starts_with("Qm") || text.starts_with('1') {
        // CIDv0 and base58 peer IDs (`Qm…`, `12D3KooW…`) carry no multibase prefix.
        let bytes = bs58_decode(text)?;
        check_multihash(&bytes)?;
        return Ok((None, bytes));
    } else {
        let first = text.chars().next().unwrap_or(' ');
        let (_, bytes) = multibase::decode(text).map_err(|e| match e {
            multibase::Error::UnknownBase(c) => KeyError::Multibase(c),
            _ => KeyError::Encoding(base_name(first)),
        })?;
        bytes
    };
    match bytes.first() {
        Some(0x01) => {
            let (_, rest) = varint(&bytes)?;
            let (codec, mh) = varint(rest)?;
            check_multihash(mh)?;
            Ok((Some(codec), mh.to_vec()))
        }
        Some(0x12) if bytes.len() == 34 => Ok((None, bytes)), // a sha2-256 multihash (CIDv0's)
        Some(&v) if v <= 3 => Err(KeyError::Version(u64::from(v))),
        _ => {
            check_multihash(&bytes)?;
            Ok((None, bytes))
        }
    }
}

fn base_name(prefix: char) -> &'static str {
    match prefix {
        'b' => "base32",
        'k' => "base36",
        'z' => "base58btc",
        'f' => "base16",
        'm' | 'M' | 'u' | 'U' => "base64",
        _ => "multibase",
    }
}

fn bs58_decode(text: &str) -> Result<Vec<u8>, KeyError> {
    multibase::Base::Base58Btc.decode(text).map_err(|_| KeyError::Encoding("base58btc"))
}

/// The provider key named by a CID (v0 or v1) or a multihash (base58btc, multibase or hex).
pub fn parse_provider_key(text: &str) -> Result<ProviderKey, KeyError> {
    let (_, mh) = decode(text)?;
    ProviderKey::new(mh).map_err(KeyError::Key)
}

/// A peer ID in base58 (`12D3KooW…`, `Qm…`) or as a CIDv1 with the `libp2p-key` codec.
pub fn parse_peer_id(text: &str) -> Result<PeerId, KeyError> {
    let (codec, mh) = decode(text)?;
    if let Some(c) = codec.filter(|c| *c != LIBP2P_KEY) {
        return Err(KeyError::NotAPeer(c));
    }
    PeerId::from_bytes(&mh).map_err(|e| KeyError::PeerId(e.to_string()))
}

/// The CIDv1 (base32, raw codec) under which a provider key is shown to people.
pub fn key_to_cid(key: &ProviderKey) -> String {
    let mut bytes = vec![0x01, 0x55]; // CIDv1, raw
    bytes.extend_from_slice(key.as_bytes());
    multibase::encode(multibase::Base::Base32Lower, bytes)
}

/// An IPNS name (`k51…`): the peer ID as a CIDv1 with the `libp2p-key` codec, base36.
pub fn ipns_name(peer: &PeerId) -> String {
    let mut bytes = vec![0x01, LIBP2P_KEY as u8];
    bytes.extend_from_slice(&peer.to_bytes());
    multibase::encode(multibase::Base::Base36Lower, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // "hello world" as raw blocks: CIDv1 base32, the same multihash as CIDv0.
    const V1: &str = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e";
    const MH_HEX: &str = "1220b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";

    #[test]
    fn a_cid_names_its_multihash_whatever_its_version_or_form() {
        let k = parse_provider_key(V1).unwrap();
        assert_eq!(hex::encode(k.as_bytes()), MH_HEX);
        let v0 = multibase::Base::Base58Btc.encode(hex::decode(MH_HEX).unwrap());
        assert!(v0.starts_with("Qm"));
        assert_eq!(parse_provider_key(&v0).unwrap(), k);
        assert_eq!(parse_provider_key(MH_HEX).unwrap(), k);
        assert_eq!(parse_provider_key(&key_to_cid(&k)).unwrap(), k);
    }

    #[test]
    fn wrong_text_says_what_is_wrong() {
        assert_eq!(parse_provider_key(""), Err(KeyError::Empty));
        assert_eq!(parse_provider_key("xyz"), Err(KeyError::Multibase('x')));
        assert_eq!(parse_provider_key("bafk!!!"), Err(KeyError::Encoding("base32")));
        let mut cid = vec![0x01, 0x55];
        cid.extend_from_slice(&hex::decode(MH_HEX).unwrap()[..30]); // a digest cut short
        let short = multibase::encode(multibase::Base::Base32Lower, cid);
        assert!(
            matches!(parse_provider_key(&short), Err(KeyError::Multihash(_))),
            "{:?}",
            parse_provider_key(&short)
        );
        assert!(parse_provider_key("QmNotBase58lI0O").is_err());
    }

    #[test]
    fn peer_ids_in_base58_or_as_libp2p_key_cids() {
        let p = PeerId::random();
        assert_eq!(parse_peer_id(&p.to_base58()).unwrap(), p);
        let name = ipns_name(&p);
        assert!(name.starts_with('k'), "{name}");
        assert_eq!(parse_peer_id(&name).unwrap(), p);
        assert_eq!(parse_peer_id(V1), Err(KeyError::NotAPeer(0x55)));
    }
}
