//! Mamba's selective scan (Gu and Dao, 2023, the S6 recurrence) on the CPU, forward and backward.
//!
//! For each batch row and channel `i`, with a state of `n` values:
//! `h_t = exp(delta_t A_i) * h_{t-1} + delta_t B_t u_t` (element-wise over the state) and
//! `y_t = C_t . h_t + D_i u_t`, for `u, delta: [b, l, d]`, `A: [d, n]`, `B, C: [b, l, n]`,
//! `D: [d]`. `delta` is taken as given (the caller applies its softplus). The forward keeps every
//! state (`[b, l, d, n]`) for the backward, which runs the recurrence in reverse:
//! `dh_t = dy_t C_t + exp(delta_{t+1} A) dh_{t+1}`.

use rayon::prelude::*;

/// Sizes of one scan: batch, length, channels, state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanShape {
    pub b: usize,
    pub l: usize,
    pub d: usize,
    pub n: usize,
}

/// A scan's inputs: `u, delta: [b, l, d]`, `a: [d, n]`, `bm, cm: [b, l, n]`, `dskip: [d]`.
#[derive(Debug, Clone, Copy)]
pub struct ScanInputs<'a> {
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub bm: &'a [f32],
    pub cm: &'a [f32],
    pub dskip: &'a [f32],
}

impl<'a> ScanInputs<'a> {
    /// From `[u, delta, a, bm, cm, dskip]`.
    pub fn new(x: [&'a [f32]; 6]) -> Self {
        let [u, delta, a, bm, cm, dskip] = x;
        Self {
            u,
            delta,
            a,
            bm,
            cm,
            dskip,
        }
    }
}

/// `(y [b, l, d], states [b, l, d, n])`.
pub fn forward(x: &ScanInputs, s: ScanShape) -> (Vec<f32>, Vec<f32>) {
    let (u, delta, a, bm, cm, dskip) = (x.u, x.delta, x.a, x.bm, x.cm, x.dskip);
    let ScanShape { b, l, d, n } = s;
    let mut y = vec![0f32; b * l * d];
    let mut states = vec![0f32; b * l * d * n];
    // Batch rows are independent: one task each.
    y.par_chunks_mut(l * d)
        .zip(states.par_chunks_mut(l * d * n))
        .enumerate()
        .for_each(|(bi, (y, st))| {
            for i in 0..d {
                let (mut h, mut decay) = (vec![0f32; n], vec![0f32; n]);
                let ai = &a[i * n..][..n];
                for t in 0..l {
                    let (x, dt) = (u[(bi * l + t) * d + i], delta[(bi * l + t) * d + i]);
                    let (bt, ct) = (&bm[(bi * l + t) * n..][..n], &cm[(bi * l + t) * n..][..n]);
                    // The state's decays first, in a loop of the exp that vectorizes.
                    for (e, &ak) in decay.iter_mut().zip(ai) {
                        *e = crate::cpu::exp(dt * ak);
                    }
                    let mut acc = 0f32;
                    for k in 0..n {
                        h[k] = decay[k] * h[k] + dt * bt[k] * x;
                        acc += ct[k] * h[k];
                    }
                    st[(t * d + i) * n..][..n].copy_from_slice(&h);
                    y[t * d + i] = acc + dskip[i] * x;
                }
            }
        });
    (y, states)
}

/// Gradients `[du, ddelta, dA, dB, dC, dD]` for the upstream gradient `dy: [b, l, d]`.
pub fn backward(x: &ScanInputs, states: &[f32], dy: &[f32], s: ScanShape) -> [Vec<f32>; 6] {
    let (u, delta, a, bm, cm, dskip) = (x.u, x.delta, x.a, x.bm, x.cm, x.dskip);
    let ScanShape { b, l, d, n } = s;
    // Per batch row: its du, ddelta, dB, dC, and its share of dA and dD (summed after).
    let parts: Vec<[Vec<f32>; 6]> = (0..b)
        .into_par_iter()
        .map(|bi| {
            let (mut du, mut ddelta) = (vec![0f32; l * d], vec![0f32; l * d]);
            let (mut da, mut dbm, mut dcm) =
                (vec![0f32; d * n], vec![0f32; l * n], vec![0f32; l * n]);
            let mut dd = vec![0f32; d];
            let st = &states[bi * l * d * n..][..l * d * n];
            let mut decays = vec![0f32; n];
            for i in 0..d {
                let mut dh = vec![0f32; n];
                let ai = &a[i * n..][..n];
                for t in (0..l).rev() {
                    let at = (bi * l + t) * d + i;
                    let (x, dt, g) = (u[at], delta[at], dy[at]);
                    let (bt, ct) = (&bm[(bi * l + t) * n..][..n], &cm[(bi * l + t) * n..][..n]);
                    let h = &st[(t * d + i) * n..][..n];
                    dd[i] += g * x;
                    let (mut gu, mut gdt) = (g * dskip[i], 0f32);
                    for (e, &ak) in decays.iter_mut().zip(ai) {
                        *e = crate::cpu::exp(dt * ak);
                    }
                    for k in 0..n {
                        let h_prev = if t > 0 {
                            st[((t - 1) * d + i) * n + k]
                        } else {
                            0.0
                        };
                        let decay = decays[k];
                        dh[k] += g * ct[k];
                        dcm[t * n + k] += g * h[k];
                        // h_t = decay * h_{t-1} + dt * B_t * u_t
                        let g_decay = dh[k] * h_prev * decay;
                        gdt += g_decay * ai[k] + dh[k] * bt[k] * x;
                        da[i * n + k] += g_decay * dt;
                        dbm[t * n + k] += dh[k] * dt * x;
                        gu += dh[k] * dt * bt[k];
                        dh[k] *= decay;
                    }
                    du[t * d + i] = gu;
                    ddelta[t * d + i] = gdt;
                }
            }
            [du, ddelta, da, dbm, dcm, dd]
        })
        .collect();
    let mut out: [Vec<f32>; 6] = [
        Vec::with_capacity(b * l * d),
        Vec::with_capacity(b * l * d),
        vec![0f32; d * n],
        Vec::with_capacity(b * l * n),
        Vec::with_capacity(b * l * n),
        vec![0f32; d],
    ];
    for p in parts {
        let [du, ddelta, da, dbm, dcm, dd] = p;
        out[0].extend(du);
        out[1].extend(ddelta);
        out[2].iter_mut().zip(da).for_each(|(o, v)| *o += v);
        out[3].extend(dbm);
        out[4].extend(dcm);
        out[5].iter_mut().zip(dd).for_each(|(o, v)| *o += v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: one channel, one state, `A = -1`, `delta = B = C = u = 1`, `D = 0.5`:
    /// `h_1 = 1`, `y_1 = 1 + 0.5`; `h_2 = e^-1 + 1`, `y_2 = e^-1 + 1 + 0.5`.
    #[test]
    fn two_steps_by_hand() {
        let s = ScanShape {
            b: 1,
            l: 2,
            d: 1,
            n: 1,
        };
        let one = [1f32, 1.0];
        let x = ScanInputs {
            u: &one,
            delta: &one,
            a: &[-1.0],
            bm: &one,
            cm: &one,
            dskip: &[0.5],
        };
        let (y, st) = forward(&x, s);
        let e = (-1f32).exp();
        assert_eq!(st, vec![1.0, e + 1.0]);
        assert!(
            (y[0] - 1.5).abs() < 1e-7 && (y[1] - (e + 1.5)).abs() < 1e-6,
            "{y:?}"
        );
    }

    /// Every gradient against central differences of the forward (f32, small steps on values of
    /// order one).
    #[test]
    fn gradients_match_finite_differences() {
        let s = ScanShape {
            b: 2,
            l: 5,
            d: 3,
            n: 4,
        };
        let mut seed = 7u64;
        let mut r = |len: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    lo + (hi - lo) * ((seed >> 40) as f32 / (1u64 << 24) as f32)
                })
                .collect()
        };
        let (bl, bld) = (s.b * s.l, s.b * s.l * s.d);
        let mut inputs = [
            r(bld, -1.0, 1.0),        // u
            r(bld, 0.1, 0.8),         // delta
            r(s.d * s.n, -1.5, -0.2), // A
            r(bl * s.n, -1.0, 1.0),   // B
            r(bl * s.n, -1.0, 1.0),   // C
            r(s.d, -1.0, 1.0),        // D
        ];
        let up = r(bld, -1.0, 1.0);
        fn view(x: &[Vec<f32>; 6]) -> ScanInputs<'_> {
            ScanInputs::new(x.each_ref().map(|v| v.as_slice()))
        }
        let loss = |x: &[Vec<f32>; 6]| -> f64 {
            let (y, _) = forward(&view(x), s);
            y.iter().zip(&up).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (_, st) = forward(&view(&inputs), s);
        let g = backward(&view(&inputs), &st, &up, s);
        let names = ["u", "delta", "A", "B", "C", "D"];
        for p in 0..6 {
            for j in 0..inputs[p].len() {
                let h = 1e-2f32;
                let v = inputs[p][j];
                inputs[p][j] = v + h;
                let lp = loss(&inputs);
                inputs[p][j] = v - h;
                let lm = loss(&inputs);
                inputs[p][j] = v;
                let fd = (lp - lm) / (2.0 * h as f64);
                let an = g[p][j] as f64;
                assert!(
                    (fd - an).abs() < 2e-3 * (1.0 + fd.abs()),
                    "d{} [{j}]: analytic {an}, finite difference {fd}",
                    names[p]
                );
            }
        }
    }
}
