//! Confining the node under test to a share of one core, so a 2-core machine can offer it many
//! times its capacity: the generator and PostgreSQL stay outside the group and keep the cores
//! the node lacks.
//!
//! The period is 10 ms, not the kernel's default 100 ms: with 100 ms, a 0.2 quota lets the node
//! run 20 ms and then stalls it for up to 80 ms, so no latency target below that could hold. With
//! 10 ms the longest stall is 8 ms. What the quota models: a node whose CPU is the bottleneck (a
//! smaller or busier machine). What it does not: the memory bandwidth, caches and NIC queues of
//! a real host, or the transport work a remote client's kernel would do (the generator's
//! sockets are on this machine and its CPU is not charged to the node).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// The scheduler period of the group, µs.
pub(crate) const PERIOD_US: u64 = 10_000;

/// A CPU cgroup of its own (v1 `cpu` controller, or v2 `cpu.max`); removed on drop.
pub(crate) struct CpuQuota {
    dir: PathBuf,
    pub(crate) quota_us: u64,
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| {
        format!(
            "cannot write {value:?} to {} (a CPU quota needs root and a writable cgroup: v1 \
             /sys/fs/cgroup/cpu or v2 /sys/fs/cgroup with the cpu controller)",
            path.display()
        )
    })
}

impl CpuQuota {
    /// A group allowed `fraction` of one core (0.2: 2 ms of CPU time every 10 ms).
    pub(crate) fn create(fraction: f64) -> anyhow::Result<Self> {
        if !(fraction > 0.0 && fraction <= 64.0) {
            bail!("--node-cpu-quota must be above 0 (a share of one core), got {fraction}");
        }
        // The kernel's smallest quota is 1 ms.
        let quota_us = ((fraction * PERIOD_US as f64).round() as u64).max(1000);
        let name = format!("hydra-bench-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|x| x == "cpu"))
            .unwrap_or(false);
        let dir = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir_all(&dir).with_context(|| format!("create the cgroup {}", dir.display()))?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
            dir
        } else if v2_has_cpu {
            // The parent must hand the cpu controller down to its children.
            write(&v2.join("cgroup.subtree_control"), "+cpu")?;
            let dir = v2.join(&name);
            std::fs::create_dir_all(&dir).with_context(|| format!("create the cgroup {}", dir.display()))?;
            write(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
            dir
        } else {
            bail!(
                "no writable CPU cgroup: neither {} nor {} with the cpu controller exists",
                v1.join("cpu.cfs_quota_us").display(),
                v2.join("cgroup.controllers").display()
            );
        };
        Ok(Self { dir, quota_us })
    }

    /// Move process `pid` (all its threads) into the group.
    pub(crate) fn add(&self, pid: u32) -> anyhow::Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    /// The share of one core the group may use.
    pub(crate) fn cores(&self) -> f64 {
        self.quota_us as f64 / PERIOD_US as f64
    }

    /// Microseconds the group was throttled (v1 `cpu.stat` `throttled_time` is ns, v2 `throttled_usec`).
    pub(crate) fn throttled_us(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            match k {
                "throttled_time" => v.trim().parse::<u64>().ok().map(|ns| ns / 1000),
                "throttled_usec" => v.trim().parse().ok(),
                _ => None,
            }
        })
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Succeeds once the node has exited (a group with members cannot be removed).
        let _ = std::fs::remove_dir(&self.dir);
    }
}
