//! Where the signals come from: the node's bounded queues ([`SignalSource`]), recent percentiles
//! of the datastore histograms ([`Window`]), and the process's resident memory ([`rss_bytes`]).

use std::collections::VecDeque;

/// Recent percentiles of one histogram: cumulative bucket counts sampled over a sliding window.
pub(crate) struct Window {
    samples: VecDeque<Vec<u64>>,
    bounds: Vec<f64>,
    pub(crate) len: usize,
}

impl Window {
    pub(crate) fn new(len: usize) -> Self {
        Self { samples: VecDeque::new(), bounds: Vec::new(), len: len.max(2) }
    }

    pub(crate) fn push(&mut self, h: &prometheus::Histogram) {
        use prometheus::core::Metric as _;
        let m = h.metric();
        let hist = m.get_histogram();
        self.bounds = hist.get_bucket().iter().map(|b| b.upper_bound()).collect();
        let mut counts: Vec<u64> = hist.get_bucket().iter().map(|b| b.cumulative_count()).collect();
        counts.push(hist.get_sample_count()); // +Inf
        self.samples.push_back(counts);
        while self.samples.len() > self.len {
            self.samples.pop_front();
        }
    }

    /// Observations in the window.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(old), Some(new)) => new.last().unwrap_or(&0).saturating_sub(*old.last().unwrap_or(&0)),
            _ => 0,
        }
    }

    /// The `q` quantile of the window as a tier signal: 0 with fewer than `min` observations. A
    /// p99 of a handful of operations is their maximum — one cold connection or one slow fsync —
    /// and a datastore that few requests reach is not overloaded by them.
    ///
    /// The worst `stall` consecutive sample intervals are left out (the span whose removal gives
    /// the lowest quantile): one stall — a WAL checkpoint's fsync, every reader blocked at once
    /// — is a handful of slow operations in one moment, and in a window that is mostly idle (the
    /// first second of load after a quiet spell) a handful is over 1 %. Latency that lasts
    /// longer than the span shows; with it all in the span, the rest of the window holds too
    /// few observations and signals nothing yet. 0: nothing left out.
    pub(crate) fn signal(&self, q: f64, min: u64, stall: usize) -> f64 {
        let (Some(old), Some(new)) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        let all = delta(new, old);
        let of =
            |d: &[u64]| if *d.last().unwrap_or(&0) < min { 0.0 } else { quantile_of(d, &self.bounds, q) };
        let intervals = self.samples.len() - 1;
        if stall == 0 {
            return of(&all);
        }
        if intervals <= stall {
            return 0.0;
        }
        (0..=intervals - stall)
            .map(|j| {
                let span = delta(&self.samples[j + stall], &self.samples[j]);
                of(&all.iter().zip(&span).map(|(a, s)| a.saturating_sub(*s)).collect::<Vec<u64>>())
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The `q` quantile (0..1) of the observations in the window, in the histogram's unit,
    /// interpolated within its bucket as Prometheus' `histogram_quantile` does; 0 without any.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let (Some(old), Some(new)) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        quantile_of(&delta(new, old), &self.bounds, q)
    }
}

/// Cumulative bucket counts observed between two samples.
fn delta(new: &[u64], old: &[u64]) -> Vec<u64> {
    new.iter().zip(old).map(|(n, o)| n.saturating_sub(*o)).collect()
}

/// The `q` quantile of cumulative bucket counts (the last one +Inf) with these upper bounds.
fn quantile_of(delta: &[u64], bounds: &[f64], q: f64) -> f64 {
    let total = *delta.last().unwrap_or(&0);
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut prev_count = 0u64;
    let mut prev_bound = 0.0;
    for (i, &c) in delta.iter().enumerate() {
        if c as f64 >= rank {
            let Some(&bound) = bounds.get(i) else {
                return prev_bound; // in the +Inf bucket: the largest finite bound
            };
            let in_bucket = (c - prev_count) as f64;
            let frac = if in_bucket > 0.0 { (rank - prev_count as f64) / in_bucket } else { 1.0 };
            return prev_bound + (bound - prev_bound) * frac;
        }
        prev_count = c;
        prev_bound = bounds.get(i).copied().unwrap_or(prev_bound);
    }
    prev_bound
}

/// The recent ratio of two counters (failed / all operations) over a sliding window of samples.
pub(crate) struct RatioWindow {
    samples: VecDeque<(u64, u64)>,
    pub(crate) len: usize,
}

impl RatioWindow {
    pub(crate) fn new(len: usize) -> Self {
        Self { samples: VecDeque::new(), len: len.max(2) }
    }

    /// Record the counters' current totals.
    pub(crate) fn push(&mut self, part: u64, total: u64) {
        self.samples.push_back((part, total));
        while self.samples.len() > self.len {
            self.samples.pop_front();
        }
    }

    /// part / total over the window; 0 with fewer than `min` operations in it.
    pub(crate) fn ratio(&self, min: u64) -> f64 {
        let (Some(old), Some(new)) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        let total = new.1.saturating_sub(old.1);
        if total == 0 || total < min {
            return 0.0;
        }
        new.0.saturating_sub(old.0) as f64 / total as f64
    }
}

/// What the controller reads to compute [`Signals`]; the node implements it over its parts.
pub trait SignalSource: Send + Sync + 'static {
    /// (entries buffered, limit).
    fn write_buffer(&self) -> (usize, usize);
    /// (keys in flight, limit).
    fn reads_in_flight(&self) -> (usize, usize);
    /// (streams queued, queue capacity).
    fn inbound_queue(&self) -> (usize, usize);
    /// Requests answered so far (a counter).
    fn requests_served(&self) -> u64 {
        0
    }
    /// Streams admitted and then reset unserved because they waited too long for a task or found
    /// the intake queue full (a counter): admitted beyond what the node serves.
    fn streams_reset_late(&self) -> u64 {
        0
    }
}

/// How often the lag probe's timer is set, and for how long.
pub const LAG_PROBE_PERIOD: std::time::Duration = std::time::Duration::from_millis(5);

/// The lag probe: a timer due every [`LAG_PROBE_PERIOD`], observing how much later than due its
/// task ran — the time any task of the runtime waits for a worker (and for the timer wheel) right
/// now. Runs until `cancel`.
pub async fn lag_probe(lag: prometheus::Histogram, cancel: tokio_util::sync::CancellationToken) {
    loop {
        let due = tokio::time::Instant::now() + LAG_PROBE_PERIOD;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        lag.observe(tokio::time::Instant::now().saturating_duration_since(due).as_secs_f64());
    }
}

/// A counter read at times, over a sliding window of the last `len` readings: how much it grew,
/// and over how long, from the oldest reading to the newest.
pub(crate) struct Readings<T> {
    samples: VecDeque<(std::time::Instant, T)>,
    pub(crate) len: usize,
}

impl<T: Copy> Readings<T> {
    pub(crate) fn new(len: usize) -> Self {
        Self { samples: VecDeque::new(), len: len.max(2) }
    }

    pub(crate) fn push_at(&mut self, at: std::time::Instant, value: T) {
        self.samples.push_back((at, value));
        while self.samples.len() > self.len {
            self.samples.pop_front();
        }
    }

    /// (seconds from the oldest reading to the newest, the oldest value, the newest); None
    /// before the first reading.
    pub(crate) fn span(&self) -> Option<(f64, T, T)> {
        let (old, new) = (self.samples.front()?, self.samples.back()?);
        Some((new.0.saturating_duration_since(old.0).as_secs_f64(), old.1, new.1))
    }
}

/// The lag probe's recent mean delay, from how many probes completed over a sliding window of
/// samples: the probe is sequential, so over a span of `t` with `n` probes each took `t / n`, of
/// which [`LAG_PROBE_PERIOD`] was the timer and the rest lag. Unlike a mean of the observed
/// delays this also counts the probe still waiting, so a runtime too starved to run the probe
/// at all shows as the whole span, not as no signal.
pub(crate) type LagWindow = Readings<u64>;

impl LagWindow {
    /// Record the probe count now.
    pub(crate) fn push(&mut self, probes: u64) {
        self.push_at(std::time::Instant::now(), probes);
    }

    /// Mean lag per probe over the window, ms (0 until the window spans two samples).
    pub(crate) fn mean_lag_ms(&self) -> f64 {
        let Some((span, old, new)) = self.span() else { return 0.0 };
        if span <= 0.0 {
            return 0.0;
        }
        let n = new.saturating_sub(old);
        if n == 0 {
            return span * 1e3;
        }
        ((span / n as f64 - LAG_PROBE_PERIOD.as_secs_f64()) * 1e3).max(0.0)
    }
}

/// The last `len` samples of a signal, for its lowest or highest over a short sliding window.
///
/// A bounded queue's fill as a tier signal is its lowest fill over the window (the controller
/// keeps one second): a queue that a burst or a short datastore stall filled and that drained
/// again within the window is no distress — its own bound sheds any excess meanwhile — and
/// taking it for one held the node in `degrade` for `min_dwell`, answering lookups from other
/// heads with cache-only misses. A queue that stayed filled over the whole window is a backlog
/// (or the statement budget holding it back) and shows.
pub(crate) struct SampleWindow {
    samples: VecDeque<f64>,
    pub(crate) len: usize,
}

impl SampleWindow {
    pub(crate) fn new(len: usize) -> Self {
        Self { samples: VecDeque::new(), len: len.max(1) }
    }

    pub(crate) fn push(&mut self, v: f64) {
        self.samples.push_back(v);
        while self.samples.len() > self.len {
            self.samples.pop_front();
        }
    }

    /// Record a queue's (entries, bound) now, as its fill ratio.
    pub(crate) fn push_fill(&mut self, (n, max): (usize, usize)) {
        self.push(if max == 0 { 0.0 } else { n as f64 / max as f64 });
    }

    /// The lowest sample in the window (0 without samples).
    pub(crate) fn lowest(&self) -> f64 {
        self.samples.iter().copied().reduce(f64::min).unwrap_or(0.0)
    }

    /// The highest sample in the window (0 without samples).
    pub(crate) fn highest(&self) -> f64 {
        self.samples.iter().copied().reduce(f64::max).unwrap_or(0.0)
    }
}

/// Resident set size of process `pid` ("self" for this one), from /proc (Linux only).
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_time_per_probe_beyond_its_period() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut w = LagWindow::new(3);
        assert_eq!(w.mean_lag_ms(), 0.0);
        w.push_at(at(0), 0);
        w.push_at(at(1000), 200); // 5 ms per probe: no lag
        assert!(w.mean_lag_ms() < 1e-9);
        w.push_at(at(2000), 240); // 2 s, 240 probes: 8.33 ms each, 3.33 ms of lag
        assert!((w.mean_lag_ms() - 3.333).abs() < 0.01, "{}", w.mean_lag_ms());
        w.push_at(at(3000), 240); // no probe ran in the last 2 s of the window
        assert!((w.mean_lag_ms() - 45.0).abs() < 0.01, "{}", w.mean_lag_ms()); // 2000/40 - 5
        w.push_at(at(4000), 240);
        assert_eq!(w.mean_lag_ms(), 2000.0, "a starved probe is the whole span");
    }

    #[test]
    fn a_queue_signals_its_fill_only_once_it_held_it_over_the_window() {
        let mut w = SampleWindow::new(5); // one second of 250 ms samples
        assert_eq!(w.lowest(), 0.0);
        // A burst: 146 of 256 reads in flight for one sample, drained by the next.
        for n in [10, 146, 20, 5, 0] {
            w.push_fill((n, 256));
        }
        assert!(w.lowest() < 0.5, "a burst that drained is no distress: {}", w.lowest());
        // A backlog: over half full at every sample of the window.
        for n in [140, 200, 180, 150, 160] {
            w.push_fill((n, 256));
        }
        assert!((w.lowest() - 140.0 / 256.0).abs() < 1e-9, "{}", w.lowest());
        w.push_fill((0, 256)); // drained: the signal falls at once
        assert_eq!(w.lowest(), 0.0);
        w.push_fill((5, 0));
        assert_eq!(w.lowest(), 0.0, "an unbounded (0) queue signals nothing");
    }

    #[test]
    fn error_ratios_follow_recent_operations_and_need_enough_of_them() {
        let mut w = RatioWindow::new(3);
        w.push(0, 0);
        w.push(50, 100); // a bad spell
        assert_eq!(w.ratio(100), 0.5);
        assert_eq!(w.ratio(101), 0.0, "too few operations to be a signal");
        w.push(50, 300);
        w.push(50, 500); // recovered; the bad spell has left the 3-sample window
        assert_eq!(w.ratio(100), 0.0);
        assert_eq!(RatioWindow::new(3).ratio(0), 0.0);
    }

    /// One interval of observations: `fast` at 1 ms, `slow` at 300 ms.
    fn interval(h: &prometheus::Histogram, w: &mut Window, fast: usize, slow: usize) {
        (0..fast).for_each(|_| h.observe(0.001));
        (0..slow).for_each(|_| h.observe(0.3));
        w.push(h);
    }

    fn latency_histogram() -> prometheus::Histogram {
        prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![0.0005, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0]),
        )
        .unwrap()
    }

    #[test]
    fn one_stall_is_left_out_and_lasting_latency_is_not() {
        // 41 samples = 40 intervals of 250 ms (a 10 s window); a 2 s tolerance is 8 intervals.
        let (h, mut w) = (latency_histogram(), Window::new(41));
        w.push(&h);
        for i in 0..40 {
            // Light steady load, 5 lookups per interval, and one stall: 8 slow in one interval.
            interval(&h, &mut w, 5, if i == 20 { 8 } else { 0 });
        }
        assert!(w.signal(0.99, 100, 0) > 0.1, "without the tolerance the stall is the p99");
        assert!(w.signal(0.99, 100, 8) <= 0.001, "{}", w.signal(0.99, 100, 8));
        // The same stall straddling two intervals.
        let (h, mut w) = (latency_histogram(), Window::new(41));
        w.push(&h);
        for i in 0..40 {
            interval(&h, &mut w, 5, if i == 20 || i == 21 { 4 } else { 0 });
        }
        assert!(w.signal(0.99, 100, 8) <= 0.001);
        // Latency lasting 5 s (20 intervals, a third slow in each) shows.
        let (h, mut w) = (latency_histogram(), Window::new(41));
        w.push(&h);
        for i in 0..40 {
            interval(&h, &mut w, 5, if i >= 20 { 2 } else { 0 });
        }
        assert!(w.signal(0.99, 100, 8) > 0.25, "{}", w.signal(0.99, 100, 8));
    }

    #[test]
    fn a_stall_in_the_first_second_after_a_quiet_spell_signals_nothing() {
        // Idle for 9 s, then 150 lookups in one second, 8 of them stalled: 5 % of the window.
        let (h, mut w) = (latency_histogram(), Window::new(41));
        w.push(&h);
        for _ in 0..36 {
            w.push(&h);
        }
        interval(&h, &mut w, 30, 8);
        for _ in 0..3 {
            interval(&h, &mut w, 40, 0);
        }
        assert!(w.signal(0.99, 100, 0) > 0.1, "the stall is the window's p99");
        assert_eq!(w.signal(0.99, 100, 8), 0.0, "all of it within 2 s: too few left to be a signal");
        // Load goes on, fast: still nothing; slow for longer than the tolerance: a signal.
        for _ in 0..8 {
            interval(&h, &mut w, 40, 0);
        }
        assert!(w.signal(0.99, 100, 8) <= 0.001);
        for _ in 0..12 {
            interval(&h, &mut w, 40, 2);
        }
        assert!(w.signal(0.99, 100, 8) > 0.25);
    }

    #[test]
    fn window_quantiles_follow_recent_observations_only() {
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![0.001, 0.01, 0.1, 1.0]),
        )
        .unwrap();
        let mut w = Window::new(3);
        w.push(&h);
        for _ in 0..1000 {
            h.observe(0.5); // old, slow
        }
        w.push(&h);
        assert!(w.quantile(0.99) > 0.1);
        for _ in 0..100 {
            h.observe(0.005);
        }
        w.push(&h);
        w.push(&h); // the slow sample has left the 3-sample window
        let p99 = w.quantile(0.99);
        assert!(p99 > 0.001 && p99 <= 0.01, "{p99}");
        assert_eq!(w.count(), 100);
        assert_eq!(w.signal(0.99, 100, 0), p99);
        assert_eq!(w.signal(0.99, 101, 0), 0.0, "too few observations to be a signal");
        assert_eq!(Window::new(3).quantile(0.99), 0.0);
    }
}
