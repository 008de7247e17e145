//! Validation of PUT_VALUE records. Only the `/pk/` and `/ipns/` namespaces are accepted.
//!
//! `/pk/<peer id>`: the value must be the protobuf-encoded public key whose peer ID is the key's.
//! `/ipns/<peer id>`: the key must name a valid peer ID and the value be a non-empty record of at
//! most 10 KiB. IPNS signature and validity checks are not done yet (see ARCHITECTURE.md).

use libp2p::identity::PublicKey;
use libp2p::PeerId;

use crate::types::ValueRecord;

/// Largest IPNS record accepted (go-libp2p's limit).
pub const MAX_IPNS_RECORD: usize = 10 * 1024;

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
}

pub fn validate(r: &ValueRecord) -> Result<(), RecordError> {
    if let Some(id) = r.key.strip_prefix(b"/pk/") {
        let peer = PeerId::from_bytes(id).map_err(|_| RecordError::BadPeerId)?;
        let pk = PublicKey::try_decode_protobuf(&r.value).map_err(|_| RecordError::KeyMismatch)?;
        if pk.to_peer_id() != peer {
            return Err(RecordError::KeyMismatch);
        }
        Ok(())
    } else if let Some(id) = r.key.strip_prefix(b"/ipns/") {
        PeerId::from_bytes(id).map_err(|_| RecordError::BadPeerId)?;
        if r.value.is_empty() || r.value.len() > MAX_IPNS_RECORD {
            return Err(RecordError::BadValue);
        }
        Ok(())
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
        assert_eq!(validate(&rec(key.clone(), kp.public().encode_protobuf())), Ok(()));
        assert_eq!(validate(&rec(key, other.public().encode_protobuf())), Err(RecordError::KeyMismatch));
    }

    #[test]
    fn other_namespaces_are_rejected() {
        assert_eq!(validate(&rec(b"/v/x".to_vec(), vec![1])), Err(RecordError::Namespace));
        assert_eq!(validate(&rec(b"/ipns/zzz".to_vec(), vec![1])), Err(RecordError::BadPeerId));
    }
}
