//! Head identities at start-up and while running: lease them in the datastore (waiting out a
//! crashed previous run of the same node name), then renew the leases on a fixed cadence.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::identity::Seed;
use crate::load::LoadControl;
use crate::net::HeadShared;
use crate::store::{LeasedHead, Store, StoreError};

/// Lease the configured heads. Live leases of this node name held by another run are either a
/// crashed previous run's (they expire within `lease_ttl`) or another live process with the same
/// name: wait up to one lease lifetime, then give up with the conflict error. Also returns when
/// the successful attempt was sent: the heads' fences count from it.
pub(super) async fn lease_heads(
    store: &Store,
    cfg: &Config,
    token: &str,
    seed: Arc<Seed>,
) -> Result<(Vec<LeasedHead>, std::time::Instant), StoreError> {
    let deadline = tokio::time::Instant::now() + cfg.lease_ttl + Duration::from_secs(1);
    loop {
        let sent = std::time::Instant::now();
        match store.acquire_heads(&cfg.node_name, token, cfg.heads as u32, cfg.lease_ttl, seed.clone()).await
        {
            Err(StoreError::LeaseConflict { leases, .. }) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(
                    node = %cfg.node_name,
                    leases,
                    "head leases of this node name are still live (a crashed previous run, or another \
                     process with the same name); waiting for them to expire"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            res => return res.map(|l| (l, sent)),
        }
    }
}

/// Renews this process's head leases every third of their lifetime, recording head addresses.
pub(super) struct Heartbeat {
    pub(super) store: Store,
    pub(super) node: String,
    /// This run's lease token.
    pub(super) token: String,
    pub(super) ttl: Duration,
    pub(super) heads: Arc<Vec<Arc<HeadShared>>>,
    /// Told how many processes hold live leases (the fleet's statement budget is split by it).
    pub(super) load: Arc<LoadControl>,
}

impl Heartbeat {
    pub(super) async fn beat(&self) {
        let rows: Vec<(u32, String)> = self
            .heads
            .iter()
            .map(|h| {
                let addrs: Vec<String> = h.advertised.load().iter().map(|a| a.to_string()).collect();
                (h.identity, addrs.join(" "))
            })
            .collect();
        let sent = std::time::Instant::now();
        match self.store.renew_leases(&self.node, &self.token, self.ttl, &rows).await {
            Ok(held) => {
                for h in self.heads.iter() {
                    if held.contains(&h.identity) {
                        h.lease.renewed(sent, self.ttl);
                    } else if !h.lease.is_lost() {
                        h.lease.lost();
                        tracing::error!(
                            head = h.index,
                            identity = h.identity,
                            "lost the lease of head {} ({}): another process took over its identity \
                             (was this process paused or cut off longer than identity.lease_ttl?); \
                             the head stops, restart the process to lease another",
                            h.index,
                            h.peer_id
                        );
                    }
                }
            }
            // Not renewed: each head keeps serving until its fence (FENCE_SHARE × lease_ttl
            // after its last successful renewal), then stops until a renewal succeeds.
            Err(e) => tracing::warn!(error = %e, "renewing head leases failed; retrying"),
        }
        if self.load.config().fleet_datastore_statements_per_second > 0 {
            self.count_fleet().await;
        }
    }

    /// Count the processes (node names) holding live leases, for the fleet's statement budget.
    async fn count_fleet(&self) {
        match self.store.count_live_processes().await {
            Ok(n) => self.load.set_fleet_processes(u32::try_from(n).unwrap_or(u32::MAX).max(1)),
            Err(e) => {
                tracing::warn!(error = %e, "counting the fleet's processes failed; the budget split stays")
            }
        }
    }

    pub(super) async fn run(self, cancel: CancellationToken) {
        // A fixed cadence, not "sleep after each renewal": slow renewals must not stretch it.
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; `start` renewed just now
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.beat().await,
            }
        }
    }
}
