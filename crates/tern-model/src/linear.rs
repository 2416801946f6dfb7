//! The projections of the blocks: float (FloatLM) or ternary (TriLM) with per-group scales.

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tern_dist::{CollectiveBackend, TpGroup};

use crate::encoder::Encoder;

/// What the block projections are made of (`model.linear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearKind {
    /// Plain floating-point weights (FloatLM).
    Float,
    /// TriLM: `gamma_g * clamp(round(W / gamma_g), -1, 1)` with a straight-through gradient.
    #[default]
    Ternary,
}

/// Which blocks of `W[out, in]` share one ternary scale. Column-parallel layers (q, k, v, gate, up)
/// are split by output rows, row-parallel layers (o, down) by input columns: each tensor-parallel
/// shard then owns whole groups and computes its own scale without communication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAxis {
    Rows,
    Cols,
}

/// How a projection is split across a tensor-parallel group (Megatron's layer types, TorchTitan's
/// `ColwiseParallel` / `RowwiseParallel`). Set from outside the model by
/// [`crate::parallelize::parallelize`]; a plain model is `Replicated` everywhere.
#[derive(Debug, Clone, Default)]
pub enum ParallelStyle {
    #[default]
    Replicated,
    /// Holds a block of output rows. Its replicated input must come through f (all-reduce of the
    /// gradient backward), which the module applies once for all its column-parallel projections
    /// ([`InputStyle`]).
    Colwise,
    /// Holds a block of input columns; its partial output goes through g (all-reduce forward).
    Rowwise(TpGroup),
}

/// What a module does to its input before its projections (TorchTitan's `PrepareModuleInput`):
/// under tensor parallelism, f once, so that q, k and v (or gate and up) send back one summed
/// gradient instead of one each.
#[derive(Debug, Clone, Default)]
pub enum InputStyle {
    #[default]
    AsIs,
    CopyToGroup(TpGroup),
}

impl InputStyle {
    pub fn prepare<B: CollectiveBackend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            InputStyle::AsIs => x,
            InputStyle::CopyToGroup(g) => B::copy_to_group(x, g),
        }
    }
}

/// A bias-free projection `y = x W^T` with `W` stored `[out, in]` as in Hugging Face checkpoints.
#[derive(Module, Debug)]
pub struct ProjLinear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    /// A distillation student's 1-bit input encoder (`None` in plain models).
    pub encoder: Option<Encoder<B>>,
    #[module(skip)]
    pub parallel: ParallelStyle,
    #[module(skip)]
    pub kind: LinearKind,
    #[module(skip)]
    pub groups: usize,
    #[module(skip)]
    pub axis: ScaleAxis,
    #[module(skip)]
    pub eps: f64,
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
}

impl ProjLinearConfig {
    /// A projection of a decoder block: the model's linear kind, scale groups and init.
    pub fn block(c: &crate::ModelConfig, d_in: usize, d_out: usize, axis: ScaleAxis) -> Self {
        Self {
            d_in,
            d_out,
            kind: c.linear,
            groups: c.scale_groups,
            axis,
            eps: c.ternary_eps,
            init_std: c.init_std,
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
            parallel: ParallelStyle::Replicated,
            kind: self.kind,
            groups: self.groups,
            axis: self.axis,
            eps: self.eps,
        }
    }
}

/// Per-group absmean scales `gamma_g = eps + mean|W_g|`, broadcastable against a weight reshaped
/// by [`grouped`]: `[groups, 1]` for row groups, `[1, groups, 1]` for column groups.
fn group_scales<B: Backend>(
    w: &Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
    eps: f64,
) -> Tensor<B, 3> {
    let [out, inp] = w.dims();
    match axis {
        ScaleAxis::Rows => w
            .clone()
            .abs()
            .reshape([groups, out / groups * inp])
            .mean_dim(1)
            .reshape([groups, 1, 1])
            .add_scalar(eps),
        ScaleAxis::Cols => w
            .clone()
            .abs()
            .reshape([out, groups, inp / groups])
            .mean_dim(2)
            .mean_dim(0)
            .add_scalar(eps),
    }
}

/// `W` viewed so that the group axis broadcasts against [`group_scales`].
fn grouped<B: Backend>(w: Tensor<B, 2>, groups: usize, axis: ScaleAxis) -> Tensor<B, 3> {
    let [out, inp] = w.dims();
    match axis {
        ScaleAxis::Rows => w.reshape([groups, out / groups, inp]),
        ScaleAxis::Cols => w.reshape([out, groups, inp / groups]),
    }
}

/// Ternary codes in {-1, 0, 1} and the per-group scales of `w`.
pub fn ternary_codes<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let dims = w.dims();
    let gamma = group_scales(&w, groups, axis, eps);
    let codes = grouped(w, groups, axis)
        .div(gamma.clone())
        .round()
        .clamp(-1.0, 1.0)
        .reshape(dims);
    (codes, gamma)
}

/// TriLM's quantized weight `W~ = gamma_g * clamp(round(W / gamma_g), -1, 1)` (no gradient path).
pub fn ternary_quantize<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    axis: ScaleAxis,
    eps: f64,
) -> Tensor<B, 2> {
    let (codes, gamma) = ternary_codes(w, groups, axis, eps);
    let dims = codes.dims();
    grouped(codes, groups, axis).mul(gamma).reshape(dims)
}

impl<B: Backend> ProjLinear<B> {
    /// The weight the forward pass multiplies by. For ternary layers the straight-through
    /// estimator makes dL/dW equal dL/dW~. It is written `W~.detach() + (W - W.detach())` rather
    /// than the usual `W + (W~ - W).detach()` because `W + (W~ - W)` is not exactly `W~` in floating
    /// point, while `W - W` is exactly zero: the forward pass sees the exact ternary weight.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        let w = self.weight.val();
        match self.kind {
            LinearKind::Float => w,
            LinearKind::Ternary => {
                let q = ternary_quantize(w.clone().detach(), self.groups, self.axis, self.eps);
                q + (w.clone() - w.detach())
            }
        }
    }

    /// Fraction of zero codes of a ternary layer (`None` for float layers).
    pub fn zero_fraction(&self) -> Option<f64> {
        match self.kind {
            LinearKind::Float => None,
            LinearKind::Ternary => {
                let w = self.weight.val().detach();
                let n = w.shape().num_elements() as f64;
                let (codes, _) = ternary_codes(w, self.groups, self.axis, self.eps);
                let zeros = codes.equal_elem(0.0).int().sum().into_scalar();
                Some(num_to_f64(zeros) / n)
            }
        }
    }
}

impl<B: CollectiveBackend> ProjLinear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match &self.encoder {
            Some(e) => e.forward(x),
            None => x,
        };
        let w = self.effective_weight();
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in;
        let [d_out, _] = w.dims();
        let y = x.reshape([rows, d_in]).matmul(w.transpose());
        let mut out = dims;
        out[D - 1] = d_out;
        let y = y.reshape(out);
        match &self.parallel {
            ParallelStyle::Rowwise(g) => B::reduce_from_group(y, g),
            _ => y,
        }
    }
}

/// A projection's input and output in one forward pass: what layer-wise distillation matches.
#[derive(Debug, Clone)]
pub struct Tap<B: Backend> {
    /// The projection's path in its block, as [`crate::model::Block::projections`] names it
    /// (`self_attn.q_proj`, ..., `mlp.down_proj`).
    pub name: &'static str,
    pub input: Tensor<B, 3>,
    pub output: Tensor<B, 3>,
}

/// `p.forward(x)`, recorded in `taps` when there are any.
pub(crate) fn tapped<B: CollectiveBackend>(
    taps: &mut Option<&mut Vec<Tap<B>>>,
    name: &'static str,
    p: &ProjLinear<B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let y = p.forward(x.clone());
    if let Some(t) = taps.as_deref_mut() {
        t.push(Tap {
            name,
            input: x,
            output: y.clone(),
        });
    }
    y
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

    fn cfg(kind: LinearKind, groups: usize, axis: ScaleAxis) -> ProjLinearConfig {
        ProjLinearConfig {
            d_in: 12,
            d_out: 8,
            kind,
            groups,
            axis,
            eps: 1e-5,
            init_std: 0.5,
        }
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
            // The group of element (r, c) and its expected scale, computed independently here.
            let group_of = |r: usize, c: usize| match axis {
                ScaleAxis::Rows => r / (8 / groups),
                ScaleAxis::Cols => c / (12 / groups),
            };
            let mut sums = vec![0f64; groups];
            let mut counts = vec![0usize; groups];
            for r in 0..8 {
                for c in 0..12 {
                    sums[group_of(r, c)] += wv[r * 12 + c].abs() as f64;
                    counts[group_of(r, c)] += 1;
                }
            }
            let mut seen_zero = false;
            for r in 0..8 {
                for c in 0..12 {
                    let g = group_of(r, c);
                    let gamma = 1e-5 + sums[g] / counts[g] as f64;
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
}
