//! The `hydra` binary as an operator runs it: configuration layers and errors, and a real
//! process that starts, serves `/v1/heads`, and shuts down cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn hydra() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hydra"));
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("HYDRA_") {
            c.env_remove(k);
        }
    }
    c
}

/// `hydra run` with `heads` heads on loopback, JSON logs on a pipe.
fn run_json(
    heads: usize,
    data_dir: &std::path::Path,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = hydra()
        .args([
            "run",
            "--heads",
            &heads.to_string(),
            "--listen-ip",
            "127.0.0.1",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/hydra.example.toml")
}

#[test]
fn invalid_values_exit_2_naming_the_field() {
    for (args, env, field) in [
        (vec!["run", "--heads", "0"], None, "heads"),
        (vec!["run", "--listen-ip", "not-an-ip"], None, "listen_ip"),
        (vec!["run", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], None, "bootstrap"),
        (vec!["run", "--database-url", "mysql://u:hunter2@h/db"], None, "database_url"),
        (vec!["run"], Some(("HYDRA_HTTP_LISTEN", "nowhere")), "http_listen"),
        (vec!["run", "--heads", "many"], None, "--heads"),
    ] {
        let mut cmd = hydra();
        cmd.args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: stderr does not name {field}: {stderr}");
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
        assert!(out.stdout.is_empty(), "nothing may start: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn a_bad_config_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "heads = 2\n[limits]\ninbound_queue = \"lots\"\n").unwrap();
    let out = hydra().args(["config", "check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inbound_queue"));
}

#[test]
fn config_check_prints_the_layered_effective_config() {
    // The example file parses and validates.
    let file = hydra::ConfigFile::from_file(&example()).unwrap();
    file.validate().unwrap();
    // file < env < flag
    let out = hydra()
        .args(["config", "check", "--config"])
        .arg(example())
        .args(["--port-base", "5000"])
        .env("HYDRA_PORT_BASE", "4500")
        .env("HYDRA_LISTEN_IP", "127.0.0.9")
        .env("HYDRA_DATABASE_URL", "postgres://hydra:hunter2@db/hydra")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let eff = hydra::ConfigFile::from_toml(&text).unwrap();
    assert_eq!(eff.heads, file.heads, "from the file");
    assert_eq!(eff.listen_ip, "127.0.0.9", "env beats file");
    assert_eq!(eff.port_base, 5000, "flag beats env");
    assert_eq!(eff.database_url, "postgres://hydra:***@db/hydra");
    assert!(!text.contains("hunter2"));
    assert!(eff.bootstrap.is_empty(), "no bootstrap peers unless asked");
    // The same as JSON.
    let out = hydra()
        .args(["config", "check", "--json", "--port-base", "5000"])
        .env("HYDRA_DATABASE_URL", "postgres://hydra:hunter2@db/hydra")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["port_base"], 5000);
    assert_eq!(v["database_url"], "postgres://hydra:***@db/hydra");
}

#[test]
fn version_is_printed() {
    let out = hydra().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hydra "));
}

#[test]
fn the_process_serves_heads_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = run_json(3, dir.path());
    let mut listening = 0;
    let http = loop {
        let line = lines.next().expect("node logs until it has started").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if msg.contains("listening on /ip4/127.0.0.1/tcp/") && msg.contains("/p2p/12D3Koo") {
            listening += 1;
        }
        if msg == "node started" {
            break v["fields"]["http"].as_str().unwrap().to_string();
        }
    };
    assert_eq!(listening, 3, "one log line with the full TCP multiaddr per head");

    let mut sock = std::net::TcpStream::connect(&http).unwrap();
    write!(sock, "GET /v1/heads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    let heads: Vec<hydra::http::HeadInfo> = serde_json::from_str(body).unwrap();
    assert_eq!(heads.len(), 3);
    assert!(heads.iter().all(|h| h.peer_id.starts_with("12D3Koo") && !h.addrs.is_empty()));

    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "node did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("node stopped")), "{rest:?}");
}

#[test]
fn starting_100_heads_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = run_json(100, dir.path());
    let mut progress = Vec::new();
    for line in lines {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let msg = v["fields"]["message"].as_str().unwrap_or_default().to_string();
        if msg.starts_with("derived keys of") || msg.starts_with("started ") {
            progress.push(msg);
        } else if msg == "node started" {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(progress.iter().filter(|m| m.starts_with("derived keys of")).count(), 10, "{progress:?}");
    assert_eq!(progress.iter().filter(|m| m.starts_with("started ")).count(), 10, "{progress:?}");
    assert!(progress.contains(&"started 100/100 heads".to_string()));
}

#[test]
fn sighup_reloads_the_load_section_and_a_bad_file_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hydra.toml");
    std::fs::write(&file, "[load]\ndatastore_statements_per_second = 100\n").unwrap();
    let data = dir.path().join("data");
    let p = common::Process::spawn(
        &["run", "--heads", "1", "--listen-ip", "127.0.0.1", "--http-listen", "127.0.0.1:0"]
            .into_iter()
            .chain(["--config", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[],
    );
    let budget = |p: &common::Process| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(&p.get("/v1/status")).ok()?;
        v["load"]["datastore_statements_per_second"].as_u64()
    };
    let wait_for = |p: &common::Process, want: u64| {
        let start = Instant::now();
        while budget(p) != Some(want) {
            assert!(start.elapsed() < Duration::from_secs(20), "status never showed {want}: {:?}", budget(p));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&p, 100);
    let hup = || Command::new("kill").args(["-HUP", &p.child.id().to_string()]).status().unwrap();

    std::fs::write(&file, "[load]\ndatastore_statements_per_second = 300\n").unwrap();
    assert!(hup().success());
    wait_for(&p, 300);

    std::fs::write(&file, "[load]\ndatastore_statements_per_second = -1\n").unwrap();
    assert!(hup().success());
    let start = Instant::now();
    while !p.get("/metrics").contains("hydra_load_config_reloads_total{result=\"error\"} 1") {
        assert!(start.elapsed() < Duration::from_secs(20), "the bad reload was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(budget(&p), Some(300), "a rejected reload keeps the previous settings");
    assert!(p.stop(), "still running and stops cleanly after reloads");
}

/// `hydra providers`, `hydra status` and `hydra heads` against a running node and its store
/// (JSON parsed and checked, tables read), `GET /v1/providers/{cid}` with the same data, and the
/// documented exit codes: 2 for a bad CID or unknown flag, 1 for an unreachable database.
#[test]
fn read_commands_show_a_running_nodes_records_status_and_heads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    // address_filter any: the client announces a loopback address.
    let p = common::Process::spawn(
        &["run", "--heads", "2", "--listen-ip", "127.0.0.1", "--http-listen", "127.0.0.1:0"]
            .into_iter()
            .chain(["--data-dir", data_s, "--address-filter", "any"])
            .collect::<Vec<_>>(),
        &[],
    );
    let heads = p.heads();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"read commands");
        hydra::types::ProviderKey::new([&[0x12, 0x20][..], &d[..]].concat()).unwrap()
    };
    let cid = hydra::keys::key_to_cid(&key);
    let client = rt.block_on(async {
        let client = common::RawClient::connect(&heads).await;
        let mut s = client.open(heads[0].0).await;
        common::RawClient::send(&mut s, &client.add_provider_body(key.as_bytes())).await.unwrap();
        client
    });
    let me = client.peer_id.to_base58();

    // The record is written within a flush interval (1 s by default).
    let start = Instant::now();
    let report = loop {
        let out = hydra().args(["providers", &cid, "--json", "--data-dir", data_s]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: hydra::http::ProvidersReport = serde_json::from_slice(&out.stdout).unwrap();
        if !r.providers.is_empty() || start.elapsed() > common::WAIT {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(report.multihash, hex::encode(key.as_bytes()));
    assert_eq!(report.providers.len(), 1, "{report:?}");
    let rec = &report.providers[0];
    assert_eq!(rec.peer_id, me);
    assert_eq!(rec.addrs, vec![client.addr.to_string()]);
    let expires = humantime::parse_rfc3339(&rec.expires_at).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(47 * 3600), "record_ttl 48h: {left:?}");
    assert!(rec.addrs_expire_at.is_some());

    // The same record by the multihash in hex and in the human table.
    let out = hydra().args(["providers", &report.multihash, "--data-dir", data_s]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains(&me) && table.contains("1 provider record"), "{table}");
    // And by a dag-pb CIDv1 of the same multihash: found, and the answer names what was asked.
    let dag_pb =
        multibase::encode(multibase::Base::Base32Lower, [&[0x01, 0x70][..], key.as_bytes()].concat());
    let out = hydra().args(["providers", &dag_pb, "--data-dir", data_s]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.starts_with(&format!("{dag_pb} (multihash {}, as a raw CID {cid})", report.multihash)),
        "{table}"
    );
    assert!(table.contains(&me) && table.contains("1 provider record"), "{table}");

    // The operator API answers the same.
    let v: serde_json::Value = serde_json::from_str(&p.get(&format!("/v1/providers/{cid}"))).unwrap();
    assert_eq!(v["providers"][0]["peer_id"], me.as_str());
    assert_eq!(v["cid"], cid.as_str());
    assert_eq!(v["query"], cid.as_str());
    let v: serde_json::Value = serde_json::from_str(&p.get(&format!("/v1/providers/{dag_pb}"))).unwrap();
    assert_eq!((&v["query"], &v["cid"]), (&dag_pb.as_str().into(), &cid.as_str().into()));
    assert_eq!(v["providers"][0]["peer_id"], me.as_str());

    // Status from the running node.
    let url = format!("http://{}", p.http);
    let out = hydra().args(["status", "--json", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["heads"], 2);
    assert!(st["tier"].is_string() && st["signals"]["runtime_lag_ms"].is_number(), "{st}");
    assert!(st["write_buffer_capacity"].as_u64().unwrap() > 0);
    let out = hydra().args(["status", "--url", &url]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("tier ") && table.contains("runtime_lag_ms"), "{table}");
    assert!(table.contains("admission open; connections open"), "{table}");
    assert_eq!(st["shedding_connections"], false);
    assert_eq!(st["listeners_closed"], false);

    // Readiness for container health checks.
    let out = hydra().args(["ready", "--url", &url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n");
    let out = hydra().args(["ready", "--url", "http://127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));

    // Heads of the fleet (this one process) from the store.
    let out = hydra().args(["heads", "--json", "--data-dir", data_s]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let active: Vec<&str> =
        listed.iter().filter(|h| h["lease_active"] == true).map(|h| h["peer_id"].as_str().unwrap()).collect();
    for (h, _) in &heads {
        assert!(active.contains(&h.to_base58().as_str()), "{listed:?}");
    }

    // Exit codes.
    let out = hydra().args(["providers", "bafk!!!", "--data-dir", data_s]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a CID or multihash: not valid base32"));
    let out = hydra().args(["providers", &cid, "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let start = Instant::now();
    let out = hydra()
        .args(["providers", &cid, "--database-url", "postgres://hydra@127.0.0.1:1/none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < Duration::from_secs(20), "an unreachable database fails fast");
    let out = hydra().args(["providers", &cid, "--data-dir", "/nonexistent/hydra"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is --data-dir right?"));
    let out = hydra().args(["status", "--url", "http://127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"));
    assert!(p.stop());
}

#[test]
fn completions_are_printed_for_bash() {
    let out = hydra().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("_hydra()") && script.contains("providers"),
        "{}",
        &script[..200.min(script.len())]
    );
}

/// `hydra sim coverage` (issue 13.4): the table, the searched head counts and the chart, on a
/// small network. Coverage grows with heads for every scheme, and reaches 100 % for even
/// spacing once there are as many heads as peers (every key's closest key is then a head).
#[test]
fn sim_coverage_prints_the_table_and_writes_the_chart() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("coverage.svg");
    let out = hydra()
        .args(["sim", "coverage", "--peers", "1000", "--heads", "20,100,1000", "--keys", "400"])
        .args(["--max-heads", "1000", "--candidates", "2,4", "--svg", svg.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let pct = |line: &str, col: usize| -> f64 {
        line.split_whitespace().filter(|w| *w != "%").nth(col).unwrap().parse().unwrap()
    };
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains('%'))
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    // Columns: v1 (2 candidates), best of 4, random, even.
    for col in 1..=4 {
        let covs: Vec<f64> = rows.iter().map(|r| pct(r, col)).collect();
        assert!(covs.windows(2).all(|w| w[0] <= w[1]), "coverage grows with heads: {covs:?}\n{text}");
        assert!(covs[0] > 0.0 && covs[0] < 100.0, "{text}");
    }
    assert_eq!(pct(rows[2], 4), 100.0, "1,000 evenly spaced heads among 1,000 peers: {text}");
    for scheme in ["v1 (2)", "best of 4", "random", "even"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(scheme)),
            "heads needed for {scheme}: {text}"
        );
    }
    assert!(text.contains("2015 heads, 16208 peers, 97.1 %"), "{text}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.matches("<polyline").count() == 4 && chart.contains("<circle")
    );
}
