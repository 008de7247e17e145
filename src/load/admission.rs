//! Admission of new inbound streams by rate while the CPU is short.
//!
//! When the node's CPU is saturated, answering every request with less (closer peers only)
//! costs about as much as a real answer, so it does not free the CPU. Instead new streams are
//! admitted at the rate the node can serve and the rest reset at once, in the stream muxer
//! ([`crate::net::admit`]) — the cheapest point we control, before negotiation, a stream task,
//! a queue slot or a decode. Streams already open keep being
//! served, and once a request is read the tier's [`super::Policy`] applies (FIND_NODE and PING
//! always served). See `docs/decisions/2026-12-01-admission-by-rate.md`.
//!
//! The rate is computed in one place, the load controller, from the measured runtime lag
//! ([`crate::types::Signals::runtime_lag_ms`]) by [`RateControl`]: additive increase while the
//! lag is low, multiplicative decrease while it is high — the rule that lets TCP find a link's
//! capacity without knowing it. The request path only asks [`Admission::admit`] (one atomic
//! load, and a GCRA check while limited).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The gate of new inbound streams.
enum Gate {
    /// Every new stream is admitted.
    Open,
    /// New streams are admitted at this rate (streams/s), in bursts of at most 100 ms of it.
    Rate(u32, DefaultDirectRateLimiter),
    /// No new stream is admitted (a forced rate of 0).
    Closed,
}

/// The admission gate the muxers ask once per new inbound stream.
pub struct Admission {
    gate: ArcSwap<Gate>,
    /// New streams offered and admitted so far (the controller's rate measurements).
    offered: AtomicU64,
    admitted: AtomicU64,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            gate: ArcSwap::from_pointee(Gate::Open),
            offered: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        }
    }
}

impl Admission {
    /// Whether one more new stream may be served now. False: reset it.
    pub fn admit(&self) -> bool {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let yes = match &**self.gate.load() {
            Gate::Open => true,
            Gate::Rate(_, l) => l.check().is_ok(),
            Gate::Closed => false,
        };
        if yes {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        yes
    }

    /// The admitted rate in force (None: every stream admitted).
    pub fn limit(&self) -> Option<u32> {
        match &**self.gate.load() {
            Gate::Open => None,
            Gate::Rate(r, _) => Some(*r),
            Gate::Closed => Some(0),
        }
    }

    /// Admit every stream (None) or `rate` streams/s (0: none).
    pub(crate) fn set(&self, rate: Option<u32>) {
        if rate == self.limit() {
            return;
        }
        let gate = match rate.map(NonZeroU32::new) {
            None => Gate::Open,
            Some(None) => Gate::Closed,
            Some(Some(r)) => {
                let burst = NonZeroU32::new(r.get() / 10).unwrap_or(NonZeroU32::MIN);
                Gate::Rate(r.get(), RateLimiter::direct(Quota::per_second(r).allow_burst(burst)))
            }
        };
        self.gate.store(Arc::new(gate));
    }

    /// (offered, admitted) new streams so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.offered.load(Ordering::Relaxed), self.admitted.load(Ordering::Relaxed))
    }
}

/// The controller's rule for the admitted rate, one step per sample.
#[derive(Debug, Default)]
pub(crate) struct RateControl {
    /// The admitted rate while limiting, streams/s.
    rate: Option<f64>,
}

/// Inputs of one step.
pub(crate) struct RateInput {
    /// The runtime lag signal, ms.
    pub lag_ms: f64,
    /// The lag at which admission starts limiting (0: never).
    pub target_ms: f64,
    /// Below `exit_ratio` × target the rate grows; it stops limiting once it exceeds what is
    /// offered by half.
    pub exit_ratio: f64,
    /// New streams offered and admitted per second since the last step.
    pub offered_per_s: f64,
    pub admitted_per_s: f64,
    /// The rate never goes below this (the node stays reachable).
    pub floor: f64,
}

impl RateControl {
    /// The next admitted rate (None: admit all).
    pub(crate) fn step(&mut self, i: &RateInput) -> Option<u32> {
        let high = i.target_ms > 0.0 && i.lag_ms >= i.target_ms;
        let low = i.target_ms <= 0.0 || i.lag_ms < i.target_ms * i.exit_ratio;
        self.rate = match self.rate {
            // Start from what was served when the lag rose, a little less.
            None if high => Some((i.admitted_per_s * 0.9).max(i.floor)),
            None => None,
            Some(r) if high => Some((r * 0.85).max(i.floor)),
            Some(r) if low && r > i.offered_per_s * 1.5 => None,
            // Additive increase: 5 % of the rate plus the floor's share per step.
            Some(r) if low => Some(r * 1.05 + i.floor * 0.1),
            Some(r) => Some(r),
        };
        self.rate.map(|r| r.min(f64::from(u32::MAX)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(lag_ms: f64, offered: f64, admitted: f64) -> RateInput {
        RateInput {
            lag_ms,
            target_ms: 20.0,
            exit_ratio: 0.5,
            offered_per_s: offered,
            admitted_per_s: admitted,
            floor: 50.0,
        }
    }

    #[test]
    fn the_rate_falls_while_the_lag_is_high_and_recovers_when_it_is_low() {
        let mut c = RateControl::default();
        assert_eq!(c.step(&input(5.0, 3000.0, 3000.0)), None, "low lag: everything admitted");
        let first = c.step(&input(40.0, 5000.0, 1000.0)).unwrap();
        assert_eq!(first, 900, "starts just below what was admitted");
        let mut r = first;
        for _ in 0..3 {
            r = c.step(&input(40.0, 5000.0, f64::from(r))).unwrap();
        }
        assert!(r < 600, "{r}: still high lag, still falling");
        for _ in 0..200 {
            r = c.step(&input(40.0, 5000.0, f64::from(r))).unwrap();
        }
        assert_eq!(r, 50, "never below the floor");
        let held = c.step(&input(15.0, 5000.0, 50.0)).unwrap();
        assert_eq!(held, 50, "between exit and target: held");
        let up = c.step(&input(2.0, 5000.0, 50.0)).unwrap();
        assert!(up > 50, "low lag: grows");
        // Offered load gone: the gate opens once the rate exceeds what is offered by half.
        let mut out = Some(up);
        for _ in 0..200 {
            out = c.step(&input(2.0, 100.0, 100.0));
            if out.is_none() {
                break;
            }
        }
        assert_eq!(out, None);
    }

    #[test]
    fn the_gate_admits_at_its_rate_and_closed_admits_nothing() {
        let a = Admission::default();
        assert!((0..1000).all(|_| a.admit()));
        a.set(Some(100));
        let n = (0..1000).filter(|_| a.admit()).count();
        assert!((1..=20).contains(&n), "{n}: a burst of 100 ms of 100/s");
        a.set(Some(0));
        assert!(!a.admit());
        assert_eq!(a.limit(), Some(0));
        a.set(None);
        assert!(a.admit());
        assert_eq!(a.counts().0, 2002, "every stream asked is counted");
    }
}
