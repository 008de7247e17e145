//! Metrics as an operator's Prometheus sees them: `promtool` lint on a real scrape, the shipped
//! alert rules, and every PromQL expression of the shipped Grafana dashboards evaluated by a real
//! Prometheus server scraping a real node. Needs `prometheus` and `promtool` on PATH (Debian's
//! `prometheus` package; `.ci/run` installs it).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{head_addrs, http_get, start, urlencode, Backend, RawClient, WAIT};
use hydra::net::wire::{self, MessageType};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.exists()))
}

static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `prometheus` or `promtool`; installs Debian's `prometheus` package on first use if missing
/// (as the interop tests install their npm packages), so `cargo test` works on a fresh machine.
fn tool(name: &str) -> PathBuf {
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = find(name) {
        return p;
    }
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed =
        apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "--no-install-recommends", "prometheus"]);
    find(name).unwrap_or_else(|| {
        panic!(
            "{name} not found and installing Debian's `prometheus` package failed ({installed}): install it"
        )
    })
}

/// Traffic of every kind through every head, so series carry real values.
async fn drive_traffic(node: &hydra::Node) {
    let heads = head_addrs(node);
    let client = RawClient::connect(&heads).await;
    for (i, (head, _)) in heads.iter().enumerate() {
        let mut s = client.open(*head).await;
        for k in 0..20u8 {
            let key = [i as u8, k, 1, 2, 3];
            RawClient::send(&mut s, &client.add_provider_body(&key)).await.unwrap();
            RawClient::request(&mut s, &wire::encode_request(MessageType::GetProviders, &key, &[]))
                .await
                .unwrap();
        }
        RawClient::request(&mut s, &wire::encode_request(MessageType::FindNode, &[1, 2, 3], &[]))
            .await
            .unwrap();
        RawClient::request(&mut s, &wire::encode_request(MessageType::Ping, &[], &[])).await.unwrap();
    }
    node.providers().flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_scrape_the_rules_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 2, Backend::Sqlite).await;
    drive_traffic(&node).await;
    // A lookup after the flush (which invalidated the cached answers of the keys it wrote).
    let heads = head_addrs(&node);
    let client = RawClient::connect(&heads[..1]).await;
    let mut s = client.open(heads[0].0).await;
    RawClient::request(&mut s, &wire::encode_request(MessageType::GetProviders, &[9, 9, 9], &[]))
        .await
        .unwrap();
    let (status, scrape) = http_get(&node.http_addr().to_string(), "/metrics").await;
    assert_eq!(status, 200);
    // The byte-budgeted parts report what they hold, within their budgets.
    for part in ["provider_cache", "address_book"] {
        let used = common::sum_samples(&scrape, "hydra_memory_bytes", &[("part", part)]);
        let limit = common::sum_samples(&scrape, "hydra_memory_limit_bytes", &[("part", part)]);
        assert!(used > 0.0 && used <= limit, "{part}: {used} of {limit} bytes");
    }
    let mut child = std::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {report}");

    for args in [
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
    ] {
        let out =
            std::process::Command::new(tool("promtool")).args(&args).current_dir(root()).output().unwrap();
        assert!(out.status.success(), "promtool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    node.shutdown().await;
}

/// Every PromQL expression in the dashboards, with Grafana's variables filled in as a dashboard
/// showing all nodes and heads would; `label_values(q, l)` template queries become `q`.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("grafana")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((format!("{name}: {}", p["title"]), t["expr"].as_str().unwrap().to_string()));
            }
        }
        for v in dash["templating"]["list"].as_array().unwrap() {
            let q = v["query"]["query"].as_str().unwrap();
            let inner =
                q.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')).map(|(m, _)| m).unwrap();
            out.push((format!("{name}: variable {}", v["name"]), inner.to_string()));
        }
    }
    out.into_iter()
        .map(|(w, e)| (w, e.replace("$__rate_interval", "10s").replace("$node", ".*").replace("$head", ".*")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_series_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), 3, Backend::Postgres).await;
    let prom_dir = tempfile::tempdir().unwrap();
    let port = hydra_testkit::free_port_base(1, &["127.0.0.1"]).unwrap();
    let config = prom_dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hydra\n    static_configs:\n      - targets: [\"{}\"]\n",
            node.http_addr()
        ),
    )
    .unwrap();
    let _prometheus = tokio::process::Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let prom = format!("127.0.0.1:{port}");
    let query = |q: String| {
        let prom = prom.clone();
        async move {
            let (status, body) = http_get(&prom, &format!("/api/v1/query?query={}", urlencode(&q))).await;
            (status, serde_json::from_str::<serde_json::Value>(&body).unwrap_or(serde_json::Value::Null))
        }
    };
    // Prometheus takes a moment to bind its port: wait for it before the first query.
    let start = Instant::now();
    while tokio::net::TcpStream::connect(&prom).await.is_err() {
        assert!(start.elapsed() < WAIT, "Prometheus did not start listening on {prom}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Traffic between scrapes, until Prometheus holds at least 8 scrapes of the node.
    loop {
        drive_traffic(&node).await;
        let (status, v) = query("count_over_time(up{job=\"hydra\"}[1m])".into()).await;
        let scrapes = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
        if status == 200 && scrapes.is_some_and(|n| n >= 8.0) {
            break;
        }
        assert!(start.elapsed() < WAIT, "Prometheus did not scrape the node: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let queries = dashboard_queries();
    assert!(queries.len() > 30, "found only {} dashboard queries", queries.len());
    let mut failures = Vec::new();
    for (where_, expr) in &queries {
        // A valid query that found nothing is asked once more after two scrapes: one slow
        // scrape of a busy machine marks the node's series stale until the next one succeeds.
        let valid = |(status, v): &(u16, serde_json::Value)| *status == 200 && v["status"] == "success";
        let empty =
            |(_, v): &(u16, serde_json::Value)| v["data"]["result"].as_array().is_none_or(|r| r.is_empty());
        let mut answer = query(expr.clone()).await;
        if valid(&answer) && empty(&answer) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            answer = query(expr.clone()).await;
        }
        if !valid(&answer) || empty(&answer) {
            let (status, v) = answer;
            failures.push(format!("{where_}\n    {expr}\n    -> HTTP {status}: {v}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    println!("{} dashboard queries evaluated, all returned series", queries.len());
    node.shutdown().await;
}
