//! Matrix products `y = x W^T` for inference, on packed ternary codes or on f32 weights, split
//! over all cores (rayon) and vectorised with AVX2 + FMA where the CPU has them (checked at run
//! time; a portable path otherwise).
//!
//! The ternary kernel never builds the float matrix. Codes are kept 2 bits a weight, row-major
//! (tern-pack's `2bit` layout, rows padded to 4 bytes). Eight weights are one u16: broadcast to
//! eight lanes, shifted by 0, 2, .., 14 bits, and the low two bits of each lane pick from the
//! table `[-s, 0, s, 0]` (vpermilps), where `s` is the scale of the weights' group: the weight
//! itself, times its scale, with no multiply. At batch 1 (decode) that vector is fused with the
//! input into the accumulator. At batch > 1 four rows at a time are expanded into a small
//! L1-resident buffer and multiplied with two input rows at a time, so the expansion is paid once
//! per row for the whole batch.

use rayon::prelude::*;
use tern_pack::TernaryMatrix;

/// A ternary matrix in the kernel's layout.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    pub rows: usize,
    pub cols: usize,
    /// Bytes per row: `ceil(cols / 4)` rounded up to a multiple of 4 (u32 loads stay in the row).
    stride: usize,
    codes: Vec<u8>,
    row_groups: usize,
    col_groups: usize,
    scales: Vec<f32>,
}

impl PackedTernary {
    pub fn new(m: &TernaryMatrix) -> Self {
        let stride = m.cols.div_ceil(4).div_ceil(4) * 4;
        let mut codes = vec![0x55u8; m.rows * stride]; // 0b01 = a zero weight in every slot
        let packed = m.pack(tern_pack::Encoding::Bits2);
        let row_bytes = m.cols.div_ceil(4);
        for r in 0..m.rows {
            codes[r * stride..][..row_bytes].copy_from_slice(&packed[r * row_bytes..][..row_bytes]);
        }
        Self {
            rows: m.rows,
            cols: m.cols,
            stride,
            codes,
            row_groups: m.row_groups,
            col_groups: m.col_groups,
            scales: m.scales.clone(),
        }
    }

    /// Bytes of codes and scales held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// Column segments of one scale each, for row `r`: (start, end, scale).
    fn segments(&self, r: usize) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        let rg = r / (self.rows / self.row_groups);
        let seg = self.cols / self.col_groups;
        (0..self.col_groups).map(move |g| {
            (
                g * seg,
                (g + 1) * seg,
                self.scales[rg * self.col_groups + g],
            )
        })
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.codes[r * self.stride..][..self.stride]
    }

    /// `sum_c W[r, c] x[c]`.
    fn row_dot(&self, r: usize, x: &[f32], simd: bool) -> f32 {
        let codes = self.row(r);
        self.segments(r)
            .map(|(c0, c1, s)| {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only true when the CPU has AVX2 and FMA.
                    return unsafe { avx2::ternary_dot(codes, x, c0, c1, s) };
                }
                let _ = simd;
                scalar_ternary_dot(codes, x, c0, c1, s)
            })
            .sum()
    }

    /// Row `r` as floats (scale included) into `out[..cols]`.
    fn expand_row(&self, r: usize, out: &mut [f32], simd: bool) {
        let codes = self.row(r);
        for (c0, c1, s) in self.segments(r) {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: as in `row_dot`.
                unsafe { avx2::ternary_expand(codes, out, c0, c1, s) };
                continue;
            }
            for (c, o) in out.iter_mut().enumerate().take(c1).skip(c0) {
                *o = weight(codes, c) * s;
            }
        }
    }
}

/// Weight `c` of a packed row, unscaled.
fn weight(codes: &[u8], c: usize) -> f32 {
    ((codes[c / 4] >> (2 * (c % 4))) & 3) as f32 - 1.0
}

fn scalar_ternary_dot(codes: &[u8], x: &[f32], c0: usize, c1: usize, s: f32) -> f32 {
    // Additions and subtractions only; the scale once at the end.
    let mut acc = 0f32;
    for c in c0..c1 {
        match (codes[c / 4] >> (2 * (c % 4))) & 3 {
            0 => acc -= x[c],
            2 => acc += x[c],
            _ => {}
        }
    }
    acc * s
}

/// A dense f32 matrix `[rows, cols]`, row-major (embeddings, the LM head, float layers).
#[derive(Debug, Clone)]
pub struct Dense {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

/// A weight matrix of the inference model.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Dense),
    Ternary(PackedTernary),
}

/// Whether the AVX2 + FMA paths run (the `TERN_NO_SIMD` environment variable turns them off).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::env::var_os("TERN_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

const ROW_TILE: usize = 4;

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.rows,
            Matrix::Ternary(t) => t.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.cols,
            Matrix::Ternary(t) => t.cols,
        }
    }
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Dense(d) => 4 * d.values.len(),
            Matrix::Ternary(t) => t.bytes(),
        }
    }

    /// `x: [batch, cols]` -> `[batch, rows]`.
    pub fn matmul(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(
            x.len(),
            batch * cols,
            "input of {} for [{batch}, {cols}]",
            x.len()
        );
        if batch == 0 || rows == 0 {
            return vec![0f32; batch * rows];
        }
        let simd = simd_available();
        // Output as [rows, batch] so that each task owns whole rows; transposed at the end.
        let mut yt = vec![0f32; rows * batch];
        let threads = rayon::current_num_threads().max(1);
        let chunk_rows = (rows.div_ceil(4 * threads)).div_ceil(ROW_TILE).max(1) * ROW_TILE;
        yt.par_chunks_mut(chunk_rows * batch)
            .enumerate()
            .for_each(|(k, out)| {
                let r0 = k * chunk_rows;
                let n = out.len() / batch;
                if batch == 1 {
                    for (i, y) in out.iter_mut().enumerate() {
                        *y = self.row_dot(r0 + i, x, simd);
                    }
                } else {
                    self.rows_times_batch(r0, n, x, batch, out, simd);
                }
            });
        if batch == 1 {
            return yt;
        }
        let mut y = vec![0f32; batch * rows];
        for r in 0..rows {
            for b in 0..batch {
                y[b * rows + r] = yt[r * batch + b];
            }
        }
        y
    }

    fn row_dot(&self, r: usize, x: &[f32], simd: bool) -> f32 {
        match self {
            Matrix::Dense(d) => dot(&d.values[r * d.cols..][..d.cols], x, simd),
            Matrix::Ternary(t) => t.row_dot(r, x, simd),
        }
    }

    /// Rows `r0..r0 + n` against every input row, into `out: [n, batch]`.
    fn rows_times_batch(
        &self,
        r0: usize,
        n: usize,
        x: &[f32],
        batch: usize,
        out: &mut [f32],
        simd: bool,
    ) {
        let cols = self.cols();
        let mut buf = match self {
            Matrix::Ternary(_) => vec![0f32; ROW_TILE * cols],
            Matrix::Dense(_) => Vec::new(),
        };
        let mut i = 0;
        while i < n {
            let m = ROW_TILE.min(n - i);
            let w: Vec<&[f32]> = match self {
                Matrix::Dense(d) => (0..m)
                    .map(|j| &d.values[(r0 + i + j) * cols..][..cols])
                    .collect(),
                Matrix::Ternary(t) => {
                    for (j, dst) in buf.chunks_mut(cols).take(m).enumerate() {
                        t.expand_row(r0 + i + j, dst, simd);
                    }
                    buf.chunks(cols).take(m).collect()
                }
            };
            let mut b = 0;
            while b < batch {
                let xs = [
                    &x[b * cols..][..cols],
                    &x[(b + 1).min(batch - 1) * cols..][..cols],
                ];
                if m == ROW_TILE {
                    let acc = tile_4x2([w[0], w[1], w[2], w[3]], xs, simd);
                    for (j, a) in acc.iter().enumerate() {
                        out[(i + j) * batch + b] = a[0];
                        if b + 1 < batch {
                            out[(i + j) * batch + b + 1] = a[1];
                        }
                    }
                } else {
                    for (j, wr) in w.iter().enumerate() {
                        out[(i + j) * batch + b] = dot(wr, xs[0], simd);
                        if b + 1 < batch {
                            out[(i + j) * batch + b + 1] = dot(wr, xs[1], simd);
                        }
                    }
                }
                b += 2;
            }
            i += m;
        }
    }
}

fn dot(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2 and FMA.
        return unsafe { avx2::dot(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn tile_4x2(w: [&[f32]; 4], x: [&[f32]; 2], simd: bool) -> [[f32; 2]; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `dot`.
        return unsafe { avx2::tile_4x2(w, x) };
    }
    let _ = simd;
    w.map(|wr| [dot(wr, x[0], false), dot(wr, x[1], false)])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    fn load_u32(codes: &[u8], byte: usize) -> i32 {
        i32::from_le_bytes(codes[byte..byte + 4].try_into().unwrap())
    }

    /// `s * sum_{c0 <= c < c1} w_c x_c` on a packed row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ternary_dot(codes: &[u8], x: &[f32], c0: usize, c1: usize, s: f32) -> f32 {
        let table = _mm256_setr_ps(-s, 0.0, s, 0.0, -s, 0.0, s, 0.0);
        let lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        let hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = c0;
        let mut tail = 0f32;
        while c < c1 && !c.is_multiple_of(16) {
            tail += super::weight(codes, c) * s * x[c];
            c += 1;
        }
        let xp = x.as_ptr();
        while c + 32 <= c1 {
            let v0 = _mm256_set1_epi32(load_u32(codes, c / 4));
            let v1 = _mm256_set1_epi32(load_u32(codes, c / 4 + 4));
            let w0 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v0, lo));
            let w1 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v0, hi));
            let w2 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v1, lo));
            let w3 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v1, hi));
            acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(c)), acc[0]);
            acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(c + 8)), acc[1]);
            acc[2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(c + 16)), acc[2]);
            acc[3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(c + 24)), acc[3]);
            c += 32;
        }
        while c + 16 <= c1 {
            let v = _mm256_set1_epi32(load_u32(codes, c / 4));
            let w0 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v, lo));
            let w1 = _mm256_permutevar_ps(table, _mm256_srlv_epi32(v, hi));
            acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(c)), acc[0]);
            acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(c + 8)), acc[1]);
            c += 16;
        }
        while c < c1 {
            tail += super::weight(codes, c) * s * x[c];
            c += 1;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + tail
    }

    /// `out[c] = s * w_c` for `c0 <= c < c1`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ternary_expand(codes: &[u8], out: &mut [f32], c0: usize, c1: usize, s: f32) {
        let table = _mm256_setr_ps(-s, 0.0, s, 0.0, -s, 0.0, s, 0.0);
        let lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        let hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
        let mut c = c0;
        while c < c1 && !c.is_multiple_of(16) {
            out[c] = super::weight(codes, c) * s;
            c += 1;
        }
        let op = out.as_mut_ptr();
        while c + 16 <= c1 {
            let v = _mm256_set1_epi32(load_u32(codes, c / 4));
            _mm256_storeu_ps(
                op.add(c),
                _mm256_permutevar_ps(table, _mm256_srlv_epi32(v, lo)),
            );
            _mm256_storeu_ps(
                op.add(c + 8),
                _mm256_permutevar_ps(table, _mm256_srlv_epi32(v, hi)),
            );
            c += 16;
        }
        while c < c1 {
            out[c] = super::weight(codes, c) * s;
            c += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c + 32 <= n {
            for (k, a_) in acc.iter_mut().enumerate() {
                let o = c + 8 * k;
                *a_ = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(o)), _mm256_loadu_ps(bp.add(o)), *a_);
            }
            c += 32;
        }
        while c + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(ap.add(c)),
                _mm256_loadu_ps(bp.add(c)),
                acc[0],
            );
            c += 8;
        }
        let mut tail = 0f32;
        while c < n {
            tail += a[c] * b[c];
            c += 1;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + tail
    }

    /// Four weight rows against two input rows: eight accumulators, six loads per eight FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_4x2(w: [&[f32]; 4], x: [&[f32]; 2]) -> [[f32; 2]; 4] {
        let n = w[0].len();
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut c = 0;
        while c + 8 <= n {
            let x0 = _mm256_loadu_ps(x[0].as_ptr().add(c));
            let x1 = _mm256_loadu_ps(x[1].as_ptr().add(c));
            for j in 0..4 {
                let wv = _mm256_loadu_ps(w[j].as_ptr().add(c));
                acc[j][0] = _mm256_fmadd_ps(wv, x0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(wv, x1, acc[j][1]);
            }
            c += 8;
        }
        let mut out = [[0f32; 2]; 4];
        for j in 0..4 {
            for k in 0..2 {
                let mut t = hsum(acc[j][k]);
                for cc in c..n {
                    t += w[j][cc] * x[k][cc];
                }
                out[j][k] = t;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn matrix(rows: usize, cols: usize, rg: usize, cg: usize, seed: u64) -> TernaryMatrix {
        let mut r = rng(seed);
        TernaryMatrix {
            rows,
            cols,
            row_groups: rg,
            col_groups: cg,
            codes: (0..rows * cols).map(|_| (r() * 3.0) as i8 - 1).collect(),
            scales: (0..rg * cg).map(|_| 0.1 + r() as f32).collect(),
        }
    }

    /// The product computed in f64 from the dequantized matrix.
    fn reference(m: &TernaryMatrix, x: &[f32], batch: usize) -> Vec<f64> {
        let w = m.dequantize();
        let mut y = vec![0f64; batch * m.rows];
        for b in 0..batch {
            for r in 0..m.rows {
                y[b * m.rows + r] = (0..m.cols)
                    .map(|c| w[r * m.cols + c] as f64 * x[b * m.cols + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn packed_products_equal_dense_on_random_and_ragged_shapes() {
        let shapes = [
            (1, 1, 1, 1),
            (3, 5, 1, 1),
            (8, 16, 2, 1),
            (7, 33, 1, 1),
            (12, 100, 1, 4),
            (64, 256, 4, 1),
            (33, 257, 1, 1),
            (5, 90, 1, 3), // column groups of 30: segments start off the 16-weight grid
            (130, 1000, 2, 1),
        ];
        for (i, &(rows, cols, rg, cg)) in shapes.iter().enumerate() {
            let m = matrix(rows, cols, rg, cg, i as u64);
            let packed = Matrix::Ternary(PackedTernary::new(&m));
            let dense = Matrix::Dense(Dense {
                rows,
                cols,
                values: m.dequantize(),
            });
            for batch in [1, 2, 3, 8] {
                let mut r = rng(100 + i as u64);
                let x: Vec<f32> = (0..batch * cols)
                    .map(|_| (r() * 2.0 - 1.0) as f32)
                    .collect();
                let want = reference(&m, &x, batch);
                for (label, mm) in [("packed", &packed), ("dense", &dense)] {
                    let y = mm.matmul(&x, batch);
                    for (k, (a, b)) in y.iter().zip(&want).enumerate() {
                        let tol = 1e-5 * (1.0 + (cols as f64).sqrt());
                        assert!(
                            (*a as f64 - b).abs() < tol,
                            "{label} [{rows}x{cols}] groups {rg}x{cg} batch {batch} index {k}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn portable_path_equals_simd_path() {
        let m = matrix(20, 300, 1, 2, 7);
        let p = PackedTernary::new(&m);
        let mut r = rng(3);
        let x: Vec<f32> = (0..300).map(|_| (r() * 2.0 - 1.0) as f32).collect();
        if simd_available() {
            for row in 0..20 {
                let a = p.row_dot(row, &x, true);
                let b = p.row_dot(row, &x, false);
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                let (mut e1, mut e2) = (vec![0f32; 300], vec![0f32; 300]);
                p.expand_row(row, &mut e1, true);
                p.expand_row(row, &mut e2, false);
                assert_eq!(e1, e2);
            }
        }
    }
}
