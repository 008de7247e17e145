//! Head identities: deterministic keys from a secret seed, balanced over the Kademlia keyspace,
//! leased to processes through the datastore.
//!
//! **Keys.** The key of identity `index` with candidate `choice` is
//! HKDF-SHA256(salt "hydra/head-identity/v1", ikm = seed, info = index ‖ choice) → Ed25519 secret.
//! Private keys are never stored: the datastore keeps (index, choice, Kademlia key, peer ID) and
//! any process with the seed re-derives the key. An index's key depends only on its own stored
//! choice, never on how many candidates were rejected elsewhere.
//!
//! **Balance.** The Kademlia key of a head is SHA-256 of its peer ID. Each new index takes the
//! best of its candidates in the binary trie of all keys issued so far: the one whose subtree at
//! depth ⌊log2 n⌋+1 — where a balanced trie of n keys holds about one key per subtree — holds
//! fewest keys; ties go to the shallower leaf, then to the lower choice. How many candidates is
//! the fleet's **identity scheme**, recorded in the datastore when its first identity is issued
//! ([`Scheme`]): v2 (32 candidates) for new fleets; v1 (2, "power of two choices") for fleets
//! created before v2 existed, which keep it so that their sequence stays what it was. `hydra
//! sim coverage` measured what it buys: 97 % of keys with a head among their 20 closest at 1,021
//! heads with v2 against 1,968 with v1 in a 16,000-peer network (`docs/benchmarks.md`).
//! (Comparing leaf depth alone was measured too coarse: at 1,000 heads the fullest 8-bit prefix
//! held 9 keys, against 7 with two candidates and 12 for random IDs.)
//!
//! **Leases.** [`plan`] decides, from a snapshot of identities and leases read under the fleet
//! lock, which identities a process gets: its own previous ones (same node name, same slot, hence
//! the same port), then identities whose lease expired or was released, then new ones.
//!
//! The seed is secret: it is never logged or printed, and `Seed` does not implement `Debug`.

use std::collections::{BTreeSet, HashSet};
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use hkdf::Hkdf;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use sha2::{Digest, Sha256};

/// The fleet's secret seed (32 bytes, stored as 64 hex characters).
pub struct Seed([u8; 32]);

impl Seed {
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(text.trim()).context("identity seed is not hex")?;
        let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) else {
            bail!("identity seed must be 32 bytes (64 hex characters), got {}", bytes.len())
        };
        Ok(Self(arr))
    }

    /// Read the seed from `file`; without one, from `data_dir/identity.seed`, created (mode 0600)
    /// on the first start of a single node.
    pub fn load_or_create(file: Option<&Path>, data_dir: &Path) -> anyhow::Result<Self> {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("read identity_seed_file {}", f.display()))?;
            return Self::from_hex(&text).with_context(|| format!("identity_seed_file {}", f.display()));
        }
        let path: PathBuf = data_dir.join("identity.seed");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_hex(&text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("create data_dir {}", data_dir.display()))?;
                let seed = Self::random();
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(&path).with_context(|| format!("create {}", path.display()))?;
                writeln!(f, "{}", hex::encode(seed.0))
                    .with_context(|| format!("write {}", path.display()))?;
                tracing::info!(path = %path.display(), "generated a new identity seed");
                Ok(seed)
            }
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
}

/// The key of identity `index`, candidate `choice`.
pub fn derive(seed: &Seed, index: u32, choice: u8) -> Keypair {
    let hk = Hkdf::<Sha256>::new(Some(b"hydra/head-identity/v1"), &seed.0);
    let mut info = [0u8; 5];
    info[..4].copy_from_slice(&index.to_be_bytes());
    info[4] = choice;
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm).expect("32 bytes is a valid HKDF-SHA256 output length");
    Keypair::ed25519_from_bytes(okm).expect("any 32 bytes are an Ed25519 secret key")
}

/// The Kademlia key of a peer: SHA-256 of its peer ID bytes.
pub fn kad_key(peer: &PeerId) -> [u8; 32] {
    Sha256::digest(peer.to_bytes()).into()
}

fn common_prefix_bits(a: &[u8; 32], b: &[u8; 32]) -> u32 {
    for i in 0..32 {
        let x = a[i] ^ b[i];
        if x != 0 {
            return i as u32 * 8 + x.leading_zeros();
        }
    }
    256
}

/// The issued Kademlia keys, viewed as a binary trie.
#[derive(Default, Clone)]
pub struct KeyTrie {
    keys: BTreeSet<[u8; 32]>,
}

impl KeyTrie {
    pub fn insert(&mut self, key: [u8; 32]) {
        self.keys.insert(key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Issued keys sharing the first `bits` bits with `key` (a subtree's size).
    pub fn count_with_prefix(&self, key: &[u8; 32], bits: u32) -> usize {
        let (mut lo, mut hi) = (*key, *key);
        for b in bits.min(256)..256 {
            let (i, m) = ((b / 8) as usize, 0x80u8 >> (b % 8));
            lo[i] &= !m;
            hi[i] |= m;
        }
        self.keys.range(lo..=hi).count()
    }

    /// Depth of the leaf `key` would get: one more than its longest common prefix with an issued
    /// key (0 for an empty trie). In sorted order that prefix is shared with a neighbour.
    pub fn depth(&self, key: &[u8; 32]) -> u32 {
        let before = self.keys.range(..=*key).next_back();
        let after = self.keys.range(*key..).next();
        match before.into_iter().chain(after).map(|k| common_prefix_bits(k, key)).max() {
            Some(cpl) => cpl + 1,
            None => 0,
        }
    }
}

/// Bit `b` of a key, 0 being the most significant.
fn bit(key: &[u8], b: usize) -> bool {
    key[b / 8] & (0x80 >> (b % 8)) != 0
}

/// In `sorted` (ascending by `key`), a run that holds the `k` entries closest to `t` by XOR
/// distance (all of `sorted` if it has at most `k`), found by descending the implicit binary trie
/// of the keys: one binary search per level, into the half that shares `t`'s next bit while that
/// half still holds `k` entries (or past an empty half). Every entry outside the run differs from
/// `t` in an earlier bit than every entry inside, so it is farther. The run holds about `k` to
/// `2k` entries for keys spread as hashes are; `t` has as many bits as the keys.
pub fn prefix_run<T>(sorted: &[T], key: impl Fn(&T) -> &[u8], t: &[u8], k: usize) -> Range<usize> {
    let (mut lo, mut hi) = (0, sorted.len());
    for b in 0..t.len() * 8 {
        if hi - lo <= k.max(1) {
            break;
        }
        // [lo, hi) agrees on bits 0..b, so bit b splits it in two.
        let mid = lo + sorted[lo..hi].partition_point(|e| !bit(key(e), b));
        let near = if bit(t, b) { mid..hi } else { lo..mid };
        if near.is_empty() {
            continue; // all of [lo, hi) is in the other half: descend there
        }
        if near.len() < k {
            break; // the k closest are the near half and the nearest of the other
        }
        (lo, hi) = (near.start, near.end);
    }
    lo..hi
}

/// A newly issued identity.
pub struct Issued {
    pub index: u32,
    pub choice: u8,
    pub kad_key: [u8; 32],
    pub keypair: Keypair,
}

/// A fleet's identity scheme: how many candidates each new index chooses from. Recorded in the
/// datastore (`hydra_meta` key `identity_scheme`) when the fleet's first identity is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Two candidates: fleets whose identities predate the record.
    V1,
    /// 32 candidates: every fleet created since.
    V2,
}

impl Scheme {
    /// The scheme a new fleet gets.
    pub const CURRENT: Scheme = Scheme::V2;

    pub fn candidates(self) -> u8 {
        match self {
            Scheme::V1 => 2,
            Scheme::V2 => 32,
        }
    }

    pub fn version(self) -> u32 {
        match self {
            Scheme::V1 => 1,
            Scheme::V2 => 2,
        }
    }

    pub fn from_version(v: u32) -> Option<Self> {
        match v {
            1 => Some(Scheme::V1),
            2 => Some(Scheme::V2),
            _ => None,
        }
    }
}

/// Extend the balanced sequence of `scheme` with `indices` (in order), inserting each choice
/// into `trie`.
pub fn extend(
    seed: &Seed,
    trie: &mut KeyTrie,
    indices: impl IntoIterator<Item = u32>,
    scheme: Scheme,
) -> Vec<Issued> {
    extend_with(seed, trie, indices, scheme.candidates())
}

/// [`extend`] choosing among `candidates` keys per index (choices `0..candidates`); the rule
/// is the same for any count, so more candidates place each key nearer the emptiest region.
/// `hydra sim coverage --candidates` measures what that buys.
///
/// The candidates' keys do not depend on the trie, only the choice among them does: they are
/// derived on every core (Ed25519 key generation is nearly all of the work: 32 candidates for
/// 10,000 new heads took 7 s on one core), a chunk of indices at a time so that only one
/// chunk's candidate keypairs are held at once; the choice then runs in index order.
pub fn extend_with(
    seed: &Seed,
    trie: &mut KeyTrie,
    indices: impl IntoIterator<Item = u32>,
    candidates: u8,
) -> Vec<Issued> {
    let indices: Vec<u32> = indices.into_iter().collect();
    let candidates = candidates.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(CANDIDATE_CHUNK) {
        for (index, cands) in chunk.iter().zip(derive_candidates(seed, chunk, candidates, threads)) {
            // The candidate in the emptier region: fewer keys in its subtree at the level where
            // a balanced trie has about one key per subtree, then the shallower leaf, then the
            // lower choice.
            let n = trie.len().max(1);
            let level = usize::BITS - n.leading_zeros();
            let (choice, keypair, kad) = cands
                .into_iter()
                .min_by_key(|(c, _, k)| {
                    (trie.count_with_prefix(k, level.saturating_sub(1)), trie.depth(k), *c)
                })
                .expect("at least one candidate");
            trie.insert(kad);
            out.push(Issued { index: *index, choice, kad_key: kad, keypair });
        }
    }
    out
}

/// Indices whose candidates are derived (and held) at once by [`extend_with`].
const CANDIDATE_CHUNK: usize = 1024;

/// Every candidate (choice, keypair, Kademlia key) of each index in `indices`, in order, derived
/// on up to `threads` threads.
fn derive_candidates(
    seed: &Seed,
    indices: &[u32],
    candidates: u8,
    threads: usize,
) -> Vec<Vec<(u8, Keypair, [u8; 32])>> {
    let of = |index: u32| -> Vec<(u8, Keypair, [u8; 32])> {
        (0..candidates)
            .map(|c| {
                let kp = derive(seed, index, c);
                let k = kad_key(&kp.public().to_peer_id());
                (c, kp, k)
            })
            .collect()
    };
    if threads <= 1 || indices.len() < 2 {
        return indices.iter().map(|&i| of(i)).collect();
    }
    let per = indices.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = indices
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(|&i| of(i)).collect::<Vec<_>>()))
            .collect();
        parts.into_iter().flat_map(|h| h.join().expect("deriving keys does not panic")).collect()
    })
}

/// One lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub index: u32,
    pub node: String,
    pub slot: u32,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// The run that holds it; None once released by a graceful shutdown.
    pub token: Option<String>,
}

/// What a process asking for `n` heads gets, decided under the fleet lock.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (slot, identity index) for every slot whose identity already exists.
    pub assigned: Vec<(u32, u32)>,
    /// Identity indices whose leases this process gives up (it now runs fewer heads).
    pub released: Vec<u32>,
    /// Slots that need new identities, in order.
    pub new_slots: Vec<u32>,
    /// Live leases of this node name held by another run (another live process with the same
    /// name, or a crashed run of this one whose leases have not expired yet).
    pub conflicts: usize,
}

/// Decide the leases of `node` asking for `n` heads at time `now`: its own previous identities
/// keep their slots; then the lowest free identities (never leased, released, or expired) fill
/// the remaining slots; the rest need new identities.
pub fn plan(node: &str, token: &str, n: u32, now: i64, identities: &[u32], leases: &[LeaseRow]) -> Plan {
    let mut p = Plan::default();
    let mut filled = HashSet::new();
    // Same name and (my run, released, or expired): mine. Same name, another run, live: not mine.
    let is_mine = |l: &LeaseRow| {
        l.node == node && (l.token.as_deref().is_none_or(|t| t == token) || l.expires_at <= now)
    };
    p.conflicts = leases.iter().filter(|l| l.node == node && !is_mine(l)).count();
    let mut mine: Vec<&LeaseRow> = leases.iter().filter(|l| is_mine(l)).collect();
    mine.sort_by_key(|l| (l.slot, l.index));
    for l in &mine {
        if l.slot < n && filled.insert(l.slot) {
            p.assigned.push((l.slot, l.index));
        }
    }
    let held: HashSet<u32> =
        leases.iter().filter(|l| !is_mine(l) && l.expires_at > now).map(|l| l.index).collect();
    let taken: HashSet<u32> = p.assigned.iter().map(|(_, i)| *i).collect();
    let mut free: Vec<u32> =
        identities.iter().copied().filter(|i| !held.contains(i) && !taken.contains(i)).collect();
    free.sort_unstable();
    let mut free = free.into_iter();
    for slot in 0..n {
        if filled.contains(&slot) {
            continue;
        }
        match free.next() {
            Some(i) => p.assigned.push((slot, i)),
            None => p.new_slots.push(slot),
        }
    }
    p.assigned.sort_unstable();
    let kept: HashSet<u32> = p.assigned.iter().map(|(_, i)| *i).collect();
    p.released = mine.iter().map(|l| l.index).filter(|i| !kept.contains(i)).collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(b: u8) -> Seed {
        Seed([b; 32])
    }

    #[test]
    fn keys_are_deterministic_per_index_and_choice() {
        let s = seed(7);
        let a = derive(&s, 5, 0).public().to_peer_id();
        assert_eq!(a, derive(&s, 5, 0).public().to_peer_id());
        assert_ne!(a, derive(&s, 5, 1).public().to_peer_id());
        assert_ne!(a, derive(&s, 6, 0).public().to_peer_id());
        assert_ne!(a, derive(&seed(8), 5, 0).public().to_peer_id());
    }

    #[test]
    fn trie_depth_matches_brute_force() {
        for _ in 0..20 {
            let mut trie = KeyTrie::default();
            let mut all = Vec::new();
            for _ in 0..200 {
                let k: [u8; 32] = rand::random();
                trie.insert(k);
                all.push(k);
            }
            for _ in 0..50 {
                let probe: [u8; 32] = rand::random();
                let brute = all.iter().map(|k| common_prefix_bits(k, &probe)).max().unwrap() + 1;
                assert_eq!(trie.depth(&probe), brute);
            }
        }
    }

    #[test]
    fn extending_is_independent_of_the_batching() {
        let s = seed(3);
        for scheme in [Scheme::V1, Scheme::V2] {
            let mut t1 = KeyTrie::default();
            let all: Vec<_> =
                extend(&s, &mut t1, 0..30, scheme).into_iter().map(|i| (i.index, i.choice)).collect();
            let mut t2 = KeyTrie::default();
            let mut parts: Vec<_> =
                extend(&s, &mut t2, 0..10, scheme).into_iter().map(|i| (i.index, i.choice)).collect();
            parts.extend(extend(&s, &mut t2, 10..30, scheme).into_iter().map(|i| (i.index, i.choice)));
            assert_eq!(all, parts);
            assert!(all.iter().all(|(_, c)| *c < scheme.candidates()));
        }
    }

    #[test]
    fn candidates_derived_on_many_threads_are_those_of_one() {
        let s = seed(4);
        let idx: Vec<u32> = (5..16).collect();
        let keys = |threads| -> Vec<Vec<(u8, [u8; 32])>> {
            derive_candidates(&s, &idx, 4, threads)
                .into_iter()
                .map(|c| c.into_iter().map(|(choice, _, k)| (choice, k)).collect())
                .collect()
        };
        let one = keys(1);
        assert_eq!(one.len(), idx.len());
        assert_eq!(one[0][3].1, kad_key(&derive(&s, 5, 3).public().to_peer_id()));
        assert_eq!(one, keys(3));
        assert_eq!(one, keys(64));
    }

    /// Largest and smallest number of keys under the 2^8 top-level prefixes, and empty prefixes.
    fn occupancy(keys: impl Iterator<Item = [u8; 32]>) -> (usize, usize, usize) {
        let mut buckets = [0usize; 256];
        for k in keys {
            buckets[k[0] as usize] += 1;
        }
        let empty = buckets.iter().filter(|b| **b == 0).count();
        (*buckets.iter().max().unwrap(), *buckets.iter().min().unwrap(), empty)
    }

    #[test]
    fn a_thousand_heads_cover_the_keyspace_evenly() {
        // 1,000 heads over the 256 top-level prefixes (3.9 per prefix on average), 10 seeds,
        // balanced IDs against random IDs. Bound: no prefix holds more than 8 balanced heads.
        // (An empty prefix cannot be ruled out with two candidates per head: even perfect choices
        // leave one with probability ~0.1 per sequence; random IDs leave ~5 per sequence.)
        let (mut bmax, mut bmin, mut bempty) = (0, usize::MAX, 0);
        let (mut rmax, mut rmin, mut rempty) = (0, usize::MAX, 0);
        for s in 0..10u8 {
            let mut trie = KeyTrie::default();
            let issued = extend(&seed(s), &mut trie, 0..1000, Scheme::V1);
            let b = occupancy(issued.iter().map(|i| i.kad_key));
            let r = occupancy((0..1000).map(|_| kad_key(&PeerId::random())));
            println!(
                "seed {s}: balanced max {} min {} empty {}; random max {} min {} empty {}",
                b.0, b.1, b.2, r.0, r.1, r.2
            );
            (bmax, bmin, bempty) = (bmax.max(b.0), bmin.min(b.1), bempty + b.2);
            (rmax, rmin, rempty) = (rmax.max(r.0), rmin.min(r.1), rempty + r.2);
        }
        println!("10 seeds: balanced max {bmax} min {bmin} empty prefixes {bempty}; random max {rmax} min {rmin} empty prefixes {rempty}");
        assert!(bmax <= 8, "a prefix holds {bmax} balanced heads");
        assert!(bmax < rmax, "balanced max {bmax} not better than random {rmax}");
        assert!(bempty * 5 < rempty, "balanced left {bempty} prefixes empty, random {rempty}");
    }

    #[test]
    fn thirty_two_candidates_leave_no_prefix_empty_and_none_crowded() {
        // Scheme v2 on the same measure (fewer seeds: 32 keys per head in a debug build).
        for s in 0..2u8 {
            let issued = extend(&seed(s), &mut KeyTrie::default(), 0..1000, Scheme::V2);
            let (max, min, empty) = occupancy(issued.iter().map(|i| i.kad_key));
            println!("seed {s}: v2 max {max} min {min} empty {empty}");
            assert!(max <= 6 && empty == 0, "v2: a prefix holds {max} heads, {empty} prefixes empty");
        }
    }

    #[test]
    fn plan_reclaims_then_reuses_then_extends() {
        let l = |index, node: &str, slot, expires_at| LeaseRow {
            index,
            node: node.into(),
            slot,
            expires_at,
            token: Some(format!("{node}-run")),
        };
        let now = 1000;
        let ids: Vec<u32> = (0..6).collect();
        let leases = vec![
            l(0, "a", 0, 2000),
            l(1, "a", 1, 500),  // mine, expired: still mine
            l(2, "b", 0, 2000), // b's, live
            l(3, "c", 0, 10),   // c died
            l(4, "a", 5, 2000), // mine, but I now want fewer heads
        ];
        // a keeps slots 0 and 1 (even the expired lease: it is a's own), fills slots 2 and 3 with
        // the lowest free identities: c's expired 3, and its own 4 moved down from slot 5.
        let p = plan("a", "a-run", 4, now, &ids, &leases);
        assert_eq!(p.assigned, vec![(0, 0), (1, 1), (2, 3), (3, 4)]);
        assert!(p.released.is_empty() && p.new_slots.is_empty());
        // Fewer heads: the extra identity is released.
        let p = plan("a", "a-run", 2, now, &ids, &leases);
        assert_eq!((p.assigned, p.released), (vec![(0, 0), (1, 1)], vec![4]));
        // A new node gets expired or free identities (a's expired 1, c's 3, never-leased 5),
        // never live ones (0, 2, 4), then new ones.
        let p = plan("d", "d-run", 5, now, &ids, &leases);
        assert_eq!(p.assigned, vec![(0, 1), (1, 3), (2, 5)]);
        assert_eq!(p.new_slots, vec![3, 4]);
        assert_eq!(p.conflicts, 0);
        // Another live run named "a" (say, a second process on the same host): a's live leases
        // are not its own, and it is told so.
        let p = plan("a", "other-run", 2, now, &ids, &leases);
        assert_eq!(p.conflicts, 2, "leases 0 and 4 are live and held by a-run");
        assert!(!p.assigned.iter().any(|(_, i)| [0, 4, 2].contains(i)), "{p:?}");
        // After a graceful shutdown (token released), the same name reclaims at once.
        let released: Vec<LeaseRow> = leases
            .iter()
            .cloned()
            .map(|mut r| {
                if r.node == "a" {
                    r.token = None
                }
                r
            })
            .collect();
        let p = plan("a", "new-run", 2, now, &ids, &released);
        assert_eq!((p.assigned, p.conflicts), (vec![(0, 0), (1, 1)], 0));
    }

    /// The k closest by a full sort, against the run's: the run must hold all of them, for
    /// spread keys and for clustered ones (shared prefixes, an empty half at the top, a
    /// target inside or outside the cluster), for every k around the population size.
    #[test]
    fn the_prefix_run_holds_the_k_closest() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let xor = |a: &[u8; 32], b: &[u8; 32]| -> [u8; 32] { std::array::from_fn(|i| a[i] ^ b[i]) };
        for n in [0usize, 1, 2, 5, 19, 20, 21, 40, 300, 3000] {
            for clustered in [false, true] {
                let mut keys: Vec<[u8; 32]> = (0..n)
                    .map(|_| {
                        let mut k: [u8; 32] = rng.gen();
                        if clustered {
                            k[0] = 0x5a; // one 8-bit prefix, and bit 0 clear for all
                            k[1] &= 0x0f;
                        }
                        k
                    })
                    .collect();
                keys.sort();
                for _ in 0..20 {
                    let mut t: [u8; 32] = rng.gen();
                    if clustered && rng.gen_bool(0.5) {
                        t[0] = 0x5a;
                    }
                    let mut by_distance = keys.clone();
                    by_distance.sort_by_cached_key(|key| xor(key, &t));
                    for k in [1usize, 2, 20, n.saturating_sub(1), n, n + 1] {
                        let run = prefix_run(&keys, |k| &k[..], &t, k);
                        let want = &by_distance[..k.min(n)];
                        let mut got = keys[run.clone()].to_vec();
                        assert!(got.len() >= k.min(n), "n {n} k {k}: run {run:?} too short");
                        // And it is a descent, not a scan: about k to 2k entries.
                        if k >= 1 && n >= 8 * k {
                            assert!(
                                run.len() <= 8 * k,
                                "n {n} k {k} clustered {clustered}: a run of {}",
                                run.len()
                            );
                        }
                        got.sort_by_cached_key(|key| xor(key, &t));
                        assert_eq!(&got[..k.min(n)], want, "n {n} k {k} clustered {clustered}");
                    }
                }
            }
        }
    }
}
