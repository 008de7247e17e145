//! How much of its CPU the node uses: the process's CPU time over the CPU it is allowed — the
//! tightest CFS quota on its cgroup path (v2 `cpu.max`, v1 `cpu.cfs_quota_us` ÷
//! `cpu.cfs_period_us`), else the CPUs it may run on.
//!
//! Shown to operators (`GET /v1/status` `cpu_busy_ratio`, `cpu_allowance_cores`; the gauges
//! `hydra_cpu_busy_ratio`, `hydra_cpu_allowance_cores`): a node held near 1 has no spare CPU
//! whatever its runtime lag says — under a quota the work waits in the sockets, in front of the
//! runtime, where the lag probe's timer does not see it.
//!
//! Not an admission signal. Tried (2026-12-07, `docs/benchmarks.md`): treating "at 0.98 of the
//! allowance with the lag rising" as CPU short, and raising the admitted rate only below 0.95. A
//! node serving its capacity already runs at 0.92–0.98 of its quota, so the share cannot tell
//! "at capacity" from "past it": at 1 × capacity the gate bound, the node began shedding, and
//! the reconnecting clients' handshakes kept it at 0.94–0.99 while it admitted half of what it
//! could serve — goodput 516/s against 756 and 837/s without the rule in the same sitting.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::signals::Readings;

/// CPU time of the whole process so far (all threads), seconds.
pub fn process_cpu_seconds() -> Option<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (r == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// The CPUs this process may use, in cores (0.2: a fifth of one): the tightest CFS quota on its
/// cgroup path and its ancestors, and the CPUs it may be scheduled on.
pub fn cpu_allowance() -> f64 {
    let cpus = cpus_allowed();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| quota_cores(&c, Path::new("/sys/fs/cgroup")));
    cgroup.map_or(cpus, |q| q.min(cpus))
}

/// The CPUs this process may be scheduled on (its affinity mask). Not
/// `std::thread::available_parallelism`, which also reads the cgroup quota — [`quota_cores`]
/// reads it here, exactly rather than rounded up — so the files would be read twice.
fn cpus_allowed() -> f64 {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return f64::from(n);
            }
        }
    }
    1.0
}

/// The tightest CFS quota (cores) along this process's cgroup path, from `/proc/self/cgroup`'s
/// text and the cgroup mount `root`; None without one.
fn quota_cores(proc_cgroup: &str, root: &Path) -> Option<f64> {
    let mut tightest: Option<f64> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let quota = if controllers.is_empty() {
            // cgroup v2 (the unified hierarchy mounted at the root; on a hybrid host it is not).
            if !root.join("cgroup.controllers").exists() {
                continue;
            }
            along(root, path, |dir| {
                let max = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
                let mut f = max.split_whitespace();
                let (quota, period) = (f.next()?, f.next()?);
                cores(quota.parse().ok()?, period.parse().ok()?)
            })
        } else if controllers.split(',').any(|c| c == "cpu") {
            let Some(mount) = [controllers, "cpu", "cpu,cpuacct"]
                .iter()
                .map(|m| root.join(m))
                .find(|m| m.join("cpu.cfs_quota_us").exists())
            else {
                continue;
            };
            along(&mount, path, |dir| {
                let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok()?.trim().parse::<f64>().ok();
                cores(read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?)
            })
        } else {
            continue;
        };
        if let Some(q) = quota {
            tightest = Some(tightest.map_or(q, |t| t.min(q)));
        }
    }
    tightest
}

/// quota ÷ period in cores; None for no quota (v1 `-1`, v2 `max`, which does not parse).
fn cores(quota: f64, period: f64) -> Option<f64> {
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// The tightest of `read` over the group `path` under `mount` and its ancestors (a quota on a
/// parent limits its children too). A path not found under the mount (a container that sees
/// its own group as the root) is read from the mount's root alone.
fn along(mount: &Path, path: &str, read: impl Fn(&Path) -> Option<f64>) -> Option<f64> {
    let mut dir: PathBuf = mount.join(path.trim_start_matches('/'));
    if !dir.exists() {
        dir = mount.to_path_buf();
    }
    let mut tightest: Option<f64> = None;
    loop {
        if let Some(q) = read(&dir) {
            tightest = Some(tightest.map_or(q, |t| t.min(q)));
        }
        if dir == mount || !dir.pop() {
            return tightest;
        }
    }
}

/// How often the allowance is read again (a process can be moved into a group, or its quota
/// changed, while it runs).
const ALLOWANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The share of its allowance the process used over a sliding window of samples (0..1, a little
/// above 1 where the kernel lets a period overrun).
pub(crate) struct BusyWindow {
    /// CPU seconds used so far, read at each sample.
    pub(crate) cpu: Readings<f64>,
    allowance: f64,
    read_at: Option<Instant>,
}

impl BusyWindow {
    pub(crate) fn new(len: usize) -> Self {
        Self { cpu: Readings::new(len), allowance: 1.0, read_at: None }
    }

    /// Record the process's CPU time now (and read the allowance again when due).
    pub(crate) fn push(&mut self) {
        let now = Instant::now();
        if self.read_at.is_none_or(|t| now.duration_since(t) >= ALLOWANCE_EVERY) {
            self.allowance = cpu_allowance();
            self.read_at = Some(now);
        }
        if let Some(cpu) = process_cpu_seconds() {
            self.push_at(now, cpu, self.allowance);
        }
    }

    pub(crate) fn push_at(&mut self, at: Instant, cpu_seconds: f64, allowance: f64) {
        self.allowance = allowance;
        self.cpu.push_at(at, cpu_seconds);
    }

    /// CPU used ÷ CPU allowed over the window (0 until it spans two samples).
    pub(crate) fn busy(&self) -> f64 {
        let Some((wall, old, new)) = self.cpu.span() else { return 0.0 };
        if wall <= 0.0 || self.allowance <= 0.0 {
            return 0.0;
        }
        (new - old).max(0.0) / (wall * self.allowance)
    }

    /// The allowance last read, cores.
    pub(crate) fn allowance(&self) -> f64 {
        self.allowance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_tightest_quota_along_the_path_counts_on_v1_and_v2() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // v1: cpu controller mounted at cpu,cpuacct, the process in /a/b; /a is limited to 0.5,
        // /a/b to 0.2.
        let v1 = root.join("cpu,cpuacct");
        for (p, quota) in [("", -1), ("a", 50_000), ("a/b", 2_000)] {
            let d = v1.join(p);
            std::fs::create_dir_all(&d).unwrap();
            let period = if p == "a/b" { 10_000 } else { 100_000 };
            std::fs::write(d.join("cpu.cfs_quota_us"), format!("{quota}\n")).unwrap();
            std::fs::write(d.join("cpu.cfs_period_us"), format!("{period}\n")).unwrap();
        }
        let q = quota_cores("4:memory:/x\n2:cpu,cpuacct:/a/b\n0::/\n", root).unwrap();
        assert!((q - 0.2).abs() < 1e-9, "{q}");
        // A group looser than its parent: the parent's quota holds.
        std::fs::write(v1.join("a/b/cpu.cfs_quota_us"), "-1").unwrap();
        let q = quota_cores("2:cpu,cpuacct:/a/b\n", root).unwrap();
        assert!((q - 0.5).abs() < 1e-9, "{q}");
        // A path the mount does not have (a container's view): its root is read.
        assert_eq!(quota_cores("2:cpu,cpuacct:/elsewhere\n", root), None);

        // v2: unified hierarchy at the root.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory").unwrap();
        std::fs::create_dir_all(root.join("pod/c")).unwrap();
        std::fs::write(root.join("pod/cpu.max"), "150000 100000\n").unwrap();
        std::fs::write(root.join("pod/c/cpu.max"), "max 100000\n").unwrap();
        let q = quota_cores("0::/pod/c\n", root).unwrap();
        assert!((q - 1.5).abs() < 1e-9, "{q}");
        // No quota anywhere: none.
        std::fs::write(root.join("pod/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(quota_cores("0::/pod/c\n", root), None);
    }

    #[test]
    fn busy_is_cpu_used_over_cpu_allowed_in_the_window() {
        let t = Instant::now();
        let mut w = BusyWindow::new(5);
        assert_eq!(w.busy(), 0.0);
        // 0.2 of a core allowed, 0.19 s of CPU a second.
        for i in 0..=8 {
            w.push_at(t + Duration::from_millis(250 * i), 0.0475 * i as f64, 0.2);
        }
        assert!((w.busy() - 0.95).abs() < 1e-9, "{}", w.busy());
        // Held at its whole quota for the last second.
        for i in 9..=12 {
            w.push_at(t + Duration::from_millis(250 * i), 0.0475 * 8.0 + 0.05 * (i - 8) as f64, 0.2);
        }
        assert!((w.busy() - 1.0).abs() < 1e-9, "{}", w.busy());
        assert_eq!(w.allowance(), 0.2);
    }

    #[test]
    fn this_process_has_an_allowance_and_its_cpu_time_grows() {
        let a = cpu_allowance();
        assert!(a > 0.0 && a <= 4096.0, "{a}");
        let c0 = process_cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds().unwrap() > c0);
    }
}
