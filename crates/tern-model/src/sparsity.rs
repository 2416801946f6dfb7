//! Q-Sparse (arXiv 2407.10969): each token's input to a projection keeps only its `k` entries of
//! largest magnitude, optionally after 8-bit absmax quantization, with a straight-through
//! gradient (the backward pass reaches every entry of the input).

use crate::hooks::Hooks;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// `[model.sparsity]` of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsityConfig {
    /// Fraction of each token's input entries kept by every projection (1 = dense).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<f64>,
    /// Overrides `top_k` for the attention projections (q, k, v, o).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_top_k: Option<f64>,
    /// Overrides `top_k` for the MLP projections (gate, up, down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_top_k: Option<f64>,
    /// Quantize each token's input to 8 bits (absmax, x 127) before choosing the top k.
    #[serde(default)]
    pub quantized: bool,
    /// Rescale the kept entries to the token's norm before sparsification (`x_s |x| / |x_s|`).
    #[serde(default)]
    pub rescale: bool,
}

/// Which projections a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Attention,
    Mlp,
}

impl SparsityConfig {
    /// Each fraction must be in (0, 1]; the message names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (key, v) in [
            ("model.sparsity.top_k", self.top_k),
            ("model.sparsity.attn_top_k", self.attn_top_k),
            ("model.sparsity.mlp_top_k", self.mlp_top_k),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v <= 1.0) {
                    return Err((key.into(), format!("{v} is not a fraction in (0, 1]")));
                }
            }
        }
        Ok(())
    }

    /// The top-K of a projection of type `t` (`None`: dense).
    pub fn top_k(&self, t: LayerType) -> Option<TopK> {
        let keep = match t {
            LayerType::Attention => self.attn_top_k.or(self.top_k),
            LayerType::Mlp => self.mlp_top_k.or(self.top_k),
        }?;
        Some(TopK {
            keep,
            quantized: self.quantized,
            rescale: self.rescale,
        })
    }
}

/// The top-K of one projection's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopK {
    pub keep: f64,
    pub quantized: bool,
    pub rescale: bool,
}

/// 8-bit absmax quantization of each row (last dimension), dequantized:
/// `clamp(round(x * s), -128, 127) / s` with `s = 127 / max(max|x|, 1e-5)`.
pub fn absmax_quantize<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let amax = x.clone().abs().max_dim(D - 1);
    absmax_quantize_with(x, amax)
}

/// [`absmax_quantize`] with the rows' absmax `amax` (`[.., 1]`) given (the whole row's, when `x`
/// holds a block of it).
pub fn absmax_quantize_with<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    amax: Tensor<B, D>,
) -> Tensor<B, D> {
    let s = amax.clamp_min(1e-5).recip().mul_scalar(127.0);
    x.mul(s.clone()).round().clamp(-128.0, 127.0).div(s)
}

impl TopK {
    /// Entries kept of a row of `d`: `round(keep * d)`, at least 1.
    pub fn k(&self, d: usize) -> usize {
        ((self.keep * d as f64).round() as usize).clamp(1, d)
    }

    /// The sparsified input: the choice is made on whole rows (`hooks` gather a row-parallel
    /// input's row from its group and hand back this tensor's block).
    pub fn apply<B: Backend, H: Hooks<B>, const D: usize>(
        &self,
        x: Tensor<B, D>,
        hooks: &H,
    ) -> Tensor<B, D> {
        let kept = hooks.on_whole_rows(x.clone().detach(), |rows| self.sparsify(rows));
        // Forward: exactly `kept`; backward: the identity to every entry of x.
        kept + (x.clone() - x.detach())
    }

    /// The sparsified rows of `x` (no gradient).
    pub fn sparsify<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let d = x.dims()[D - 1];
        let v = if self.quantized {
            absmax_quantize(x.clone())
        } else {
            x.clone()
        };
        let k = self.k(d);
        let kept = if k == d {
            v
        } else {
            v.clone() * top_k_mask(v.abs(), k)
        };
        if self.rescale {
            let norm = |t: Tensor<B, D>| t.powi_scalar(2).sum_dim(D - 1).sqrt();
            let factor = norm(x).div(norm(kept.clone()).clamp_min(1e-12));
            kept * factor
        } else {
            kept
        }
    }
}

/// 1 at the `k` largest entries of each row of `a` (last dimension), 0 elsewhere. Entries tied
/// with the k-th largest value are kept lowest index first, as many as the row still needs, so
/// exactly k survive and the choice does not depend on a sort's order of equal keys (which differs
/// between backends). Ties are common: an 8-bit quantized row has at most 256 distinct values.
pub fn top_k_mask<B: Backend, const D: usize>(a: Tensor<B, D>, k: usize) -> Tensor<B, D> {
    let dims = a.dims();
    // The sorted values are the same whatever order a sort gives equal keys.
    let kth = a
        .clone()
        .sort_descending(D - 1)
        .narrow(D - 1, k - 1, 1)
        .expand(dims);
    let above = a.clone().greater(kth.clone()).float();
    let at = a.equal(kth).float();
    let missing = above
        .clone()
        .sum_dim(D - 1)
        .neg()
        .add_scalar(k as f64)
        .expand(dims);
    let first_ties = at.clone().cumsum(D - 1).lower_equal(missing).float() * at;
    above + first_ties
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    type B = Flex;
    type AB = Autodiff<Flex>;

    fn t(v: &[f32], rows: usize) -> Tensor<B, 2> {
        let d = v.len() / rows;
        Tensor::from_data(TensorData::new(v.to_vec(), [rows, d]), &Default::default())
    }

    fn vals<BB: Backend, const D: usize>(x: Tensor<BB, D>) -> Vec<f32> {
        x.into_data().convert::<f32>().to_vec().unwrap()
    }

    #[test]
    fn keeps_exactly_k_on_ties() {
        let top = TopK {
            keep: 0.5,
            quantized: false,
            rescale: false,
        };
        // Row 0: all |x| equal (a 4-way tie for 2 places); row 1: distinct.
        let x = t(&[1.0, -1.0, 1.0, -1.0, 0.1, -3.0, 2.0, 0.5], 2);
        let y = vals(top.sparsify(x));
        // The tie keeps the lowest indices.
        assert_eq!(&y[..4], &[1.0, -1.0, 0.0, 0.0], "{y:?}");
        assert_eq!(&y[4..], &[0.0, -3.0, 2.0, 0.0]);
        // One entry above the tie, three tied for the remaining two places of k = 3.
        let three = TopK { keep: 0.6, ..top };
        let y = vals(three.sparsify(t(&[0.5, -2.0, 0.5, 0.1, -0.5], 1)));
        assert_eq!(y, [0.5, -2.0, 0.5, 0.0, 0.0]);
        // k = round(0.3 * 4) = 1; at least 1 even for a tiny fraction.
        let one = TopK { keep: 0.01, ..top };
        assert_eq!(one.k(4), 1);
        let y = vals(one.sparsify(t(&[0.0, 0.0, 0.0, 0.0], 1)));
        assert_eq!(y, vec![0.0; 4]);
    }

    #[test]
    fn quantized_top_k_keeps_8_bit_levels() {
        let top = TopK {
            keep: 0.5,
            quantized: true,
            rescale: false,
        };
        let x = t(&[0.9, -0.31, 0.05, 0.6, -0.2, 0.0123, 0.4, -0.7], 1);
        let y = vals(top.sparsify(x));
        // s = 127 / 0.9: kept values are integers / s, the largest four by magnitude.
        let s = 127.0 / 0.9f32;
        let want: Vec<f32> = [0.9f32, 0.0, 0.0, 0.6, 0.0, 0.0, 0.4, -0.7]
            .iter()
            .map(|v| (v * s).round() / s)
            .collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        let levels: Vec<f32> = y.iter().map(|v| v * s).collect();
        assert!(levels.iter().all(|l| (l - l.round()).abs() < 1e-3));
        assert!(
            levels.iter().any(|l| l.abs() > 1.5),
            "not collapsed to {{-1, 0, 1}}: {levels:?}"
        );
    }

    #[test]
    fn rescale_preserves_the_norm() {
        let top = TopK {
            keep: 0.25,
            quantized: false,
            rescale: true,
        };
        let x = t(&[3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 1);
        let y = vals(top.sparsify(x));
        // Keeps 2 entries (4 and 3, norm 5), scaled up to the row's norm sqrt(9 + 16 + 4).
        let norm_y: f32 = y.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm_y - 29f32.sqrt()).abs() < 1e-5, "{y:?}");
        assert_eq!(y.iter().filter(|v| **v != 0.0).count(), 2);
    }

    #[test]
    fn absmax_quantization_closed_form() {
        let y = vals(absmax_quantize(t(&[0.5, -0.25, 0.1, 0.0], 1)));
        let s = 127.0 / 0.5f32;
        let want: Vec<f32> = [0.5f32, -0.25, 0.1, 0.0]
            .iter()
            .map(|v| (v * s).round() / s)
            .collect();
        assert_eq!(y, want);
    }

    #[test]
    fn straight_through_gradient_reaches_every_entry() {
        let top = TopK {
            keep: 0.5,
            quantized: true,
            rescale: false,
        };
        let x = Tensor::<AB, 2>::from_data(
            TensorData::new(vec![0.9f32, -0.1, 0.05, 0.6], [1, 4]),
            &Default::default(),
        )
        .require_grad();
        let w = Tensor::<AB, 2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 4]),
            &Default::default(),
        );
        let y = top.apply(x.clone(), &crate::hooks::NoHooks);
        let g = (y * w).sum().backward();
        assert_eq!(vals(x.grad(&g).unwrap()), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
