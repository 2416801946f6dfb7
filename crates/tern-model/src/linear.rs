//! The projections of the blocks: float (FloatLM) or ternary (TriLM) with per-group scales.

use crate::encoder::Encoder;
use crate::hooks::{Hooks, NoHooks};
use crate::sparsity::{absmax_quantize_with, TopK};
use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tern_kernels::precision::{matmul_precision, Precision};
use tern_kernels::{reference, Kernels, TernarySpec};

/// What the block projections are made of (`model.linear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearKind {
    /// Plain floating-point weights (FloatLM).
    Float,
    /// TriLM: `gamma_g * clamp(round(W / gamma_g), -1, 1)` with a straight-through gradient.
    #[default]
    Ternary,
    /// BitNet b1.58's BitLinear: a weightless RMSNorm of the input, 8-bit absmax quantization per
    /// token, absmean ternary weights per scale group (`max(mean|W_g|, 1e-5)`), STE on both.
    Bitnet,
}

/// Which blocks of `W[out, in]` share one ternary scale. Column-parallel layers (q, k, v, gate, up)
/// are split by output rows, row-parallel layers (o, down) by input columns: each tensor-parallel
/// shard then owns whole groups and computes its own scale without communication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAxis {
    Rows,
    Cols,
}

/// A bias-free projection `y = x W^T` with `W` stored `[out, in]` as in Hugging Face checkpoints.
/// `hooks` is what was applied from outside the model (tensor parallelism, an observer); the
/// plain model's [`NoHooks`] does nothing.
#[derive(Module, Debug)]
pub struct ProjLinear<B: Backend, H = NoHooks> {
    pub weight: Param<Tensor<B, 2>>,
    /// A distillation student's 1-bit input encoder (`None` in plain models).
    pub encoder: Option<Encoder<B>>,
    #[module(skip)]
    pub hooks: H,
    #[module(skip)]
    pub kind: LinearKind,
    #[module(skip)]
    pub groups: usize,
    #[module(skip)]
    pub axis: ScaleAxis,
    #[module(skip)]
    pub eps: f64,
    /// Q-Sparse top-K of the input (`None`: dense).
    #[module(skip)]
    pub sparsity: Option<TopK>,
    /// Epsilon of BitNet's RMSNorm of the input.
    #[module(skip)]
    pub rms_eps: f64,
    /// How far a ternary layer's weight is quantized: `W~ = (1 - m) W + m Q(W)` (1: TriLM's
    /// forward; below 1 during a distillation's ramp into quantization, `distill.quant_ramp_steps`).
    #[module(skip)]
    pub quant_mix: f64,
}

/// Everything needed to build a [`ProjLinear`].
#[derive(Debug, Clone)]
pub struct ProjLinearConfig {
    pub d_in: usize,
    pub d_out: usize,
    pub kind: LinearKind,
    pub groups: usize,
    pub axis: ScaleAxis,
    pub eps: f64,
    pub init_std: f64,
    pub sparsity: Option<TopK>,
    pub rms_eps: f64,
}

impl ProjLinearConfig {
    /// A projection of a decoder block: the model's linear kind, scale groups, init and the
    /// top-K of its layer type.
    pub fn block(
        c: &crate::ModelConfig,
        d_in: usize,
        d_out: usize,
        axis: ScaleAxis,
        layer: crate::sparsity::LayerType,
    ) -> Self {
        Self {
            d_in,
            d_out,
            kind: c.linear,
            groups: c.scale_groups,
            axis,
            eps: c.ternary_eps,
            init_std: c.init_std,
            sparsity: c.sparsity.as_ref().and_then(|s| s.top_k(layer)),
            rms_eps: c.rms_eps,
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ProjLinear<B> {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        }
        .init([self.d_out, self.d_in], device);
        ProjLinear {
            weight,
            encoder: None,
            hooks: NoHooks,
            kind: self.kind,
            groups: self.groups,
            axis: self.axis,
            eps: self.eps,
            sparsity: self.sparsity,
            rms_eps: self.rms_eps,
            quant_mix: 1.0,
        }
    }
}

impl ScaleAxis {
    fn by_rows(self) -> bool {
        self == ScaleAxis::Rows
    }
}

/// Ternary codes in {-1, 0, 1} and the per-group scales of `w`.
pub fn ternary_codes<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let gamma = reference::group_scales(&w, groups, axis.by_rows(), eps);
    let codes = reference::ternary_codes(w, gamma.clone(), groups, axis.by_rows());
    (codes, gamma)
}

/// TriLM's quantized weight `W~ = gamma_g * clamp(round(W / gamma_g), -1, 1)` (no gradient path).
pub fn ternary_quantize<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
    eps: f64,
) -> Tensor<B, 2> {
    reference::ternary_quantize(
        w,
        TernarySpec {
            groups,
            by_rows: axis.by_rows(),
            eps,
        },
    )
}

/// BitNet b1.58's weight `W_q = gamma_g * clamp(round(W / gamma_g), -1, 1)` with
/// `gamma_g = max(mean|W_g|, 1e-5)` per scale group, and its codes and scales.
pub fn bitnet_codes<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    // group_scales adds its eps; BitNet clamps instead.
    let gamma = reference::group_scales(&w, groups, axis.by_rows(), 0.0).clamp_min(1e-5);
    let codes = reference::ternary_codes(w, gamma.clone(), groups, axis.by_rows());
    (codes, gamma)
}

/// BitNet's input: a weightless RMSNorm over the whole row, then 8-bit absmax quantization per
/// token with a straight-through gradient (forward exactly the quantized value). `hooks` see the
/// row's sum of squares and its absmax: under tensor parallelism a row-parallel input holds a
/// block of the row, and both statistics are the whole row's.
pub fn bitnet_input<B: Backend, H: Hooks<B>, const D: usize>(
    x: Tensor<B, D>,
    eps: f64,
    hooks: &H,
) -> Tensor<B, D> {
    let d = hooks.row_len(x.dims()[D - 1]);
    let ss = hooks.row_sum(x.clone().powi_scalar(2).sum_dim(D - 1));
    let xn = x.div(ss.div_scalar(d as f64).add_scalar(eps).sqrt());
    let plain = xn.clone().detach();
    let amax = hooks.row_max(plain.clone().abs().max_dim(D - 1));
    let q = absmax_quantize_with(plain.clone(), amax);
    q + (xn - plain)
}

impl<B: Backend, H> ProjLinear<B, H> {
    /// The weight the forward pass multiplies by. For ternary and BitNet layers the
    /// straight-through estimator makes dL/dW equal dL/dW~ (ternary: one fused op,
    /// [`Kernels::ternary_ste`]; BitNet: [`reference::straight_through`], which says why it is
    /// written as it is); the forward pass sees the exact quantized weight (a ternary layer
    /// during a ramp, `quant_mix < 1`, sees its blend with the latent weight).
    pub fn effective_weight(&self) -> Tensor<B, 2>
    where
        B: Kernels,
    {
        let w = self.weight.val();
        match self.kind {
            LinearKind::Float => w,
            LinearKind::Ternary => {
                let spec = TernarySpec {
                    groups: self.groups,
                    by_rows: self.axis.by_rows(),
                    eps: self.eps,
                };
                match self.quant_mix >= 1.0 {
                    true => B::ternary_ste(w, spec),
                    // The straight-through gradient of the quantized part is the identity, so
                    // the mix passes the gradient unchanged.
                    false => {
                        w.clone().mul_scalar(1.0 - self.quant_mix)
                            + B::ternary_ste(w, spec).mul_scalar(self.quant_mix)
                    }
                }
            }
            LinearKind::Bitnet => {
                let (codes, gamma) = bitnet_codes(w.clone().detach(), self.groups, self.axis);
                let q = reference::dequantize(codes, gamma, self.groups, self.axis.by_rows());
                reference::straight_through(w, q)
            }
        }
    }

    /// `x W~^T` of a ternary or BitNet layer in bf16: the codes are multiplied as they are (exact
    /// in bf16, where a scaled code is not) and each group's scale applied to the f32 product.
    /// Backward, the codes carry the straight-through gradient divided by the scale, so that
    /// `dL/dW = dL/dW~` as in f32.
    fn scaled_codes(&self, x: Tensor<B, 2>) -> Tensor<B, 2>
    where
        B: Kernels,
    {
        let w = self.weight.val();
        let (codes, gamma) = self.codes().expect("a ternary or BitNet layer");
        let (g, by_rows) = (self.groups, self.axis.by_rows());
        let dims = w.dims();
        let unit = reference::grouped(w, g, by_rows)
            .div(gamma.clone())
            .reshape(dims);
        let c = reference::straight_through(unit, codes);
        let [d_out, d_in] = dims;
        if by_rows {
            let scale = gamma
                .reshape([g, 1])
                .repeat_dim(1, d_out / g)
                .reshape([1, d_out]);
            return <B as Kernels>::linear(x, c) * scale;
        }
        let k = d_in / g;
        let gamma = gamma.reshape([g]);
        (0..g)
            .map(|i| {
                let part = <B as Kernels>::linear(
                    x.clone().narrow(1, i * k, k),
                    c.clone().narrow(1, i * k, k),
                );
                part * gamma.clone().narrow(0, i, 1).reshape([1, 1])
            })
            .reduce(|a, b| a + b)
            .expect("at least one group")
    }

    /// The codes and scales of a ternary or BitNet layer (`None` for float layers).
    pub fn codes(&self) -> Option<(Tensor<B, 2>, Tensor<B, 3>)> {
        let w = self.weight.val().detach();
        match self.kind {
            LinearKind::Float => None,
            LinearKind::Ternary => Some(ternary_codes(w, self.groups, self.axis, self.eps)),
            LinearKind::Bitnet => Some(bitnet_codes(w, self.groups, self.axis)),
        }
    }

    /// Fraction of zero codes of a ternary or BitNet layer (`None` for float layers).
    pub fn zero_fraction(&self) -> Option<f64> {
        let share = self.zero_share()?.into_scalar();
        Some(num_to_f64(share))
    }

    /// [`Self::zero_fraction`] as a one-element tensor on the device (read back with others).
    pub fn zero_share(&self) -> Option<Tensor<B, 1>> {
        let (codes, _) = self.codes()?;
        let n = codes.shape().num_elements() as f64;
        Some(codes.equal_elem(0.0).float().sum().div_scalar(n))
    }
}

impl<B: Kernels, H: Hooks<B>> ProjLinear<B, H> {
    /// What the matmul multiplies: the input after the encoder (distillation students), BitNet's
    /// norm and 8-bit quantization, and the top-K (Q-Sparse). For BitNet the top-K comes last and
    /// picks among the quantized values (Q-Sparse's 1.58-bit form, `TopK(|Q(x_n)|)`), so the norm
    /// is taken over the whole input and a rescale means what it says.
    pub fn matmul_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match &self.encoder {
            Some(e) => e.forward(x, &self.hooks),
            None => x,
        };
        let x = match self.kind {
            LinearKind::Bitnet => bitnet_input(x, self.rms_eps, &self.hooks),
            _ => x,
        };
        match &self.sparsity {
            Some(t) => t.apply(x, &self.hooks),
            None => x,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let input = x.clone();
        let x = self.matmul_input(x);
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in;
        let x = x.reshape([rows, d_in]);
        let y = match (matmul_precision(), self.kind) {
            (Precision::Bf16, LinearKind::Ternary | LinearKind::Bitnet)
                if self.quant_mix >= 1.0 =>
            {
                self.scaled_codes(x)
            }
            _ => <B as Kernels>::linear(x, self.effective_weight()),
        };
        let d_out = y.dims()[1];
        let mut out = dims;
        out[D - 1] = d_out;
        let y = self.hooks.output(y.reshape(out));
        self.hooks.observe(&input, &y);
        y
    }
}

impl<B: Backend, H> ProjLinear<B, H> {
    /// This projection with its hooks mapped by `f` (how `parallelize` and the taps apply theirs).
    pub fn map_hooks<H2>(self, f: impl FnOnce(H) -> H2) -> ProjLinear<B, H2> {
        ProjLinear {
            weight: self.weight,
            encoder: self.encoder,
            hooks: f(self.hooks),
            kind: self.kind,
            groups: self.groups,
            axis: self.axis,
            eps: self.eps,
            sparsity: self.sparsity,
            rms_eps: self.rms_eps,
            quant_mix: self.quant_mix,
        }
    }
}

fn num_to_f64<E: burn::tensor::ElementConversion>(e: E) -> f64 {
    e.elem::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;
    type AB = Autodiff<Flex>;

    /// The gradient of a layer's latent weight.
    fn weight_grad(
        layer: &ProjLinear<AB>,
        g: &<AB as burn::tensor::backend::AutodiffBackend>::Gradients,
    ) -> Vec<f32> {
        let grad = layer.weight.val().grad(g).unwrap();
        grad.into_data().to_vec().unwrap()
    }

    fn cfg(kind: LinearKind, groups: usize, axis: ScaleAxis) -> ProjLinearConfig {
        ProjLinearConfig {
            d_in: 12,
            d_out: 8,
            kind,
            groups,
            axis,
            eps: 1e-5,
            init_std: 0.5,
            sparsity: None,
            rms_eps: 1e-5,
        }
    }

    /// The scale group of element (r, c) of an [8, 12] matrix and each group's mean |w|, computed
    /// independently of the code under test.
    fn group_means(
        wv: &[f32],
        groups: usize,
        axis: ScaleAxis,
    ) -> (impl Fn(usize, usize) -> usize, Vec<f64>) {
        let group_of = move |r: usize, c: usize| match axis {
            ScaleAxis::Rows => r / (8 / groups),
            ScaleAxis::Cols => c / (12 / groups),
        };
        let mut sums = vec![0f64; groups];
        for r in 0..8 {
            for c in 0..12 {
                sums[group_of(r, c)] += wv[r * 12 + c].abs() as f64;
            }
        }
        let means = sums.iter().map(|s| s / (96 / groups) as f64).collect();
        (group_of, means)
    }

    #[test]
    fn ternary_values_are_group_scales() {
        let dev = Default::default();
        for (groups, axis) in [
            (1, ScaleAxis::Rows),
            (2, ScaleAxis::Rows),
            (4, ScaleAxis::Cols),
            (3, ScaleAxis::Cols),
        ] {
            let w = Tensor::<B, 2>::random([8, 12], Distribution::Normal(0.0, 1.0), &dev);
            let wv: Vec<f32> = w.to_data().to_vec().unwrap();
            let q: Vec<f32> = ternary_quantize(w, groups, axis, 1e-5)
                .into_data()
                .to_vec()
                .unwrap();
            let (group_of, means) = group_means(&wv, groups, axis);
            let mut seen_zero = false;
            for r in 0..8 {
                for c in 0..12 {
                    let g = group_of(r, c);
                    let gamma = 1e-5 + means[g];
                    let v = q[r * 12 + c] as f64;
                    let code = (wv[r * 12 + c] as f64 / gamma).round().clamp(-1.0, 1.0);
                    assert!(
                        (v - code * gamma).abs() < 1e-5 * gamma.max(1.0),
                        "{v} vs {}",
                        code * gamma
                    );
                    assert!(
                        v == 0.0 || ((v.abs() - gamma).abs() < 1e-5),
                        "value {v} not in {{-g,0,g}}, g={gamma}"
                    );
                    seen_zero |= v == 0.0;
                }
            }
            assert!(seen_zero, "a normal matrix has some zero codes");
        }
    }

    #[test]
    fn ste_gradient_equals_gradient_wrt_quantized_weight() {
        let dev = Default::default();
        let layer = cfg(LinearKind::Ternary, 2, ScaleAxis::Rows).init::<AB>(&dev);
        let x = Tensor::<AB, 2>::random([5, 12], Distribution::Normal(0.0, 1.0), &dev);
        let target = Tensor::<AB, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &dev);

        // Latent weight through the STE.
        let loss = (layer.forward(x.clone()) - target.clone())
            .powi_scalar(2)
            .sum();
        let g = loss.backward();
        let g_latent = layer.weight.val().grad(&g).unwrap();

        // The same loss as a function of the quantized weight as a leaf.
        let wq = ternary_quantize(layer.weight.val().inner(), 2, ScaleAxis::Rows, 1e-5);
        let wq = Tensor::<AB, 2>::from_inner(wq).require_grad();
        let loss = (x.matmul(wq.clone().transpose()) - target)
            .powi_scalar(2)
            .sum();
        let g = loss.backward();
        let g_q = wq.grad(&g).unwrap();

        let a: Vec<f32> = g_latent.into_data().to_vec().unwrap();
        let b: Vec<f32> = g_q.into_data().to_vec().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().any(|v| v.abs() > 1e-3));
    }

    #[test]
    fn ternary_forward_uses_quantized_weight() {
        let dev = Default::default();
        let layer = cfg(LinearKind::Ternary, 4, ScaleAxis::Cols).init::<B>(&dev);
        let x = Tensor::<B, 3>::random([2, 3, 12], Distribution::Normal(0.0, 1.0), &dev);
        let y = layer.forward(x.clone());
        let wq = ternary_quantize(layer.weight.val(), 4, ScaleAxis::Cols, 1e-5);
        let expect = x.reshape([6, 12]).matmul(wq.transpose()).reshape([2, 3, 8]);
        y.into_data()
            .assert_approx_eq::<f32>(&expect.into_data(), burn::tensor::Tolerance::default());
        let _ = TensorData::from([1.0f32]);
    }

    /// A ramp's mix `m`: the forward uses `(1 - m) W + m Q(W)`, and the latent weight's gradient
    /// is the gradient with respect to that weight (the quantized part's straight-through
    /// estimator is the identity); `m = 1` is the plain ternary layer.
    #[test]
    fn quant_mix_blends_float_and_ternary_weights() {
        let dev = Default::default();
        let mut layer = cfg(LinearKind::Ternary, 2, ScaleAxis::Rows).init::<AB>(&dev);
        layer.quant_mix = 0.25;
        let x = Tensor::<AB, 2>::random([5, 12], Distribution::Normal(0.0, 1.0), &dev);
        let target = Tensor::<AB, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &dev);
        let y = layer.forward(x.clone());
        let w = layer.weight.val().inner();
        let wq = ternary_quantize(w.clone(), 2, ScaleAxis::Rows, 1e-5);
        let mixed = w.mul_scalar(0.75) + wq.mul_scalar(0.25);
        let expect = x.clone().inner().matmul(mixed.clone().transpose());
        y.clone()
            .inner()
            .into_data()
            .assert_approx_eq::<f32>(&expect.into_data(), burn::tensor::Tolerance::default());
        let g = (y - target.clone()).powi_scalar(2).sum().backward();
        let g_latent = weight_grad(&layer, &g);
        let leaf = Tensor::<AB, 2>::from_inner(mixed).require_grad();
        let g = (x.matmul(leaf.clone().transpose()) - target)
            .powi_scalar(2)
            .sum()
            .backward();
        let g_leaf: Vec<f32> = leaf.grad(&g).unwrap().into_data().to_vec().unwrap();
        for (a, b) in g_latent.iter().zip(&g_leaf) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Not the plain ternary layer's output.
        layer.quant_mix = 1.0;
        let plain = layer.forward(Tensor::<AB, 2>::ones([1, 12], &dev)).inner();
        layer.quant_mix = 0.25;
        let ramped = layer.forward(Tensor::<AB, 2>::ones([1, 12], &dev)).inner();
        assert!((plain - ramped).abs().max().into_scalar() > 1e-3);
    }

    /// BitNet's weight: per group `gamma = max(mean|W_g|, 1e-5)`, values in {-gamma, 0, gamma}.
    #[test]
    fn bitnet_weight_closed_form() {
        let dev = Default::default();
        for (groups, axis) in [
            (1, ScaleAxis::Rows),
            (2, ScaleAxis::Rows),
            (3, ScaleAxis::Cols),
        ] {
            let mut layer = cfg(LinearKind::Bitnet, groups, axis).init::<B>(&dev);
            let wv: Vec<f32> = layer.weight.val().into_data().to_vec().unwrap();
            let q: Vec<f32> = layer.effective_weight().into_data().to_vec().unwrap();
            let (group_of, means) = group_means(&wv, groups, axis);
            for r in 0..8 {
                for c in 0..12 {
                    let gamma = means[group_of(r, c)].max(1e-5);
                    let want = (wv[r * 12 + c] as f64 / gamma).round().clamp(-1.0, 1.0) * gamma;
                    assert!((q[r * 12 + c] as f64 - want).abs() < 1e-6 * gamma.max(1.0));
                }
            }
            // An all-zero matrix: gamma clamps to 1e-5 instead of dividing by zero.
            layer.weight = Param::from_tensor(Tensor::zeros([8, 12], &dev));
            let q: Vec<f32> = layer.effective_weight().into_data().to_vec().unwrap();
            assert!(q.iter().all(|v| *v == 0.0));
        }
    }

    /// BitNet's input: RMSNorm without weight, then per-token absmax to 8 bits.
    #[test]
    fn bitnet_input_closed_form() {
        let dev = Default::default();
        let xv = [0.5f32, -2.0, 0.25, 1.0, 3.0, 0.0, -0.1, 0.7];
        let x = Tensor::<B, 2>::from_data(TensorData::new(xv.to_vec(), [2, 4]), &dev);
        let y: Vec<f32> = bitnet_input(x, 1e-5, &NoHooks)
            .into_data()
            .to_vec()
            .unwrap();
        for row in 0..2 {
            let r = &xv[row * 4..][..4];
            let rms = (r.iter().map(|v| (v * v) as f64).sum::<f64>() / 4.0 + 1e-5).sqrt();
            let xn: Vec<f64> = r.iter().map(|&v| v as f64 / rms).collect();
            let s = 127.0 / xn.iter().fold(0f64, |m, v| m.max(v.abs()));
            for j in 0..4 {
                let want = (xn[j] * s).round().clamp(-128.0, 127.0) / s;
                assert!((y[row * 4 + j] as f64 - want).abs() < 1e-5, "{y:?}");
                // An 8-bit level: an integer once scaled.
                let level = y[row * 4 + j] as f64 * s;
                assert!((level - level.round()).abs() < 1e-3);
            }
        }
    }

    /// STE on both: dL/dW = dL/dW_q and dL/dx = the gradient through the RMSNorm alone (the
    /// quantization passes gradients straight through).
    #[test]
    fn bitnet_straight_through_gradients() {
        let dev = Default::default();
        let layer = cfg(LinearKind::Bitnet, 2, ScaleAxis::Rows).init::<AB>(&dev);
        let x =
            Tensor::<AB, 2>::random([5, 12], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let target = Tensor::<AB, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &dev);
        let g = (layer.forward(x.clone()) - target.clone())
            .powi_scalar(2)
            .sum()
            .backward();
        let gw = weight_grad(&layer, &g);
        let gx: Vec<f32> = x.grad(&g).unwrap().into_data().to_vec().unwrap();

        // Reference: W_q and the quantized input as they are forward, gradients as if neither
        // were rounded: W_q a leaf, the input x / rms(x) without the rounding.
        let wq = Tensor::<AB, 2>::from_inner(layer.effective_weight().inner()).require_grad();
        let x2 = Tensor::<AB, 2>::from_inner(x.clone().inner()).require_grad();
        let xn = x2.clone().div(
            x2.clone()
                .powi_scalar(2)
                .mean_dim(1)
                .add_scalar(1e-5)
                .sqrt(),
        );
        let xq = Tensor::<AB, 2>::from_inner(bitnet_input(x.clone().inner(), 1e-5, &NoHooks));
        let input = xq + (xn.clone() - xn.detach());
        let g2 = (input.matmul(wq.clone().transpose()) - target)
            .powi_scalar(2)
            .sum()
            .backward();
        let gw2: Vec<f32> = wq.grad(&g2).unwrap().into_data().to_vec().unwrap();
        let gx2: Vec<f32> = x2.grad(&g2).unwrap().into_data().to_vec().unwrap();
        for (a, b) in gw.iter().zip(&gw2).chain(gx.iter().zip(&gx2)) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert!(gx.iter().any(|v| v.abs() > 1e-3));
    }

    /// BitNet with top-K: the norm and 8-bit quantization see the whole row, then the top-K keeps
    /// k of those quantized values; a rescale then changes them (it would cancel in a norm taken
    /// after the top-K).
    #[test]
    fn bitnet_top_k_picks_among_quantized_values() {
        let dev = Default::default();
        let x = Tensor::<B, 2>::random([3, 12], Distribution::Normal(0.0, 1.0), &dev);
        let q: Vec<f32> = bitnet_input(x.clone(), 1e-5, &NoHooks)
            .into_data()
            .to_vec()
            .unwrap();
        let mut outs = Vec::new();
        for rescale in [false, true] {
            let mut c = cfg(LinearKind::Bitnet, 1, ScaleAxis::Rows);
            c.sparsity = Some(TopK {
                keep: 0.25,
                quantized: false,
                rescale,
            });
            let y: Vec<f32> = c
                .init::<B>(&dev)
                .matmul_input(x.clone())
                .into_data()
                .to_vec()
                .unwrap();
            for (yr, qr) in y.chunks(12).zip(q.chunks(12)) {
                let mut order: Vec<usize> = (0..12).collect();
                order.sort_by(|&a, &b| qr[b].abs().total_cmp(&qr[a].abs()));
                let kept = &order[..3];
                assert_eq!(yr.iter().filter(|v| **v != 0.0).count(), 3);
                for j in 0..12 {
                    if !kept.contains(&j) {
                        assert_eq!(yr[j], 0.0);
                    } else if !rescale {
                        assert_eq!(yr[j], qr[j]);
                    }
                }
            }
            outs.push(y);
        }
        assert_ne!(outs[0], outs[1], "rescale changes the kept values");
    }

    #[test]
    fn zero_fraction_counts_zero_codes() {
        let dev = Default::default();
        let mut layer = cfg(LinearKind::Ternary, 1, ScaleAxis::Rows).init::<B>(&dev);
        // mean|W| = 1: entries 0.1 round to 0, 1.9 and -1 stay nonzero.
        let mut v = vec![1.0f32; 96];
        v[0] = 0.1;
        v[1] = 1.9;
        v[2] = -1.0;
        let s: f32 = v.iter().map(|x| x.abs()).sum::<f32>() / 96.0;
        assert!((s - 1.0).abs() < 0.01);
        layer.weight = Param::from_tensor(Tensor::from_data(TensorData::new(v, [8, 12]), &dev));
        let z = layer.zero_fraction().unwrap();
        assert!((z - 1.0 / 96.0).abs() < 1e-9, "{z}");
    }

    /// In bf16 a ternary layer multiplies its exact codes and applies the scales in f32: with
    /// inputs in {-1, 0, 1} (exact in bf16, sums of at most 12 of them too) the output equals
    /// f32's to f32 rounding, where a bf16-rounded scaled weight would be off by up to 2^-9
    /// relative. BitNet's 8-bit inputs are not exact in bf16: its output follows f32's within
    /// bf16 rounding. The weight gradient is f32's straight-through one within bf16 rounding.
    #[test]
    fn bf16_products_keep_codes_exact_and_scales_f32() {
        use tern_kernels::precision::set_matmul_precision;
        let dev = Default::default();
        let xs: Vec<f32> = (0..5 * 12)
            .map(|i| ((i * 7 + i / 12) % 3) as f32 - 1.0)
            .collect();
        let dy0 = Tensor::<B, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &dev);
        for kind in [LinearKind::Ternary, LinearKind::Bitnet] {
            for (groups, axis) in [
                (2, ScaleAxis::Rows),
                (2, ScaleAxis::Cols),
                (1, ScaleAxis::Cols),
            ] {
                let layer = cfg(kind, groups, axis).init::<AB>(&dev);
                let run = |p: Precision| {
                    set_matmul_precision(p);
                    let x = Tensor::<AB, 2>::from_data(TensorData::new(xs.clone(), [5, 12]), &dev);
                    let y = layer.forward(x.require_grad());
                    set_matmul_precision(Precision::F32);
                    let g = (y.clone() * Tensor::from_inner(dy0.clone()))
                        .sum()
                        .backward();
                    let dw = layer.weight.val().grad(&g).unwrap();
                    let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
                    (host(y.inner()), host(dw))
                };
                let (y32, dw32) = run(Precision::F32);
                let (y16, dw16) = run(Precision::Bf16);
                let big = |v: &[f32]| v.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                let diff = |a: &[f32], b: &[f32]| {
                    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                };
                let tol = if kind == LinearKind::Ternary {
                    1e-6
                } else {
                    1e-2
                };
                assert!(
                    diff(&y32, &y16) <= tol * big(&y32),
                    "{kind:?} {axis:?}: {y32:?} {y16:?}"
                );
                assert!(diff(&dw32, &dw16) <= 1e-2 * big(&dw32), "{kind:?} {axis:?}");
            }
        }
    }
}
