//! Head-identity leases in the datastore: the one orchestration, over either backend.
//!
//! `acquire` runs inside one transaction that holds the fleet's lease lock (a PostgreSQL advisory
//! transaction lock; on SQLite the single writer connection): it checks the seed fingerprint,
//! reads every identity and lease, lets [`identity::plan`] decide, extends the balanced sequence
//! when needed (key derivation on a blocking thread), and writes the result. Two processes
//! starting at once therefore see each other's leases and never get the same identity.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{ms_after, StoreError};
use crate::identity::{self, KeyTrie, LeaseRow, Seed};

/// An identity this process runs: slot (port_base + slot) and identity index with its choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasedHead {
    pub slot: u32,
    pub index: u32,
    pub choice: u8,
}

/// One identity of the fleet with its lease, as `hydra heads` and `/v1/heads?fleet=true` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetHead {
    pub identity: u32,
    pub peer_id: String,
    pub node: Option<String>,
    pub slot: Option<u32>,
    pub addrs: Vec<String>,
    /// Unix milliseconds; None if the identity is not leased.
    pub lease_expires_at: Option<i64>,
    pub lease_active: bool,
}

/// One identity as stored: index, choice, Kademlia key.
pub(crate) type IdentityRow = (u32, u8, Vec<u8>);

/// The backend operations `acquire` needs, all inside one locked transaction.
pub(crate) trait LeaseTx {
    /// The datastore's clock (ms since the epoch): every lease decision is taken on it, so a
    /// host whose clock is off cannot take over live leases or keep expired ones.
    async fn now(&mut self) -> Result<i64, StoreError>;
    async fn meta(&mut self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    async fn identities(&mut self) -> Result<Vec<IdentityRow>, StoreError>;
    async fn leases(&mut self) -> Result<Vec<LeaseRow>, StoreError>;
    async fn insert_identity(
        &mut self,
        index: u32,
        choice: u8,
        kad_key: &[u8],
        peer: &str,
    ) -> Result<(), StoreError>;
    async fn release(&mut self, node: &str, index: u32) -> Result<(), StoreError>;
    async fn lease(
        &mut self,
        index: u32,
        node: &str,
        token: &str,
        slot: u32,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    async fn commit(self) -> Result<(), StoreError>;
}

fn fingerprint(seed: &Seed) -> Vec<u8> {
    // Derived from a key of the seed, not the seed itself: a 256-bit secret stays secret.
    let probe = identity::derive(seed, u32::MAX, 0).public().to_peer_id();
    Sha256::digest([b"hydra seed fingerprint v1".as_slice(), &probe.to_bytes()].concat()).to_vec()
}

/// The fleet's identity scheme, recorded on first use: the current one for a fleet without
/// identities, v1 for one whose identities an older release issued (it keeps its sequence).
async fn identity_scheme<T: LeaseTx>(tx: &mut T, fresh: bool) -> Result<identity::Scheme, StoreError> {
    use identity::Scheme;
    match tx.meta("identity_scheme").await? {
        Some(v) => {
            let text = String::from_utf8_lossy(&v).into_owned();
            text.trim().parse().ok().and_then(Scheme::from_version).ok_or_else(|| {
                StoreError::Identity(format!(
                    "this datastore's identity scheme {text:?} is newer than this release knows; upgrade hydra"
                ))
            })
        }
        None => {
            let scheme = if fresh { Scheme::CURRENT } else { Scheme::V1 };
            tx.set_meta("identity_scheme", scheme.version().to_string().as_bytes()).await?;
            Ok(scheme)
        }
    }
}

pub(crate) async fn acquire<T: LeaseTx>(
    mut tx: T,
    node: &str,
    token: &str,
    n: u32,
    ttl: Duration,
    seed: Arc<Seed>,
) -> Result<Vec<LeasedHead>, StoreError> {
    let fp = fingerprint(&seed);
    match tx.meta("seed_fingerprint").await? {
        None => tx.set_meta("seed_fingerprint", &fp).await?,
        Some(stored) if stored == fp => {}
        Some(_) => {
            return Err(StoreError::Identity(
                "this datastore's head identities were made from a different identity seed; \
                 give every process of a fleet the same identity_seed_file"
                    .into(),
            ))
        }
    }
    let ids = tx.identities().await?;
    let scheme = identity_scheme(&mut tx, ids.is_empty()).await?;
    let leases = tx.leases().await?;
    let now = tx.now().await?;
    let indices: Vec<u32> = ids.iter().map(|(i, _, _)| *i).collect();
    let plan = identity::plan(node, token, n, now, &indices, &leases);
    if plan.conflicts > 0 {
        return Err(StoreError::LeaseConflict { node: node.to_owned(), leases: plan.conflicts });
    }
    let choices: HashMap<u32, u8> = ids.iter().map(|(i, c, _)| (*i, *c)).collect();
    let mut out: Vec<LeasedHead> = plan
        .assigned
        .iter()
        .map(|&(slot, index)| LeasedHead { slot, index, choice: choices[&index] })
        .collect();

    if !plan.new_slots.is_empty() {
        let next = indices.iter().max().map_or(0, |m| m + 1);
        let count = plan.new_slots.len() as u32;
        let keys: Vec<[u8; 32]> =
            ids.iter().filter_map(|(_, _, k)| <[u8; 32]>::try_from(k.as_slice()).ok()).collect();
        let seed = seed.clone();
        // The scheme's candidate keys per new identity: CPU work, off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            let mut trie = KeyTrie::default();
            for k in keys {
                trie.insert(k);
            }
            identity::extend(&seed, &mut trie, next..next + count, scheme)
                .into_iter()
                .map(|i| (i.index, i.choice, i.kad_key, i.keypair.public().to_peer_id().to_string()))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| StoreError::Identity(format!("key derivation failed: {e}")))?;
        for (&slot, (index, choice, kad, peer)) in plan.new_slots.iter().zip(issued) {
            tx.insert_identity(index, choice, &kad, &peer).await?;
            out.push(LeasedHead { slot, index, choice });
        }
    }
    for index in &plan.released {
        tx.release(node, *index).await?;
    }
    // Counted from now, not from the plan: deriving keys for many new heads takes a while.
    let expires = ms_after(tx.now().await?, ttl);
    for h in &out {
        tx.lease(h.index, node, token, h.slot, expires).await?;
    }
    tx.commit().await?;
    out.sort_by_key(|h| h.slot);
    Ok(out)
}
