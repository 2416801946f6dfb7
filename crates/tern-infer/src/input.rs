//! What a block projection does to its input before the product, as `ProjLinear::matmul_input`
//! does in training: BitNet b1.58's weightless RMSNorm and 8-bit absmax quantization per token,
//! then Q-Sparse's top-K (optionally among 8-bit values, optionally rescaled to the row's norm).
//! Rows that end up as integers times one scale go to the 8-bit kernel, exactly; float rows go to
//! the f32 kernel, or, when asked ([`Activations::Int8`]), are quantized to 8 bits per chunk, as
//! llama.cpp does.

use tern_model::sparsity::TopK;

use crate::simd::{self, Isa};

/// How float activations meet packed ternary matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// f32 products: the trained model's arithmetic.
    #[default]
    Exact,
    /// 8-bit activations, one absmax scale per 256 values: integer dot products, faster,
    /// approximate.
    Int8,
}

/// A projection's input rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct InputRule {
    /// BitNet: RMSNorm without weight (this epsilon), then 8 bits per token.
    pub bitnet_eps: Option<f64>,
    pub top_k: Option<TopK>,
}

/// A prepared input: float rows, or integers with one scale a row (`x = q * scale`).
pub enum Prepared {
    F32(Vec<f32>),
    Ints { q: Vec<i8>, scale: Vec<f32> },
}

impl Prepared {
    /// The float rows (integers dequantized).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Prepared::F32(v) => v,
            Prepared::Ints { q, scale } => {
                let d = q.len() / scale.len().max(1);
                q.chunks(d.max(1))
                    .zip(&scale)
                    .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 * s))
                    .collect()
            }
        }
    }
}

/// Training's 8-bit absmax quantization of a row: `q = clamp(round(x s), -128, 127)`, with
/// `s = 127 / max(max|x|, 1e-5)` (as `tern_model::sparsity::absmax_quantize_with` computes it).
fn absmax_ints(x: &[f32]) -> (Vec<i8>, f32) {
    let isa = Isa::detect();
    let amax = simd::absmax(x, isa);
    let s = (1.0 / amax.max(1e-5)) * 127.0;
    let mut q = vec![0i8; x.len()];
    simd::quantize_i8(x, s, &mut q, isa);
    (q, s)
}

/// 1 at the `k` largest entries of `a`; entries tied with the k-th largest are kept lowest index
/// first (`tern_model::sparsity::top_k_mask`'s rule).
fn top_k_mask(a: &[f32], k: usize) -> Vec<bool> {
    let mut sorted = a.to_vec();
    sorted.sort_by(|x, y| y.total_cmp(x));
    let kth = sorted[k - 1];
    let mut missing = k - a.iter().filter(|&&v| v > kth).count();
    a.iter()
        .map(|&v| {
            if v > kth {
                true
            } else if v == kth && missing > 0 {
                missing -= 1;
                true
            } else {
                false
            }
        })
        .collect()
}

fn norm(x: impl Iterator<Item = f32>) -> f32 {
    x.map(|v| v * v).sum::<f32>().sqrt()
}

impl InputRule {
    pub fn is_plain(&self) -> bool {
        self.bitnet_eps.is_none() && self.top_k.is_none()
    }

    /// `x: [batch, d]` as the product sees it.
    pub fn prepare(&self, x: Vec<f32>, batch: usize) -> Prepared {
        if self.is_plain() || batch == 0 {
            return Prepared::F32(x);
        }
        let d = x.len() / batch;
        let rows: Vec<Prepared> = x.chunks(d).map(|r| self.prepare_row(r)).collect();
        if rows.iter().all(|r| matches!(r, Prepared::Ints { .. })) {
            let (mut q, mut scale) = (Vec::with_capacity(x.len()), Vec::with_capacity(batch));
            for r in rows {
                if let Prepared::Ints { q: rq, scale: rs } = r {
                    q.extend(rq);
                    scale.extend(rs);
                }
            }
            Prepared::Ints { q, scale }
        } else {
            Prepared::F32(rows.into_iter().flat_map(Prepared::into_f32).collect())
        }
    }

    fn prepare_row(&self, x: &[f32]) -> Prepared {
        let d = x.len();
        // BitNet's input, or the float row.
        let (vals, ints): (Vec<f32>, Option<(Vec<i8>, f32)>) = match self.bitnet_eps {
            Some(eps) => {
                let ss = x.iter().map(|v| v * v).sum::<f32>();
                let rms = (ss / d as f32 + eps as f32).sqrt();
                let xn: Vec<f32> = x.iter().map(|v| v / rms).collect();
                let (q, s) = absmax_ints(&xn);
                (q.iter().map(|&v| v as f32 / s).collect(), Some((q, s)))
            }
            None => (x.to_vec(), None),
        };
        let Some(top) = self.top_k else {
            let (q, s) = ints.expect("a rule that is not plain quantizes or sparsifies");
            return Prepared::Ints {
                q,
                scale: vec![1.0 / s],
            };
        };
        // Q-Sparse: choose among the (re)quantized values when asked.
        let (v, v_ints) = if top.quantized {
            let (q, s) = absmax_ints(&vals);
            (q.iter().map(|&c| c as f32 / s).collect(), Some((q, s)))
        } else {
            (vals.clone(), ints)
        };
        let k = top.k(d);
        let keep = if k == d {
            vec![true; d]
        } else {
            top_k_mask(&v.iter().map(|c| c.abs()).collect::<Vec<_>>(), k)
        };
        let kept: Vec<f32> = v
            .iter()
            .zip(&keep)
            .map(|(&c, &m)| if m { c } else { 0.0 })
            .collect();
        let factor = if top.rescale {
            norm(vals.iter().copied()) / norm(kept.iter().copied()).max(1e-12)
        } else {
            1.0
        };
        match v_ints {
            Some((q, s)) => Prepared::Ints {
                q: q.iter()
                    .zip(&keep)
                    .map(|(&c, &m)| if m { c } else { 0 })
                    .collect(),
                scale: vec![factor / s],
            },
            None => Prepared::F32(kept.iter().map(|c| c * factor).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keep_the_lowest_indices() {
        let m = top_k_mask(&[1.0, 3.0, 2.0, 2.0, 2.0, 0.5], 3);
        assert_eq!(m, [false, true, true, true, false, false]);
        let m = top_k_mask(&[2.0, 2.0, 2.0], 2);
        assert_eq!(m, [true, true, false]);
    }

    #[test]
    fn bitnet_rows_are_integers_of_the_normalized_input() {
        let rule = InputRule {
            bitnet_eps: Some(1e-5),
            top_k: None,
        };
        let x = vec![0.5f32, -1.0, 2.0, 0.0, 1.0, 1.0, 1.0, -3.0];
        let Prepared::Ints { q, scale } = rule.prepare(x.clone(), 2) else {
            panic!("BitNet rows are integers");
        };
        for (b, row) in x.chunks(4).enumerate() {
            let rms = (row.iter().map(|v| (v * v) as f64).sum::<f64>() / 4.0 + 1e-5).sqrt();
            let xn: Vec<f64> = row.iter().map(|&v| v as f64 / rms).collect();
            let s = 127.0 / xn.iter().fold(0f64, |m, v| m.max(v.abs()));
            for j in 0..4 {
                assert_eq!(q[b * 4 + j] as f64, (xn[j] * s).round());
                let back = q[b * 4 + j] as f64 * scale[b] as f64;
                assert!((back - (xn[j] * s).round() / s).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn top_k_keeps_k_entries_and_rescales_to_the_norm() {
        let top = TopK {
            keep: 0.5,
            quantized: false,
            rescale: true,
        };
        let rule = InputRule {
            bitnet_eps: None,
            top_k: Some(top),
        };
        let x = vec![0.1f32, -2.0, 0.3, 1.0];
        let Prepared::F32(y) = rule.prepare(x.clone(), 1) else {
            panic!("float rows stay float");
        };
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let f = n(&x) / n(&[-2.0, 1.0]);
        assert_eq!(y, vec![0.0, -2.0 * f, 0.0, 1.0 * f]);
    }
}
