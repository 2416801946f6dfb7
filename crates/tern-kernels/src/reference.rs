//! The layers as compositions of burn ops: what every backend runs unless it has a fused kernel,
//! and what the fused kernels are tested against.

use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use crate::precision::product;
use crate::{AdamwScalars, Gate, Kernels, TernarySpec};

/// `x w^T`, `w` stored `[d_out, d_in]`.
pub fn linear<B: Kernels>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    product(x, w.transpose())
}

pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let rms = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt();
    x.div(rms).mul(weight.unsqueeze())
}

pub fn glu<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    act: Gate,
) -> Tensor<B, D> {
    let gate = match act {
        // silu(x) = x * sigmoid(x) with sigmoid(x) = (1 + tanh(x / 2)) / 2: burn's sigmoid goes
        // through f32 whatever the tensor's precision, which breaks f64 gradient checks.
        Gate::Silu => gate.clone() * gate.div_scalar(2.0).tanh().add_scalar(1.0).div_scalar(2.0),
        Gate::Relu2 => relu(gate).powi_scalar(2),
    };
    gate * up
}

/// `cat(-x[.., d/2..], x[.., ..d/2])` along the last dimension.
pub fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let first = x.clone().narrow(3, 0, d / 2);
    let second = x.narrow(3, d / 2, d - d / 2);
    Tensor::cat(vec![second.neg(), first], 3)
}

/// RoPE of `x: [batch, seq, heads, head_dim]`, tables `[seq, head_dim]`.
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Tensor<B, 4> {
    let [t, hd] = cos.dims();
    let cos = cos.reshape([1, t, 1, hd]);
    let sin = sin.reshape([1, t, 1, hd]);
    x.clone() * cos + rotate_half(x) * sin
}

/// Causal attention, q `[b, t, heads, hd]`, k and v `[b, t, kv_heads, hd]`; query head j reads
/// key/value head j / (heads / kv_heads), as Hugging Face's `repeat_kv`.
pub fn causal_attention<B: Kernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, t, nh, hd] = q.dims();
    let nkv = k.dims()[2];
    let repeat = |y: Tensor<B, 4>| {
        let y = y.swap_dims(1, 2);
        if nh == nkv {
            y
        } else {
            y.unsqueeze_dim::<5>(2)
                .repeat_dim(2, nh / nkv)
                .reshape([b, nh, t, hd])
        }
    };
    let q = q.swap_dims(1, 2);
    let (k, v) = (repeat(k), repeat(v));
    let scores = product(q, k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
    let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &scores.device()) // true above the diagonal
        .unsqueeze::<4>()
        .expand([b, nh, t, t]);
    // A large finite value, not -inf: a masked fill may be computed as a blend, and -inf * 0
    // would be NaN.
    let probs = softmax(scores.mask_fill(mask, -1e9), 3);
    product(probs, v).swap_dims(1, 2)
}

/// Per-row `-log softmax(logits)[target]`.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    log_softmax(logits, 1)
        .gather(1, targets.unsqueeze_dim(1))
        .reshape([n])
        .neg()
}

/// Per-group absmean scales `gamma_g = eps + mean|W_g|`, broadcastable against a weight reshaped
/// by [`grouped`]: `[groups, 1, 1]` for row groups, `[1, groups, 1]` for column groups.
pub fn group_scales<B: Backend>(
    w: &Tensor<B, 2>,
    groups: usize,
    by_rows: bool,
    eps: f64,
) -> Tensor<B, 3> {
    let [out, inp] = w.dims();
    if by_rows {
        w.clone()
            .abs()
            .reshape([groups, out / groups * inp])
            .mean_dim(1)
            .reshape([groups, 1, 1])
            .add_scalar(eps)
    } else {
        w.clone()
            .abs()
            .reshape([out, groups, inp / groups])
            .mean_dim(2)
            .mean_dim(0)
            .add_scalar(eps)
    }
}

/// `W` viewed so that the group axis broadcasts against [`group_scales`].
pub fn grouped<B: Backend>(w: Tensor<B, 2>, groups: usize, by_rows: bool) -> Tensor<B, 3> {
    let [out, inp] = w.dims();
    if by_rows {
        w.reshape([groups, out / groups, inp])
    } else {
        w.reshape([out, groups, inp / groups])
    }
}

/// The codes `clamp(round(W / gamma_g), -1, 1)` of `w` for the per-group scales `gamma`.
pub fn ternary_codes<B: Backend>(
    w: Tensor<B, 2>,
    gamma: Tensor<B, 3>,
    groups: usize,
    by_rows: bool,
) -> Tensor<B, 2> {
    let dims = w.dims();
    grouped(w, groups, by_rows)
        .div(gamma)
        .round()
        .clamp(-1.0, 1.0)
        .reshape(dims)
}

/// `gamma_g * codes`: the weight that codes and scales stand for.
pub fn dequantize<B: Backend>(
    codes: Tensor<B, 2>,
    gamma: Tensor<B, 3>,
    groups: usize,
    by_rows: bool,
) -> Tensor<B, 2> {
    let dims = codes.dims();
    grouped(codes, groups, by_rows).mul(gamma).reshape(dims)
}

/// `gamma_g * clamp(round(W / gamma_g), -1, 1)` without a gradient path.
pub fn ternary_quantize<B: Backend>(w: Tensor<B, 2>, spec: TernarySpec) -> Tensor<B, 2> {
    let (g, rows) = (spec.groups, spec.by_rows);
    let gamma = group_scales(&w, g, rows, spec.eps);
    dequantize(ternary_codes(w, gamma.clone(), g, rows), gamma, g, rows)
}

/// `q` forward and the gradient straight through to `w` backward, written `q + (W -
/// W.detach())` (with `q` computed from the detached `W`) rather than `W + (q - W).detach()`:
/// `W - W` is exactly zero, while `W + (q - W)` is not exactly `q` in floating point, so the
/// forward pass sees the exact quantized weight.
pub fn straight_through<B: Backend>(w: Tensor<B, 2>, q: Tensor<B, 2>) -> Tensor<B, 2> {
    q + (w.clone() - w.detach())
}

/// TriLM's quantized weight with the straight-through gradient.
pub fn ternary_ste<B: Backend>(w: Tensor<B, 2>, spec: TernarySpec) -> Tensor<B, 2> {
    let q = ternary_quantize(w.clone().detach(), spec);
    straight_through(w, q)
}

/// One AdamW update (see [`AdamwScalars`]), each scalar converted to the tensors' precision.
pub fn adamw_step<B: Backend>(
    p: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    g: Tensor<B, 1>,
    s: AdamwScalars,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let g = match s.grad_scale {
        Some(c) => g.mul_scalar(c),
        None => g,
    };
    let p = match s.decay {
        Some(d) => p.mul_scalar(d),
        None => p,
    };
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.powi_scalar(2).mul_scalar(1.0 - s.beta2);
    let denom = v.clone().sqrt().div_scalar(s.bc2_sqrt).add_scalar(s.eps);
    let p = p - m.clone().div(denom).mul_scalar(s.step_size);
    (p, m, v)
}

/// `sum(t^2)` of each tensor, summed on the device and read back at once, in f64.
pub fn squared_norms<B: Backend>(ts: &[Tensor<B, 1>]) -> Vec<f64> {
    if ts.is_empty() {
        return Vec::new();
    }
    let sums = ts.iter().map(|t| t.clone().powi_scalar(2).sum()).collect();
    Tensor::cat(sums, 0).into_data().iter::<f64>().collect()
}

/// Mamba's selective scan ([`crate::scan`]) as burn ops, one step at a time: `u, delta: [b, l,
/// d]`, `a: [d, n]`, `bm, cm: [b, l, n]`, `dskip: [d]` -> `[b, l, d]`.
pub fn selective_scan<B: Backend>(
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    bm: Tensor<B, 3>,
    cm: Tensor<B, 3>,
    dskip: Tensor<B, 1>,
) -> Tensor<B, 3> {
    let [b, l, d] = u.dims();
    let n = a.dims()[1];
    let a = a.unsqueeze::<3>(); // [1, d, n]
    let mut h = Tensor::<B, 3>::zeros([b, d, n], &u.device());
    let mut ys = Vec::with_capacity(l);
    for t in 0..l {
        let col = |x: &Tensor<B, 3>| x.clone().slice([0..b, t..t + 1, 0..d]).reshape([b, d, 1]);
        let (ut, dt) = (col(&u), col(&delta));
        let bt = bm.clone().slice([0..b, t..t + 1, 0..n]); // [b, 1, n]
        let ct = cm.clone().slice([0..b, t..t + 1, 0..n]);
        h = (dt.clone() * a.clone()).exp() * h + dt * ut * bt;
        ys.push((h.clone() * ct).sum_dim(2).reshape([b, 1, d]));
    }
    Tensor::cat(ys, 1) + u * dskip.reshape([1, 1, d])
}
