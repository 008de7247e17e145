//! Admission of new inbound streams and connections while the CPU is short.
//!
//! When the node's CPU is saturated, answering every request with less (closer peers only)
//! costs about as much as a real answer, so it does not free the CPU. Instead new streams are
//! admitted at the rate the node can serve and the rest reset at once, in the stream muxer
//! ([`crate::net::admit`]) — before negotiation, a stream task, a queue slot or a decode. Streams
//! already open keep being served, and once a request is read the tier's [`super::Policy`]
//! applies (FIND_NODE and PING always served). See
//! `docs/decisions/2026-12-01-admission-by-rate.md`.
//!
//! A reset stream still costs its transport work (its frames decrypted, a reset written): about
//! 0.3 of a served request. Far past capacity that alone eats the CPU, so the node also sheds
//! **connections** ([`ShedControl`]): while most new streams are being reset, inbound
//! connections are closed — a share of them, drawn at their next new stream — so that the ones
//! kept offer about what the node serves, and new inbound connections are refused before their
//! handshake; while the CPU is short but not shedding, new connections are admitted by rate (a
//! handshake costs several requests). A client whose connection was closed learns at once and
//! goes elsewhere, as the DHT's clients do with an unreachable peer; a refused dial costs the
//! node an accept and a close. See `docs/decisions/2026-12-07-shedding-connections.md`.
//!
//! The rates are computed in one place, the load controller, from the measured runtime lag
//! ([`crate::types::Signals::runtime_lag_ms`]) and the streams offered and admitted:
//! [`RateControl`] (additive increase while the lag is low, multiplicative decrease while it is
//! high — the rule that lets TCP find a link's capacity without knowing it) and [`ShedControl`].
//! The request path only asks [`Admission::admit`] (one atomic load, and a GCRA check while
//! limited), a muxer [`Admission::keep_connection`] (one atomic load) and a new connection
//! [`Admission::admit_connection`].

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

/// The admission gate the muxers ask once per new inbound stream, and the heads once per new
/// inbound connection.
pub struct Admission {
    gate: ArcSwap<Gate>,
    /// New streams offered and admitted so far (the controller's rate measurements).
    offered: AtomicU64,
    admitted: AtomicU64,
    /// New inbound connections: all admitted, by rate, or none.
    connections: ArcSwap<Gate>,
    /// Connection shedding: each inbound connection draws once per epoch, at its first new
    /// stream after the epoch began, and is kept with probability `keep_ppm` / 10⁶.
    epoch: AtomicU64,
    keep_ppm: AtomicU32,
    /// Whether the heads' TCP listeners are open (false: closed, the kernel refuses new dials;
    /// `crate::net::door`). A watch, so that a head's transport wakes when it changes.
    listeners: tokio::sync::watch::Sender<bool>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            gate: ArcSwap::from_pointee(Gate::Open),
            offered: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            connections: ArcSwap::from_pointee(Gate::Open),
            epoch: AtomicU64::new(0),
            keep_ppm: AtomicU32::new(1_000_000),
            listeners: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// Builds a gate admitting `rate` per second (None: all; 0: none), in bursts of at most 100 ms of
/// it (at least one).
fn gate_of(rate: Option<u32>) -> Gate {
    match rate.map(NonZeroU32::new) {
        None => Gate::Open,
        Some(None) => Gate::Closed,
        Some(Some(r)) => {
            let burst = NonZeroU32::new(r.get() / 10).unwrap_or(NonZeroU32::MIN);
            Gate::Rate(r.get(), RateLimiter::direct(Quota::per_second(r).allow_burst(burst)))
        }
    }
}

impl Gate {
    fn pass(&self) -> bool {
        match self {
            Gate::Open => true,
            Gate::Rate(_, l) => l.check().is_ok(),
            Gate::Closed => false,
        }
    }

    fn limit(&self) -> Option<u32> {
        match self {
            Gate::Open => None,
            Gate::Rate(r, _) => Some(*r),
            Gate::Closed => Some(0),
        }
    }
}

impl Admission {
    /// Whether one more new stream may be served now. False: reset it.
    pub fn admit(&self) -> bool {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let yes = self.gate.load().pass();
        if yes {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        yes
    }

    /// The admitted rate in force (None: every stream admitted).
    pub fn limit(&self) -> Option<u32> {
        self.gate.load().limit()
    }

    /// Admit every stream (None) or `rate` streams/s (0: none).
    pub(crate) fn set(&self, rate: Option<u32>) {
        if rate == self.limit() {
            return;
        }
        self.gate.store(Arc::new(gate_of(rate)));
    }

    /// Whether a new inbound connection may start its handshake now. False: close it unread.
    pub fn admit_connection(&self) -> bool {
        self.connections.load().pass()
    }

    /// The admitted rate of new inbound connections (None: all; 0: none).
    pub fn connection_limit(&self) -> Option<u32> {
        self.connections.load().limit()
    }

    /// Admit every new inbound connection (None) or `rate` per second (0: none).
    pub(crate) fn set_connections(&self, rate: Option<u32>) {
        if rate != self.connection_limit() {
            self.connections.store(Arc::new(gate_of(rate)));
        }
    }

    /// Whether TCP listeners are open (see [`Admission::set_listeners`]), and a wake-up when
    /// that changes.
    pub fn listeners(&self) -> tokio::sync::watch::Receiver<bool> {
        self.listeners.subscribe()
    }

    /// Whether TCP listeners are open now.
    pub fn listeners_open(&self) -> bool {
        *self.listeners.borrow()
    }

    /// Open (true) or close the heads' TCP listeners: closed while no new inbound connection is
    /// admitted at all, so the kernel refuses a dial instead of the node accepting and closing it.
    pub(crate) fn set_listeners(&self, open: bool) {
        self.listeners.send_if_modified(|o| std::mem::replace(o, open) != open);
    }

    /// The current shedding epoch: what a new inbound connection starts with (it draws only in
    /// epochs that begin after it was established).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Asked by an inbound connection's muxer as a new stream arrives, with the epoch it last
    /// drew in: false if the connection is to be closed. One atomic load unless a new epoch
    /// began; then one random draw.
    pub fn keep_connection(&self, drawn: &mut u64) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch == *drawn {
            return true;
        }
        *drawn = epoch;
        rand::random::<u32>() % 1_000_000 < self.keep_ppm.load(Ordering::Relaxed)
    }

    /// Begin an epoch in which each inbound connection is kept with probability `keep`.
    pub(crate) fn cut_connections(&self, keep: f64) {
        self.keep_ppm.store((keep.clamp(0.0, 1.0) * 1e6) as u32, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// End the cut in force: connections that have not drawn in it yet are kept. (A cut begun
    /// just before the load fell would otherwise still close connections at their next stream,
    /// long after the node had room.)
    pub(crate) fn end_cut(&self) {
        self.keep_ppm.store(1_000_000, Ordering::Relaxed);
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
    /// Samples since the last decrease: the lag is a mean over the last second, so a decrease
    /// shows in it only a second later — decreasing again before would overshoot.
    since_decrease: u32,
    /// The node's capacity as last shown: the admitted rate at the last sample in which the gate
    /// was binding (more offered than admitted) and the lag low. Kept while the gate is open —
    /// after connections were cut, little is offered for a while, and the clients let back in
    /// must be measured against what the node served, not against an open gate — and forgotten
    /// after [`CAPACITY_MEMORY_S`] without limiting.
    capacity: Option<f64>,
    /// Samples since the gate last limited.
    open_for: u32,
    /// The most requests served per second in a sample with a low lag, and the samples since it
    /// was set (replaced by the current rate after [`CAPACITY_MEMORY_S`]): what the node was
    /// just shown to serve. The gate starts from no less than 0.9 × it — at the onset of an
    /// overload the sample in which the lag rises serves far less (the queue is full of streams
    /// reset late), and a gate started from that sample cut connections toward it: under a
    /// 0.5-core quota the node served 4,271/s, the gate started at 1,163/s, the cut kept 14 %
    /// of the clients, and the node then served a third of C for a minute with its lag at 1 ms.
    served_shown: f64,
    served_shown_for: u32,
}

/// Seconds with the gate open after which the remembered capacity is forgotten.
const CAPACITY_MEMORY_S: u32 = 60;

/// Of the streams admitted, more than this share reset unserved counts as CPU distress.
const LATE_SHARE: f64 = 0.05;

/// What both rules, [`RateControl`]'s and [`ShedControl`]'s, read of one sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// The runtime lag signal, ms.
    pub lag_ms: f64,
    /// The lag at which admission starts limiting (0: never).
    pub target_ms: f64,
    /// Below `exit_ratio` × target the lag is low: the rate grows, and it stops limiting once
    /// it exceeds what is offered by half.
    pub exit_ratio: f64,
    /// New streams offered per second since the last step.
    pub offered_per_s: f64,
    /// Samples per second (the controller's `sample_interval`).
    pub samples_per_s: f64,
}

impl Reading {
    /// Whether the lag is below `exit_ratio` × its target (always, with admission by rate off).
    fn lag_low(&self) -> bool {
        self.target_ms <= 0.0 || self.lag_ms < self.target_ms * self.exit_ratio
    }

    /// The steps in a second.
    fn second(&self) -> u32 {
        self.samples_per_s.ceil().max(1.0) as u32
    }
}

/// Inputs of one step.
pub(crate) struct RateInput {
    pub reading: Reading,
    /// New streams admitted per second since the last step.
    pub admitted_per_s: f64,
    /// Requests answered per second since the last step: what the node serves now. When the
    /// lag rises everything offered was being admitted, so the admitted rate says nothing of
    /// capacity; what was answered does.
    pub served_per_s: f64,
    /// Streams admitted and then reset unserved per second (queue full or waited too long):
    /// more than [`LATE_SHARE`] of those admitted is CPU short as much as a high lag is.
    pub late_per_s: f64,
    /// The rate never goes below this (the node stays reachable).
    pub floor: f64,
}

impl RateControl {
    /// The next admitted rate (None: admit all).
    pub(crate) fn step(&mut self, i: &RateInput) -> Option<u32> {
        // Admitted but reset unserved: the lag (a one-second mean) may not show yet what the
        // queue already does — once it has begun to rise. With the lag still low, streams that
        // waited behind a burst (a node starting, dozens of peers dialling at once) are the
        // burst, not a CPU short of capacity: limiting on them alone started the gate at its
        // floor and closed the door to a node with spare capacity.
        let r = &i.reading;
        let late = r.target_ms > 0.0 && !r.lag_low() && i.late_per_s > LATE_SHARE * i.admitted_per_s.max(1.0);
        let high = r.target_ms > 0.0 && r.lag_ms >= r.target_ms || late;
        let low = r.lag_low(); // never late: late needs the lag risen above low
        let second = r.second();
        self.since_decrease = self.since_decrease.saturating_add(1);
        let decrease = high && self.since_decrease >= second;
        if decrease || (high && self.rate.is_none()) {
            self.since_decrease = 0;
        }
        // A binding gate with a low lag shows a rate the node serves; so does what an open gate
        // let through with a low lag.
        if let Some(r) = self.rate {
            if low && i.reading.offered_per_s > r {
                self.capacity = Some(r);
            }
            self.open_for = 0;
        } else {
            if low {
                self.capacity = self.capacity.map(|c| c.max(i.served_per_s));
            }
            self.open_for = self.open_for.saturating_add(1);
            if self.open_for >= CAPACITY_MEMORY_S * second {
                self.capacity = None;
            }
        }
        if low {
            self.served_shown_for = self.served_shown_for.saturating_add(1);
            if i.served_per_s >= self.served_shown || self.served_shown_for >= CAPACITY_MEMORY_S * second {
                self.served_shown = i.served_per_s;
                self.served_shown_for = 0;
            }
        }
        let remembered = self.capacity.unwrap_or(0.0).max(self.served_shown) * 0.9;
        self.rate = match self.rate {
            // Start from what was served when the lag rose (or, if more, from the capacity last
            // shown or the most served with a low lag lately: right after a cut the clients let
            // back in bring their handshakes before their requests, and at an onset the sample
            // that shows the lag serves little), a little less.
            None if high => Some((i.admitted_per_s.min(i.served_per_s) * 0.9).max(remembered).max(i.floor)),
            None => None,
            Some(r) if decrease => Some((r * 0.85).max(i.floor)),
            Some(r) if low && r > i.reading.offered_per_s * 1.5 => None,
            // Additive increase: 5 % of the rate plus the floor's share per step.
            Some(r) if low => Some(r * 1.05 + i.floor * 0.1),
            Some(r) => Some(r),
        };
        self.rate.map(|r| r.min(f64::from(u32::MAX)) as u32)
    }

    /// The capacity last shown (streams/s), while remembered.
    pub(crate) fn capacity(&self) -> Option<f64> {
        self.capacity
    }
}

/// The controller's rule for connections, one step per sample, after [`RateControl`]'s.
///
/// **Open:** every new inbound connection admitted. **Limited:** once the stream gate limits (the
/// CPU is short), new connections are admitted at `connections_per_s` — a handshake costs
/// several requests — and only while there is room: for three seconds fewer streams offered
/// than 0.9 × what the node serves (the gate's rate while it limits, else the capacity it last
/// showed, [`RateControl::capacity`]) and a low lag. A client let in without room only brings
/// streams to reset; without room but with a low lag and a capacity remembered, a trickle (a
/// tenth of the rate) still comes in, so that a capacity shown at a bad moment is corrected.
/// Once admitting, while there is room, the rate grows by `connections_per_s` every second, and once the gate
/// has been open for ten seconds with room all are admitted again (the clients turned away come
/// back gradually, not in one storm of handshakes). **Shedding:** once the new streams offered
/// exceed `shed_ratio` × the admitted rate for two samples in a row — more than half reset at
/// `shed_ratio` 2 — new connections are refused, and connections are cut: each inbound
/// connection is kept with probability `CUT_HEADROOM` (1.15) × what the node serves ÷ offered
/// (at most 0.9, at least 0.05), drawn at its next new stream, so that those kept offer a
/// little more than is admitted and the stream gate keeps trimming. What the node serves is
/// here the larger of the gate's rate and the capacity last shown: a gate pulled down by a
/// burst of handshakes or refusals must not take most of the clients with it. Another cut
/// follows every second while the excess lasts (what was cut shows in the offered rate only
/// once those clients are gone). Shedding ends, into Limited, after two seconds in which the
/// gate reset fewer than it admitted and the lag was below `exit_ratio` × its target.
#[derive(Debug, Default)]
pub(crate) struct ShedControl {
    mode: Mode,
    /// Samples in a row with the excess (outside shedding).
    over: u32,
    /// Samples in a row with room for another client.
    roomy: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Mode {
    #[default]
    Open,
    /// New connections at `rate`/s; `calm`: samples in a row with room and the gate open.
    Limited { rate: f64, calm: u32 },
    /// `since_cut`: samples since the last cut; `calm`: samples in a row with less reset than
    /// admitted and a low lag.
    Shedding { since_cut: u32, calm: u32 },
}

/// Kept connections offer about this much more than the stream gate admits.
const CUT_HEADROOM: f64 = 1.15;
/// Seconds of room with the gate open after which every new connection is admitted again.
const OPEN_AFTER_S: u32 = 10;
/// While limited, new connections are admitted only once the streams offered have been below
/// this share of what the node serves (and the lag low) for `ROOM_AFTER_S` seconds: right after
/// a cut there is room only until the clients cut are let back in.
const ROOM: f64 = 0.9;
const ROOM_AFTER_S: u32 = 3;
/// Seconds of a calm gate after which shedding ends.
const SHED_CALM_S: u32 = 2;

/// Inputs of one step.
pub(crate) struct ShedInput {
    pub reading: Reading,
    /// The stream gate's admitted rate after this step (None: open).
    pub rate: Option<f64>,
    /// The capacity the stream gate last showed ([`RateControl::capacity`]), streams/s.
    pub capacity: Option<f64>,
    /// Shed connections past this many offered per admitted stream (0: never).
    pub shed_ratio: f64,
    /// New connections per second while the CPU is short and the node is not shedding; also the
    /// step by which that rate grows each calm second.
    pub connections_per_s: u32,
}

/// What a step decided.
#[derive(Debug, PartialEq)]
pub(crate) struct ShedStep {
    /// Begin a cut keeping each connection with this probability.
    pub cut: Option<f64>,
    /// New connections admitted per second (None: all).
    pub connections: Option<u32>,
}

impl ShedControl {
    pub(crate) fn shedding(&self) -> bool {
        matches!(self.mode, Mode::Shedding { .. })
    }

    pub(crate) fn step(&mut self, i: &ShedInput) -> ShedStep {
        let rate = i.rate.unwrap_or(f64::INFINITY);
        // What the node serves: the gate's rate while it limits, else the capacity last shown
        // (unknown: unbounded).
        let serves = i.rate.or(i.capacity).unwrap_or(f64::INFINITY);
        let offered = i.reading.offered_per_s;
        let lag_low = i.reading.lag_low();
        let excess = i.shed_ratio > 0.0 && offered > i.shed_ratio * rate;
        // Cut toward what the node serves; a gate pulled below its capacity by a burst of
        // handshakes or refusals must not take most of the clients with it.
        let kept_for = rate.max(i.capacity.unwrap_or(0.0));
        let keep = || (CUT_HEADROOM * kept_for / offered.max(1.0)).clamp(0.05, 0.9);
        // Room for more clients: what is offered leaves a share of what the node serves free.
        let room_now = lag_low && offered <= ROOM * serves;
        let per_s = i.reading.samples_per_s.max(1e-3);
        let second = i.reading.second();
        let floor = f64::from(i.connections_per_s);
        let mut cut = None;
        self.over = if excess && !self.shedding() { self.over + 1 } else { 0 };
        self.mode = match self.mode {
            _ if self.over >= 2 => {
                self.over = 0;
                cut = Some(keep());
                Mode::Shedding { since_cut: 0, calm: 0 }
            }
            Mode::Open if i.rate.is_some() => Mode::Limited { rate: floor, calm: 0 },
            Mode::Open => Mode::Open,
            Mode::Limited { rate: r, calm } => {
                if room_now {
                    // The rate grows once connections are being admitted (room for
                    // `ROOM_AFTER_S` already); all are admitted after ten seconds of room with
                    // the gate open.
                    let admitting = self.roomy >= ROOM_AFTER_S * second;
                    let calm = if i.rate.is_none() { calm + 1 } else { 0 };
                    if calm >= OPEN_AFTER_S * second {
                        Mode::Open
                    } else {
                        Mode::Limited { rate: if admitting { r + floor / per_s } else { r }, calm }
                    }
                } else if lag_low {
                    Mode::Limited { rate: r, calm: 0 }
                } else {
                    Mode::Limited { rate: floor, calm: 0 }
                }
            }
            Mode::Shedding { since_cut, calm } => {
                let mut since_cut = since_cut + 1;
                if excess && since_cut >= second {
                    since_cut = 0;
                    cut = Some(keep());
                }
                // The gate reset fewer than it admitted, and the lag is low.
                let calm = if offered <= 2.0 * rate && lag_low { calm + 1 } else { 0 };
                if calm >= SHED_CALM_S * second {
                    Mode::Limited { rate: floor, calm: 0 }
                } else {
                    Mode::Shedding { since_cut, calm }
                }
            }
        };
        // Room for another client, counted only while limited: the gate resets nothing (it admits
        // more than is offered) and the lag is low. Without room a new connection would only bring more to reset.
        let limited = matches!(self.mode, Mode::Limited { .. });
        self.roomy = if limited && room_now { self.roomy + 1 } else { 0 };
        let room = self.roomy >= ROOM_AFTER_S * second;
        let connections = match self.mode {
            Mode::Open => None,
            Mode::Limited { rate, .. } if room => Some(rate.min(f64::from(u32::MAX)) as u32),
            // A low lag without room by the capacity last shown: a trickle, so that a capacity
            // shown at a bad moment (a storm of handshakes) is corrected by what comes in.
            // (None if connections_per_s is 0: then none while the CPU is short.)
            Mode::Limited { .. } if lag_low && i.capacity.is_some() => {
                Some((i.connections_per_s / 10).max(u32::from(i.connections_per_s > 0)))
            }
            Mode::Limited { .. } | Mode::Shedding { .. } => Some(0),
        };
        ShedStep { cut, connections }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(lag_ms: f64, offered: f64, admitted: f64) -> RateInput {
        RateInput {
            reading: Reading {
                lag_ms,
                target_ms: 20.0,
                exit_ratio: 0.5,
                offered_per_s: offered,
                samples_per_s: 1.0,
            },
            admitted_per_s: admitted,
            served_per_s: admitted,
            late_per_s: 0.0,
            floor: 50.0,
        }
    }

    #[test]
    fn the_rate_falls_while_the_lag_is_high_and_recovers_when_it_is_low() {
        let mut c = RateControl::default();
        assert_eq!(c.step(&input(5.0, 500.0, 500.0)), None, "low lag: everything admitted");
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
    fn streams_reset_unserved_limit_the_rate_as_a_high_lag_does() {
        let mut c = RateControl::default();
        // The lag risen above its low mark (0.5 × 20 ms) but below its target.
        let late = |n| RateInput { late_per_s: n, ..input(12.0, 3000.0, 3000.0) };
        assert_eq!(c.step(&late(100.0)), None, "3 % reset late: noise");
        assert_eq!(
            c.step(&late(600.0)),
            Some(2700),
            "20 % reset late: limited though the lag is below its target"
        );
        assert_eq!(c.step(&RateInput { late_per_s: 600.0, ..input(12.0, 3000.0, 2700.0) }), Some(2295));
        assert!(c.step(&input(5.0, 3000.0, 2295.0)).unwrap() > 2295, "none late, a low lag: grows");
        // A burst: half of 40 streams late while the lag stays low (a node starting while its
        // peers dial it) is not a CPU short of capacity.
        let burst = RateInput { late_per_s: 20.0, ..input(5.0, 40.0, 40.0) };
        assert_eq!(RateControl::default().step(&burst), None, "late in a burst with a low lag: not limited");
        let mut off = late(600.0);
        off.reading.target_ms = 0.0;
        assert_eq!(RateControl::default().step(&off), None, "admission by rate off: never");
    }

    #[test]
    fn the_rate_falls_at_most_once_per_second() {
        let mut c = RateControl::default();
        let at = |lag| {
            let mut i = input(lag, 5000.0, 1000.0);
            i.reading.samples_per_s = 4.0;
            i
        };
        assert_eq!(c.step(&at(40.0)), Some(900));
        for _ in 0..3 {
            assert_eq!(c.step(&at(40.0)), Some(900), "the lag's window still holds the old rate");
        }
        assert_eq!(c.step(&at(40.0)), Some(765), "a second later: × 0.85");
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

    fn shed_input(offered: f64, rate: Option<f64>, lag_ms: f64) -> ShedInput {
        ShedInput {
            reading: Reading {
                lag_ms,
                target_ms: 20.0,
                exit_ratio: 0.7,
                offered_per_s: offered,
                samples_per_s: 4.0,
            },
            rate,
            capacity: None,
            shed_ratio: 2.0,
            connections_per_s: 20,
        }
    }

    #[test]
    fn connections_are_shed_only_past_the_ratio_and_cut_toward_the_admitted_rate() {
        let mut c = ShedControl::default();
        let open = ShedStep { cut: None, connections: None };
        assert_eq!(c.step(&shed_input(5000.0, None, 5.0)), open, "gate open: every connection admitted");
        let first: Vec<ShedStep> = (0..12).map(|_| c.step(&shed_input(800.0, Some(1000.0), 5.0))).collect();
        assert_eq!(first[10].connections, Some(0), "room, not for 3 s yet");
        assert_eq!(
            first[11],
            ShedStep { cut: None, connections: Some(20) },
            "CPU short, nothing reset, a low lag for 3 s: room for new connections, by rate"
        );
        assert_eq!(
            c.step(&shed_input(1500.0, Some(1000.0), 30.0)),
            ShedStep { cut: None, connections: Some(0) },
            "a third reset: no room for more clients, none cut"
        );
        assert_eq!(c.step(&shed_input(5000.0, Some(1000.0), 30.0)).cut, None, "one sample: a burst");
        let st = c.step(&shed_input(5000.0, Some(1000.0), 30.0));
        assert_eq!(st, ShedStep { cut: Some(0.23), connections: Some(0) }, "keep 1.15 × 1000 / 5000");
        assert!(c.shedding());
        for _ in 0..3 {
            assert_eq!(c.step(&shed_input(3000.0, Some(1000.0), 30.0)).cut, None, "next cut after a second");
        }
        let again = c.step(&shed_input(30_000.0, Some(1000.0), 30.0)).cut;
        assert_eq!(again, Some(0.05), "never keep fewer than 5 % at once");
        // Less reset than admitted and a low lag for two seconds: shedding ends, into limited.
        for _ in 0..7 {
            assert_eq!(c.step(&shed_input(1200.0, Some(1000.0), 5.0)).connections, Some(0));
        }
        assert_eq!(
            c.step(&shed_input(1200.0, Some(1000.0), 5.0)),
            ShedStep { cut: None, connections: Some(0) }
        );
        assert!(!c.shedding(), "limited, but no room while some are still reset");
        let roomy: Vec<Option<u32>> =
            (0..12).map(|_| c.step(&shed_input(800.0, Some(1000.0), 5.0)).connections).collect();
        assert_eq!(roomy[10], Some(0));
        assert_eq!(roomy[11], Some(20), "room for 3 s");
        // Still room, now with the gate open: +20/s each second; every connection admitted after
        // ten seconds of room with the gate open.
        let ramp: Vec<Option<u32>> =
            (0..40).map(|_| c.step(&shed_input(800.0, None, 5.0)).connections).collect();
        assert_eq!(ramp[3], Some(40), "a second later: +20/s");
        assert_eq!(ramp[38], Some(215));
        assert_eq!(ramp[39], None, "ten seconds open with room: open");
        // A high lag keeps it shedding even when little is reset.
        let mut c = ShedControl::default();
        c.step(&shed_input(5000.0, Some(1000.0), 30.0));
        c.step(&shed_input(5000.0, Some(1000.0), 30.0));
        for _ in 0..20 {
            assert_eq!(c.step(&shed_input(1200.0, Some(1000.0), 30.0)).connections, Some(0));
        }
        // Off by configuration: never cut; new connections only with room, as ever.
        let mut c = ShedControl::default();
        for _ in 0..10 {
            let st = c.step(&ShedInput { shed_ratio: 0.0, ..shed_input(50_000.0, Some(100.0), 90.0) });
            assert_eq!(st, ShedStep { cut: None, connections: Some(0) });
        }
        let st: Vec<ShedStep> = (0..12)
            .map(|_| c.step(&ShedInput { shed_ratio: 0.0, ..shed_input(50.0, Some(100.0), 5.0) }))
            .collect();
        assert_eq!(st[11].connections, Some(20));
    }

    #[test]
    fn an_overload_starts_the_gate_from_what_was_served_with_a_low_lag_not_from_its_first_sample() {
        let mut c = RateControl::default();
        for _ in 0..20 {
            assert_eq!(c.step(&input(2.0, 4000.0, 4000.0)), None, "4,000/s served, a low lag");
        }
        // The onset: 8,000/s offered, the queue full of streams reset late, 1,300/s served in the
        // sample where the lag rises.
        let onset = RateInput { served_per_s: 1300.0, ..input(40.0, 8000.0, 8000.0) };
        assert_eq!(c.step(&onset), Some(3600), "0.9 × the 4,000/s just served, not 0.9 × 1,300");
        // Cut toward that: each connection kept with 1.15 × 3,600 ÷ 8,000, about half.
        let mut shed = ShedControl::default();
        let at = |rate| ShedInput { capacity: None, ..shed_input(8000.0, Some(rate), 40.0) };
        shed.step(&at(3600.0));
        assert_eq!(shed.step(&at(3600.0)).cut, Some(0.5175));
        // A minute later with the lag low the most served is what is served now.
        let mut c = RateControl::default();
        c.step(&input(2.0, 4000.0, 4000.0));
        for _ in 0..CAPACITY_MEMORY_S {
            c.step(&input(2.0, 300.0, 300.0));
        }
        let onset = RateInput { served_per_s: 250.0, ..input(40.0, 8000.0, 8000.0) };
        assert_eq!(c.step(&onset), Some(270), "0.9 × 300: the 4,000/s of a minute ago is forgotten");
    }

    #[test]
    fn the_capacity_shown_is_remembered_while_the_gate_is_open_and_forgotten_after_a_minute() {
        let mut c = RateControl::default();
        assert_eq!(c.step(&input(40.0, 5000.0, 1000.0)), Some(900));
        assert_eq!(c.capacity(), None, "a high lag shows no capacity");
        let r = c.step(&input(2.0, 5000.0, 900.0)).unwrap();
        assert_eq!(c.capacity(), Some(900.0), "binding with a low lag: 900/s is served");
        assert!(r > 900, "and the rate probes above it");
        // A cut: little offered, the gate opens, the capacity stays.
        let mut out = Some(r);
        for _ in 0..50 {
            out = c.step(&RateInput { served_per_s: 100.0, ..input(2.0, 100.0, 100.0) });
        }
        assert_eq!(out, None);
        assert_eq!(c.capacity(), Some(900.0), "an open gate serving less keeps it");
        // Clients let back in bring handshakes before requests: the lag rises while little is
        // served, and the gate starts from the capacity shown, not from that.
        assert_eq!(c.step(&RateInput { served_per_s: 200.0, ..input(40.0, 300.0, 300.0) }), Some(810));
        // With the gate open and the lag low, what is served raises it.
        let mut c = RateControl::default();
        c.step(&input(40.0, 5000.0, 1000.0));
        c.step(&input(2.0, 5000.0, 900.0));
        for _ in 0..10 {
            c.step(&RateInput { served_per_s: 50.0, ..input(2.0, 50.0, 50.0) });
        }
        c.step(&RateInput { served_per_s: 1500.0, ..input(2.0, 1500.0, 1500.0) });
        assert_eq!(c.capacity(), Some(1500.0));
        let idle = RateInput { served_per_s: 50.0, ..input(2.0, 50.0, 50.0) };
        for _ in 0..49 {
            c.step(&idle);
        }
        assert_eq!(c.capacity(), Some(1500.0), "59 seconds with the gate open (a sample a second)");
        c.step(&idle);
        assert_eq!(c.capacity(), None, "sixty: forgotten");
    }

    #[test]
    fn after_a_cut_the_capacity_shown_sizes_the_cut_and_the_room() {
        let with = |offered, rate, lag, capacity| ShedInput { capacity, ..shed_input(offered, rate, lag) };
        let mut c = ShedControl::default();
        c.step(&with(10_000.0, Some(200.0), 30.0, Some(1000.0)));
        let st = c.step(&with(10_000.0, Some(200.0), 30.0, Some(1000.0)));
        assert_eq!(st.cut, Some(0.115), "keep 1.15 × the capacity 1000 ÷ 10,000, not × the gate's 200");
        // Calm for two seconds: limited. The gate open, 950/s offered against a capacity of
        // 1000/s: no room, only a trickle of new connections (a tenth of the rate).
        for _ in 0..8 {
            c.step(&with(950.0, Some(1000.0), 5.0, Some(1000.0)));
        }
        assert!(!c.shedding());
        let tight: Vec<Option<u32>> =
            (0..20).map(|_| c.step(&with(950.0, None, 5.0, Some(1000.0))).connections).collect();
        assert!(tight.iter().all(|n| *n == Some(2)), "{tight:?}");
        assert_eq!(c.step(&with(950.0, None, 30.0, Some(1000.0))).connections, Some(0), "a high lag: none");
        let roomy: Vec<Option<u32>> =
            (0..12).map(|_| c.step(&with(700.0, None, 5.0, Some(1000.0))).connections).collect();
        assert_eq!(roomy[10], Some(2));
        assert_eq!(roomy[11], Some(20), "three seconds with room: by rate");
        // Nothing remembered (a forced rate, or a minute open): an open gate with a low lag is room.
        let mut c = ShedControl::default();
        c.step(&with(5000.0, Some(1000.0), 30.0, None));
        let st: Vec<Option<u32>> =
            (0..12).map(|_| c.step(&with(5000.0, None, 5.0, None)).connections).collect();
        assert_eq!(st[11], Some(20));
        // New connections set to none while the CPU is short: no trickle either.
        let mut c = ShedControl::default();
        let none =
            |offered, rate| ShedInput { connections_per_s: 0, ..with(offered, rate, 5.0, Some(1000.0)) };
        c.step(&none(950.0, Some(1000.0)));
        assert!((0..20).all(|_| c.step(&none(950.0, None)).connections == Some(0)));
    }

    #[test]
    fn a_connection_draws_once_per_cut_begun_after_it_started() {
        let a = Admission::default();
        let mut drawn = a.epoch();
        assert!((0..100).all(|_| a.keep_connection(&mut drawn)), "no cut: kept");
        a.cut_connections(0.0);
        assert!(!a.keep_connection(&mut drawn), "keep nothing: closed at its next stream");
        let mut newer = a.epoch();
        assert!(a.keep_connection(&mut newer), "a connection started after the cut does not draw in it");
        a.cut_connections(1.0);
        assert!(a.keep_connection(&mut newer) && a.keep_connection(&mut newer));
        // A cut that ended before a connection drew in it does not close it.
        let mut late = a.epoch();
        a.cut_connections(0.0);
        a.end_cut();
        assert!(a.keep_connection(&mut late), "shedding over: kept at its next stream");
        // Half kept, over many connections.
        a.cut_connections(0.5);
        let kept = (0..10_000)
            .filter(|_| {
                let mut d = a.epoch() - 1;
                a.keep_connection(&mut d)
            })
            .count();
        assert!((4_500..5_500).contains(&kept), "{kept} of 10,000 kept at 0.5");
        // New connections: all, by rate, none.
        assert!(a.admit_connection());
        a.set_connections(Some(0));
        assert!(!a.admit_connection());
        a.set_connections(Some(100));
        let n = (0..1000).filter(|_| a.admit_connection()).count();
        assert!((1..=20).contains(&n), "{n}");
        a.set_connections(None);
        assert!(a.admit_connection());
    }
}
