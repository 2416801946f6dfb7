//! tern's fused kernels, as a burn backend extension.
//!
//! [`Kernels`] names the layers that the model runs as one operation each: the bias-free linear
//! layer, RMSNorm, the gated activation of the MLP, RoPE, causal grouped-query attention, per-row
//! cross-entropy and TriLM's ternary weight with its straight-through gradient, and two optimizer
//! passes (the AdamW update, a gradient's squared norm). Every backend gets the [`reference`]
//! composition of burn ops (autodiff differentiates it op by op). The CPU backend (`Flex`, f32)
//! has fused forward and backward kernels ([`cpu`]); `Autodiff<Flex>` runs them as single graph
//! nodes with their own `Backward`, so that no intermediate (attention scores, softmax of the
//! vocabulary, masks, broadcast copies) is stored or copied. Other backends and other precisions
//! (f64 gradient checks, CUDA) take the reference path.

#![allow(clippy::too_many_arguments)]

pub mod chunked;
pub mod cpu;
mod flex;
pub mod guard;
pub mod precision;
pub mod reference;
pub mod scan;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};

pub use cpu::{AttnShape, Gate};

/// How a ternary weight's scale groups split `W[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TernarySpec {
    pub groups: usize,
    /// Groups of whole rows (column-parallel layers) or of whole columns (row-parallel ones).
    pub by_rows: bool,
    pub eps: f64,
}

/// The scalars of one AdamW update of a parameter, in PyTorch's order: `g *= grad_scale` and
/// `p *= decay` (each when `Some`), `m = beta1 m + (1 - beta1) g`, `v = beta2 v + (1 - beta2) g^2`,
/// `p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwScalars {
    pub grad_scale: Option<f64>,
    pub decay: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step_size: f64,
    pub bc2_sqrt: f64,
}

/// A backend with tern's fused layers. The `*_fwd` / `*_bwd` pairs are the fused kernels on the
/// backend's own tensors: `None` from a `*_fwd` means "not fused here" (the default) and the op
/// takes the reference path; a `*_bwd` is only called after its `*_fwd` gave `Some`.
pub trait Kernels: Backend {
    /// This backend's matmul must not see an inner dimension of 32 mod 64 ([`guard`]).
    const PADS_K32: bool = false;
    /// Without fused kernels, attention and cross-entropy run in chunks ([`chunked`]) rather
    /// than as burn ops over whole `[batch, heads, seq, seq]` scores and a whole softmax.
    const LEAN_ATTENTION: bool = false;

    /// `x w^T` of `x: [rows, d_in]` and `w: [d_out, d_in]`.
    fn linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if low_precision() {
            return reference::linear(x, w);
        }
        match Self::linear_fwd(prim(&x), prim(&w)) {
            Some(y) => tensor(y),
            None => reference::linear(x, w),
        }
    }
    /// `x / sqrt(mean(x^2) + eps) * weight` over the last axis of `x: [rows, d]`.
    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        match Self::rms_norm_fwd(prim(&x), prim(&weight), eps) {
            Some((y, _)) => tensor(y),
            None => reference::rms_norm(x, weight, eps),
        }
    }
    /// `act(gate) * up`, element-wise.
    fn glu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        act: Gate,
    ) -> Tensor<Self, D> {
        match Self::glu_fwd(prim(&gate), prim(&up), act) {
            Some(y) => tensor(y),
            None => reference::glu(gate, up, act),
        }
    }
    /// RoPE of `x: [batch, seq, heads, head_dim]` with tables `[seq, head_dim]`.
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 4> {
        match Self::rope_fwd(prim(&x), prim(&cos), prim(&sin), false) {
            Some(y) => tensor(y),
            None => reference::rope(x, cos, sin),
        }
    }
    /// Causal attention of q `[batch, seq, heads, head_dim]` over k, v `[batch, seq, kv_heads,
    /// head_dim]`, output in q's layout.
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        if Self::LEAN_ATTENTION {
            let p = precision::matmul_precision();
            return chunked::forward(p, q, k, v, chunked::CHUNK).0;
        }
        if low_precision() {
            return reference::causal_attention(q, k, v);
        }
        match Self::attention_fwd(prim(&q), prim(&k), prim(&v)) {
            Some((y, _)) => tensor(y),
            None => reference::causal_attention(q, k, v),
        }
    }
    /// Per-row `-log softmax(logits)[target]` of `logits: [rows, vocab]`.
    fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Tensor<Self, 1> {
        if Self::LEAN_ATTENTION {
            return chunked::cross_entropy_forward(logits, targets, chunked::CE_ROWS).0;
        }
        match Self::cross_entropy_fwd(prim(&logits), targets.clone().into_primitive()) {
            Some((y, _)) => tensor(y),
            None => reference::cross_entropy(logits, targets),
        }
    }
    /// TriLM's quantized weight, with the straight-through gradient `dL/dW = dL/dW~`.
    fn ternary_ste(w: Tensor<Self, 2>, spec: TernarySpec) -> Tensor<Self, 2> {
        match Self::ternary_fwd(prim(&w), spec) {
            Some(q) => tensor(q),
            None => reference::ternary_ste(w, spec),
        }
    }

    /// One AdamW update of a flat parameter and its moments: `(p, m, v)` after it. Fused on the
    /// CPU backend (one pass, the moments updated in place when nothing else holds them).
    fn adamw_step(
        p: Tensor<Self, 1>,
        m: Tensor<Self, 1>,
        v: Tensor<Self, 1>,
        g: Tensor<Self, 1>,
        s: AdamwScalars,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>, Tensor<Self, 1>) {
        reference::adamw_step(p, m, v, g, s)
    }

    fn linear_fwd(_x: FloatTensor<Self>, _w: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }
    /// `(dx, dw)` of a linear layer, each only when asked for.
    fn linear_bwd(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _want: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        unreachable!("linear_bwd without linear_fwd")
    }
    /// `sum(t^2)` of each flat tensor, on the host in f64 (for the global gradient norm): by
    /// default summed on the device and read back at once (one wait for the device a step, not
    /// one a parameter). Fused on the CPU backend: one read, f32 lanes over blocks summed in f64.
    fn squared_norms(ts: &[Tensor<Self, 1>]) -> Vec<f64> {
        reference::squared_norms(ts)
    }

    /// Mamba's selective scan ([`scan`]): `u, delta: [b, l, d]`, `a: [d, n]`, `bm, cm: [b, l,
    /// n]`, `dskip: [d]` -> `y: [b, l, d]`.
    fn selective_scan(
        u: Tensor<Self, 3>,
        delta: Tensor<Self, 3>,
        a: Tensor<Self, 2>,
        bm: Tensor<Self, 3>,
        cm: Tensor<Self, 3>,
        dskip: Tensor<Self, 1>,
    ) -> Tensor<Self, 3> {
        let ins = [
            prim(&u),
            prim(&delta),
            prim(&a),
            prim(&bm),
            prim(&cm),
            prim(&dskip),
        ];
        match Self::selective_scan_fwd(ins) {
            Some((y, _)) => tensor(y),
            None => reference::selective_scan(u, delta, a, bm, cm, dskip),
        }
    }
    /// Fused selective scan of `[u, delta, a, bm, cm, dskip]`: the output and every state
    /// (`[b, l, d, n]`).
    fn selective_scan_fwd(
        _ins: [FloatTensor<Self>; 6],
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// The gradients of `[u, delta, a, bm, cm, dskip]`.
    fn selective_scan_bwd(
        _ins: [FloatTensor<Self>; 6],
        _states: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 6] {
        unreachable!("selective_scan_bwd without selective_scan_fwd")
    }

    /// Fused RMSNorm: the output and `1 / rms` per row.
    fn rms_norm_fwd(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _eps: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// `(dx, dw)` of RMSNorm.
    fn rms_norm_bwd(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _rstd: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("rms_norm_bwd without rms_norm_fwd")
    }
    fn glu_fwd(
        _g: FloatTensor<Self>,
        _u: FloatTensor<Self>,
        _act: Gate,
    ) -> Option<FloatTensor<Self>> {
        None
    }
    /// `(d gate, d up)`.
    fn glu_bwd(
        _g: FloatTensor<Self>,
        _u: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
        _act: Gate,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("glu_bwd without glu_fwd")
    }
    /// RoPE, or its transpose (`inverse`: the backward pass).
    fn rope_fwd(
        _x: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _inverse: bool,
    ) -> Option<FloatTensor<Self>> {
        None
    }
    /// The output and the saved `[lse]`.
    fn attention_fwd(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// `(dq, dk, dv)`.
    fn attention_bwd(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("attention_bwd without attention_fwd")
    }
    /// The per-row losses and the softmax probabilities (what the backward pass keeps).
    fn cross_entropy_fwd(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }
    /// d logits from the probabilities and the per-row loss gradients.
    fn cross_entropy_bwd(
        _probs: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("cross_entropy_bwd without cross_entropy_fwd")
    }
    fn ternary_fwd(_w: FloatTensor<Self>, _spec: TernarySpec) -> Option<FloatTensor<Self>> {
        None
    }
}

/// Products in bf16 ([`precision`]) take the reference path: the fused CPU kernels are f32.
fn low_precision() -> bool {
    precision::matmul_precision() != precision::Precision::F32
}

fn prim<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> Kernels for burn::backend::NdArray<E, I, Q>
where
    Self: Backend,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
}

// The f32 burn-cuda backend tern trains with: the reference path, its products padded where
// burn 0.21's cubek matmul is wrong (inner dimensions of 32 mod 64).
#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda {
    const PADS_K32: bool = true;
    const LEAN_ATTENTION: bool = true;
}

// ---------------------------------------------------------------------------------------------
// Autodiff: each fused kernel one node with its own backward.

type Inner<B> = FloatTensor<B>;

/// Registers `grad` as the gradient of parent `i` (when it is tracked).
fn give<B: Backend, const N: usize>(
    ops: &Ops<impl Sized, N>,
    grads: &mut Gradients,
    i: usize,
    grad: Inner<B>,
) {
    if let Some(node) = &ops.parents[i] {
        grads.register::<B>(node.id, grad);
    }
}

#[derive(Debug)]
struct LinearBack;
impl<B: Kernels> Backward<B, 2> for LinearBack {
    type State = (Inner<B>, Inner<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state.clone();
        let want = [ops.parents[0].is_some(), ops.parents[1].is_some()];
        let [dx, dw] = B::linear_bwd(x, w, dy, want);
        if let Some(dx) = dx {
            give::<B, 2>(&ops, grads, 0, dx);
        }
        if let Some(dw) = dw {
            give::<B, 2>(&ops, grads, 1, dw);
        }
    }
}

#[derive(Debug)]
struct ScanBack;
impl<B: Kernels> Backward<B, 6> for ScanBack {
    /// The six inputs, then the states.
    type State = Vec<Inner<B>>;
    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let mut st = ops.state.clone();
        let states = st.pop().expect("states");
        let ins: [Inner<B>; 6] = st.try_into().expect("six inputs");
        for (i, g) in B::selective_scan_bwd(ins, states, dy)
            .into_iter()
            .enumerate()
        {
            give::<B, 6>(&ops, grads, i, g);
        }
    }
}

#[derive(Debug)]
struct RmsNormBack;
impl<B: Kernels> Backward<B, 2> for RmsNormBack {
    type State = (Inner<B>, Inner<B>, Inner<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, rstd) = ops.state.clone();
        let (dx, dw) = B::rms_norm_bwd(x, w, rstd, dy);
        give::<B, 2>(&ops, grads, 0, dx);
        give::<B, 2>(&ops, grads, 1, dw);
    }
}

#[derive(Debug)]
struct GluBack(Gate);
impl<B: Kernels> Backward<B, 2> for GluBack {
    type State = (Inner<B>, Inner<B>);
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (g, u) = ops.state.clone();
        let (dg, du) = B::glu_bwd(g, u, dy, self.0);
        give::<B, 2>(&ops, grads, 0, dg);
        give::<B, 2>(&ops, grads, 1, du);
    }
}

#[derive(Debug)]
struct RopeBack;
impl<B: Kernels> Backward<B, 1> for RopeBack {
    type State = (Inner<B>, Inner<B>);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state.clone();
        let dx = B::rope_fwd(dy, cos, sin, true).expect("rope transpose after a fused rope");
        give::<B, 1>(&ops, grads, 0, dx);
    }
}

#[derive(Debug)]
struct AttentionBack;
impl<B: Kernels> Backward<B, 3> for AttentionBack {
    type State = [Inner<B>; 5];
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let [q, k, v, out, lse] = ops.state.clone();
        let (dq, dk, dv) = B::attention_bwd(q, k, v, out, lse, dout);
        give::<B, 3>(&ops, grads, 0, dq);
        give::<B, 3>(&ops, grads, 1, dk);
        give::<B, 3>(&ops, grads, 2, dv);
    }
}

#[derive(Debug)]
struct CrossEntropyBack;
impl<B: Kernels> Backward<B, 1> for CrossEntropyBack {
    type State = (Inner<B>, IntTensor<B>);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dl = grads.consume::<B>(&ops.node);
        let (probs, t) = ops.state.clone();
        give::<B, 1>(&ops, grads, 0, B::cross_entropy_bwd(probs, t, dl));
    }
}

#[derive(Debug)]
struct StraightThrough;
impl<B: Backend> Backward<B, 1> for StraightThrough {
    type State = ();
    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        give::<B, 1>(&ops, grads, 0, g);
    }
}

/// The primitive of an autodiff tensor.
fn ad<B: Backend, C: CheckpointStrategy, const D: usize>(
    t: &Tensor<Autodiff<B, C>, D>,
) -> FloatTensor<Autodiff<B, C>> {
    t.clone().into_primitive().tensor()
}

/// Finishes a stateful op: tracked, it keeps `state`; untracked, only the output.
fn finish<B, C, BO, S, const N: usize, const D: usize>(
    kind: OpsKind<BO, B, S, C, N>,
    state: S,
    out: Inner<B>,
) -> Tensor<Autodiff<B, C>, D>
where
    B: Backend,
    C: CheckpointStrategy,
    BO: Backward<B, N, State = S>,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    let t = match kind {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl<B: Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
    const PADS_K32: bool = B::PADS_K32;
    const LEAN_ATTENTION: bool = B::LEAN_ATTENTION;

    fn linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if low_precision() {
            return reference::linear(x, w);
        }
        let (xa, wa) = (ad(&x), ad(&w));
        let Some(y) = B::linear_fwd(xa.primitive.clone(), wa.primitive.clone()) else {
            return reference::linear(x, w);
        };
        let kind = LinearBack
            .prepare::<C>([xa.node, wa.node])
            .compute_bound()
            .stateful();
        finish(kind, (xa.primitive, wa.primitive), y)
    }

    fn selective_scan(
        u: Tensor<Self, 3>,
        delta: Tensor<Self, 3>,
        a: Tensor<Self, 2>,
        bm: Tensor<Self, 3>,
        cm: Tensor<Self, 3>,
        dskip: Tensor<Self, 1>,
    ) -> Tensor<Self, 3> {
        let ins = [ad(&u), ad(&delta), ad(&a), ad(&bm), ad(&cm), ad(&dskip)];
        let Some((y, states)) = B::selective_scan_fwd(ins.clone().map(|t| t.primitive)) else {
            return reference::selective_scan(u, delta, a, bm, cm, dskip);
        };
        let kind = ScanBack
            .prepare::<C>(ins.clone().map(|t| t.node))
            .compute_bound()
            .stateful();
        let mut state: Vec<Inner<B>> = ins.into_iter().map(|t| t.primitive).collect();
        state.push(states);
        finish(kind, state, y)
    }

    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let (xa, wa) = (ad(&x), ad(&weight));
        let Some((y, rstd)) = B::rms_norm_fwd(xa.primitive.clone(), wa.primitive.clone(), eps)
        else {
            return reference::rms_norm(x, weight, eps);
        };
        let kind = RmsNormBack
            .prepare::<C>([xa.node, wa.node])
            .compute_bound()
            .stateful();
        finish(kind, (xa.primitive, wa.primitive, rstd), y)
    }

    fn glu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        act: Gate,
    ) -> Tensor<Self, D> {
        let (ga, ua) = (ad(&gate), ad(&up));
        let Some(y) = B::glu_fwd(ga.primitive.clone(), ua.primitive.clone(), act) else {
            return reference::glu(gate, up, act);
        };
        let kind = GluBack(act)
            .prepare::<C>([ga.node, ua.node])
            .compute_bound()
            .stateful();
        finish(kind, (ga.primitive, ua.primitive), y)
    }

    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 4> {
        let xa = ad(&x);
        let (c, s) = (ad(&cos).primitive, ad(&sin).primitive);
        let Some(y) = B::rope_fwd(xa.primitive.clone(), c.clone(), s.clone(), false) else {
            return reference::rope(x, cos, sin);
        };
        let kind = RopeBack.prepare::<C>([xa.node]).compute_bound().stateful();
        finish(kind, (c, s), y)
    }

    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        if B::LEAN_ATTENTION {
            return chunked::causal_attention(q, k, v, chunked::CHUNK);
        }
        if low_precision() {
            return reference::causal_attention(q, k, v);
        }
        let (qa, ka, va) = (ad(&q), ad(&k), ad(&v));
        let fused = B::attention_fwd(
            qa.primitive.clone(),
            ka.primitive.clone(),
            va.primitive.clone(),
        );
        let Some((y, lse)) = fused else {
            return reference::causal_attention(q, k, v);
        };
        let kind = AttentionBack
            .prepare::<C>([qa.node, ka.node, va.node])
            .compute_bound()
            .stateful();
        let state = [qa.primitive, ka.primitive, va.primitive, y.clone(), lse];
        finish(kind, state, y)
    }

    fn cross_entropy(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Tensor<Self, 1> {
        if B::LEAN_ATTENTION {
            let t = Tensor::from_primitive(targets.into_primitive());
            return chunked::cross_entropy(logits, t, chunked::CE_ROWS);
        }
        let xa = ad(&logits);
        let t = targets.clone().into_primitive();
        let Some((loss, probs)) = B::cross_entropy_fwd(xa.primitive.clone(), t.clone()) else {
            return reference::cross_entropy(logits, targets);
        };
        let kind = CrossEntropyBack
            .prepare::<C>([xa.node])
            .compute_bound()
            .stateful();
        finish(kind, (probs, t), loss)
    }

    fn ternary_ste(w: Tensor<Self, 2>, spec: TernarySpec) -> Tensor<Self, 2> {
        let wa = ad(&w);
        let Some(q) = B::ternary_fwd(wa.primitive.clone(), spec) else {
            return reference::ternary_ste(w, spec);
        };
        let out = StraightThrough
            .prepare::<C>([wa.node])
            .compute_bound()
            .stateless(q);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
