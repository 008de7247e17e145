//! Load control: how much work the node accepts, decided in one place from measured signals.
//!
//! Owns the load tier ([`Tier`], computed by [`tier::decide`] in the [`LoadControl`] controller
//! task from [`Signals`] sampled every `load.sample_interval`), what each tier does
//! ([`Policy`] — the one table the request path asks), the datastore statement budget
//! ([`StatementBudget`]), admission of new streams by rate ([`Admission`]), per-peer fair shares ([`peers`]) and reloading `[load]` without a
//! restart ([`Reloader`]).
//!
//! It reads signals through [`SignalSource`] and the metrics registry; it never calls the
//! provider manager, the stores or a swarm, and it never waits on the datastore. The stores take
//! from the statement budget; the request path asks [`LoadControl::policy`] once per request.
//!
//! | tier | GET_PROVIDERS | ADD_PROVIDER | FIND_NODE, PING | new inbound streams |
//! |---|---|---|---|---|
//! | `normal` | cache, then datastore | buffered | served | accepted |
//! | `degrade` | datastore only for keys this head is among the k closest to, else cache only (miss → closer peers only) | buffered, but a refresh of a record with more than `degrade_skip_refresh_if_remaining` left is not rewritten | served | accepted |
//! | `refuse` | cached answer, else closer peers only | buffered (the buffer's bound sheds), fresh refreshes not rewritten | served | accepted |
//! | `peak` | cached answer, else closer peers only | dropped | served | reset at the handler |
//!
//! Per-peer fair shares apply from `degrade` up (peers share the statement budget ÷
//! `degrade_per_peer_cost`; cached answers free), and in `normal` only while statements wait for
//! the budget (then they share the budget).
//!
//! A tier is **entered** as soon as any signal reaches that tier's threshold (escalation is
//! immediate: the datastore must be protected now, not after a dwell), and **left** only when
//! every signal is below `exit_ratio` × its threshold for that tier *and* the tier has been held
//! for `min_dwell`, one tier at a time. Hysteresis plus dwell keep it from flapping. Latency
//! signals leave out the worst `latency_stall_tolerance` of their window, so that one stall of
//! the datastore, a moment in which every reader waits, is not taken for an overload; for the
//! same reason a queue's fill signals only what it held over the last second.
//!
//! Under CPU distress (the runtime lag at or above `admission_lag_ms`) new inbound streams are
//! admitted by rate ([`admission`]) and the rest reset in the muxer before negotiation; open
//! streams keep being served. Far past capacity the node sheds connections too.
//!
//! Two rate limits (governor) apply in every tier: a per-process budget of datastore statements
//! per second (the hard ceiling), which makes flushes and lookups wait — so batches grow and the
//! buffer and lookup queue fill, which raises the tier — and, while short of capacity, a per-peer
//! fair share of datastore statements, kept in a map of at most `max_tracked_peers` peers (peers
//! beyond it share one bucket).

pub mod admission;
pub mod budget;
pub mod controller;
pub mod cpu;
pub mod peers;
pub mod policy;
pub mod reload;
pub mod signals;
pub mod tier;

pub use crate::types::{PerSignal, Signals, Thresholds, Tier};
pub use admission::Admission;
pub use budget::StatementBudget;
pub use controller::{LatencyPair, LoadControl, Status};
pub use peers::BoundedKeys;
pub use policy::Policy;
pub use reload::Reloader;
pub use signals::{lag_probe, rss_bytes, SignalSource};
