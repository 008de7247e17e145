//! What each tier does: the one table the request path asks, once per request.
//!
//! The stream tasks, the intake and the per-peer limiter read a [`Policy`] instead of comparing
//! tiers themselves, so changing what a tier does is a change here (and to the table in
//! `ARCHITECTURE.md`), not a hunt through the request path.

use crate::types::Tier;

/// What the node does in one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The tier this policy belongs to (sheds are counted by it).
    pub tier: Tier,
    /// Requests that wait for the datastore (GET_PROVIDERS, GET_VALUE, PUT_VALUE) are served.
    /// When false they are shed: GET_PROVIDERS and GET_VALUE answer with a cached answer or
    /// closer peers only, PUT_VALUE is reset.
    pub datastore: bool,
    /// ADD_PROVIDER is taken into the write buffer. The buffer is bounded (beyond its bound it
    /// sheds, counted) and its flushes wait for the statement budget, so buffering never adds
    /// load on the datastore beyond the budget — and an announcement refused at the door would
    /// be lost, while one buffered survives a slow datastore. Off only in `peak` (memory).
    pub buffer_writes: bool,
    /// GET_PROVIDERS for a key this head is not among the k closest to is answered from the
    /// cache only (a miss: closer peers only). Keys it is responsible for still reach the
    /// datastore (go-libp2p-kad-dht #730).
    pub far_keys_from_cache_only: bool,
    /// An ADD_PROVIDER refreshing a record this process wrote that still has more than
    /// `load.degrade_skip_refresh_if_remaining` to live is acknowledged without a write.
    pub skip_fresh_refreshes: bool,
    /// Per-peer fair shares of datastore statements apply (`load.per_peer_*`). Off in `normal`:
    /// a node with spare capacity answers every peer in full — to a DHT client a shed
    /// GET_PROVIDERS is indistinguishable from "nobody provides this". (They also apply in
    /// `normal` while statements wait for the datastore budget: [`crate::load::LoadControl::allow_peer`].)
    /// Cached answers are free: never limited.
    pub per_peer_limits: bool,
    /// Peers share the statement budget divided by `load.degrade_per_peer_cost`.
    pub raised_peer_cost: bool,
    /// New inbound kad streams are accepted; when false the handler resets them. Open streams
    /// keep being served.
    pub new_streams: bool,
}

impl Policy {
    /// The policy of `tier`. FIND_NODE and PING never touch the datastore and are served in
    /// every tier (on open streams in `peak`), without a per-peer limit.
    pub const fn of(tier: Tier) -> Policy {
        let normal = Policy {
            tier,
            datastore: true,
            buffer_writes: true,
            far_keys_from_cache_only: false,
            skip_fresh_refreshes: false,
            per_peer_limits: false,
            raised_peer_cost: false,
            new_streams: true,
        };
        match tier {
            Tier::Normal => normal,
            Tier::Degrade => Policy {
                far_keys_from_cache_only: true,
                skip_fresh_refreshes: true,
                per_peer_limits: true,
                raised_peer_cost: true,
                ..normal
            },
            // No lookups; announcements are still buffered (fresh refreshes not rewritten).
            Tier::Refuse => Policy {
                datastore: false,
                skip_fresh_refreshes: true,
                per_peer_limits: true,
                raised_peer_cost: true,
                ..normal
            },
            Tier::Peak => Policy {
                datastore: false,
                buffer_writes: false,
                skip_fresh_refreshes: true,
                per_peer_limits: true,
                raised_peer_cost: true,
                new_streams: false,
                ..normal
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_higher_tier_never_does_more_work_than_a_lower_one() {
        for pair in Tier::ALL.windows(2) {
            let (lo, hi) = (Policy::of(pair[0]), Policy::of(pair[1]));
            assert!(hi.datastore <= lo.datastore, "{pair:?}");
            assert!(hi.buffer_writes <= lo.buffer_writes, "{pair:?}");
            assert!(hi.skip_fresh_refreshes >= lo.skip_fresh_refreshes, "{pair:?}");
            assert!(hi.new_streams <= lo.new_streams, "{pair:?}");
            assert!(hi.raised_peer_cost >= lo.raised_peer_cost, "{pair:?}");
            assert!(hi.per_peer_limits >= lo.per_peer_limits, "{pair:?}");
            // Cache-only reads only make sense while the datastore serves lookups.
            if hi.datastore {
                assert!(hi.far_keys_from_cache_only >= lo.far_keys_from_cache_only, "{pair:?}");
            }
        }
        let normal = Policy::of(Tier::Normal);
        assert!(normal.datastore && normal.new_streams && !normal.far_keys_from_cache_only);
        assert!(!normal.per_peer_limits, "a node with spare capacity limits no peer");
        assert!(!Policy::of(Tier::Peak).new_streams && !Policy::of(Tier::Refuse).datastore);
        assert!(
            Policy::of(Tier::Refuse).buffer_writes,
            "a slow datastore is no reason to lose announcements"
        );
    }
}
