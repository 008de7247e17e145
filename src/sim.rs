//! `hydra sim coverage`: what heads buy the network, simulated.
//!
//! An Amino-like network of `peers` random peer IDs (Kademlia keys are SHA-256 of the peer ID,
//! as in [`identity::kad_key`]) plus `H` heads. A provider record of a key is stored on the key's
//! `k` (20) closest peers by XOR distance, so the share of random keys whose `k` closest include a
//! head — the **coverage** — is also the share of provider records that reach the fleet. Heads
//! take the node's balanced identities ([`identity::extend_with`]: `v1 (2)` and `v2 (32)` are
//! the identity schemes of [`identity::Scheme`], other counts are what-ifs) or random ones
//! (candidate 0 of every index, [`identity::derive`], no balancing); a last series places keys
//! exactly evenly (the ideal spacing, not identities) for reference.
//!
//! **Exact and fast.** A key is covered iff its closest head is closer than its `k`-th closest
//! network peer (fewer than `k` peers are then closer than that head, so it ranks among the `k`
//! closest of the union; otherwise `k` peers rank before every head). The `k`-th peer distance is
//! computed once per key; the closest head is a walk down the sorted head keys (a binary trie).
//! Both schemes issue identities in a fixed order, so the first `H` of one sequence of heads
//! serve every `H`, and coverage only grows with `H`: the heads needed for a target coverage
//! are found by bisection.

use std::fmt::Write as _;

use rand::{Rng, SeedableRng};

use crate::identity::{self, KeyTrie, Seed};

/// ProbeLab's measurement of the hydra fleet (RFM21): 2,015 heads, 16,208 DHT peers, 97.1 % of
/// peers with a head among their 20 closest.
pub const HYDRA_FLEET: (usize, usize, f64) = (2015, 16_208, 0.971);

pub type Key = [u8; 32];

/// How the simulated heads' keys are placed (the node's identity schemes among them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The node's sequence rule with this many candidates per index (2: scheme v1, 32: v2).
    Balanced(u8),
    /// One random identity per index.
    Random,
    /// Keys at exactly `i × 2^256 / H` (no identities: the ideal spacing).
    Even,
}

impl Placement {
    pub fn name(self) -> String {
        match self {
            Placement::Balanced(c) if c == identity::Scheme::V1.candidates() => format!("v1 ({c})"),
            Placement::Balanced(c) if c == identity::Scheme::V2.candidates() => format!("v2 ({c})"),
            Placement::Balanced(c) => format!("best of {c}"),
            Placement::Random => "random".into(),
            Placement::Even => "even".into(),
        }
    }
}

/// The simulated network: its peers' distances to every sampled key.
pub struct Network {
    /// The sampled keys.
    pub keys: Vec<Key>,
    /// For each key, the XOR distance of its `k`-th closest network peer.
    kth: Vec<Key>,
    pub peers: usize,
    pub k: usize,
}

/// The Kademlia key of a random Ed25519 peer, drawn from `rng` (reproducible).
fn peer_key(rng: &mut impl Rng) -> Key {
    let kp = libp2p::identity::Keypair::ed25519_from_bytes(rng.gen::<[u8; 32]>()).expect("32 bytes");
    identity::kad_key(&kp.public().to_peer_id())
}

fn xor(a: &Key, b: &Key) -> Key {
    std::array::from_fn(|i| a[i] ^ b[i])
}

impl Network {
    /// `peers` random peers and `keys` random keys, from `rng_seed`.
    pub fn new(peers: usize, keys: usize, k: usize, rng_seed: u64) -> Self {
        assert!(peers >= k, "the network needs at least k peers");
        let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
        let ids: Vec<Key> = (0..peers).map(|_| peer_key(&mut rng)).collect();
        let keys: Vec<Key> = (0..keys).map(|_| rng.gen()).collect();
        let mut dist = Vec::with_capacity(peers);
        let kth = keys
            .iter()
            .map(|t| {
                dist.clear();
                dist.extend(ids.iter().map(|p| xor(p, t)));
                *dist.select_nth_unstable(k - 1).1
            })
            .collect();
        Network { keys, kth, peers, k }
    }

    /// Share of the sampled keys whose `k` closest include one of `heads` (sorted).
    pub fn coverage(&self, heads: &[Key]) -> f64 {
        if heads.is_empty() {
            return 0.0;
        }
        let covered =
            self.keys.iter().zip(&self.kth).filter(|(t, kth)| xor(&closest(heads, t), t) < **kth).count();
        covered as f64 / self.keys.len() as f64
    }
}

/// The key of `sorted` closest to `t` by XOR distance (the routing snapshots' trie descent).
pub fn closest(sorted: &[Key], t: &Key) -> Key {
    sorted[identity::prefix_run(sorted, |k| &k[..], t, 1).start]
}

/// The first `n` heads' Kademlia keys under `scheme`, in issue order.
pub fn head_keys(scheme: Placement, seed: &Seed, n: usize) -> Vec<Key> {
    match scheme {
        Placement::Balanced(c) => identity::extend_with(seed, &mut KeyTrie::default(), 0..n as u32, c)
            .into_iter()
            .map(|i| i.kad_key)
            .collect(),
        Placement::Random => (0..n as u32)
            .map(|i| identity::kad_key(&identity::derive(seed, i, 0).public().to_peer_id()))
            .collect(),
        Placement::Even => (0..n)
            .map(|i| {
                // i × 2^256 / n, to 128 bits of precision (plenty for any n here).
                let x = ((i as u128) << 64) / n as u128;
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(x as u64).to_be_bytes());
                k
            })
            .collect(),
    }
}

fn sorted(keys: &[Key]) -> Vec<Key> {
    let mut v = keys.to_vec();
    v.sort_unstable();
    v
}

/// The largest gap between neighbouring keys (the keyspace as a ring) as a multiple of the even
/// spacing `2^256 / n`, from the top 64 bits.
pub fn largest_gap(keys: &[Key]) -> f64 {
    let mut top: Vec<u64> = keys.iter().map(|k| u64::from_be_bytes(k[..8].try_into().unwrap())).collect();
    top.sort_unstable();
    let ring = top.first().map(|f| f.wrapping_sub(*top.last().unwrap())).unwrap_or(0);
    let widest = top.windows(2).map(|w| w[1] - w[0]).chain([ring]).max().unwrap_or(0);
    widest as f64 / (u64::MAX as f64 / keys.len().max(1) as f64)
}

/// The fewest of `heads` (a prefix of one sequence) giving `target` coverage, if any do.
pub fn heads_needed(net: &Network, heads: &[Key], target: f64) -> Option<usize> {
    fewest(heads.len(), |h| net.coverage(&sorted(&heads[..h])) >= target)
}

/// The smallest `h` in `1..=max` with `enough(h)`, by bisection (`enough` must not turn false
/// again as `h` grows); `None` if even `max` is not enough.
fn fewest(max: usize, enough: impl Fn(usize) -> bool) -> Option<usize> {
    if !enough(max) {
        return None;
    }
    let (mut lo, mut hi) = (0, max); // enough(hi), and lo is not (or 0)
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if enough(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// One simulation's results.
pub struct Report {
    /// The schemes simulated, in column order.
    pub schemes: Vec<Placement>,
    pub peers: usize,
    pub keys: usize,
    pub k: usize,
    /// (heads, scheme, coverage, largest gap × even spacing) for each asked head count.
    pub rows: Vec<(usize, Placement, f64, f64)>,
    /// (scheme, target, heads needed or `None` if more than `max_heads`).
    pub needed: Vec<(Placement, f64, Option<usize>)>,
    pub max_heads: usize,
}

pub const TARGETS: [f64; 3] = [0.90, 0.97, 0.99];

/// Simulate `heads` counts against one network of `peers` peers, sampling `keys` keys, for
/// balanced heads with each of `candidates` per index (2 is the shipped scheme), random and
/// evenly spaced heads; search for the heads needed for [`TARGETS`] up to `max_heads`.
pub fn coverage(
    peers: usize,
    heads: &[usize],
    keys: usize,
    max_heads: usize,
    candidates: &[u8],
    rng_seed: u64,
) -> Report {
    const K: usize = 20;
    let net = Network::new(peers, keys, K, rng_seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed ^ 0x6865_6164);
    let seed = Seed::from_hex(&hex::encode(rng.gen::<[u8; 32]>())).expect("32 bytes of hex");
    let longest = heads.iter().copied().chain([max_heads]).max().unwrap_or(0);
    let schemes: Vec<Placement> = candidates
        .iter()
        .map(|&c| Placement::Balanced(c))
        .chain([Placement::Random, Placement::Even])
        .collect();
    let mut rows = Vec::new();
    let mut needed = Vec::new();
    for &scheme in &schemes {
        if scheme == Placement::Even {
            for &h in heads {
                let ks = head_keys(scheme, &seed, h);
                rows.push((h, scheme, net.coverage(&sorted(&ks)), largest_gap(&ks)));
            }
            for t in TARGETS {
                // Even spacing is not a prefix sequence: bisect over whole placements.
                let found = fewest(max_heads, |h| net.coverage(&sorted(&head_keys(scheme, &seed, h))) >= t);
                needed.push((scheme, t, found));
            }
            continue;
        }
        let all = head_keys(scheme, &seed, longest);
        for &h in heads {
            let ks = &all[..h];
            rows.push((h, scheme, net.coverage(&sorted(ks)), largest_gap(ks)));
        }
        for t in TARGETS {
            needed.push((scheme, t, heads_needed(&net, &all[..max_heads], t)));
        }
    }
    Report { schemes, peers, keys, k: K, rows, needed, max_heads }
}

impl Report {
    fn row(&self, h: usize, s: Placement) -> Option<(f64, f64)> {
        self.rows.iter().find(|r| r.0 == h && r.1 == s).map(|r| (r.2, r.3))
    }

    fn head_counts(&self) -> Vec<usize> {
        let mut hs: Vec<usize> = self.rows.iter().map(|r| r.0).collect();
        hs.sort_unstable();
        hs.dedup();
        hs
    }

    /// The tables, as printed by `hydra sim coverage`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "network: {} random peers, k = {}, {} random keys; a key is covered when a head is among its {} closest",
            self.peers, self.k, self.keys, self.k
        );
        let _ = writeln!(
            out,
            "(= the share of provider records, stored on a key's k closest, that reach a head)\n"
        );
        let gapped: Vec<Placement> = self.schemes.iter().copied().filter(|s| *s != Placement::Even).collect();
        let _ = write!(out, "{:>7}", "heads");
        for s in &self.schemes {
            let _ = write!(out, "  {:>11}", s.name());
        }
        for s in &gapped {
            let _ = write!(out, "  {:>15}", format!("gap {}", s.name()));
        }
        out.push('\n');
        for h in self.head_counts() {
            let _ = write!(out, "{h:>7}");
            for s in &self.schemes {
                let cell = self.row(h, *s).map(|(c, _)| format!("{:.1} %", c * 100.0)).unwrap_or_default();
                let _ = write!(out, "  {cell:>11}");
            }
            for s in &gapped {
                let gap = self.row(h, *s).map(|(_, g)| format!("{g:.1} x")).unwrap_or_default();
                let _ = write!(out, "  {gap:>15}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "(gap: the widest space between neighbouring head keys, in multiples of even spacing)"
        );
        let _ = writeln!(out, "\nheads needed (searched up to {}):", self.max_heads);
        let _ = writeln!(out, "{:>11}  {:>8}  {:>8}  {:>8}", "scheme", "90 %", "97 %", "99 %");
        for s in &self.schemes {
            let cell = |t: f64| {
                self.needed
                    .iter()
                    .find(|n| n.0 == *s && n.1 == t)
                    .map(|n| n.2.map(|h| h.to_string()).unwrap_or(format!(">{}", self.max_heads)))
                    .unwrap_or_default()
            };
            let _ =
                writeln!(out, "{:>11}  {:>8}  {:>8}  {:>8}", s.name(), cell(0.90), cell(0.97), cell(0.99));
        }
        let (h, p, c) = HYDRA_FLEET;
        let _ = writeln!(
            out,
            "\nthe hydra fleet (ProbeLab RFM21): {h} heads, {p} peers, {:.1} % of peers with a head among their 20 closest",
            c * 100.0
        );
        out
    }

    /// Coverage against heads for each scheme, the hydra fleet marked: an SVG document.
    pub fn svg(&self) -> String {
        let (w, h, m) = (720.0, 420.0, 60.0);
        let hs = self.head_counts();
        let x_max = hs.iter().copied().chain([HYDRA_FLEET.0]).max().unwrap_or(1) as f64;
        let x = |heads: f64| m + (w - 2.0 * m) * heads / x_max;
        let y = |cov: f64| h - m - (h - 2.0 * m) * cov;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Keys with a head among their {} closest ({} peers)</text>"#,
            w / 2.0,
            self.k,
            self.peers
        );
        // Axes, grid and labels.
        for i in 0..=10 {
            let cov = i as f64 / 10.0;
            let _ = writeln!(
                s,
                r##"<line x1="{m}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}%</text>"##,
                w - m,
                m - 6.0,
                y(cov) + 4.0,
                i * 10,
                y = y(cov)
            );
        }
        for i in 0..=5 {
            let heads = x_max * i as f64 / 5.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text>"#,
                x(heads),
                h - m + 18.0,
                heads
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{m}" x2="{m}" y1="{m}" y2="{}" stroke="#000"/><line x1="{m}" x2="{}" y1="{}" y2="{}" stroke="#000"/>"##,
            h - m,
            w - m,
            h - m,
            h - m
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">heads</text>"#, w / 2.0, h - 16.0);
        const COLOURS: [&str; 6] = ["#1f77b4", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
        for (i, scheme) in self.schemes.iter().enumerate() {
            let colour = match scheme {
                Placement::Random => "#d62728",
                Placement::Even => "#2ca02c",
                Placement::Balanced(_) => COLOURS[i % COLOURS.len()],
            };
            let pts: Vec<String> = hs
                .iter()
                .filter_map(|&n| self.row(n, *scheme).map(|(c, _)| format!("{:.1},{:.1}", x(n as f64), y(c))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = m + 14.0 + 16.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                w - m - 150.0,
                w - m - 126.0,
                w - m - 120.0,
                ly + 4.0,
                scheme.name()
            );
        }
        let (fh, fp, fc) = HYDRA_FLEET;
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">hydra fleet: {fh} heads, {fp} peers, {:.1}%</text>"#,
            x(fh as f64),
            y(fc),
            x(fh as f64) - 8.0,
            y(fc) + 16.0,
            fc * 100.0
        );
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut (closest head vs the k-th peer) agrees with sorting the whole union.
    #[test]
    fn coverage_equals_the_brute_force_k_closest() {
        let net = Network::new(400, 300, 20, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        // The network's own peers, rebuilt as `Network::new` drew them.
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let peers: Vec<Key> = (0..400).map(|_| peer_key(&mut r)).collect();
        for n in [1, 5, 30] {
            let heads: Vec<Key> = (0..n).map(|_| rng.gen()).collect();
            let brute = net
                .keys
                .iter()
                .filter(|t| {
                    let mut all: Vec<(Key, bool)> = peers.iter().map(|p| (xor(p, t), false)).collect();
                    all.extend(heads.iter().map(|h| (xor(h, t), true)));
                    all.sort_unstable();
                    all[..20].iter().any(|(_, head)| *head)
                })
                .count() as f64
                / net.keys.len() as f64;
            assert_eq!(net.coverage(&sorted(&heads)), brute, "{n} heads");
        }
    }

    #[test]
    fn the_trie_walk_finds_the_xor_closest_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let keys = sorted(&(0..500).map(|_| rng.gen()).collect::<Vec<Key>>());
        for _ in 0..500 {
            let t: Key = rng.gen();
            let best = keys.iter().min_by_key(|k| xor(k, &t)).unwrap();
            assert_eq!(closest(&keys, &t), *best);
        }
    }

    #[test]
    fn even_spacing_has_no_gap_wider_than_its_step_and_balanced_beats_random() {
        let seed = Seed::from_hex(&"ab".repeat(32)).unwrap();
        assert!((largest_gap(&head_keys(Placement::Even, &seed, 1000)) - 1.0).abs() < 0.01);
        let bal = largest_gap(&head_keys(Placement::Balanced(2), &seed, 500));
        let rnd = largest_gap(&head_keys(Placement::Random, &seed, 500));
        assert!(bal < rnd, "balanced {bal:.1} x, random {rnd:.1} x");
    }
}
