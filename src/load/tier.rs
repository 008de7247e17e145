//! The tier rule: the next tier from the current one, how long it has been held, and a sample.
//! Pure logic, tested under tokio's paused clock.

use tokio::time::Instant;

use crate::config::LoadSection;
use crate::types::{Signals, Tier};

/// The next tier, given the current one, when it was entered, and a fresh sample.
pub fn decide(cur: Tier, since: Instant, now: Instant, s: &Signals, cfg: &LoadSection) -> Tier {
    decide_with_lag(cur, since, now, s, cfg, s.runtime_lag_ms)
}

/// [`decide`], with `recent_lag_ms` the highest runtime lag over the latency signals' window
/// (`load.window`): a datastore p99 over a window in which the CPU was short includes the
/// node's own wait for a worker, even if the lag has dropped since.
pub fn decide_with_lag(
    cur: Tier,
    since: Instant,
    now: Instant,
    s: &Signals,
    cfg: &LoadSection,
    recent_lag_ms: f64,
) -> Tier {
    if let Some(t) = cfg.force_tier {
        return t;
    }
    let thresholds = |t: Tier| match t {
        Tier::Normal => None,
        Tier::Degrade => Some(&cfg.degrade),
        Tier::Refuse => Some(&cfg.refuse),
        Tier::Peak => Some(&cfg.peak),
    };
    // While the CPU is short, datastore latency as the node times it includes the wait for a
    // worker: it is the node's latency, not the datastore's, and refusing datastore work would
    // not free the CPU (answering with less costs about as much; admission by rate is what
    // helps, and the statement budget still caps the datastore). Latency then only degrades.
    let lag = cfg.degrade.runtime_lag_ms;
    let cpu_short = lag > 0.0 && s.runtime_lag_ms.max(recent_lag_ms) >= lag * cfg.exit_ratio;
    let cpu_bound = Signals { datastore_p99_ms: 0.0, pool_wait_p99_ms: 0.0, ..*s };
    let signals = |t: Tier| if cpu_short && t >= Tier::Refuse { &cpu_bound } else { s };
    let highest = |factor: f64| {
        Tier::ALL
            .into_iter()
            .rev()
            .find(|t| thresholds(*t).is_none_or(|th| th.reached(signals(*t), factor)))
            .unwrap_or(Tier::Normal)
    };
    let up = highest(1.0);
    if up > cur {
        return up;
    }
    // Stay while any signal is still above the exit level of the current tier.
    if highest(cfg.exit_ratio) >= cur || now.duration_since(since) < cfg.min_dwell {
        return cur;
    }
    cur.below()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::types::Thresholds;

    fn cfg() -> LoadSection {
        LoadSection { min_dwell: Duration::from_secs(10), exit_ratio: 0.5, ..LoadSection::default() }
    }

    fn latency(ms: f64) -> Signals {
        Signals { datastore_p99_ms: ms, ..Signals::default() }
    }

    // The controller's rule, stepped through a load episode under tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn tiers_escalate_at_once_and_step_down_with_hysteresis_and_dwell() {
        let c = cfg(); // degrade at 50 ms, refuse at 250 ms; exit at half of each
        let mut since = Instant::now();
        let mut tier = Tier::Normal;
        let step = |s: Signals, tier: &mut Tier, since: &mut Instant| {
            let next = decide(*tier, *since, Instant::now(), &s, &c);
            if next != *tier {
                *since = Instant::now();
            }
            *tier = next;
        };
        step(latency(10.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Normal);
        // A spike straight past refuse: entered at once, skipping nothing it should not.
        step(latency(300.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Refuse);
        // Back under the refuse threshold but above its exit level (125 ms): stays.
        tokio::time::advance(Duration::from_secs(60)).await;
        step(latency(200.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Refuse, "hysteresis: 200 ms is above the exit level of refuse");
        // Below the exit level, but the dwell started at the last change: one step down only
        // once the dwell has passed since entering refuse (60 s here).
        step(latency(100.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Degrade);
        // Just stepped down: even an idle datastore leaves degrade only after min_dwell.
        tokio::time::advance(Duration::from_secs(9)).await;
        step(latency(1.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Degrade, "dwell not over");
        tokio::time::advance(Duration::from_secs(1)).await;
        step(latency(1.0), &mut tier, &mut since);
        assert_eq!(tier, Tier::Normal);
        // Flapping around the degrade threshold does not flap the tier.
        for ms in [55.0, 45.0, 52.0, 30.0, 51.0, 26.0] {
            tokio::time::advance(Duration::from_secs(2)).await;
            step(latency(ms), &mut tier, &mut since);
            assert_eq!(tier, Tier::Degrade, "{ms} ms");
        }
    }

    #[test]
    fn any_signal_raises_the_tier_and_disabled_ones_never_do() {
        let c = cfg();
        let now = Instant::now();
        let full_queue = Signals { inbound_queue_fill_ratio: 0.95, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &full_queue, &c), Tier::Degrade);
        let with_peak =
            LoadSection { peak: Thresholds { rss_mib: 1000.0, ..Thresholds::default() }, ..c.clone() };
        let big = Signals { rss_mib: 1200.0, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &big, &with_peak), Tier::Peak);
        let buffer = Signals { write_buffer_fill_ratio: 0.85, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &buffer, &c), Tier::Degrade);
        let failing = Signals { datastore_error_ratio: 0.2, ..Signals::default() };
        assert_eq!(
            decide(Tier::Normal, now, now, &failing, &c),
            Tier::Degrade,
            "errors degrade, never refuse"
        );
        let slow = Signals { pool_wait_p99_ms: 150.0, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &slow, &c), Tier::Refuse);
        // rss_mib is disabled (0) by default (and peak has no default trigger at all).
        let rss = Signals { rss_mib: 1e9, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &rss, &c), Tier::Normal);
        // A slow-looking datastore while the runtime lags is the node's own latency: degrade,
        // not refuse.
        let starved = Signals { datastore_p99_ms: 400.0, runtime_lag_ms: 30.0, ..Signals::default() };
        assert_eq!(decide(Tier::Normal, now, now, &starved, &c), Tier::Degrade);
        // The lag dropped a moment ago but the latency window still covers the starved seconds.
        let after = Signals { datastore_p99_ms: 400.0, runtime_lag_ms: 2.0, ..Signals::default() };
        assert_eq!(decide_with_lag(Tier::Normal, now, now, &after, &c, 30.0), Tier::Degrade);
        assert_eq!(
            decide_with_lag(Tier::Normal, now, now, &after, &c, 2.0),
            Tier::Refuse,
            "no lag in the window"
        );
        let lagging = Signals { runtime_lag_ms: 25.0, ..Signals::default() };
        assert_eq!(
            decide(Tier::Normal, now, now, &lagging, &c),
            Tier::Degrade,
            "lag degrades, never refuses"
        );
        let forced = LoadSection { force_tier: Some(Tier::Refuse), ..c };
        assert_eq!(decide(Tier::Normal, now, now, &Signals::default(), &forced), Tier::Refuse);
    }
}
