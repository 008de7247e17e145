//! The benchmark binary as a user runs it: `startup` and a short `load` step against the `hydra`
//! binary of this checkout (built by the benchmark itself), on loopback and a throwaway
//! PostgreSQL. Smoke tests of the machinery, not measurements: the figures printed are not
//! asserted beyond "the node answered".

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hydra-bench"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hydra-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hydra-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn startup_starts_and_measures_this_checkouts_node() {
    let out = bench(&["startup", "--heads", "2", "--runs", "1", "--idle", "0", "--quic", "false"]);
    let row =
        out.lines().find(|l| l.split_whitespace().next() == Some("2")).unwrap_or_else(|| panic!("{out}"));
    let rss_mib: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(rss_mib > 1.0, "idle RSS of a real node: {row}");
}

#[test]
fn load_runs_a_step_and_the_node_answers() {
    let out = bench(&[
        "load",
        "--heads",
        "2",
        "--clients",
        "2",
        "--preload",
        "20",
        "--rates",
        "100",
        "--step-seconds",
        "2",
    ]);
    let row = out.lines().find(|l| l.trim_start().starts_with("100/s")).unwrap_or_else(|| panic!("{out}"));
    let goodput: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(goodput > 0.0, "no request answered: {row}\n{out}");
    assert!(out.contains("clean shutdown: true"), "{out}");
}
