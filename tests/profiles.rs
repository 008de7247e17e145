//! Profiles as an operator gets them from the shipped binary (jemalloc, heap profiler on): an
//! automatic heap profile when RSS passes a (here forced) fraction of the memory limit, whose
//! samples name the node's own allocation sites; heap and CPU profiles on the operator API.

mod common;

use std::io::Read as _;
use std::time::{Duration, Instant};

use prost::Message as _;

/// The parts of pprof's `profile.proto` a test needs.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
}

fn decode(bytes: &[u8]) -> Profile {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).expect("a pprof profile")
}

/// Names of the functions on the stacks of the profile's samples.
fn sampled_functions(p: &Profile) -> Vec<String> {
    let mut names = Vec::new();
    for s in &p.sample {
        for id in &s.location_id {
            let Some(loc) = p.location.iter().find(|l| l.id == *id) else { continue };
            for line in &loc.line {
                if let Some(f) = p.function.iter().find(|f| f.id == line.function_id) {
                    names.push(p.string_table.get(f.name as usize).cloned().unwrap_or_default());
                }
            }
        }
    }
    names
}

#[test]
fn memory_near_the_limit_writes_a_heap_profile_naming_our_allocation_sites() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles");
    let config = dir.path().join("hydra.toml");
    // The threshold forced low: a 1 GiB limit, a profile at 0.1 % of it (any running node).
    std::fs::write(
        &config,
        format!(
            "[profiles]\nmemory_limit_mib = 1024\nheap_dump_at_memory_fraction = 0.001\ncheck_interval = \"200ms\"\ndir = {:?}\n",
            profiles.to_str().unwrap()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let p = common::Process::spawn(
        &["run", "--heads", "2", "--listen-ip", "127.0.0.1", "--http-listen", "127.0.0.1:0"]
            .into_iter()
            .chain(["--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
            .collect::<Vec<_>>(),
        &[],
    );
    let start = Instant::now();
    let file = loop {
        let found = std::fs::read_dir(&profiles).ok().and_then(|mut d| d.next()).map(|e| e.unwrap().path());
        if let Some(f) = found {
            break f;
        }
        assert!(start.elapsed() < common::WAIT, "no heap profile in {}", profiles.display());
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200)); // written in one call; let it finish
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("heap-") && name.ends_with(".pb.gz"), "{name}");
    let profile = decode(&std::fs::read(&file).unwrap());
    assert!(!profile.sample.is_empty(), "an empty profile is not a profile");
    let names = sampled_functions(&profile);
    // Our own code allocated at start-up: the heads, the caches, the buffers.
    assert!(names.iter().any(|n| n.starts_with("hydra::")), "no hydra:: frame among {} names", names.len());
    assert!(p.get("/metrics").contains("hydra_profiles_heap_dumps_total 1"));
    // The allocator's own accounting is on /metrics: live bytes, and pages at least as many.
    let stat = |s: &str| p.metric("hydra_allocator_bytes", &[("stat", s)]);
    let (allocated, active, resident) = (stat("allocated"), stat("active"), stat("resident"));
    assert!(allocated > 1e6, "jemalloc's allocated bytes on /metrics: {allocated}");
    assert!(active >= allocated && resident >= active, "{allocated} <= {active} <= {resident}");

    // On demand, on the operator API.
    let (status, heap) = p.get_bytes("/debug/pprof/heap");
    assert_eq!(status, 200);
    assert!(!decode(&heap).sample.is_empty());
    // Symbolizing loaded the binary's debug info (hundreds of MiB for this debug build); it is
    // freed after each profile, not kept for the life of the process.
    let after = stat("allocated");
    println!("allocated: {allocated} bytes after the automatic profile, {after} after one on demand");
    assert!(after < 64e6, "{after} bytes still allocated after a heap profile");
    let (status, cpu) = p.get_bytes("/debug/pprof/profile?seconds=1");
    assert_eq!(status, 200);
    let cpu = decode(&cpu);
    assert!(!cpu.string_table.is_empty(), "a CPU profile with its string table");
    assert!(p.stop());
}
