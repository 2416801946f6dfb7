//! Packed ternary matrices and their products with a row of activations, in f32 (exact: the
//! trained model's arithmetic) or in 8 bits (integer dot products, VNNI where the CPU has it).
//!
//! Layout: each row is cut at its scale groups into segments, and each segment into blocks of
//! [`BLOCK`] = 64 weights held in 16 bytes. Byte `j` of a block holds weights `j`, `16 + j`,
//! `32 + j` and `48 + j` in bits 0-1, 2-3, 4-5 and 6-7, each as `w + 1` in {0, 1, 2}; a segment's
//! last block is padded with zero weights (code 1). One broadcast of a block's 16 bytes to four
//! 128-bit lanes, shifted by 0, 2, 4 and 6 bits and masked, gives the 64 codes in order: the
//! whole expansion for a 64-byte VNNI dot product.
//!
//! 8-bit activations: a row's segment is padded to whole blocks with zeros and cut into chunks of
//! [`CHUNK`] values that share one scale `d` (value = `d * q`). Because the codes are `w + 1`,
//! `sum_c code_c q_c = sum_c w_c q_c + sum_c q_c`; the second sum is taken once per activation
//! row ([`Q8Rows::corr`]), not once per weight row.

use crate::simd::{self, Isa};
use tern_pack::TernaryMatrix;

/// Weights per 16-byte block.
pub const BLOCK: usize = 64;
/// Activations per 8-bit scale.
pub const CHUNK: usize = 256;
const CHUNK_BLOCKS: usize = CHUNK / BLOCK;

/// A ternary matrix in the kernel's layout.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    pub rows: usize,
    pub cols: usize,
    row_groups: usize,
    col_groups: usize,
    /// Columns of one scale segment.
    seg: usize,
    /// Blocks of one segment.
    seg_blocks: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// Rows of activations quantized to 8 bits, in a matrix's padded segment layout.
#[derive(Debug, Clone)]
pub struct Q8Rows {
    pub batch: usize,
    /// `[batch, col_groups * seg_blocks * 64]`.
    pub q: Vec<i8>,
    /// One scale per chunk: `[batch, col_groups, chunks]`.
    pub d: Vec<f32>,
    /// `sum_chunks d * sum(q)` per row and segment: `[batch, col_groups]`.
    pub corr: Vec<f32>,
}

impl PackedTernary {
    pub fn new(m: &TernaryMatrix) -> Self {
        let seg = m.cols / m.col_groups;
        let seg_blocks = seg.div_ceil(BLOCK);
        let row_bytes = m.col_groups * seg_blocks * 16;
        let mut codes = vec![0x55u8; m.rows * row_bytes];
        for r in 0..m.rows {
            for g in 0..m.col_groups {
                for c in 0..seg {
                    let w = m.codes[r * m.cols + g * seg + c];
                    let (b, i) = (c / BLOCK, c % BLOCK);
                    let byte = r * row_bytes + (g * seg_blocks + b) * 16 + i % 16;
                    let shift = 2 * (i / 16);
                    codes[byte] = (codes[byte] & !(3 << shift)) | (((w + 1) as u8) << shift);
                }
            }
        }
        Self {
            rows: m.rows,
            cols: m.cols,
            row_groups: m.row_groups,
            col_groups: m.col_groups,
            seg,
            seg_blocks,
            codes,
            scales: m.scales.clone(),
        }
    }

    /// Bytes of codes and scales held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    fn padded_seg(&self) -> usize {
        self.seg_blocks * BLOCK
    }

    /// Columns of a padded activation row.
    pub fn padded_cols(&self) -> usize {
        self.col_groups * self.padded_seg()
    }

    fn chunks(&self) -> usize {
        self.seg_blocks.div_ceil(CHUNK_BLOCKS)
    }

    fn scale(&self, r: usize, g: usize) -> f32 {
        self.scales[(r / (self.rows / self.row_groups)) * self.col_groups + g]
    }

    /// Segment `g` of row `r`'s codes.
    fn codes(&self, r: usize, g: usize) -> &[u8] {
        let n = self.seg_blocks * 16;
        &self.codes[(r * self.col_groups + g) * n..][..n]
    }

    /// `x: [batch, cols]` laid out as padded segments, zeros in the padding.
    pub fn pad<T: Copy + Default>(&self, x: &[T], batch: usize) -> Vec<T> {
        let (seg, pseg) = (self.seg, self.padded_seg());
        let mut out = vec![T::default(); batch * self.padded_cols()];
        for (src, dst) in x
            .chunks(seg)
            .zip(out.chunks_mut(pseg))
            .take(batch * self.col_groups)
        {
            dst[..seg].copy_from_slice(src);
        }
        out
    }

    /// Rows `x: [batch, cols]` to 8 bits, one absmax scale per chunk (as llama.cpp's Q8 types
    /// do): the fast, approximate path for float activations.
    pub fn quantize(&self, x: &[f32], batch: usize) -> Q8Rows {
        let isa = Isa::detect();
        let xp = self.pad(x, batch);
        let mut q = vec![0i8; xp.len()];
        let mut d = Vec::with_capacity(batch * self.col_groups * self.chunks());
        for (xs, qs) in xp
            .chunks(self.padded_seg())
            .zip(q.chunks_mut(self.padded_seg()))
        {
            for (xc, qc) in xs.chunks(CHUNK).zip(qs.chunks_mut(CHUNK)) {
                let dc = simd::absmax(xc, isa) / 127.0;
                let inv = if dc > 0.0 { 1.0 / dc } else { 0.0 };
                simd::quantize_i8(xc, inv, qc, isa);
                d.push(dc);
            }
        }
        self.finish(batch, q, d)
    }

    /// Rows already in 8 bits (`x = q * row_scale[b]`, `q: [batch, cols]`), as BitNet's
    /// activations are: exact.
    pub fn from_ints(&self, q: &[i8], row_scale: &[f32]) -> Q8Rows {
        let batch = row_scale.len();
        let q = self.pad(q, batch);
        let per_row = self.col_groups * self.chunks();
        let d = row_scale
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, per_row))
            .collect();
        self.finish(batch, q, d)
    }

    fn finish(&self, batch: usize, q: Vec<i8>, d: Vec<f32>) -> Q8Rows {
        let corr = q
            .chunks(self.padded_seg())
            .zip(d.chunks(self.chunks()))
            .map(|(qs, ds)| {
                qs.chunks(CHUNK)
                    .zip(ds)
                    .map(|(qc, dc)| dc * qc.iter().map(|&v| v as i32).sum::<i32>() as f32)
                    .sum()
            })
            .collect();
        Q8Rows { batch, q, d, corr }
    }

    /// A padded f32 row in the order the batch-1 f32 kernels of `isa` read it
    /// ([`simd::order_f32`], segment by segment).
    pub(crate) fn order_f32(&self, mut xp: Vec<f32>, isa: Isa) -> Vec<f32> {
        for seg in xp.chunks_mut(self.padded_seg()) {
            simd::order_f32(seg, isa);
        }
        xp
    }

    /// `sum_c W[r, c] x[c]` for a padded f32 row `xp`.
    #[cfg(test)]
    pub(crate) fn row_dot(&self, r: usize, xp: &[f32], isa: Isa) -> f32 {
        let pseg = self.padded_seg();
        let xp = self.order_f32(xp.to_vec(), isa);
        (0..self.col_groups)
            .map(|g| {
                let dot = simd::ternary_dot_f32(self.codes(r, g), &xp[g * pseg..][..pseg], isa);
                dot * self.scale(r, g)
            })
            .sum()
    }

    /// Rows `r0..r0 + out.len()` against one padded f32 row `xp`, in [`PackedTernary::order_f32`]'s
    /// order: four weight rows at a time share each load of the input.
    pub(crate) fn rows_f32(&self, r0: usize, xp: &[f32], out: &mut [f32], isa: Isa) {
        let pseg = self.padded_seg();
        out.fill(0.0);
        for g in 0..self.col_groups {
            let x = &xp[g * pseg..][..pseg];
            let mut i = 0;
            while i < out.len() {
                let r = r0 + i;
                let sums = if i + 4 <= out.len() {
                    let codes = [0, 1, 2, 3].map(|j| self.codes(r + j, g));
                    simd::ternary_dot_f32_x4(codes, x, isa).to_vec()
                } else {
                    vec![simd::ternary_dot_f32(self.codes(r, g), x, isa)]
                };
                for (j, sum) in sums.iter().enumerate() {
                    out[i + j] += sum * self.scale(r + j, g);
                }
                i += sums.len();
            }
        }
    }

    /// `sum_c W[r, c] x[c]` for row `b` of `x`.
    #[cfg(test)]
    pub(crate) fn row_dot_q8(&self, r: usize, x: &Q8Rows, b: usize, isa: Isa) -> f32 {
        let (pseg, nch) = (self.padded_seg(), self.chunks());
        let base = b * self.padded_cols();
        (0..self.col_groups)
            .map(|g| {
                let q = &x.q[base + g * pseg..][..pseg];
                let d = &x.d[(b * self.col_groups + g) * nch..][..nch];
                let sum = simd::ternary_dot_q8(self.codes(r, g), q, d, CHUNK_BLOCKS, isa);
                (sum - x.corr[b * self.col_groups + g]) * self.scale(r, g)
            })
            .sum()
    }

    /// Rows `r0..r0 + n` against every row of `x`, into `out: [n, batch]`: four weight rows at
    /// a time share each load of the activations.
    pub(crate) fn rows_q8(&self, r0: usize, n: usize, x: &Q8Rows, out: &mut [f32], isa: Isa) {
        let (pseg, nch, batch) = (self.padded_seg(), self.chunks(), x.batch);
        out.fill(0.0);
        if batch >= 4 {
            return self.rows_q8_expanded(r0, n, x, out, isa);
        }
        for b in 0..batch {
            for g in 0..self.col_groups {
                let q = &x.q[b * self.padded_cols() + g * pseg..][..pseg];
                let d = &x.d[(b * self.col_groups + g) * nch..][..nch];
                let corr = x.corr[b * self.col_groups + g];
                let mut i = 0;
                while i < n {
                    let r = r0 + i;
                    let sums = if i + 4 <= n {
                        let codes = [0, 1, 2, 3].map(|j| self.codes(r + j, g));
                        simd::ternary_dot_q8_x4(codes, q, d, CHUNK_BLOCKS, isa).to_vec()
                    } else {
                        vec![simd::ternary_dot_q8(
                            self.codes(r, g),
                            q,
                            d,
                            CHUNK_BLOCKS,
                            isa,
                        )]
                    };
                    for (j, sum) in sums.iter().enumerate() {
                        out[(i + j) * batch + b] += (sum - corr) * self.scale(r + j, g);
                    }
                    i += sums.len();
                }
            }
        }
    }

    /// [`PackedTernary::rows_q8`] for many activation rows (a prompt): four weight rows at a time
    /// are expanded to bytes once and multiplied with every activation row.
    fn rows_q8_expanded(&self, r0: usize, n: usize, x: &Q8Rows, out: &mut [f32], isa: Isa) {
        let (pseg, nch, batch) = (self.padded_seg(), self.chunks(), x.batch);
        let mut buf = vec![0u8; 4 * pseg];
        for g in 0..self.col_groups {
            let mut i = 0;
            while i < n {
                let m = 4.min(n - i);
                for j in 0..4 {
                    // A short last tile repeats its last row; only `m` results are kept.
                    let r = r0 + i + j.min(m - 1);
                    simd::expand_codes(self.codes(r, g), &mut buf[j * pseg..][..pseg], isa);
                }
                let w: [&[u8]; 4] = std::array::from_fn(|j| &buf[j * pseg..][..pseg]);
                for b in 0..batch {
                    let q = &x.q[b * self.padded_cols() + g * pseg..][..pseg];
                    let d = &x.d[(b * self.col_groups + g) * nch..][..nch];
                    let corr = x.corr[b * self.col_groups + g];
                    let sums = simd::bytes_dot_q8_x4(w, q, d, CHUNK_BLOCKS, isa);
                    for (j, sum) in sums.iter().enumerate().take(m) {
                        out[(i + j) * batch + b] += (sum - corr) * self.scale(r0 + i + j, g);
                    }
                }
                i += m;
            }
        }
    }

    /// Row `r` as floats (scale included), in the padded layout: `out[..padded_cols]`.
    pub(crate) fn expand_row(&self, r: usize, out: &mut [f32], isa: Isa) {
        let pseg = self.padded_seg();
        for g in 0..self.col_groups {
            let o = &mut out[g * pseg..][..pseg];
            simd::expand_f32(self.codes(r, g), self.scale(r, g), o, isa);
        }
    }
}

/// Code `i` (0..64) of a 16-byte block.
pub fn code(block: &[u8], i: usize) -> u8 {
    (block[i % 16] >> (2 * (i / 16))) & 3
}
