//! Profiles: where the memory and the CPU go, in pprof form (`go tool pprof`, Grafana Pyroscope,
//! Polar Signals all read it).
//!
//! **Heap.** With the `jemalloc` feature (default) the binary's allocator is jemalloc with its
//! sampling heap profiler on from the start (one sample per 512 KiB allocated on average:
//! `malloc_conf` in `main.rs`), so a profile can be taken at any time, including the moment that
//! matters: [`watch`] writes one to `profiles.dir` when RSS reaches
//! `profiles.heap_dump_at_memory_fraction` of the memory limit (the cgroup's, or
//! `profiles.memory_limit_mib` where that is lower or there is none), at most once per
//! `profiles.cooldown`, keeping the newest
//! `profiles.max_files`. Symbols are resolved in the process, so a profile names functions.
//!
//! **CPU.** [`cpu_pprof`] samples every thread at 99 Hz for the asked number of seconds
//! (pprof-rs, SIGPROF); one at a time.
//!
//! Both are served on the operator API to loopback clients only (`/debug/pprof/heap`,
//! `/debug/pprof/profile?seconds=N`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::ProfilesSection;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("heap profiling is not active (built without the jemalloc feature, or profiling off)")]
    HeapInactive,
    #[error("a CPU profile is already being taken")]
    Busy,
    #[error("{0}")]
    Failed(String),
}

/// Whether heap profiles can be taken in this process.
pub fn heap_profiling_active() -> bool {
    #[cfg(feature = "jemalloc")]
    {
        jemalloc_pprof::PROF_CTL.is_some()
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        false
    }
}

/// jemalloc's accounting, (stat, bytes): `allocated` (live objects), `active` (their pages),
/// `resident`, `mapped`, `retained` (returned to the OS, its address space kept) and
/// `metadata`. Empty without the `jemalloc` feature or when jemalloc is not the allocator.
pub fn allocator_stats() -> Vec<(&'static str, u64)> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_err() {
            return Vec::new();
        }
        let read = [
            ("allocated", stats::allocated::read()),
            ("active", stats::active::read()),
            ("resident", stats::resident::read()),
            ("mapped", stats::mapped::read()),
            ("retained", stats::retained::read()),
            ("metadata", stats::metadata::read()),
        ];
        read.into_iter().filter_map(|(k, v)| Some((k, v.ok()? as u64))).collect()
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        Vec::new()
    }
}

/// A heap profile of live allocations (sampled), gzipped pprof.
pub async fn heap_pprof() -> Result<Vec<u8>, ProfileError> {
    #[cfg(feature = "jemalloc")]
    {
        let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else { return Err(ProfileError::HeapInactive) };
        let mut ctl = ctl.clone().lock_owned().await;
        // Dumping reads the profile from a file jemalloc writes and symbolizes it: blocking work.
        tokio::task::spawn_blocking(move || {
            let profile = ctl.dump_pprof();
            forget_symbols();
            profile
        })
        .await
        .map_err(|e| ProfileError::Failed(e.to_string()))?
        .map_err(|e| ProfileError::Failed(format!("{e:#}")))
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        Err(ProfileError::HeapInactive)
    }
}

/// Free what symbolizing a profile loaded: backtrace-rs keeps the binary's parsed debug info
/// for the life of the process (~130 MiB for the release build), which an automatic heap dump
/// near the memory limit would otherwise add for good.
fn forget_symbols() {
    backtrace::clear_symbol_cache();
}

static CPU_BUSY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A CPU profile over `seconds` (every thread, 99 Hz), pprof protobuf.
pub async fn cpu_pprof(seconds: u64) -> Result<Vec<u8>, ProfileError> {
    use std::sync::atomic::Ordering;
    if CPU_BUSY.swap(true, Ordering::AcqRel) {
        return Err(ProfileError::Busy);
    }
    let res = tokio::task::spawn_blocking(move || {
        use pprof::protos::Message as _;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(99)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| ProfileError::Failed(e.to_string()))?;
        std::thread::sleep(Duration::from_secs(seconds));
        let report = guard.report().build().map_err(|e| ProfileError::Failed(e.to_string()))?;
        let profile = report.pprof().map_err(|e| ProfileError::Failed(e.to_string()));
        forget_symbols();
        let profile = profile?;
        let mut out = Vec::new();
        profile.encode(&mut out).map_err(|e| ProfileError::Failed(e.to_string()))?;
        Ok(out)
    })
    .await
    .unwrap_or_else(|e| Err(ProfileError::Failed(e.to_string())));
    CPU_BUSY.store(false, Ordering::Release);
    res
}

/// The process's memory limit in bytes: its cgroup's (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), or `configured_mib` where there is none — the lower of the two
/// when both are set; `None` when unlimited.
pub fn memory_limit(configured_mib: u64) -> Option<u64> {
    let configured = (configured_mib > 0).then(|| configured_mib * 1024 * 1024);
    match (cgroup_memory_limit(), configured) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn cgroup_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        // "max" (v2) or a value near i64::MAX (v1): no limit.
        return text.trim().parse::<u64>().ok().filter(|v| *v < (1 << 60));
    }
    None
}

/// Write `profile` as a new file in `dir` and keep only the newest `max_files`.
fn save(dir: &Path, profile: &[u8], rss: u64, max_files: usize) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = dir.join(format!("heap-{secs}-rss{}MiB.pb.gz", rss >> 20));
    std::fs::write(&path, profile)?;
    // heap-<unix seconds>-…: oldest first.
    let written = |p: &PathBuf| -> Option<u64> {
        p.file_name()?.to_str()?.strip_prefix("heap-")?.split('-').next()?.parse().ok()
    };
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((written(&p)?, p)))
        .collect();
    files.sort();
    while files.len() > max_files {
        let _ = std::fs::remove_file(files.remove(0).1);
    }
    Ok(path)
}

/// Until `cancel`: write a heap profile when RSS passes the threshold (see the module docs).
pub async fn watch(
    cfg: ProfilesSection,
    dir: PathBuf,
    dumps: prometheus::IntCounter,
    cancel: CancellationToken,
) {
    let Some(limit) = memory_limit(cfg.memory_limit_mib) else {
        tracing::debug!("no memory limit known: no automatic heap profiles");
        return;
    };
    if !heap_profiling_active() {
        tracing::info!("heap profiling is not active: no automatic heap profiles");
        return;
    }
    let threshold = (limit as f64 * cfg.heap_dump_at_memory_fraction) as u64;
    let mut last: Option<Instant> = None;
    let mut tick = tokio::time::interval(cfg.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(rss) = crate::load::rss_bytes("self") else { continue };
        if rss < threshold || last.is_some_and(|t| t.elapsed() < cfg.cooldown) {
            continue;
        }
        last = Some(Instant::now());
        match heap_pprof().await {
            Ok(p) => match save(&dir, &p, rss, cfg.max_files) {
                Ok(path) => {
                    dumps.inc();
                    tracing::warn!(
                        rss_mib = rss >> 20,
                        limit_mib = limit >> 20,
                        path = %path.display(),
                        "memory high: heap profile written"
                    );
                }
                Err(e) => tracing::warn!(error = %e, dir = %dir.display(), "cannot write heap profile"),
            },
            Err(e) => tracing::warn!(error = %e, "heap profile failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_profiles_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        // Older ones, one with fewer digits (sorted by number, not as text).
        for secs in [999, 1000, 1001, 1002, 1003] {
            std::fs::write(dir.path().join(format!("heap-{secs}-rss1MiB.pb.gz")), b"x").unwrap();
        }
        let new = save(dir.path(), b"new", 5 << 20, 3).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let new = new.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(names, vec!["heap-1002-rss1MiB.pb.gz".to_string(), "heap-1003-rss1MiB.pb.gz".into(), new]);
    }

    #[test]
    fn the_lower_of_the_cgroup_and_the_configured_limit_counts() {
        let cgroup = cgroup_memory_limit();
        assert_eq!(memory_limit(0), cgroup);
        assert_eq!(memory_limit(512), Some(cgroup.map_or(512 << 20, |c| c.min(512 << 20))));
    }
}
