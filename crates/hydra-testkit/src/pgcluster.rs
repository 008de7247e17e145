//! Throwaway PostgreSQL clusters for tests and benchmarks.
//!
//! Starts a private cluster from the installed server binaries (`/usr/lib/postgresql/*/bin`, else
//! `pg_config --bindir`) on a free loopback port, with its socket and data in a temporary
//! directory. As root (initdb refuses to run as root) the server runs as the `postgres` user via
//! `runuser`. Dropping the handle stops the cluster and removes its directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// A running throwaway cluster.
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Server options of the last start (a resumed server starts with the same ones).
    opts: String,
}

fn find_bindir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    if let Some(p) = versions.pop() {
        return Ok(p);
    }
    let out = Command::new("pg_config").arg("--bindir").output().context("run pg_config --bindir")?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.join("initdb").exists() {
        return Ok(p);
    }
    bail!("no PostgreSQL server binaries found (install postgresql, or set DATABASE_URL)")
}

/// The first of `n` consecutive ports free for TCP and UDP on every address in `ips`, below the
/// kernel's ephemeral range, so that outgoing connections of other processes (which take
/// ephemeral ports) cannot take one between now and its use. For tests and benchmarks.
pub fn free_port_base(n: u16, ips: &[&str]) -> anyhow::Result<u16> {
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(n).max(10_001));
    'outer: for _ in 0..200 {
        let base = low + rand::random::<u16>() % (high - low);
        for port in base..base + n {
            for ip in ips {
                let free = std::net::TcpListener::bind((*ip, port)).is_ok()
                    && std::net::UdpSocket::bind((*ip, port)).is_ok();
                if !free {
                    continue 'outer;
                }
            }
        }
        return Ok(base);
    }
    bail!("no {n} free consecutive ports between {low} and {high} on {ips:?}")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// Create and start a cluster. `fsync = false` is for functional tests only; benchmarks keep
    /// the production default.
    pub fn start(fsync: bool) -> anyhow::Result<Self> {
        let bindir = find_bindir()?;
        let dir = std::env::temp_dir().join(format!(
            "hydra-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown").arg("postgres:").arg(&dir).status()?.success();
            if !ok {
                bail!("chown postgres {} failed", dir.display());
            }
        }
        let mut c = Self { dir, bindir, port: 0, as_postgres, opts: String::new() };
        let data = c.dir.join("data");
        c.run(
            "initdb",
            &["-D", &data.to_string_lossy(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
        )
        .context("initdb")?;
        // The port is free when picked but not reserved: something else may bind it before the
        // server does, so a failed start is tried again on another.
        let mut tries = 0;
        loop {
            tries += 1;
            c.port = free_port_base(1, &["127.0.0.1"])?;
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=300 \
                 -c shared_buffers=256MB",
                c.port,
                c.dir.display(),
                if fsync { "on" } else { "off" }
            );
            let log = c.dir.join("log");
            let started = c
                .run(
                    "pg_ctl",
                    &[
                        "-D",
                        &data.to_string_lossy(),
                        "-o",
                        &opts,
                        "-l",
                        &log.to_string_lossy(),
                        "-w",
                        "start",
                    ],
                )
                .with_context(|| format!("pg_ctl start on port {} (log: {})", c.port, log.display()));
            match started {
                Ok(()) => {
                    c.opts = opts;
                    break;
                }
                Err(e) if tries >= 3 => return Err(e),
                Err(e) => eprintln!("{e:#}; trying another port"),
            }
        }
        Ok(c)
    }

    /// Set the scheduling priority (nice value) of the server and its current processes; backends
    /// started later inherit it from the postmaster. Returns how many processes were changed
    /// (0 when not permitted, e.g. raising priority without root).
    pub fn set_priority(&self, nice: i32) -> usize {
        self.pids()
            .into_iter()
            // SAFETY: setpriority only reads its arguments.
            .filter(|pid| unsafe { libc::setpriority(libc::PRIO_PROCESS, *pid, nice) } == 0)
            .count()
    }

    /// The postmaster's PID and its children's (backends, background workers), now.
    pub fn pids(&self) -> Vec<u32> {
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let Some(master) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![master];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // Field 4, after the parenthesised command name, is the parent pid.
            let parent =
                stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            if parent == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let bin = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out =
            cmd.args(args).stdin(Stdio::null()).output().with_context(|| format!("run {}", bin.display()))?;
        if !out.status.success() {
            bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stop the server at once and keep its files, as a crashed or unreachable database would be.
    pub fn halt(&self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"])
    }

    /// Start a halted server again, on the same port with the same options.
    pub fn resume(&self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-o", &self.opts, "-l", &log.to_string_lossy(), "-w", "start"],
        )
    }

    /// Stop the server at once and remove its files.
    pub fn stop(&self) {
        let data = self.dir.join("data");
        let _ = self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Create a new, empty database on the server at `admin_url` and return its URL.
pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    create_database_from(admin_url, name, None).await
}

/// Create database `name` as a copy of `template` (nobody may be connected to it), or empty.
pub async fn create_database_from(
    admin_url: &str,
    name: &str,
    template: Option<&str>,
) -> anyhow::Result<String> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {}", describe(admin_url)))?;
    tokio::spawn(conn);
    // Identifiers cannot be bound; the name is ours and restricted to [a-z0-9_].
    for n in std::iter::once(name).chain(template) {
        if !n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            bail!("database name {n:?} must be [a-z0-9_]");
        }
    }
    let from = template.map(|t| format!(" TEMPLATE {t}")).unwrap_or_default();
    client.batch_execute(&format!("CREATE DATABASE {name}{from}")).await.context("create database")?;
    // Rebuild the URL with the new database name.
    let base = admin_url.split('?').next().unwrap_or(admin_url);
    let without_db = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    Ok(format!("{without_db}/{name}"))
}

/// Where a database URL points, for error messages, without its password.
fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => format!(
            "PostgreSQL at {:?} port {:?}, database {:?}, user {:?}",
            c.get_hosts(),
            c.get_ports(),
            c.get_dbname().unwrap_or(""),
            c.get_user().unwrap_or("")
        ),
        Err(_) => "PostgreSQL (the URL does not parse)".into(),
    }
}
