//! Where head identities are made. The only place that creates head keys.
//!
//! For now every start draws fresh random Ed25519 keys. Persistent, balanced, fleet-wide
//! identities (HKDF from a seed, leases in the datastore) replace this function's body.

use libp2p::identity::Keypair;

/// The key of head `index`.
pub fn head_keypair(_index: usize) -> Keypair {
    Keypair::generate_ed25519()
}
