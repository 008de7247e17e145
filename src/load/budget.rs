//! The datastore statement budget: a per-process ceiling on statements per second.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// The per-process budget of datastore statements per second (governor GCRA). Statements wait
/// for it, they are never dropped by it. The burst is 1/20 of the rate (50 ms worth): any window
/// of T seconds holds at most rate × T + rate / 20 statements — 1.05 × the rate over one second,
/// 1.01 × over five.
#[derive(Default)]
pub struct StatementBudget {
    limiter: ArcSwapOption<DirectLimiter>,
    /// Observes how long statements waited (`hydra_load_statement_budget_wait_seconds`).
    wait: Option<prometheus::Histogram>,
    /// Statements waiting for the budget now.
    waiting: AtomicUsize,
}

impl StatementBudget {
    /// An unlimited budget (until [`Self::set`]) whose waits are observed in `wait`.
    pub fn new(wait: prometheus::Histogram) -> Self {
        Self { limiter: ArcSwapOption::empty(), wait: Some(wait), waiting: AtomicUsize::new(0) }
    }

    /// Whether statements are waiting for the budget right now: the datastore work this process
    /// may do is used up, so per-peer fairness applies even in the normal tier.
    pub fn is_exhausted(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Budget `per_second` statements per second; 0 removes the limit.
    pub fn set(&self, per_second: u32) {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(per_second / 20).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)))
        });
        self.limiter.store(limiter);
    }

    /// Wait until `n` statements may run.
    pub async fn take(&self, n: u32) {
        let Some(limiter) = self.limiter.load_full() else { return };
        for _ in 0..n {
            if limiter.check().is_ok() {
                continue;
            }
            let start = std::time::Instant::now();
            self.waiting.fetch_add(1, Ordering::Relaxed);
            let _done = Waiting(&self.waiting);
            limiter.until_ready().await;
            if let Some(h) = &self.wait {
                h.observe(start.elapsed().as_secs_f64());
            }
        }
    }
}

/// Takes one statement off the waiting count when the wait ends (or the waiter is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
