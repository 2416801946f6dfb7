//! Leading singular vectors for GaLore's projections: exact thin SVD in f64 on the host (faer),
//! or randomized subspace iteration whose large products run on the training device.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use faer::Mat;
use tern_kernels::guard::matmul;

/// Which singular vectors a projection keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `P = U[:, :r]` (m x r): `R = P^T G`, back `P N`.
    Left,
    /// `P = Vh[:r, :]` (r x n): `R = G P^T`, back `N P`.
    Right,
}

/// The leading `r` singular vectors of the row-major `m x n` matrix `g`, as the projection
/// matrix of `side`, row-major: `m x r` (Left) or `r x n` (Right). Each vector's sign is fixed so
/// that its entry of largest magnitude (the first such) is positive: SVD routines disagree on
/// signs, and a fixed rule keeps ranks, runs and the reference script in agreement.
pub fn leading_singular_vectors(g: &[f32], m: usize, n: usize, r: usize, side: Side) -> Vec<f32> {
    assert_eq!(g.len(), m * n);
    assert!(r <= m.min(n), "rank {r} above min({m}, {n})");
    let a = Mat::<f64>::from_fn(m, n, |i, j| g[i * n + j] as f64);
    let svd = a.thin_svd().expect("the SVD of a finite matrix converges");
    // faer returns singular values in non-increasing order.
    let vecs = match side {
        Side::Left => svd.U(),
        Side::Right => svd.V(),
    };
    let len = vecs.nrows();
    let cols: Vec<Vec<f64>> = (0..r)
        .map(|k| (0..len).map(|i| vecs[(i, k)]).collect())
        .collect();
    projection_layout(cols, side)
}

/// Vectors (each of the length of the projected side) as the projection matrix of `side`,
/// row-major, each with its largest-magnitude entry (the first such) positive.
fn projection_layout(mut cols: Vec<Vec<f64>>, side: Side) -> Vec<f32> {
    for c in &mut cols {
        let big = c
            .iter()
            .enumerate()
            .fold(0, |b, (i, x)| if x.abs() > c[b].abs() { i } else { b });
        if c[big] < 0.0 {
            c.iter_mut().for_each(|x| *x = -*x);
        }
    }
    let len = cols.first().map_or(0, Vec::len);
    match side {
        // m x r: row i holds entry i of every vector.
        Side::Left => (0..len)
            .flat_map(|i| cols.iter().map(move |c| c[i] as f32))
            .collect(),
        // r x n: one vector per row.
        Side::Right => cols.into_iter().flatten().map(|x| x as f32).collect(),
    }
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `Y` with orthonormal columns spanning the same space, by shifted Cholesky-QR run twice: the
/// tall products stay on the device, only the k x k Gram matrix is factorised on the host.
fn orthonormalize<B: tern_kernels::Kernels>(y: Tensor<B, 2>) -> Tensor<B, 2> {
    let k = y.dims()[1];
    let device = y.device();
    let mut q = y;
    for _ in 0..2 {
        let s = host(matmul(q.clone().transpose(), q.clone()));
        // The shift keeps the factorisation defined for a nearly rank-deficient Y (f32 Gram).
        let shift = 1e-7 * (0..k).map(|i| s[i * k + i]).sum::<f64>().max(1e-30);
        // S + shift I = L L^T; Q = Y L^-T.
        let mut l = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..=i {
                let mut v = s[i * k + j] + if i == j { shift } else { 0.0 };
                for p in 0..j {
                    v -= l[i * k + p] * l[j * k + p];
                }
                l[i * k + j] = if i == j {
                    v.max(1e-300).sqrt()
                } else {
                    v / l[j * k + j]
                };
            }
        }
        // L^-1 by forward substitution, column by column.
        let mut inv = vec![0f64; k * k];
        for c in 0..k {
            for i in c..k {
                let mut v = if i == c { 1.0 } else { 0.0 };
                for p in c..i {
                    v -= l[i * k + p] * inv[p * k + c];
                }
                inv[i * k + c] = v / l[i * k + i];
            }
        }
        // L^-T as a row-major k x k matrix: element (i, j) = inv(j, i).
        let r_inv: Vec<f32> = (0..k * k)
            .map(|x| inv[(x % k) * k + x / k] as f32)
            .collect();
        let r_inv = Tensor::<B, 2>::from_data(TensorData::new(r_inv, [k, k]), &device);
        q = matmul(q, r_inv);
    }
    q
}

/// The leading `r` singular vectors of `g` (on the training device) by randomized subspace
/// iteration (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1): a Gaussian sketch of
/// `r + oversample` columns, `iters` power iterations with re-orthonormalisation, then the exact
/// SVD of the small projected matrix. Same layout and sign rule as
/// [`leading_singular_vectors`]; `seed` fixes the sketch (the same on every rank).
pub fn randomized_singular_vectors<B: tern_kernels::Kernels>(
    g: &Tensor<B, 2>,
    r: usize,
    side: Side,
    oversample: usize,
    iters: usize,
    seed: u64,
) -> Vec<f32> {
    // The wanted vectors are the left singular vectors of A (a x b).
    let a_mat = match side {
        Side::Left => g.clone(),
        Side::Right => g.clone().transpose(),
    };
    let [a, b] = a_mat.dims();
    assert!(r <= a.min(b), "rank {r} above min({a}, {b})");
    let k = (r + oversample).min(a.min(b));
    let omega = gaussian(b * k, seed);
    let omega = Tensor::<B, 2>::from_data(TensorData::new(omega, [b, k]), &g.device());
    let mut q = orthonormalize(matmul(a_mat.clone(), omega));
    for _ in 0..iters {
        let z = orthonormalize(matmul(a_mat.clone().transpose(), q));
        q = orthonormalize(matmul(a_mat.clone(), z));
    }
    // B = Q^T A (k x b); A ~ Q B, so A's leading left vectors are Q times B's.
    let small = host(matmul(q.clone().transpose(), a_mat));
    let bm = Mat::<f64>::from_fn(k, b, |i, j| small[i * b + j]);
    let svd = bm.thin_svd().expect("the SVD of a finite matrix converges");
    let u = svd.U();
    let w: Vec<f32> = (0..k)
        .flat_map(|i| (0..r).map(move |c| u[(i, c)] as f32))
        .collect();
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [k, r]), &g.device());
    let vecs = host(matmul(q, w)); // a x r
    let cols: Vec<Vec<f64>> = (0..r)
        .map(|c| (0..a).map(|i| vecs[i * r + c]).collect())
        .collect();
    projection_layout(cols, side)
}

/// `n` samples of N(0, 1) from `seed` (SplitMix64 and Box-Muller).
fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_one_matrix_and_signs() {
        // g = 3 u v^T with u = (1, 2, 2)/3, v = -(0.6, 0.8): the leading vectors up to sign.
        let (u, v) = ([1.0f32 / 3.0, 2.0 / 3.0, 2.0 / 3.0], [-0.6f32, -0.8]);
        let g: Vec<f32> = (0..3)
            .flat_map(|i| (0..2).map(move |j| 3.0 * u[i] * v[j]))
            .collect();
        let right = leading_singular_vectors(&g, 3, 2, 1, Side::Right);
        let left = leading_singular_vectors(&g, 3, 2, 1, Side::Left);
        // Largest-magnitude entry positive: v becomes (0.6, 0.8); u keeps (1, 2, 2)/3.
        for (a, b) in right.iter().zip([0.6, 0.8]) {
            assert!((a - b).abs() < 1e-6, "{right:?}");
        }
        for (a, b) in left.iter().zip(u) {
            assert!((a - b).abs() < 1e-6, "{left:?}");
        }
    }

    #[test]
    fn randomized_finds_the_leading_subspace() {
        use burn::backend::Flex;
        // G = U diag(s) V^T with a decaying spectrum (40 x 24): both sides, against the exact SVD.
        let (m, n, r) = (40usize, 24usize, 4usize);
        let noise = gaussian(m * n, 3);
        let g: Vec<f32> = (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                let low: f32 = (0..6)
                    .map(|k| {
                        let s = 10f32 * 0.5f32.powi(k as i32);
                        s * ((i * (k + 1)) as f32 * 0.37).sin()
                            * ((j * (k + 2)) as f32 * 0.23).cos()
                    })
                    .sum();
                low + 1e-3 * noise[x]
            })
            .collect();
        let t =
            Tensor::<Flex, 2>::from_data(TensorData::new(g.clone(), [m, n]), &Default::default());
        for (side, len) in [(Side::Right, n), (Side::Left, m)] {
            let exact = leading_singular_vectors(&g, m, n, r, side);
            let rand = randomized_singular_vectors(&t, r, side, 8, 2, 11);
            // Projector distance: |P_e P_e^T - P_r P_r^T| entry-wise, independent of signs.
            let at = |p: &[f32], k: usize, i: usize| match side {
                Side::Right => p[k * len + i],
                Side::Left => p[i * r + k],
            };
            let mut worst = 0f32;
            for i in 0..len {
                for j in 0..len {
                    let pe: f32 = (0..r).map(|k| at(&exact, k, i) * at(&exact, k, j)).sum();
                    let pr: f32 = (0..r).map(|k| at(&rand, k, i) * at(&rand, k, j)).sum();
                    worst = worst.max((pe - pr).abs());
                }
            }
            assert!(worst < 1e-3, "{side:?}: projectors differ by {worst}");
            // And, with the shared sign rule, the vectors themselves.
            let d = exact
                .iter()
                .zip(&rand)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-3, "{side:?}: vectors differ by {d}");
        }
    }

    #[test]
    fn orthonormal_and_ordered() {
        let (m, n, r) = (7, 5, 3);
        let g: Vec<f32> = (0..m * n)
            .map(|k| ((k * 37 % 11) as f32 - 5.0) * 0.3 + (k as f32).sin())
            .collect();
        let p = leading_singular_vectors(&g, m, n, r, Side::Right);
        for a in 0..r {
            for b in 0..r {
                let dot: f32 = (0..n).map(|j| p[a * n + j] * p[b * n + j]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "P P^T [{a}, {b}] = {dot}");
            }
        }
        // |G v_k| = sigma_k, non-increasing.
        let sig: Vec<f32> = (0..r)
            .map(|k| {
                (0..m)
                    .map(|i| {
                        (0..n)
                            .map(|j| g[i * n + j] * p[k * n + j])
                            .sum::<f32>()
                            .powi(2)
                    })
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        assert!(sig[0] >= sig[1] && sig[1] >= sig[2], "{sig:?}");
    }
}
