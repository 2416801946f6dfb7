//! Leading singular vectors for GaLore's projections: exact thin SVD in f64 on the host (faer).

use faer::Mat;

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
    let mut cols: Vec<Vec<f64>> = (0..r)
        .map(|k| (0..len).map(|i| vecs[(i, k)]).collect())
        .collect();
    for c in &mut cols {
        let big = c
            .iter()
            .enumerate()
            .fold(0, |b, (i, x)| if x.abs() > c[b].abs() { i } else { b });
        if c[big] < 0.0 {
            c.iter_mut().for_each(|x| *x = -*x);
        }
    }
    match side {
        // m x r: row i holds entry i of every vector.
        Side::Left => (0..len)
            .flat_map(|i| cols.iter().map(move |c| c[i] as f32))
            .collect(),
        // r x n: one vector per row.
        Side::Right => cols.into_iter().flatten().map(|x| x as f32).collect(),
    }
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
