//! Matrix products `y = x W^T` for inference, on packed ternary codes or on f32 weights, split
//! over all cores (rayon), each task owning whole output rows, with the inner loops of
//! [`crate::simd`] (AVX-512 with VNNI, AVX2 + FMA or portable, chosen at run time).
//!
//! The ternary kernel never builds the float matrix (layout in [`crate::ternary`]). f32 inputs:
//! at batch 1 (decode) each block's codes pick `-x, 0, x` from a table and accumulate; at larger
//! batches four rows at a time are expanded into a small L1-resident buffer and multiplied with two
//! input rows at a time, so the expansion is paid once per row for the whole batch. 8-bit inputs
//! ([`Q8Rows`]: BitNet's, or float rows quantized with `--activations int8`): integer dot
//! products of four weight rows at a time against each block of activations (`vpdpbusd`).

use rayon::prelude::*;

use crate::simd::{self, Isa};
pub use crate::ternary::{PackedTernary, Q8Rows};

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

/// Whether vector forms of the kernels run (`TERN_NO_SIMD` turns them off).
pub fn simd_available() -> bool {
    Isa::detect() != Isa::Portable
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

    /// `x: [batch, cols]` -> `[batch, rows]`, in f32.
    pub fn matmul(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(
            x.len(),
            batch * cols,
            "input of {} for [{batch}, {cols}]",
            x.len()
        );
        let isa = Isa::detect();
        // Ternary rows multiply inputs laid out as their padded segments.
        let (xp, width) = match self {
            Matrix::Ternary(t) if batch == 1 => (
                std::borrow::Cow::Owned(t.order_f32(t.pad(x, 1), isa)),
                t.padded_cols(),
            ),
            Matrix::Ternary(t) => (std::borrow::Cow::Owned(t.pad(x, batch)), t.padded_cols()),
            Matrix::Dense(_) => (std::borrow::Cow::Borrowed(x), cols),
        };
        by_rows(rows, batch, |r0, out| {
            let n = out.len() / batch;
            if batch == 1 {
                match self {
                    Matrix::Ternary(t) => t.rows_f32(r0, &xp, out, isa),
                    Matrix::Dense(d) => {
                        for (i, y) in out.iter_mut().enumerate() {
                            *y = simd::dot(&d.values[(r0 + i) * cols..][..cols], &xp, isa);
                        }
                    }
                }
            } else {
                self.rows_times_batch(r0, n, &xp, width, batch, out, isa);
            }
        })
    }

    /// `x` (8-bit rows in this matrix's layout) -> `[batch, rows]`. Ternary matrices only.
    pub fn matmul_q8(&self, x: &Q8Rows) -> Vec<f32> {
        let Matrix::Ternary(t) = self else {
            panic!("8-bit inputs multiply packed ternary matrices only");
        };
        let isa = Isa::detect();
        let batch = x.batch;
        by_rows(t.rows, batch, |r0, out| {
            t.rows_q8(r0, out.len() / batch, x, out, isa)
        })
    }

    /// Rows `r0..r0 + n` against every (padded, `width` wide) input row, into `out: [n, batch]`.
    #[allow(clippy::too_many_arguments)]
    fn rows_times_batch(
        &self,
        r0: usize,
        n: usize,
        x: &[f32],
        width: usize,
        batch: usize,
        out: &mut [f32],
        isa: Isa,
    ) {
        let mut buf = match self {
            Matrix::Ternary(_) => vec![0f32; ROW_TILE * width],
            Matrix::Dense(_) => Vec::new(),
        };
        let mut i = 0;
        while i < n {
            let m = ROW_TILE.min(n - i);
            let w: Vec<&[f32]> = match self {
                Matrix::Dense(d) => (0..m)
                    .map(|j| &d.values[(r0 + i + j) * width..][..width])
                    .collect(),
                Matrix::Ternary(t) => {
                    for (j, dst) in buf.chunks_mut(width).take(m).enumerate() {
                        t.expand_row(r0 + i + j, dst, isa);
                    }
                    buf.chunks(width).take(m).collect()
                }
            };
            let mut b = 0;
            while b < batch {
                let xs = [
                    &x[b * width..][..width],
                    &x[(b + 1).min(batch - 1) * width..][..width],
                ];
                if m == ROW_TILE {
                    let acc = simd::tile_4x2([w[0], w[1], w[2], w[3]], xs, isa);
                    for (j, a) in acc.iter().enumerate() {
                        out[(i + j) * batch + b] = a[0];
                        if b + 1 < batch {
                            out[(i + j) * batch + b + 1] = a[1];
                        }
                    }
                } else {
                    for (j, wr) in w.iter().enumerate() {
                        out[(i + j) * batch + b] = simd::dot(wr, xs[0], isa);
                        if b + 1 < batch {
                            out[(i + j) * batch + b + 1] = simd::dot(wr, xs[1], isa);
                        }
                    }
                }
                b += 2;
            }
            i += m;
        }
    }
}

/// `[batch, rows]` from `f(r0, out)`, which fills rows `r0..` of `out: [n, batch]`; the rows are
/// split over all cores, each task owning whole rows.
fn by_rows(rows: usize, batch: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if batch == 0 || rows == 0 {
        return vec![0f32; batch * rows];
    }
    let mut yt = vec![0f32; rows * batch];
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = (rows.div_ceil(4 * threads)).div_ceil(ROW_TILE).max(1) * ROW_TILE;
    yt.par_chunks_mut(chunk_rows * batch)
        .enumerate()
        .for_each(|(k, out)| f(k * chunk_rows, out));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tern_pack::TernaryMatrix;

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

    /// Every vector form against the portable one, and the 8-bit products against the product
    /// of the dequantized 8-bit rows (exact integer sums: only float rounding differs).
    #[test]
    fn every_instruction_set_gives_the_portable_results() {
        let isas = Isa::all_available();
        eprintln!("instruction sets here: {isas:?}");
        for (i, &(rows, cols, rg, cg)) in [
            (20, 300, 1, 2),
            (9, 64, 1, 1),
            (6, 1000, 2, 4),
            (4, 70, 1, 1),
            (9, 1400, 1, 2), // segments of 11 blocks: two runs of four and three blocks after
        ]
        .iter()
        .enumerate()
        {
            let m = matrix(rows, cols, rg, cg, 7 + i as u64);
            let p = PackedTernary::new(&m);
            let mut r = rng(3 + i as u64);
            let batch = 3;
            let x: Vec<f32> = (0..batch * cols)
                .map(|_| (r() * 2.0 - 1.0) as f32)
                .collect();
            let xp = p.pad(&x, batch);
            let q8 = p.quantize(&x, batch);
            // The dequantized 8-bit rows, unpadded.
            let xq: Vec<f32> = q8_values(&p, &q8, cols, cg);
            let want_q = reference(&m, &xq, batch);
            let width = p.padded_cols();
            for row in 0..rows {
                let base = p.row_dot(row, &xp[..width], Isa::Portable);
                let base_q = p.row_dot_q8(row, &q8, 0, Isa::Portable);
                for &isa in &isas {
                    let a = p.row_dot(row, &xp[..width], isa);
                    assert!((a - base).abs() < 1e-4, "{isa:?} row {row}: {a} vs {base}");
                    for b in 0..batch {
                        let y = p.row_dot_q8(row, &q8, b, isa);
                        let w = want_q[b * rows + row];
                        assert!(
                            (y as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{isa:?} q8 [{rows}x{cols}] row {row} batch {b}: {y} vs {w}"
                        );
                    }
                    let y = p.row_dot_q8(row, &q8, 0, isa);
                    assert!(
                        (y - base_q).abs() < 1e-4,
                        "{isa:?} q8 row {row}: {y} vs {base_q}"
                    );
                }
            }
            // Rows expanded to floats (the batched f32 path) are the same on every form.
            let mut e0 = vec![0f32; width];
            p.expand_row(rows - 1, &mut e0, Isa::Portable);
            for &isa in &isas {
                let mut e = vec![0f32; width];
                p.expand_row(rows - 1, &mut e, isa);
                assert_eq!(e, e0, "{isa:?} expand_row");
            }
            // Four rows at a time (decode's f32 path): the same products.
            for &isa in &isas {
                let mut out = vec![0f32; rows];
                p.rows_f32(0, &p.order_f32(xp[..width].to_vec(), isa), &mut out, isa);
                for (row, y) in out.iter().enumerate() {
                    let base = p.row_dot(row, &xp[..width], Isa::Portable);
                    assert!(
                        (y - base).abs() < 1e-4,
                        "{isa:?} rows_f32 row {row}: {y} vs {base}"
                    );
                }
            }
            // A prompt's many rows take the expanded-bytes path: the same products.
            let wide = 6;
            let xw: Vec<f32> = (0..wide * cols).map(|_| (r() * 2.0 - 1.0) as f32).collect();
            let q8w = p.quantize(&xw, wide);
            let want_w = reference(&m, &q8_values(&p, &q8w, cols, cg), wide);
            for &isa in &isas {
                let mut out = vec![0f32; rows * wide];
                p.rows_q8(0, rows, &q8w, &mut out, isa);
                for row in 0..rows {
                    for b in 0..wide {
                        let (y, w) = (out[row * wide + b] as f64, want_w[b * rows + row]);
                        assert!(
                            (y - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{isa:?} batch {wide} row {row}: {y} vs {w}"
                        );
                    }
                }
            }
            // 8 bits per chunk of 256 stay close to the f32 product (inputs in [-1, 1]).
            let exact = reference(&m, &x, batch);
            let y = Matrix::Ternary(p.clone()).matmul_q8(&q8);
            for (a, b) in y.iter().zip(&exact) {
                let bound = 0.02 * (cols as f64).sqrt();
                assert!((*a as f64 - b).abs() < bound, "{a} vs {b}");
            }
        }
    }

    /// The values `d * q` that 8-bit rows stand for, `[batch, cols]`.
    fn q8_values(p: &PackedTernary, q8: &Q8Rows, cols: usize, cg: usize) -> Vec<f32> {
        let seg = cols / cg;
        let pseg = p.padded_cols() / cg;
        let chunks = pseg.div_ceil(crate::ternary::CHUNK);
        let mut out = Vec::new();
        for b in 0..q8.batch {
            for g in 0..cg {
                for c in 0..seg {
                    let q = q8.q[b * p.padded_cols() + g * pseg + c] as f32;
                    let d = q8.d[(b * cg + g) * chunks + c / crate::ternary::CHUNK];
                    out.push(d * q);
                }
            }
        }
        out
    }

    /// BitNet's rows: integers times one scale a row, multiplied exactly.
    #[test]
    fn integer_rows_multiply_exactly() {
        let (rows, cols) = (16, 320);
        let m = matrix(rows, cols, 2, 1, 11);
        let p = PackedTernary::new(&m);
        let mut r = rng(5);
        let q: Vec<i8> = (0..2 * cols).map(|_| (r() * 255.0 - 127.0) as i8).collect();
        let s = [0.25f32, 0.5];
        let q8 = p.from_ints(&q, &s);
        let y = Matrix::Ternary(p).matmul_q8(&q8);
        for b in 0..2 {
            for row in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| m.codes[row * cols + c] as f64 * q[b * cols + c] as f64)
                    .sum::<f64>()
                    * m.scales[row / 8] as f64
                    * s[b] as f64;
                let got = y[b * rows + row] as f64;
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }
}
