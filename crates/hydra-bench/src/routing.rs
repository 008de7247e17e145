//! `hydra-bench routing`: what answering "closer peers" costs as a process's heads grow
//! (issue 13: 10,000 heads per process).
//!
//! Every FIND_NODE and GET_PROVIDERS answer calls [`RoutingSnapshot::closest`] on the head's
//! snapshot: its routing-table peers plus every sibling head of the process. Per head count the
//! bench builds one snapshot (random peer IDs: `--peers` in the table, the heads as siblings)
//! and times `closest` for random targets on one thread, in thread CPU time, beside a **full
//! scan** of the same candidates — every distance, then a selection of the k closest, which is
//! what `closest` did before it walked the sorted keys (main at `3165de5`). The two alternate,
//! `--runs` times; it prints medians in microseconds per answer and each head count's ratio to
//! the first.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hydra::config::AddressFilter;
use hydra::net::routing::{RoutingSnapshot, Siblings, K_VALUE};
use libp2p::kad::KBucketKey;
use libp2p::{Multiaddr, PeerId};

use crate::store::median;

pub(crate) struct RoutingOpts {
    pub heads: Vec<usize>,
    pub peers: usize,
    pub queries: usize,
    pub runs: usize,
}

/// This thread's CPU time, to the nanosecond (`store::cpu_time` reads the process's in 10 ms
/// ticks, too coarse for a measurement of a few milliseconds).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Microseconds of CPU per call of `f` over `targets`; `sink` keeps the answers observable.
fn per_call(targets: &[Vec<u8>], sink: &mut usize, mut f: impl FnMut(&[u8]) -> usize) -> f64 {
    let t0 = thread_cpu();
    for t in targets {
        *sink += f(t);
    }
    (thread_cpu() - t0).as_secs_f64() * 1e6 / targets.len() as f64
}

pub(crate) fn routing(o: RoutingOpts) -> anyhow::Result<()> {
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse()?;
    let peers: Vec<PeerId> = (0..o.peers).map(|_| PeerId::random()).collect();
    let targets: Vec<Vec<u8>> = (0..o.queries).map(|_| rand::random::<[u8; 32]>().to_vec()).collect();
    println!(
        "routing: closer peers (k = {K_VALUE}) from a snapshot of {} table peers plus the sibling heads; {} random \
         targets per measurement, thread CPU time, medians of {} runs",
        o.peers, o.queries, o.runs
    );
    println!("| heads | µs per answer (walk) | µs per answer (full scan) | scan ÷ walk | walk ÷ first row's walk |");
    println!("|---|---|---|---|---|");
    let mut first = None;
    let mut sink = 0usize;
    for &h in &o.heads {
        let heads: Vec<PeerId> = (0..h).map(|_| PeerId::random()).collect();
        let live = Arc::new(ArcSwap::from_pointee(vec![addr.clone()]));
        let siblings = Siblings::new(heads.iter().map(|p| (*p, live.clone())), AddressFilter::Any);
        let snap = RoutingSnapshot::new(peers.iter().map(|p| (*p, vec![addr.clone()])), siblings);
        let keys: Vec<KBucketKey<PeerId>> =
            peers.iter().chain(&heads).map(|p| KBucketKey::from(*p)).collect();
        let Some(&me) = heads.first() else { continue };
        let (mut walk, mut scan) = (Vec::new(), Vec::new());
        for _ in 0..o.runs {
            walk.push(per_call(&targets, &mut sink, |t| snap.closest(t, K_VALUE, &[me]).len()));
            scan.push(per_call(&targets, &mut sink, |t| {
                let t = KBucketKey::new(t.to_vec());
                let mut d: Vec<_> = keys.iter().map(|k| (k.distance(&t), k)).collect();
                if d.len() > K_VALUE + 1 {
                    d.select_nth_unstable_by(K_VALUE, |a, b| a.0.cmp(&b.0));
                }
                d.truncate(K_VALUE + 1);
                d.sort_by_key(|c| c.0);
                d.len()
            }));
        }
        let (w, s) = (median(walk), median(scan));
        let base = *first.get_or_insert(w);
        println!("| {h} | {w:.2} | {s:.1} | {:.1} | {:.2} |", s / w, w / base);
    }
    std::hint::black_box(sink);
    Ok(())
}
