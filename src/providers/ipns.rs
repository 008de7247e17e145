//! IPNS records (the IPNS record specification, V2 signatures), validated the one way both
//! doors use: PUT_VALUE over the DHT and `PUT /routing/v1/ipns/{name}`.
//!
//! A record is accepted when: it is at most 10 KiB; `signatureV2` and `data` are present;
//! `data` is a DAG-CBOR map with `Value`, `Validity`, `ValidityType` (0 = EOL), `Sequence` and
//! `TTL`; the public key is the embedded `pubKey` (which must hash to the name) or, for an
//! identity-multihash name (Ed25519), the name itself; `signatureV2` verifies over
//! `"ipns-signature:" ++ data`; the validity (an RFC 3339 end of life) is in the future; and every
//! V1 field present equals its CBOR twin. Between two valid records of one name the higher
//! `Sequence` wins, then the later validity — [`Order`], enforced in the datastore's upsert so
//! concurrent writers of a fleet cannot regress a name.

use ciborium::Value as Cbor;
use libp2p::identity::PublicKey;
use libp2p::PeerId;
use prost::Message as _;

/// Largest IPNS record accepted (the specification's limit).
pub const MAX_RECORD: usize = 10 * 1024;

const SIGNATURE_PREFIX: &[u8] = b"ipns-signature:";

/// The IPNS record's protobuf (`IpnsEntry`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IpnsEntry {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub value: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub signature_v1: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "3")]
    pub validity_type: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub validity: Option<Vec<u8>>,
    #[prost(uint64, optional, tag = "5")]
    pub sequence: Option<u64>,
    #[prost(uint64, optional, tag = "6")]
    pub ttl: Option<u64>,
    #[prost(bytes = "vec", optional, tag = "7")]
    pub pub_key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "8")]
    pub signature_v2: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub data: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpnsError {
    #[error("record larger than 10 KiB")]
    TooLarge,
    #[error("not an IPNS record (protobuf): {0}")]
    Protobuf(String),
    #[error("no signatureV2 or no data (V1-only records are not accepted)")]
    NotV2,
    #[error("data is not the DAG-CBOR map of an IPNS record: {0}")]
    Cbor(String),
    #[error("no public key: the name is not an inlined Ed25519 key and the record embeds none")]
    NoKey,
    #[error("the embedded public key does not belong to this name")]
    WrongKey,
    #[error("signatureV2 does not verify")]
    BadSignature,
    #[error("validity type {0} is not supported (0 = EOL)")]
    ValidityType(u64),
    #[error("validity is not an RFC 3339 time")]
    BadValidity,
    #[error("expired (validity {0})")]
    Expired(String),
    #[error("V1 field {0} differs from the signed data")]
    V1Mismatch(&'static str),
}

pub use crate::types::ValueOrder as Order;

/// A record that passed [`validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid {
    pub order: Order,
    /// The record's TTL (how long a resolver may cache it), ns as in the record.
    pub ttl_ns: u64,
}

/// The signed fields, from the CBOR `data`.
struct Signed {
    value: Vec<u8>,
    validity: Vec<u8>,
    validity_type: u64,
    sequence: u64,
    ttl: u64,
}

fn parse_data(data: &[u8]) -> Result<Signed, IpnsError> {
    let v: Cbor = ciborium::de::from_reader(data).map_err(|e| IpnsError::Cbor(e.to_string()))?;
    let Cbor::Map(entries) = v else { return Err(IpnsError::Cbor("not a map".into())) };
    let field =
        |name: &str| entries.iter().find(|(k, _)| matches!(k, Cbor::Text(t) if t == name)).map(|(_, v)| v);
    let bytes = |name: &'static str| match field(name) {
        Some(Cbor::Bytes(b)) => Ok(b.clone()),
        _ => Err(IpnsError::Cbor(format!("{name} missing or not bytes"))),
    };
    let uint = |name: &'static str| match field(name) {
        Some(Cbor::Integer(i)) => u64::try_from(*i).map_err(|_| IpnsError::Cbor(format!("{name} negative"))),
        _ => Err(IpnsError::Cbor(format!("{name} missing or not an integer"))),
    };
    Ok(Signed {
        value: bytes("Value")?,
        validity: bytes("Validity")?,
        validity_type: uint("ValidityType")?,
        sequence: uint("Sequence")?,
        ttl: uint("TTL")?,
    })
}

/// Parse an RFC 3339 validity into ms since the epoch.
fn eol_ms(validity: &[u8]) -> Result<i64, IpnsError> {
    let text = std::str::from_utf8(validity).map_err(|_| IpnsError::BadValidity)?;
    let t = humantime::parse_rfc3339(text).map_err(|_| IpnsError::BadValidity)?;
    let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| IpnsError::BadValidity)?;
    Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Validate `record` as the IPNS record of `name` at `now_ms`.
pub fn validate(name: &PeerId, record: &[u8], now_ms: i64) -> Result<Valid, IpnsError> {
    if record.len() > MAX_RECORD {
        return Err(IpnsError::TooLarge);
    }
    let entry = IpnsEntry::decode(record).map_err(|e| IpnsError::Protobuf(e.to_string()))?;
    let (Some(sig), Some(data)) = (entry.signature_v2.as_deref(), entry.data.as_deref()) else {
        return Err(IpnsError::NotV2);
    };
    if sig.is_empty() || data.is_empty() {
        return Err(IpnsError::NotV2);
    }
    let signed = parse_data(data)?;
    let key = match entry.pub_key.as_deref().filter(|k| !k.is_empty()) {
        Some(k) => {
            let pk = PublicKey::try_decode_protobuf(k).map_err(|_| IpnsError::WrongKey)?;
            if pk.to_peer_id() != *name {
                return Err(IpnsError::WrongKey);
            }
            pk
        }
        None => inlined_key(name).ok_or(IpnsError::NoKey)?,
    };
    if !key.verify(&[SIGNATURE_PREFIX, data].concat(), sig) {
        return Err(IpnsError::BadSignature);
    }
    if signed.validity_type != 0 {
        return Err(IpnsError::ValidityType(signed.validity_type));
    }
    let eol = eol_ms(&signed.validity)?;
    if eol <= now_ms {
        return Err(IpnsError::Expired(String::from_utf8_lossy(&signed.validity).into_owned()));
    }
    // V1 fields, where present, must say what the signed data says.
    if entry.value.as_ref().is_some_and(|v| *v != signed.value) {
        return Err(IpnsError::V1Mismatch("value"));
    }
    if entry.validity.as_ref().is_some_and(|v| *v != signed.validity) {
        return Err(IpnsError::V1Mismatch("validity"));
    }
    if entry.validity_type.is_some_and(|t| u64::try_from(t).ok() != Some(signed.validity_type)) {
        return Err(IpnsError::V1Mismatch("validityType"));
    }
    if entry.sequence.is_some_and(|s| s != signed.sequence) {
        return Err(IpnsError::V1Mismatch("sequence"));
    }
    if entry.ttl.is_some_and(|t| t != signed.ttl) {
        return Err(IpnsError::V1Mismatch("ttl"));
    }
    Ok(Valid { order: Order { seq: signed.sequence, eol_ms: eol }, ttl_ns: signed.ttl })
}

/// The public key inlined in a peer ID (an identity multihash: Ed25519 and other short keys).
fn inlined_key(name: &PeerId) -> Option<PublicKey> {
    let mh = name.as_ref();
    (mh.code() == 0x00).then(|| PublicKey::try_decode_protobuf(mh.digest()).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn cbor(value: &[u8], validity: &str, seq: u64, ttl: u64) -> Vec<u8> {
        let map = Cbor::Map(vec![
            (Cbor::Text("TTL".into()), Cbor::Integer(ttl.into())),
            (Cbor::Text("Value".into()), Cbor::Bytes(value.to_vec())),
            (Cbor::Text("Sequence".into()), Cbor::Integer(seq.into())),
            (Cbor::Text("Validity".into()), Cbor::Bytes(validity.as_bytes().to_vec())),
            (Cbor::Text("ValidityType".into()), Cbor::Integer(0.into())),
        ]);
        let mut out = Vec::new();
        ciborium::ser::into_writer(&map, &mut out).unwrap();
        out
    }

    /// A record as the spec describes it, V1 fields included.
    fn record(kp: &Keypair, seq: u64, validity: &str, embed_key: bool) -> Vec<u8> {
        let data = cbor(b"/ipfs/bafkqaaa", validity, seq, 1_000_000_000);
        let sig = kp.sign(&[SIGNATURE_PREFIX, &data].concat()).unwrap();
        IpnsEntry {
            value: Some(b"/ipfs/bafkqaaa".to_vec()),
            signature_v1: Some(vec![1]),
            validity_type: Some(0),
            validity: Some(validity.as_bytes().to_vec()),
            sequence: Some(seq),
            ttl: Some(1_000_000_000),
            pub_key: embed_key.then(|| kp.public().encode_protobuf()),
            signature_v2: Some(sig),
            data: Some(data),
        }
        .encode_to_vec()
    }

    const FUTURE: &str = "2999-01-01T00:00:00.000000000Z";
    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_signed_record_is_valid_with_or_without_an_embedded_key() {
        let kp = Keypair::generate_ed25519();
        let name = kp.public().to_peer_id();
        for embed in [false, true] {
            let v = validate(&name, &record(&kp, 7, FUTURE, embed), NOW).unwrap();
            assert_eq!(v.order.seq, 7);
            assert!(v.order.eol_ms > NOW);
        }
    }

    #[test]
    fn forged_expired_foreign_and_inconsistent_records_are_rejected() {
        let kp = Keypair::generate_ed25519();
        let name = kp.public().to_peer_id();
        let other = Keypair::generate_ed25519();
        // Signed by another key, for this name.
        assert_eq!(validate(&name, &record(&other, 1, FUTURE, false), NOW), Err(IpnsError::BadSignature));
        assert_eq!(validate(&name, &record(&other, 1, FUTURE, true), NOW), Err(IpnsError::WrongKey));
        // Expired.
        assert!(matches!(
            validate(&name, &record(&kp, 1, "2001-01-01T00:00:00Z", false), NOW),
            Err(IpnsError::Expired(_))
        ));
        // A V1 field that says something else than the signed data.
        let mut e = IpnsEntry::decode(record(&kp, 1, FUTURE, false).as_slice()).unwrap();
        e.sequence = Some(99);
        assert_eq!(validate(&name, &e.encode_to_vec(), NOW), Err(IpnsError::V1Mismatch("sequence")));
        // A flipped bit in the signed data.
        let mut e = IpnsEntry::decode(record(&kp, 1, FUTURE, false).as_slice()).unwrap();
        let data = e.data.as_mut().unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        assert!(validate(&name, &e.encode_to_vec(), NOW).is_err());
        // Too large, garbage, V1 only.
        assert_eq!(validate(&name, &vec![0; MAX_RECORD + 1], NOW), Err(IpnsError::TooLarge));
        assert!(validate(&name, b"\xff\xff", NOW).is_err());
        let mut e = IpnsEntry::decode(record(&kp, 1, FUTURE, false).as_slice()).unwrap();
        e.signature_v2 = None;
        assert_eq!(validate(&name, &e.encode_to_vec(), NOW), Err(IpnsError::NotV2));
    }

    #[test]
    fn higher_sequence_wins_then_later_validity() {
        let a = Order { seq: 2, eol_ms: 10 };
        assert!(Order { seq: 3, eol_ms: 1 } > a);
        assert!(Order { seq: 2, eol_ms: 11 } > a);
        assert!(Order { seq: 1, eol_ms: 99 } < a);
    }
}
