//! Deterministic sampling of fixed-size blocks.
//!
//! The token stream is cut into non-overlapping blocks of `seq_len + 1` tokens (TinyLlama's
//! 2049-token blocks: inputs `[0, seq_len)`, targets `[1, seq_len]`). Global sample `i` is block
//! `perm_e[i mod N]` of epoch `e = i / N`, where `perm_e` is a Fisher-Yates shuffle seeded from the
//! run seed and the epoch. The only position state is the number of consumed samples, so a resume,
//! also with another data-parallel size, continues exactly where the run stopped.

/// SplitMix64: small, fast, and fixed forever (the order must not change between versions).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    blocks: usize,
    seed: u64,
    cached_epoch: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    pub fn new(blocks: usize, seed: u64) -> Self {
        assert!(blocks > 0 && blocks <= u32::MAX as usize);
        Self {
            blocks,
            seed,
            cached_epoch: None,
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    fn permutation(&mut self, epoch: u64) -> &[u32] {
        if self.cached_epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = SplitMix64(self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
            let mut p: Vec<u32> = (0..self.blocks as u32).collect();
            for i in (1..p.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                p.swap(i, j);
            }
            self.cached_epoch = Some((epoch, p));
        }
        &self.cached_epoch.as_ref().unwrap().1
    }

    /// Block index of global sample `i`.
    pub fn block_of(&mut self, i: u64) -> usize {
        let n = self.blocks as u64;
        self.permutation(i / n)[(i % n) as usize] as usize
    }

    /// Block indices of the samples `start .. start + count`.
    pub fn blocks_of(&mut self, start: u64, count: usize) -> Vec<usize> {
        (0..count as u64)
            .map(|k| self.block_of(start + k))
            .collect()
    }
}

/// Tokens of block `b` (`block_len = seq_len + 1`).
pub fn block(tokens: &[u32], b: usize, block_len: usize) -> &[u32] {
    &tokens[b * block_len..(b + 1) * block_len]
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
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let mut s = Sampler::new(100, 42);
        let e0 = s.blocks_of(0, 100);
        let e1 = s.blocks_of(100, 100);
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let mut sorted1 = e1.clone();
        sorted1.sort();
        assert_eq!(sorted1, sorted);
        assert_ne!(e0, e1);
        assert_ne!(e0, sorted, "shuffled");
    }

    #[test]
    fn order_depends_only_on_seed_and_position() {
        let mut a = Sampler::new(37, 7);
        let full = a.blocks_of(0, 200);
        // A fresh sampler resumed at sample 90 continues identically, whatever was read before.
        let mut b = Sampler::new(37, 7);
        assert_eq!(b.blocks_of(90, 110), full[90..].to_vec());
        let mut c = Sampler::new(37, 8);
        assert_ne!(c.blocks_of(0, 37), full[..37].to_vec());
    }

    #[test]
    fn dp_slices_partition_the_batch() {
        let parts: Vec<_> = (0..4).flat_map(|r| dp_slice(16, r, 4)).collect();
        assert_eq!(parts, (0..16).collect::<Vec<_>>());
    }
}
