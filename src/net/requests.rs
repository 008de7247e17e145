//! Answering one decoded request: from the process's routing snapshot (FIND_NODE, closer peers) and
//! from the provider manager (providers, values). What a request may cost depends on the load
//! tier's [`Policy`](crate::load::Policy), read once per request; nothing here touches a swarm.

use libp2p::PeerId;
use rand::seq::SliceRandom;

use super::routing::K_VALUE;
use super::streams::Service;
use super::wire::{Request, Response};
use crate::load::{LoadControl, Policy};
use crate::metrics::{Outcome, ShedReason};
use crate::providers::ProviderManager;
use crate::types::{PeerRecord, ProviderKey};

/// What to do on the stream after a request.
pub(super) enum Reply {
    Send(Response),
    /// No reply (ADD_PROVIDER never has one).
    Nothing,
    /// Reset the stream: the request failed in a way the peer must notice.
    Reset,
}

/// The providers of `key` as far as the tier `policy` allows — the one rule for every door
/// (DHT streams, the Delegated Routing API). `far`: the key is not among those the asking head
/// (or, over HTTP, this process) is responsible for; `allow`: the requester's rate permits a
/// datastore lookup. The caller counts the shed.
pub async fn providers_in_tier(
    providers: &ProviderManager,
    load: &LoadControl,
    policy: Policy,
    key: &ProviderKey,
    far: impl FnOnce() -> bool,
    allow: impl FnOnce() -> bool,
) -> Result<Vec<PeerRecord>, ShedReason> {
    if !policy.datastore {
        // Refused datastore work: a cached answer costs nothing and is still served.
        providers.cached_answer(key).ok_or(ShedReason::Tier)
    } else if policy.far_keys_from_cache_only && far() {
        // Degrade: the datastore only for keys this head is responsible for.
        providers.get_providers_cached(key).ok_or(ShedReason::CacheOnly)
    } else if load.peer_limits_active(policy.tier) {
        // Short of capacity: cached answers are free, lookups are charged to the requester.
        match providers.cached_answer(key) {
            Some(hit) => Ok(hit),
            None if !allow() => Err(ShedReason::PeerRate),
            None => providers.get_providers(key).await.map_err(|s| s.0),
        }
    } else {
        providers.get_providers(key).await.map_err(|s| s.0)
    }
}

/// Bytes a peer takes in a reply: its ID, each address, and the protobuf framing around them.
fn wire_bytes(p: &PeerRecord) -> usize {
    p.peer.to_bytes().len() + 8 + p.addrs.iter().map(|a| a.len() + 3).sum::<usize>()
}

/// Keep `lists` (in order of priority, each already in the order it should be cut from) within
/// `budget` bytes: a peer is kept while it fits, the rest of its list and of the lists after it
/// is left out. Returns how many peers were left out.
fn within_bytes(budget: usize, closer: &mut Vec<PeerRecord>, providers: &mut Vec<PeerRecord>) -> usize {
    let mut used = 0;
    let mut left_out = 0;
    let mut full = false;
    for list in [closer, providers] {
        let mut n = 0;
        for p in list.iter() {
            let size = wire_bytes(p);
            full = full || used + size > budget;
            if full {
                break;
            }
            used += size;
            n += 1;
        }
        left_out += list.len() - n;
        list.truncate(n);
    }
    left_out
}

/// Answer one request.
pub(super) async fn handle(svc: &Service, head: usize, peer: PeerId, req: Request) -> (Reply, Outcome) {
    let me = svc.heads[head].peer_id;
    let closer = |key: &[u8]| svc.routing.load().closest(key, K_VALUE, &[peer, me]);
    // Every reply within `limits.max_reply_bytes`, closer peers first; what is left out is counted.
    let fit = |closer: &mut Vec<PeerRecord>, providers: &mut Vec<PeerRecord>| {
        let trimmed = within_bytes(svc.limits.max_reply_bytes, closer, providers);
        if trimmed > 0 {
            svc.metrics.reply_peers_trimmed.inc_by(trimmed as u64);
        }
    };
    let policy = svc.load.policy();
    let tier = policy.tier;
    // For requests that touch the datastore: refused by the tier or the peer's rate?
    let refused = || {
        if !policy.datastore {
            Some(ShedReason::Tier)
        } else if !svc.load.allow_peer(&peer, tier, 1.0) {
            Some(ShedReason::PeerRate)
        } else {
            None
        }
    };
    match req {
        // Never touch the datastore: served in every tier, not rate limited.
        Request::Ping => (Reply::Send(Response::Ping), Outcome::Ok),
        Request::FindNode { key } => {
            let mut closer = closer(&key);
            fit(&mut closer, &mut Vec::new());
            (Reply::Send(Response::FindNode { key, closer }), Outcome::Ok)
        }
        Request::GetProviders { key } => {
            let far = || !svc.routing.load().is_among_closest(key.as_bytes(), &me, K_VALUE);
            let allow = || svc.load.allow_peer(&peer, tier, 1.0);
            let served = providers_in_tier(&svc.providers, &svc.load, policy, &key, far, allow).await;
            let (mut providers, outcome) = match served {
                Ok(p) => (p, Outcome::Ok),
                Err(reason) => (Vec::new(), svc.shed(tier, reason)),
            };
            providers.shuffle(&mut rand::thread_rng());
            providers.truncate(svc.limits.max_providers_per_reply);
            let mut closer = closer(key.as_bytes());
            fit(&mut closer, &mut providers);
            (Reply::Send(Response::GetProviders { key, providers, closer }), outcome)
        }
        Request::AddProvider { key, providers, rejected } => {
            if providers.is_empty() {
                tracing::debug!(%peer, rejected, "ADD_PROVIDER without a valid entry for the sender");
                // Counted, but not worth a reset: go ignores such entries too.
                return (Reply::Nothing, Outcome::Invalid);
            }
            // Buffered in every tier but peak (the buffer's bound sheds the excess, its flushes
            // wait for the statement budget): a slow datastore is no reason to lose them.
            let refused = if !policy.buffer_writes {
                Some(ShedReason::Tier)
            } else if !svc.load.allow_peer(&peer, tier, svc.providers.statements_per_write()) {
                Some(ShedReason::PeerRate)
            } else {
                None
            };
            if let Some(reason) = refused {
                return (Reply::Nothing, svc.shed(tier, reason));
            }
            let skip =
                policy.skip_fresh_refreshes.then(|| svc.load.config().degrade_skip_refresh_if_remaining);
            let mut outcome = Outcome::Ok;
            for rec in providers {
                if let Err(s) = svc.providers.add_provider_unless_fresh(key.clone(), rec, skip) {
                    outcome = svc.shed(tier, s.0);
                }
            }
            (Reply::Nothing, outcome)
        }
        Request::GetValue { key } => {
            let got = match refused() {
                Some(reason) => Err(reason),
                None => svc.providers.get_value(&key).await.map_err(|s| s.0),
            };
            let (record, outcome) = match got {
                Ok(r) => (r, Outcome::Ok),
                Err(reason) => (None, svc.shed(tier, reason)),
            };
            let closer = closer(&key);
            (Reply::Send(Response::GetValue { key, record, closer }), outcome)
        }
        Request::PutValue { key, mut record } => {
            let valid = match crate::providers::records::validate(&record, crate::store::now_ms()) {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "PUT_VALUE rejected");
                    return (Reply::Reset, Outcome::Invalid);
                }
            };
            if let Some(reason) = refused() {
                return (Reply::Reset, svc.shed(tier, reason));
            }
            record.time_received = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
            match svc.providers.put_value(&record, valid).await {
                Ok(true) => (Reply::Send(Response::PutValue { key, record }), Outcome::Ok),
                // A better record of the name is stored: go-libp2p-kad-dht answers an error too.
                Ok(false) => {
                    tracing::debug!(%peer, "PUT_VALUE of an older IPNS record rejected");
                    (Reply::Reset, Outcome::Invalid)
                }
                Err(s) => (Reply::Reset, svc.shed(tier, s.0)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerRecord> {
        (0..n)
            .map(|i| PeerRecord {
                peer: PeerId::random(),
                addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 4000 + i).parse().unwrap()],
            })
            .collect()
    }

    #[test]
    fn replies_are_cut_at_the_first_peer_that_does_not_fit() {
        let (mut closer, mut providers) = (peers(3), peers(3));
        let size = wire_bytes(&closer[0]);
        assert!(closer.iter().chain(&providers).all(|p| wire_bytes(p) == size));

        // Exactly four peers' worth: all closer peers and the first provider, nothing after.
        let left_out = within_bytes(4 * size, &mut closer, &mut providers);
        assert_eq!((closer.len(), providers.len(), left_out), (3, 1, 2));

        // One byte short of two peers: the second closer peer stops both lists.
        let (mut closer, mut providers) = (peers(3), peers(3));
        let left_out = within_bytes(2 * size - 1, &mut closer, &mut providers);
        assert_eq!((closer.len(), providers.len(), left_out), (1, 0, 5));

        // Room for everything: nothing left out.
        let (mut closer, mut providers) = (peers(3), peers(3));
        assert_eq!(within_bytes(usize::MAX / 2, &mut closer, &mut providers), 0);
    }
}
