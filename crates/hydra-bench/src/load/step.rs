//! One measured step: drive a rate for a while, sample the node and PostgreSQL meanwhile, and
//! report what the client and the node saw.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;

use super::client::{drive, percentile_ms, request, Answer, Ctx, Tally};
use super::Op;
use crate::node::{cpu_seconds, histogram_quantile_ms, http_get, machine_jiffies, metric_sum, NodeProcess};

/// Results of one step.
pub(crate) struct Step {
    pub(crate) label: String,
    pub(crate) offered: f64,
    pub(crate) sent: f64,
    /// Full answers within 1 s of their due time per second, counted at the client; for
    /// ADD_PROVIDER those sent in time × the share of a sample found afterwards.
    pub(crate) goodput: f64,
    /// Requests the node counted `ok` per second (its `/metrics`).
    pub(crate) node_ok: f64,
    /// FIND_NODE sent and answered in full within 1 s, per second.
    pub(crate) finds_sent: f64,
    pub(crate) finds_good: f64,
    /// ADD_PROVIDERs of new records sent in time: (found afterwards, checked), of a uniform
    /// sample over the step and of the step's first ones.
    pub(crate) adds_found: Checked,
    pub(crate) first_adds_found: Checked,
    /// ADD_PROVIDERs per second: sent and closed in time (as the client saw it), accepted by the
    /// node (`hydra_kad_requests_total{type="add_provider",outcome="ok"}`), and shed by it.
    pub(crate) adds: (f64, f64, f64),
    pub(crate) shed: f64,
    /// Refused (reset, or closed without a reply) per second, and the p99 of how long a refused
    /// request took to learn it (from its due time).
    pub(crate) rejected: f64,
    pub(crate) reject_p99: f64,
    pub(crate) failed: u64,
    pub(crate) dropped: u64,
    /// Inbound connections the node closed (connection shedding) and new ones it refused
    /// before their handshake (CPU short), in the step.
    pub(crate) conns_shed: u64,
    pub(crate) conns_refused: u64,
    /// Dials that failed at the clients (refused by the node, or by the kernel while the node's
    /// listeners were closed).
    pub(crate) dials_failed: u64,
    /// What the node shed in the step, by reason (its counters' names), largest first.
    pub(crate) shed_by: Vec<(String, f64)>,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) get_p99: f64,
    /// p99 of GET_PROVIDERS answered that went out on a connection the client already had, and
    /// how many of the answered GET_PROVIDERS did.
    pub(crate) get_p99_connected: f64,
    pub(crate) gets_connected: (usize, usize),
    /// p99 of a stream's time inside the node, from the intake to its first reply written
    /// (`hydra_kad_stream_sojourn_seconds`), GET_PROVIDERS and FIND_NODE; bucket bounds.
    pub(crate) node_sojourn_p99: (f64, f64),
    /// p99 of GET_PROVIDERS inside the node (decoded request to reply written), bucket bound.
    pub(crate) node_get_p99: f64,
    pub(crate) tier_max: String,
    pub(crate) tier_end: String,
    /// Mean of the node's runtime lag signal over the step's 1 s samples, ms.
    pub(crate) lag_ms: f64,
    pub(crate) rss_mib: f64,
    pub(crate) cpu_ms_per_1k: f64,
    /// CPU of this process (the generator) per 1,000 requests sent.
    pub(crate) gen_cpu_ms_per_1k: f64,
    /// Busy share of all the machine's cores over the step (node, PostgreSQL, generator, rest).
    pub(crate) machine_busy_pct: f64,
    pub(crate) pg_tps: f64,
    pub(crate) pg_tps_max5: f64,
}

impl Step {
    pub(crate) fn header() -> String {
        format!(
            "{:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>9} {:>7} {:>7} {:>7} {:>6} {:>6} {:>13} {:>7} {:>7} {:>7} {:>6} {:>15} {:>6} {:>6} {:>8} {:>8} {:>6} {:>7} {:>6}",
            "step",
            "offered",
            "sent",
            "goodput",
            "node-ok",
            "find ok/snt",
            "adds kept",
            "shed/s",
            "rej/s",
            "rej p99",
            "failed",
            "gendrop",
            "conns cut/ref",
            "p50 ms",
            "p99 ms",
            "get p99",
            "node",
            "tier max/end",
            "lag ms",
            "RSS",
            "cpu/1k",
            "gen/1k",
            "busy%",
            "pg tx/s",
            "max5s"
        )
    }

    pub(crate) fn row(&self) -> String {
        format!(
            "{:>7} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>11} {:>9} {:>7.0} {:>7.0} {:>7.1} {:>6} {:>6} {:>13} {:>7.1} {:>7.1} {:>7.1} {:>6} {:>15} {:>6.1} {:>6.0} {:>8.1} {:>8.1} {:>6.0} {:>7.0} {:>6.0}",
            self.label,
            self.offered,
            self.sent,
            self.goodput,
            self.node_ok,
            format!("{:.0}/{:.0}", self.finds_good, self.finds_sent),
            format!("{}/{}", self.adds_found.found, self.adds_found.checked),
            self.shed,
            self.rejected,
            self.reject_p99,
            self.failed,
            self.dropped,
            format!("{}/{}", self.conns_shed, self.conns_refused),
            self.p50,
            self.p99,
            self.get_p99,
            self.node_get_p99,
            format!("{}/{}", self.tier_max, self.tier_end),
            self.lag_ms,
            self.rss_mib,
            self.cpu_ms_per_1k,
            self.gen_cpu_ms_per_1k,
            self.machine_busy_pct,
            self.pg_tps,
            self.pg_tps_max5
        )
    }

    /// Where ADD_PROVIDERs went: sent in time, accepted by the node, shed by it, and the share of
    /// the uniform sample found afterwards.
    pub(crate) fn adds_line(&self) -> Option<String> {
        let (sent, ok, shed) = self.adds;
        let Checked { found, said_none, checked } = self.adds_found;
        (found < checked).then(|| {
            format!(
                "         ADD_PROVIDER/s: {sent:.0} sent in time, {ok:.0} accepted by the node, {shed:.0} shed by it; of a uniform sample of {checked}: {found} found, {said_none} answered without providers, {} not answered in 20 s",
                checked - found - said_none
            )
        })
    }

    /// The step's first new records, found or not, when that differs from the uniform sample
    /// (which sizes goodput).
    pub(crate) fn first_adds_line(&self) -> Option<String> {
        let (f, n) = (self.first_adds_found.found, self.first_adds_found.checked);
        let (uf, un) = (self.adds_found.found, self.adds_found.checked);
        (n > 0 && f * un != uf * n).then(|| {
            format!("         adds kept of the step's first {n} (the bench's sample until it drew over the whole step): {f}/{n}")
        })
    }

    /// Where answered GET_PROVIDERS waited: on connections the client had, and inside the node.
    pub(crate) fn latency_line(&self) -> Option<String> {
        let (on, all) = self.gets_connected;
        (self.rejected > 0.0 || on < all).then(|| {
            format!(
                "         GET_PROVIDERS p99 {:.1} ms all, {:.1} ms of the {on} of {all} sent on a connection the client had; in the node (intake to reply written) p99 ≤ {} ms GET_PROVIDERS, ≤ {} ms FIND_NODE",
                self.get_p99, self.get_p99_connected, self.node_sojourn_p99.0, self.node_sojourn_p99.1
            )
        })
    }

    /// Dials the clients saw fail, beside those the node refused itself (the rest the kernel
    /// refused: the node's listeners were closed).
    pub(crate) fn dials_line(&self) -> Option<String> {
        (self.dials_failed > 0).then(|| {
            format!(
                "         dials failed at the clients: {}, of them refused by the node after accepting them: {}",
                self.dials_failed, self.conns_refused
            )
        })
    }

    /// The shed breakdown as one line (None when nothing was shed).
    pub(crate) fn shed_line(&self) -> Option<String> {
        if self.shed_by.is_empty() {
            return None;
        }
        let parts: Vec<String> = self.shed_by.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
        Some(format!("         shed in the step: {}", parts.join(", ")))
    }
}

/// How much counter `name{labels}` grew between two scrapes.
fn grew(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(after, name, labels) - metric_sum(before, name, labels)
}

/// What the node shed between two scrapes, per counter: requests by reason
/// (`hydra_load_shed_total{reason}`, which counts the provider manager's sheds of requests too)
/// and streams by event.
fn shed_by(before: &str, after: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for reason in [
        "write_buffer_full",
        "reads_in_flight",
        "read_deadline",
        "datastore_error",
        "peer_rate",
        "cache_only",
        "tier",
    ] {
        let d = grew(before, after, "hydra_load_shed_total", &[("reason", reason)]);
        out.push((format!("request:{reason}"), d));
    }
    for event in ["refused", "admission", "queue_full", "peer_limit", "queue_wait", "evicted"] {
        let d = grew(before, after, "hydra_kad_streams_total", &[("event", event)]);
        out.push((format!("stream:{event}"), d));
    }
    out.retain(|(_, d)| *d > 0.0);
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// Wait until the node's tier is one of `tiers`, polling its status, for at most `limit`.
pub(crate) async fn wait_for_tier(node: &NodeProcess, tiers: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let status = http_get(&node.http, "/v1/status").await.unwrap_or_default();
        if tiers.iter().any(|t| status.contains(&format!("\"tier\":\"{t}\""))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the check of a sample of new records found after a step.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Checked {
    pub(crate) found: usize,
    /// Answered, twice, without providers.
    pub(crate) said_none: usize,
    pub(crate) checked: usize,
}

impl Checked {
    /// The share found (1 with nothing checked).
    pub(crate) fn share(&self) -> f64 {
        if self.checked == 0 {
            1.0
        } else {
            self.found as f64 / self.checked as f64
        }
    }
}

/// Before the samples of new records are checked: the load off, the buffer given time to flush,
/// and the node let out of `refuse` (where a lookup not in the cache is answered with closer
/// peers only; at most 20 s) — whether a record was *kept* is the question.
async fn settle_for_checks(node: &NodeProcess) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_for_tier(node, &["normal", "degrade"], Duration::from_secs(20)).await;
}

/// After a step, [`settle_for_checks`] done: how many of the sampled new records announced in
/// time are found (asked by random clients of random heads). An ask that got no answer about
/// the record — the node refused it, or the client is still backing off from a connection the
/// node shed in the step — is asked again by another client until 20 s have passed (until
/// 2026-12-07 only four times: after a 10C step most clients were backing off, and records that
/// were there counted as lost); and an answer without providers is asked once more, 0.5 s
/// later, by another client (a lookup shed by a passing limit is not the record's absence).
async fn check_adds(ctx: &Arc<Ctx>, keys: Vec<Vec<u8>>) -> Checked {
    let checked = keys.len();
    let answers: Vec<Option<bool>> = futures::stream::iter(keys)
        .map(|k| {
            let ctx = ctx.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut nones = 0;
                while Instant::now() < deadline {
                    let ask = request(&ctx, Op::Get, &k);
                    match tokio::time::timeout(Duration::from_secs(5), ask).await {
                        Ok((Answer::Full, _)) => return Some(true),
                        Ok((Answer::Partial, _)) => {
                            nones += 1;
                            if nones >= 2 {
                                return Some(false);
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Ok((Answer::Refused, _)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                    }
                }
                None
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    Checked {
        found: answers.iter().filter(|a| **a == Some(true)).count(),
        said_none: answers.iter().filter(|a| **a == Some(false)).count(),
        checked,
    }
}

/// PostgreSQL transactions committed + rolled back in `db` so far.
pub(crate) async fn pg_xacts(c: &tokio_postgres::Client, db: &str) -> anyhow::Result<f64> {
    let row = c
        .query_one(
            "SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await?;
    Ok(row.get(0))
}

pub(crate) const TIERS: [&str; 4] = ["normal", "degrade", "refuse", "peak"];

/// What the sampler saw during a step (1 s samples).
#[derive(Default, Clone, Copy)]
pub(crate) struct Samples {
    tier_max: usize,
    rss_max_mib: f64,
    /// Highest PostgreSQL transaction rate over a 5 s window.
    pg_max5: f64,
    /// The node's runtime lag signal (ms, its mean over the last second), summed over samples.
    lag_sum: f64,
    samples: u32,
}

pub(crate) async fn connect_pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Every second: the node's tier and RSS; every 5 s: PostgreSQL's transaction rate.
pub(crate) async fn sample(http: String, pid: u32, pg_url: String, db: String, out: Arc<Mutex<Samples>>) {
    let Ok(pg) = connect_pg(&pg_url).await else { return };
    let mut last = match pg_xacts(&pg, &db).await {
        Ok(x) => (Instant::now(), x),
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 1u64.. {
        tick.tick().await;
        let (tier, lag) = match http_get(&http, "/v1/status")
            .await
            .map(|b| serde_json::from_str::<serde_json::Value>(&b))
        {
            Ok(Ok(v)) => (
                TIERS.iter().position(|t| v["tier"] == *t).unwrap_or(0),
                v["signals"]["runtime_lag_ms"].as_f64().unwrap_or(0.0),
            ),
            _ => (0, 0.0),
        };
        let rss = hydra::load::rss_bytes(&pid.to_string()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let mut pg_rate = None;
        if n % 5 == 0 {
            if let Ok(x) = pg_xacts(&pg, &db).await {
                pg_rate = Some((x - last.1) / last.0.elapsed().as_secs_f64());
                last = (Instant::now(), x);
            }
        }
        let mut s = out.lock().unwrap_or_else(|e| e.into_inner());
        s.tier_max = s.tier_max.max(tier);
        s.lag_sum += lag;
        s.samples += 1;
        s.rss_max_mib = s.rss_max_mib.max(rss);
        if let Some(r) = pg_rate {
            s.pg_max5 = s.pg_max5.max(r);
        }
    }
}

/// The node's PostgreSQL database, for the transaction counts.
pub(crate) struct Pg {
    pub(crate) url: String,
    pub(crate) db: String,
    pub(crate) client: tokio_postgres::Client,
}

pub(crate) async fn run_step(
    ctx: &Arc<Ctx>,
    node: &NodeProcess,
    pg: &Pg,
    label: String,
    rate: f64,
    dur: Duration,
) -> anyhow::Result<Step> {
    let ok = |m: &str| metric_sum(m, "hydra_kad_requests_total", &[("outcome", "ok")]);
    let shed = |m: &str| {
        metric_sum(m, "hydra_load_shed_total", &[])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "refused")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "admission")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "queue_full")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "peer_limit")])
            + metric_sum(m, "hydra_kad_streams_total", &[("event", "queue_wait")])
    };
    // Clients shed in an earlier step come back (their dial backoff cleared, as for a new load,
    // the node admitting connections again) before this one is measured.
    for c in ctx.clients.iter() {
        c.clear_backoff();
    }
    let want = (ctx.clients.len() * ctx.heads.len()) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = http_get(&node.http, "/metrics").await?;
        let have = metric_sum(&m, "hydra_head_connections", &[]);
        if have >= want {
            break;
        }
        if Instant::now() > deadline {
            println!("         note: {have} of {want} client connections before the step (20 s waited)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before = http_get(&node.http, "/metrics").await?;
    let dials_failed0 = super::client::DIALS_FAILED.load(std::sync::atomic::Ordering::Relaxed);
    let cpu0 = node.cpu_seconds().unwrap_or(0.0);
    let (gen0, machine0) = (cpu_seconds("self").unwrap_or(0.0), machine_jiffies());
    let x0 = pg_xacts(&pg.client, &pg.db).await?;
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler =
        tokio::spawn(sample(node.http.clone(), node.pid, pg.url.clone(), pg.db.clone(), samples.clone()));
    let tally = Arc::new(Tally::default());
    drive(ctx, rate, dur, &tally).await;
    sampler.abort();
    let secs = t0.elapsed().as_secs_f64();
    let x1 = pg_xacts(&pg.client, &pg.db).await?;
    let after = http_get(&node.http, "/metrics").await?;
    let status: serde_json::Value = serde_json::from_str(&http_get(&node.http, "/v1/status").await?)?;
    let cpu = node.cpu_seconds().unwrap_or(0.0) - cpu0;
    let gen_cpu = cpu_seconds("self").unwrap_or(0.0) - gen0;
    let machine_busy_pct = crate::node::busy_pct_since(machine0).unwrap_or(0.0);
    let s = *samples.lock().unwrap_or_else(|e| e.into_inner());
    let sent = tally.sent.load(Ordering::Relaxed);
    let per_s = |v: f64| v / dur.as_secs_f64();
    let sample = std::mem::take(&mut *tally.add_sample.lock().unwrap_or_else(|e| e.into_inner()));
    if !sample.uniform.is_empty() {
        settle_for_checks(node).await;
    }
    // Up to the sample's size the step's first announcements are the uniform sample.
    let same = sample.first == sample.uniform;
    let adds_found = check_adds(ctx, sample.uniform).await;
    let first_adds_found = if same { adds_found } else { check_adds(ctx, sample.first).await };
    let kept = adds_found.share();
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    Ok(Step {
        label,
        offered: rate,
        sent: per_s(sent as f64),
        goodput: per_s(n(&tally.good) + n(&tally.good_adds) * kept),
        node_ok: per_s(ok(&after) - ok(&before)),
        finds_sent: per_s(n(&tally.finds_sent)),
        finds_good: per_s(n(&tally.good_finds)),
        adds_found,
        first_adds_found,
        adds: {
            let adds = |outcome| {
                let labels = [("type", "add_provider"), ("outcome", outcome)];
                per_s(grew(&before, &after, "hydra_kad_requests_total", &labels))
            };
            (per_s(n(&tally.good_adds)), adds("ok"), adds("shed"))
        },
        shed: per_s(shed(&after) - shed(&before)),
        rejected: per_s(n(&tally.rejected)),
        reject_p99: percentile_ms(&tally.reject_latency, 0.99),
        failed: tally.failed.load(Ordering::Relaxed),
        dropped: tally.dropped.load(Ordering::Relaxed),
        conns_shed: grew(&before, &after, "hydra_kad_connections_shed_total", &[]) as u64,
        conns_refused: grew(&before, &after, "hydra_kad_connections_refused_total", &[]) as u64,
        dials_failed: super::client::DIALS_FAILED.load(std::sync::atomic::Ordering::Relaxed) - dials_failed0,
        shed_by: shed_by(&before, &after),
        p50: percentile_ms(&tally.latency, 0.5),
        p99: percentile_ms(&tally.latency, 0.99),
        get_p99: percentile_ms(&tally.get_latency, 0.99),
        get_p99_connected: percentile_ms(&tally.get_latency_connected, 0.99),
        gets_connected: {
            let len = |v: &Mutex<Vec<u32>>| v.lock().unwrap_or_else(|e| e.into_inner()).len();
            (len(&tally.get_latency_connected), len(&tally.get_latency))
        },
        node_sojourn_p99: {
            let sojourn = |ty| {
                let labels = [("type", ty)];
                histogram_quantile_ms(&before, &after, "hydra_kad_stream_sojourn_seconds", &labels, 0.99)
            };
            (sojourn("get_providers"), sojourn("find_node"))
        },
        node_get_p99: histogram_quantile_ms(
            &before,
            &after,
            "hydra_kad_request_duration_seconds",
            &[("type", "get_providers")],
            0.99,
        ),
        tier_max: TIERS[s.tier_max].to_string(),
        lag_ms: if s.samples > 0 { s.lag_sum / f64::from(s.samples) } else { 0.0 },
        tier_end: status["tier"].as_str().unwrap_or("?").to_string(),
        rss_mib: s.rss_max_mib.max(node.rss_kib().unwrap_or(0.0) / 1024.0),
        cpu_ms_per_1k: if sent > 0 { cpu * 1e6 / sent as f64 } else { 0.0 },
        gen_cpu_ms_per_1k: if sent > 0 { gen_cpu * 1e6 / sent as f64 } else { 0.0 },
        machine_busy_pct,
        pg_tps: (x1 - x0) / secs,
        pg_tps_max5: s.pg_max5,
    })
}

/// Hold an ACCESS EXCLUSIVE lock on `providers` for `hold` out of every `period`: every read
/// and write of provider records stalls meanwhile, as behind a slow or overloaded database.
pub(crate) async fn slow_postgres(url: String, hold: Duration, period: Duration) {
    let Ok(c) = connect_pg(&url).await else { return };
    loop {
        let held = async {
            c.batch_execute("BEGIN; LOCK TABLE providers IN ACCESS EXCLUSIVE MODE").await?;
            tokio::time::sleep(hold).await;
            c.batch_execute("COMMIT").await
        };
        if held.await.is_err() {
            return;
        }
        tokio::time::sleep(period.saturating_sub(hold)).await;
    }
}
