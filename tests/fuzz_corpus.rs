//! Replays the fuzzing corpus and every crash fuzzing found (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the same harness the fuzz targets run
//! (`fuzz/harness.rs`), as ordinary tests: CI builds one profile and no fuzzer.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let done = std::panic::catch_unwind(|| run(&data));
            assert!(done.is_ok(), "{} made the {target} harness panic", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "no corpus for {target} in fuzz/corpus/{target}");
    println!("{target}: {n} inputs replayed");
}

#[test]
fn wire_corpus() {
    replay("wire", harness::wire);
}

#[test]
fn records_corpus() {
    replay("records", harness::records);
}

#[test]
fn keys_corpus() {
    replay("keys", harness::keys);
}

#[test]
fn config_corpus() {
    replay("config", harness::config);
}
