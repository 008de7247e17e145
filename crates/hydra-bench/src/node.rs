//! The node under test: the `hydra` binary of this checkout as a child process, and reading its
//! HTTP API, its metrics and its CPU time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use tokio::io::AsyncBufReadExt;

/// The `hydra` binary to benchmark: `HYDRA_BIN` when set, else the binary of this checkout,
/// built first (`cargo build -p hydra --bin hydra`) with the profile this benchmark was built
/// with, into the same target directory — so `cargo run --release -p hydra-bench` measures a
/// release node of the same commit, never a stale or foreign one.
pub(crate) fn hydra_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HYDRA_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("find this benchmark's own path")?;
    let mut dir = exe.parent().context("the benchmark binary has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?; // a test binary
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => bail!("cannot tell the build profile from {}", exe.display()),
    };
    let target_dir = dir.parent().context("the profile directory has no parent")?;
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the hydra binary (profile {profile}) …");
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path", manifest, "-p", "hydra", "--bin", "hydra"])
        .args(["--profile", profile, "--target-dir"])
        .arg(target_dir)
        .status()
        .context("run cargo to build the hydra binary (or set HYDRA_BIN)")?;
    ensure!(status.success(), "building the hydra binary failed (or set HYDRA_BIN to one)");
    let bin = dir.join("hydra");
    ensure!(bin.exists(), "{} is missing after the build", bin.display());
    Ok(bin)
}

/// `hydra run` arguments for a node on loopback with `heads` heads, the embedded store in `dir`,
/// ephemeral ports and no QUIC unless `quic`, and `extra` flags.
pub(crate) fn loopback_run_args(
    heads: usize,
    dir: &Path,
    node_name: &str,
    quic: bool,
    extra: &[&str],
) -> Vec<String> {
    let (heads, dir) = (heads.to_string(), dir.display().to_string());
    let quic = if quic { "true" } else { "false" };
    let base = ["run", "--heads", &heads, "--listen-ip", "127.0.0.1", "--http-listen", "127.0.0.1:0"];
    let rest = ["--node-name", node_name, "--quic", quic, "--data-dir", &dir];
    base.iter().chain(&rest).chain(extra).map(|s| s.to_string()).collect()
}

/// Start `cmd` at a higher CPU priority than the generator (when allowed: as root), so on a
/// shared machine the generator, not the server under test, falls behind — as if the clients
/// were other machines. The generator reports the rate it really sent.
pub(crate) fn outrank_generator(cmd: &mut tokio::process::Command) {
    // SAFETY: setpriority is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            Ok(())
        });
    }
}

/// The machine's busy share (%, all cores) since `start` (a [`machine_jiffies`] reading).
pub(crate) fn busy_pct_since(start: Option<(u64, u64)>) -> Option<f64> {
    match (start, machine_jiffies()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 * 100.0 / (t1 - t0) as f64),
        _ => None,
    }
}

/// Write the config of a benchmark node into `dir` (`dir/hydra.toml`; returned): `base` with
/// `heads` heads on 127.0.0.1 (ephemeral ports, TCP only, no bootstrap, any address kept), its
/// data in `dir/data`, PostgreSQL at `database_url` or else the embedded store.
pub(crate) fn bench_config(
    mut file: hydra::config::ConfigFile,
    heads: usize,
    dir: &Path,
    database_url: Option<&str>,
    node_name: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    file.heads = heads;
    file.listen_ip = "127.0.0.1".into();
    file.port_base = 0;
    file.http_listen = "127.0.0.1:0".into();
    file.data_dir = dir.join("data");
    file.database_url = database_url.unwrap_or_default().to_string();
    file.quic = false;
    file.bootstrap.clear();
    file.node_name = node_name.into();
    file.identity_seed_file = String::new();
    file.routing.address_filter = hydra::config::AddressFilter::Any;
    file.validate().context("node config")?;
    let path = dir.join("hydra.toml");
    // Only what differs from the defaults: a `hydra` built from an earlier commit (`compare
    // --baseline-bin`) refuses keys it does not know, and need not know the defaults added since.
    let mut set = toml::Value::try_from(&file)?;
    strip_defaults(&mut set, &toml::Value::try_from(hydra::config::ConfigFile::default())?);
    std::fs::write(&path, toml::to_string(&set)?)?;
    Ok(path)
}

/// Remove from `v` every table entry equal to the one in `defaults`, recursively.
fn strip_defaults(v: &mut toml::Value, defaults: &toml::Value) {
    let (toml::Value::Table(t), toml::Value::Table(d)) = (v, defaults) else { return };
    t.retain(|k, val| match d.get(k) {
        Some(dv) if dv == val => false,
        Some(dv) => {
            strip_defaults(val, dv);
            !matches!(val, toml::Value::Table(t) if t.is_empty())
        }
        None => true,
    });
}

/// A `hydra run` child process: its HTTP address, and its logs drained so it never blocks.
pub(crate) struct NodeProcess {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    pub http: String,
    drain: tokio::task::JoinHandle<()>,
    /// Tier changes the node logged (message and signals), taken by [`Self::tier_changes`].
    tier_log: Arc<Mutex<Vec<String>>>,
}

impl NodeProcess {
    /// Start `<hydra> <args>` (JSON logs) and wait up to `timeout` for "node started".
    pub(crate) async fn spawn(hydra: &Path, args: &[String], timeout: Duration) -> anyhow::Result<Self> {
        let mut cmd = tokio::process::Command::new(hydra);
        outrank_generator(&mut cmd);
        let mut child = cmd
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("pid")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let http = loop {
            let line = tokio::time::timeout(timeout, lines.next_line())
                .await
                .context("the node did not start in time")??
                .context("hydra exited before it started")?;
            if line.contains("\"node started\"") {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                break v["fields"]["http"].as_str().context("http address in the start line")?.to_string();
            }
        };
        // Keep reading logs so the child never blocks on a full pipe; keep the tier changes.
        let tier_log = Arc::new(Mutex::new(Vec::new()));
        let log = tier_log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if !["load tier", "CPU short", "admission open"].iter().any(|m| line.contains(m)) {
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let f = &v["fields"];
                    let entry = format!(
                        "{} {}{}",
                        f["message"].as_str().unwrap_or(""),
                        f["signals"].as_str().unwrap_or(""),
                        f["lag_ms"].as_f64().map(|l| format!("lag {l:.1} ms")).unwrap_or_default()
                    );
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
                }
            }
        });
        Ok(Self { child, pid, http, drain, tier_log })
    }

    /// Every head's peer ID and TCP address (`/v1/heads`).
    pub async fn tcp_heads(&self) -> anyhow::Result<Vec<(libp2p::PeerId, libp2p::Multiaddr)>> {
        tcp_heads_at(&self.http).await
    }

    /// Tier changes logged since the last call.
    pub fn tier_changes(&self) -> Vec<String> {
        std::mem::take(&mut *self.tier_log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> Option<f64> {
        hydra::load::rss_bytes(&self.pid.to_string()).map(|b| b as f64 / 1024.0)
    }

    /// User + system CPU time, seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(&self.pid.to_string())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub async fn stop(mut self) -> bool {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let res = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        self.drain.abort();
        matches!(res, Ok(Ok(s)) if s.success())
    }
}

/// Every head's peer ID and TCP address, from the node's `/v1/heads` at `http`.
pub(crate) async fn tcp_heads_at(http: &str) -> anyhow::Result<Vec<(libp2p::PeerId, libp2p::Multiaddr)>> {
    let heads: Vec<hydra::http::HeadInfo> = serde_json::from_str(&http_get(http, "/v1/heads").await?)?;
    Ok(heads
        .into_iter()
        .filter_map(|h| {
            let tcp = h.addrs.iter().find(|a| a.contains("/tcp/"))?.parse().ok()?;
            Some((h.peer_id.parse().ok()?, tcp))
        })
        .collect())
}

/// `GET path` over HTTP/1.0 from `addr`; the body.
pub(crate) async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Sum of the samples of metric `name` whose labels include every `(label, value)`.
pub(crate) fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The `q` quantile of histogram `name` (with `labels`) over the observations between two
/// scrapes, from its cumulative buckets (the upper bound of the bucket it falls in), in ms.
pub(crate) fn histogram_quantile_ms(
    before: &str,
    after: &str,
    name: &str,
    labels: &[(&str, &str)],
    q: f64,
) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut v: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{')?;
                if n != bucket || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
                    return None;
                }
                let le = rest.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, value.parse().ok()?))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let (b, a) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> = a.iter().zip(&b).map(|((le, x), (_, y))| (*le, x - y)).collect();
    let Some(&(_, total)) = delta.last() else { return f64::NAN };
    if total <= 0.0 {
        return f64::NAN;
    }
    delta.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| le * 1e3).unwrap_or(f64::NAN)
}

/// User + system CPU seconds of process `pid` ("self" for this one) so far, from /proc.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// (busy, total) jiffies of all cores together, from the first line of /proc/stat (Linux only).
pub(crate) fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP x\n\
        hydra_kad_requests_total{head=\"0\",type=\"find_node\",outcome=\"ok\"} 3\n\
        hydra_kad_requests_total{head=\"1\",type=\"find_node\",outcome=\"ok\"} 4\n\
        hydra_kad_requests_total{head=\"0\",type=\"find_node\",outcome=\"shed\"} 100\n\
        d_bucket{type=\"get\",le=\"0.001\"} 0\nd_bucket{type=\"get\",le=\"0.01\"} 0\n\
        d_bucket{type=\"get\",le=\"0.1\"} 0\nd_bucket{type=\"get\",le=\"+Inf\"} 0\n";

    #[test]
    fn metric_sums_match_every_label_given() {
        assert_eq!(metric_sum(BEFORE, "hydra_kad_requests_total", &[("outcome", "ok")]), 7.0);
        assert_eq!(metric_sum(BEFORE, "hydra_kad_requests_total", &[]), 107.0);
        assert_eq!(metric_sum(BEFORE, "hydra_kad_requests_total", &[("head", "1"), ("outcome", "ok")]), 4.0);
        assert_eq!(metric_sum(BEFORE, "missing", &[]), 0.0);
    }

    #[test]
    fn histogram_quantiles_count_only_observations_between_scrapes() {
        // 99 fast observations and one slow one between the scrapes.
        let after = "d_bucket{type=\"get\",le=\"0.001\"} 99\nd_bucket{type=\"get\",le=\"0.01\"} 99\n\
            d_bucket{type=\"get\",le=\"0.1\"} 100\nd_bucket{type=\"get\",le=\"+Inf\"} 100\n";
        assert_eq!(histogram_quantile_ms(BEFORE, after, "d", &[("type", "get")], 0.5), 1.0);
        assert_eq!(histogram_quantile_ms(BEFORE, after, "d", &[("type", "get")], 0.999), 100.0);
        assert!(
            histogram_quantile_ms(BEFORE, BEFORE, "d", &[("type", "get")], 0.5).is_nan(),
            "none observed"
        );
    }
}
