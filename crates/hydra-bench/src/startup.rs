//! `hydra-bench startup`: start-up time and idle memory of `hydra run` with many heads.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::node::{loopback_run_args, NodeProcess};
use crate::store::median;

/// `hydra-bench startup`: for each head count, start `hydra run` (this checkout's binary, embedded store,
/// loopback, fresh data directory), time until it logs "node started" (identities leased and
/// derived, every head listening), stay idle, read its resident memory, stop it with SIGTERM.
pub(crate) async fn startup(
    heads: Vec<usize>,
    runs: usize,
    idle: Duration,
    quic: bool,
) -> anyhow::Result<()> {
    let hydra = crate::node::hydra_binary()?;
    println!(
        "hydra-bench startup: {runs} runs per head count, idle {idle:?} before reading RSS, QUIC {quic}"
    );
    println!(
        "{:>6}  {:>16}  {:>14}  {:>16}",
        "heads", "start-up (s)", "idle RSS (MiB)", "RSS per head (KiB)"
    );
    for n in heads {
        let (mut secs, mut rss) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let dir = std::env::temp_dir().join(format!("hydra-bench-startup-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let t = Instant::now();
            let args = loopback_run_args(n, &dir, "bench", quic, &[]);
            let node = NodeProcess::spawn(&hydra, &args, Duration::from_secs(600)).await?;
            secs.push(t.elapsed().as_secs_f64());
            tokio::time::sleep(idle).await;
            rss.push(node.rss_kib().context("read the node's RSS")?);
            node.stop().await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (s, r) = (median(secs), median(rss));
        println!("{n:>6}  {s:>16.2}  {:>14.1}  {:>16.0}", r / 1024.0, r / n as f64);
    }
    Ok(())
}
