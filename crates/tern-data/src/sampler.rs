//! Deterministic sampling of fixed-size blocks from weighted sources.
//!
//! Each source is cut into blocks of `seq_len + 1` tokens (TinyLlama's 2049-token blocks: inputs
//! `[0, seq_len)`, targets `[1, seq_len]`). Global sample `i` goes to a source by a fixed,
//! weight-proportional interleaving ([`Blend`]); the source's `k`-th sample is block
//! `perm_e(k mod N)` of epoch `e = k / N`, where `perm_e` is a keyed pseudo-random permutation
//! ([`Permutation`]) of the source's `N` blocks, computed per index in O(1) time and memory (a
//! materialised shuffle of SlimPajama's 300M blocks would take 1.2 GB per process). The only
//! position state is the number of consumed samples, so a resume, also with another
//! data-parallel size, continues exactly where the run stopped.

/// SplitMix64: small, fast, and fixed forever (the order must not change between versions).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Jumps over the next `n` draws (the state only advances by a constant per draw).
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// SplitMix64's finaliser: a bijective 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed bijection of `0..n`: a 4-round Feistel network on the smallest even number of bits
/// that covers `n`, with cycle walking back into range (fewer than 4 rounds trips on average,
/// since the network's domain is under `4n`).
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, key: u64) -> Self {
        assert!(n > 0, "a permutation of nothing");
        let bits = (64 - (n - 1).leading_zeros()).max(2);
        let mut rng = SplitMix64(key);
        Self {
            n,
            half_bits: bits.div_ceil(2),
            keys: std::array::from_fn(|_| rng.next_u64()),
        }
    }

    fn round_trip(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            (l, r) = (r, l ^ (mix(r ^ k) & mask));
        }
        (l << self.half_bits) | r
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.round_trip(i);
        while x >= self.n {
            x = self.round_trip(x);
        }
        x
    }
}

/// Samples per blending period: weights are honoured exactly to six decimals (TinyLlama's
/// 0.693584 / 0.306416 mix is exact), and a seek scans at most one period.
pub const BLEND_PERIOD: u64 = 1_000_000;

/// Weight-proportional interleaving of sources, as nginx's smooth weighted round robin: every
/// period of [`BLEND_PERIOD`] samples gives source `s` exactly `quota[s]` samples, spread evenly.
/// No randomness: the order inside each source is what is shuffled.
#[derive(Debug, Clone)]
pub struct Blend {
    quota: Vec<u64>,
}

impl Blend {
    /// Quotas from weights by largest remainder; errors name the weight that cannot be honoured.
    pub fn new(weights: &[f64]) -> Result<Self, String> {
        if weights.is_empty() {
            return Err("no source".into());
        }
        if let Some((i, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w > 0.0))
        {
            return Err(format!("source {i}: weight {w} is not a positive number"));
        }
        let sum: f64 = weights.iter().sum();
        let exact: Vec<f64> = weights
            .iter()
            .map(|w| w / sum * BLEND_PERIOD as f64)
            .collect();
        let mut quota: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by(|&a, &b| {
            let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
            fb.total_cmp(&fa).then(a.cmp(&b))
        });
        let short = BLEND_PERIOD - quota.iter().sum::<u64>();
        for &s in order.iter().take(short as usize) {
            quota[s] += 1;
        }
        if let Some(i) = quota.iter().position(|&q| q == 0) {
            return Err(format!(
                "source {i}: weight {} is below one sample in {BLEND_PERIOD}",
                weights[i]
            ));
        }
        Ok(Self { quota })
    }

    pub fn sources(&self) -> usize {
        self.quota.len()
    }

    /// A cursor positioned at global sample `i`.
    pub fn cursor(&self, i: u64) -> BlendCursor {
        let mut c = BlendCursor {
            quota: self.quota.clone(),
            next: i - i % BLEND_PERIOD,
            current: vec![0; self.quota.len()],
            counts: self.quota.iter().map(|q| q * (i / BLEND_PERIOD)).collect(),
        };
        while c.next < i {
            c.next();
        }
        c
    }
}

/// Walks the blend sample by sample; `next()` gives `(source, index within the source)`.
#[derive(Debug, Clone)]
pub struct BlendCursor {
    quota: Vec<u64>,
    next: u64,
    current: Vec<i64>,
    counts: Vec<u64>,
}

impl BlendCursor {
    /// The global sample that `next()` gives.
    pub fn position(&self) -> u64 {
        self.next
    }
}

impl Iterator for BlendCursor {
    type Item = (usize, u64);

    fn next(&mut self) -> Option<(usize, u64)> {
        let mut best = 0;
        for (s, q) in self.quota.iter().enumerate() {
            self.current[s] += *q as i64;
            if self.current[s] > self.current[best] {
                best = s;
            }
        }
        self.current[best] -= BLEND_PERIOD as i64;
        let k = self.counts[best];
        self.counts[best] += 1;
        self.next += 1;
        Some((best, k))
    }
}

/// Which block of a source of `blocks` blocks its `k`-th sample reads, reshuffled every epoch.
pub fn block_of(blocks: u64, seed: u64, source: usize, k: u64) -> u64 {
    let epoch = k / blocks;
    let key = mix(seed ^ mix((source as u64) << 32 | epoch.wrapping_add(1)));
    Permutation::new(blocks, key).apply(k % blocks)
}

/// Number of whole blocks in a stream.
pub fn num_blocks(tokens: usize, block_len: usize) -> usize {
    tokens / block_len
}

/// The part of a global batch that data-parallel rank `rank` of `dp` reads.
pub fn dp_slice(global_batch: usize, rank: usize, dp: usize) -> std::ops::Range<usize> {
    let per = global_batch / dp;
    rank * per..(rank + 1) * per
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_bijections_for_every_size() {
        for n in 1..=300u64 {
            let p = Permutation::new(n, n * 7919);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(i)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        // Large sizes too, by sampling: distinct images, all in range.
        let n = 306_000_001u64;
        let p = Permutation::new(n, 1);
        let imgs: std::collections::HashSet<u64> = (0..100_000).map(|i| p.apply(i)).collect();
        assert_eq!(imgs.len(), 100_000);
        assert!(imgs.iter().all(|&x| x < n));
    }

    #[test]
    fn order_depends_only_on_seed_source_and_position() {
        let n = 37;
        let full: Vec<u64> = (0..200).map(|k| block_of(n, 7, 0, k)).collect();
        // Each epoch is a permutation, and epochs differ.
        for e in 0..5 {
            let mut ep = full[e * 37..((e + 1) * 37).min(200)].to_vec();
            ep.sort();
            ep.dedup();
            assert_eq!(ep.len(), (200 - e * 37).min(37));
        }
        assert_ne!(full[..37], full[37..74]);
        assert_ne!(full[..37], (0..37).collect::<Vec<_>>()[..], "shuffled");
        let other_seed: Vec<u64> = (0..37).map(|k| block_of(n, 8, 0, k)).collect();
        let other_source: Vec<u64> = (0..37).map(|k| block_of(n, 7, 1, k)).collect();
        assert_ne!(other_seed[..], full[..37]);
        assert_ne!(other_source[..], full[..37]);
    }

    #[test]
    fn blend_honours_weights_exactly_per_period_and_spreads_evenly() {
        let b = Blend::new(&[0.693584, 0.306416]).unwrap();
        assert_eq!(b.quota, vec![693_584, 306_416]);
        let picks: Vec<(usize, u64)> = b.cursor(0).take(BLEND_PERIOD as usize + 10).collect();
        let first = picks[..BLEND_PERIOD as usize]
            .iter()
            .filter(|p| p.0 == 0)
            .count();
        assert_eq!(first, 693_584);
        // Even spread: over any window of 1000 samples the share is within 0.2% of the weight.
        for w in picks[..BLEND_PERIOD as usize].chunks(1000) {
            let zero = w.iter().filter(|p| p.0 == 0).count();
            assert!((692..=695).contains(&zero), "{zero}");
        }
        // Indices within a source count up from 0 with no gap.
        let ones: Vec<u64> = picks.iter().filter(|p| p.0 == 1).map(|p| p.1).collect();
        assert_eq!(ones, (0..ones.len() as u64).collect::<Vec<_>>());
        // A cursor started anywhere (also past a period) continues the same sequence.
        for start in [1u64, 999, 500_000, 999_999, 1_000_003] {
            let resumed: Vec<_> = b.cursor(start).take(7).collect();
            assert_eq!(
                resumed,
                picks[start as usize..start as usize + 7],
                "{start}"
            );
        }
        let three = Blend::new(&[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(three.quota.iter().sum::<u64>(), BLEND_PERIOD);
        assert!(Blend::new(&[1.0, 0.0]).unwrap_err().contains("source 1"));
        assert!(Blend::new(&[1.0, 1e-9]).unwrap_err().contains("below one"));
        assert!(Blend::new(&[]).is_err());
    }

    #[test]
    fn dp_slices_partition_the_batch() {
        let parts: Vec<_> = (0..4).flat_map(|r| dp_slice(16, r, 4)).collect();
        assert_eq!(parts, (0..16).collect::<Vec<_>>());
    }
}
