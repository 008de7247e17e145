//! The benchmark binary as a user runs it: `startup`, a short `load` step and a short `compare`
//! against the `hydra` binary of this checkout (built by the benchmark itself), on loopback and a
//! throwaway PostgreSQL. Smoke tests of the machinery, not measurements: the figures printed are
//! not asserted beyond "the servers answered and kept what they were sent".

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
    let out =
        bench(&["startup", "--heads", "2", "--runs", "1", "--idle", "0", "--quic", "false", "--peers", "50"]);
    let row =
        out.lines().find(|l| l.split_whitespace().next() == Some("2")).unwrap_or_else(|| panic!("{out}"));
    let col = |i: usize| -> f64 { row.split_whitespace().nth(i).unwrap().parse().unwrap() };
    assert!(col(2) > 1.0, "idle RSS of a real node: {row}");
    // The synthetic servers entered the process-wide table (a few may have been dialled by the
    // heads' kad, refused on their unused port and dropped as unreachable).
    assert!((25.0..=50.0).contains(&col(4)), "table peers: {row}");
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

/// `compare` starts all four servers (hydra on both stores, the stock rust-libp2p kad server and
/// js-libp2p kad-dht), drives both stream modes at each and finds the records it announced again
/// (on another head for hydra, on the home node for the others).
#[test]
fn compare_drives_all_four_servers_and_finds_what_it_announced() {
    let out = bench(&[
        "compare",
        "--heads",
        "2",
        "--records",
        "1000",
        "--clients",
        "4",
        "--rate",
        "100",
        "--step-seconds",
        "2",
        "--rounds",
        "1",
    ]);
    for streams in ["fresh streams", "reused streams"] {
        let table = out.split(streams).nth(1).unwrap_or_else(|| panic!("no {streams} table:\n{out}"));
        for server in ["hydra", "hydra-pg", "rust-kad", "js"] {
            let row = table
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("| {server} |")))
                .unwrap_or_else(|| panic!("no {server} row after {streams}:\n{out}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let goodput: f64 = cells[2].parse().unwrap();
            let (found, sent) = cells[10].split_once('/').unwrap();
            let (found, sent): (f64, f64) = (found.parse().unwrap(), sent.parse().unwrap());
            assert!(goodput > 50.0, "{server}, {streams}: {row}\n{out}");
            assert!(sent > 0.0 && found >= 0.9 * sent, "{server}, {streams}: records lost: {row}\n{out}");
        }
    }
}
