//! Causal attention in query chunks, from burn ops on any backend, as one autodiff node (what the
//! cuda build runs; the CPU has its fused kernel). Forward, each chunk of `CHUNK` queries scores
//! only the keys up to its last position, and only the diagonal block needs a mask (one
//! `[CHUNK, CHUNK]` mask serves every chunk); the output and each row's log-sum-exp are kept.
//! Backward recomputes each chunk's probabilities from the log-sum-exp (FlashAttention's
//! recurrence: `dS = P * (dP - rowsum(dO * O))`). No `[batch, heads, seq, seq]` tensor exists at
//! any time: at most `[batch, heads, CHUNK, seq]`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{Bool, Tensor, TensorPrimitive};

use crate::guard::pad_axis;
use crate::precision::{matmul_precision, product_in, Precision};
use crate::Kernels;

/// Query rows per chunk.
pub const CHUNK: usize = 256;

type T4<B> = Tensor<B, 4>;

/// `[b, t, kv_heads, d]` -> `[b, heads, t, d]`, each key/value head repeated for its queries.
fn heads_first<B: Kernels>(x: T4<B>, heads: usize) -> T4<B> {
    let [b, t, kvh, d] = x.dims();
    let x = x.swap_dims(1, 2);
    if kvh == heads {
        return x;
    }
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, heads / kvh)
        .reshape([b, heads, t, d])
}

/// The sum over each key/value head's query heads: `[b, heads, t, d]` -> `[b, t, kv_heads, d]`.
fn heads_back<B: Kernels>(x: T4<B>, kv_heads: usize) -> T4<B> {
    let [b, h, t, d] = x.dims();
    let x = if h == kv_heads {
        x
    } else {
        x.reshape([b, kv_heads, h / kv_heads, t, d])
            .sum_dim(2)
            .reshape([b, kv_heads, t, d])
    };
    x.swap_dims(1, 2)
}

/// The chunks' query ranges `(start, len)`.
fn chunks(t: usize, c: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(c)).map(move |j| (j * c, c.min(t - j * c)))
}

/// Scores of queries `s..s+n` against keys `0..s+n`, scaled, the diagonal block masked.
fn scores<B: Kernels>(
    p: Precision,
    q: &T4<B>,
    k: &T4<B>,
    s: usize,
    n: usize,
    mask: &Tensor<B, 2, Bool>,
) -> T4<B> {
    let d = q.dims()[3];
    let e = s + n;
    let qj = q.clone().narrow(2, s, n);
    let kj = k.clone().narrow(2, 0, e);
    let sc = product_in(p, qj, kj.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
    let [b, h, _, _] = sc.dims();
    let diag = sc.clone().narrow(3, s, n);
    let m = mask.clone().narrow(0, 0, n).narrow(1, 0, n);
    let diag = diag.mask_fill(m.unsqueeze::<4>().expand([b, h, n, n]), -1e9);
    if s == 0 {
        diag
    } else {
        Tensor::cat(vec![sc.narrow(3, 0, s), diag], 3)
    }
}

fn causal_mask<B: Kernels>(c: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    // true above the diagonal
    Tensor::<B, 2, Bool>::tril_mask([c, c], 0, device)
}

/// Output `[b, t, heads, d]` and log-sum-exps `[b, heads, t, 1]` of causal attention, on plain
/// tensors, the products in precision `pr`.
pub fn forward<B: Kernels>(
    pr: Precision,
    q: T4<B>,
    k: T4<B>,
    v: T4<B>,
    c: usize,
) -> (T4<B>, T4<B>) {
    let h = q.dims()[2];
    let t = q.dims()[1];
    let (q, k, v) = (heads_first(q, h), heads_first(k, h), heads_first(v, h));
    let mask = causal_mask::<B>(c.min(t), &q.device());
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (s, n) in chunks(t, c) {
        let sc = scores(pr, &q, &k, s, n, &mask);
        let m = sc.clone().max_dim(3);
        let p = (sc - m.clone()).exp();
        let l = p.clone().sum_dim(3);
        outs.push(product_in(pr, p, v.clone().narrow(2, 0, s + n)) / l.clone());
        lses.push(m + l.log());
    }
    (Tensor::cat(outs, 2).swap_dims(1, 2), Tensor::cat(lses, 2))
}

/// `(dq, dk, dv)` from the inputs, the output, the log-sum-exps and the output's gradient, the
/// products in the forward pass's precision `pr`.
pub fn backward<B: Kernels>(
    pr: Precision,
    [q, k, v, out, lse, dout]: [T4<B>; 6],
    c: usize,
) -> (T4<B>, T4<B>, T4<B>) {
    let [b, t, h, d] = q.dims();
    let kvh = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    let (q, k, v) = (heads_first(q, h), heads_first(k, h), heads_first(v, h));
    let (out, dout) = (out.swap_dims(1, 2), dout.swap_dims(1, 2));
    let rowdot = (dout.clone() * out).sum_dim(3);
    let mask = causal_mask::<B>(c.min(t), &q.device());
    let mut dq = Vec::new();
    let mut dk = T4::<B>::zeros([b, h, t, d], &q.device());
    let mut dv = dk.clone();
    // A chunk's key and value gradients cover keys 0..e: zeros for the keys after it.
    let pad = |x: T4<B>| pad_axis(x, 2, t);
    for (s, n) in chunks(t, c) {
        let e = s + n;
        let p = (scores(pr, &q, &k, s, n, &mask) - lse.clone().narrow(2, s, n)).exp();
        let dout_j = dout.clone().narrow(2, s, n);
        dv = dv + pad(product_in(pr, p.clone().swap_dims(2, 3), dout_j.clone()));
        let dp = product_in(pr, dout_j, v.clone().narrow(2, 0, e).swap_dims(2, 3));
        let ds = p * (dp - rowdot.clone().narrow(2, s, n));
        dq.push(product_in(pr, ds.clone(), k.clone().narrow(2, 0, e)).mul_scalar(scale));
        let qj = q.clone().narrow(2, s, n);
        dk = dk + pad(product_in(pr, ds.swap_dims(2, 3), qj).mul_scalar(scale));
    }
    let dq = Tensor::cat(dq, 2).swap_dims(1, 2);
    (dq, heads_back(dk, kvh), heads_back(dv, kvh))
}

#[derive(Debug)]
struct ChunkedBack(usize, Precision);

impl<B: Kernels> Backward<B, 3> for ChunkedBack {
    type State = [burn::tensor::ops::FloatTensor<B>; 5];
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let [q, k, v, out, lse] = ops.state.clone();
        let t = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
        let (dq, dk, dv) = backward(self.1, [t(q), t(k), t(v), t(out), t(lse), t(dout)], self.0);
        for (i, g) in [dq, dk, dv].into_iter().enumerate() {
            if let Some(node) = &ops.parents[i] {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// Causal attention as one autodiff node over the chunked forward and backward.
pub fn causal_attention<B: Kernels, C: CheckpointStrategy>(
    q: T4<Autodiff<B, C>>,
    k: T4<Autodiff<B, C>>,
    v: T4<Autodiff<B, C>>,
    c: usize,
) -> T4<Autodiff<B, C>> {
    let (qa, ka, va) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let t = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    let pr = matmul_precision();
    let (y, lse) = forward(
        pr,
        t(qa.primitive.clone()),
        t(ka.primitive.clone()),
        t(va.primitive.clone()),
        c,
    );
    let (y, lse) = (y.into_primitive().tensor(), lse.into_primitive().tensor());
    let kind = ChunkedBack(c, pr)
        .prepare::<C>([qa.node, ka.node, va.node])
        .compute_bound()
        .stateful();
    let out = match kind {
        OpsKind::Tracked(prep) => prep.finish(
            [qa.primitive, ka.primitive, va.primitive, y.clone(), lse],
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Rows of logits per cross-entropy chunk.
pub const CE_ROWS: usize = 1024;

/// Per-row `-log softmax(logits)[target]` and the rows' log-sum-exps, in chunks of `rows` rows
/// (no softmax of the whole batch exists at once).
pub fn cross_entropy_forward<B: Kernels>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, burn::tensor::Int>,
    rows: usize,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [n, _] = logits.dims();
    let (mut losses, mut lses) = (Vec::new(), Vec::new());
    for (s, r) in chunks(n, rows) {
        let x = logits.clone().narrow(0, s, r);
        let m = x.clone().max_dim(1);
        let lse = (x.clone() - m.clone()).exp().sum_dim(1).log() + m;
        let t = targets.clone().narrow(0, s, r).unsqueeze_dim(1);
        losses.push((lse.clone() - x.gather(1, t)).reshape([r]));
        lses.push(lse);
    }
    (Tensor::cat(losses, 0), Tensor::cat(lses, 0))
}

/// `d logits = (softmax - onehot(target)) * dloss`, chunk by chunk from the log-sum-exps.
pub fn cross_entropy_backward<B: Kernels>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, burn::tensor::Int>,
    lse: Tensor<B, 2>,
    dloss: Tensor<B, 1>,
    rows: usize,
) -> Tensor<B, 2> {
    let [n, v] = logits.dims();
    let mut out = Vec::new();
    for (s, r) in chunks(n, rows) {
        let p = (logits.clone().narrow(0, s, r) - lse.clone().narrow(0, s, r)).exp();
        let t = targets.clone().narrow(0, s, r).unsqueeze_dim(1);
        let onehot = Tensor::<B, 2>::zeros([r, v], &p.device()).scatter(
            1,
            t,
            Tensor::ones([r, 1], &p.device()),
            burn::tensor::IndexingUpdateOp::Add,
        );
        out.push((p - onehot) * dloss.clone().narrow(0, s, r).reshape([r, 1]));
    }
    Tensor::cat(out, 0)
}

#[derive(Debug)]
struct CrossEntropyBack(usize);

impl<B: Kernels> Backward<B, 1> for CrossEntropyBack {
    type State = (
        burn::tensor::ops::FloatTensor<B>,
        burn::tensor::ops::IntTensor<B>,
        burn::tensor::ops::FloatTensor<B>,
    );
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dl = grads.consume::<B>(&ops.node);
        let (x, t, lse) = ops.state.clone();
        let f = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
        let dl = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(dl));
        let t = Tensor::<B, 1, burn::tensor::Int>::from_primitive(t);
        let dx = cross_entropy_backward(f(x), t, f(lse), dl, self.0);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// Per-row cross-entropy as one autodiff node over the chunked forward and backward: it keeps
/// the logits and a log-sum-exp per row, not burn's softmax intermediates.
pub fn cross_entropy<B: Kernels, C: CheckpointStrategy>(
    logits: Tensor<Autodiff<B, C>, 2>,
    targets: Tensor<Autodiff<B, C>, 1, burn::tensor::Int>,
    rows: usize,
) -> Tensor<Autodiff<B, C>, 1> {
    let xa = logits.into_primitive().tensor();
    let t = targets.into_primitive();
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(xa.primitive.clone()));
    let tt = Tensor::<B, 1, burn::tensor::Int>::from_primitive(t.clone());
    let (loss, lse) = cross_entropy_forward(x, tt, rows);
    let (loss, lse) = (
        loss.into_primitive().tensor(),
        lse.into_primitive().tensor(),
    );
    let kind = CrossEntropyBack(rows)
        .prepare::<C>([xa.node])
        .compute_bound()
        .stateful();
    let out = match kind {
        OpsKind::Tracked(prep) => prep.finish((xa.primitive, t, lse), loss),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
