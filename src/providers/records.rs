//! Validation of value records (PUT_VALUE, `PUT /routing/v1/ipns`). Only the `/pk/` and
//! `/ipns/` namespaces are accepted.
//!
//! `/pk/<peer id>`: the value must be the protobuf-encoded public key whose peer ID is the key's.
//! `/ipns/<peer id>`: a valid, signed, unexpired IPNS record of that name ([`super::ipns`]); its
//! [`Order`] goes with it to the datastore, whose upsert keeps the better of two records.

use libp2p::identity::PublicKey;
use libp2p::PeerId;

pub use super::ipns::{IpnsError, Order, MAX_RECORD as MAX_IPNS_RECORD};
use crate::types::ValueRecord;

/// What validation learned about an accepted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Validated {
    /// IPNS: which of two records of the name wins. `/pk/`: none (one key, one value).
    pub order: Option<Order>,
    /// IPNS: the record's end of validity (ms since the epoch): it is not served after it.
    pub eol_ms: Option<i64>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("namespace not accepted")]
    Namespace,
    #[error("key does not contain a valid peer id")]
    BadPeerId,
    #[error("public key does not match the key's peer id")]
    KeyMismatch,
    #[error("value empty or too large")]
    BadValue,
    #[error("invalid IPNS record: {0}")]
    Ipns(#[from] IpnsError),
}

/// Validate `r` at `now_ms` (IPNS validity is checked against it).
pub fn validate(r: &ValueRecord, now_ms: i64) -> Result<Validated, RecordError> {
    if let Some(id) = r.key.strip_prefix(b"/pk/") {
        let peer = PeerId::from_bytes(id).map_err(|_| RecordError::BadPeerId)?;
        let pk = PublicKey::try_decode_protobuf(&r.value).map_err(|_| RecordError::KeyMismatch)?;
        if pk.to_peer_id() != peer {
            return Err(RecordError::KeyMismatch);
        }
        Ok(Validated::default())
    } else if let Some(id) = r.key.strip_prefix(b"/ipns/") {
        let name = PeerId::from_bytes(id).map_err(|_| RecordError::BadPeerId)?;
        if r.value.is_empty() {
            return Err(RecordError::BadValue);
        }
        let v = super::ipns::validate(&name, &r.value, now_ms)?;
        Ok(Validated { order: Some(v.order), eol_ms: Some(v.order.eol_ms) })
    } else {
        Err(RecordError::Namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn rec(key: Vec<u8>, value: Vec<u8>) -> ValueRecord {
        ValueRecord { key, value, time_received: String::new() }
    }

    #[test]
    fn pk_records_must_match_their_key() {
        let kp = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let key = [b"/pk/".as_slice(), &kp.public().to_peer_id().to_bytes()].concat();
        assert_eq!(validate(&rec(key.clone(), kp.public().encode_protobuf()), 0), Ok(Validated::default()));
        assert_eq!(validate(&rec(key, other.public().encode_protobuf()), 0), Err(RecordError::KeyMismatch));
    }

    #[test]
    fn other_namespaces_are_rejected() {
        assert_eq!(validate(&rec(b"/v/x".to_vec(), vec![1]), 0), Err(RecordError::Namespace));
        assert_eq!(validate(&rec(b"/ipns/zzz".to_vec(), vec![1]), 0), Err(RecordError::BadPeerId));
        let name = PeerId::random().to_bytes();
        let ipns = [b"/ipns/".as_slice(), &name].concat();
        assert!(
            matches!(validate(&rec(ipns, vec![1, 2, 3]), 0), Err(RecordError::Ipns(_))),
            "unsigned bytes"
        );
    }
}
