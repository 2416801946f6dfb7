//! The CPU backend's fused kernels: f32 tensors go to [`crate::cpu`], other precisions take
//! the reference path.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Shape, Tensor, TensorData, TensorMetadata};

use crate::cpu::{self, AttnShape, Gate};
use crate::{reference, AdamwScalars, Kernels, TernarySpec};

/// `t` as a contiguous f32 tensor, or `None` for other precisions.
fn f32_tensor(t: &FlexTensor) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    Some(if t.layout().contiguous_offsets().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    })
}

/// The elements of a contiguous tensor.
fn data(t: &FlexTensor) -> &[f32] {
    let (start, end) = t.layout().contiguous_offsets().expect("contiguous");
    &t.storage::<f32>()[start..end]
}

fn new(v: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape.into()))
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.shape().to_vec()
}

/// The sizes of a selective scan from `u: [b, l, d]` and `a: [d, n]`.
fn scan_shape(u: &FlexTensor, a: &FlexTensor) -> crate::scan::ScanShape {
    let (ud, ad) = (dims(u), dims(a));
    crate::scan::ScanShape {
        b: ud[0],
        l: ud[1],
        d: ud[2],
        n: ad[1],
    }
}

fn scan_inputs(t: &[FlexTensor; 6]) -> crate::scan::ScanInputs<'_> {
    crate::scan::ScanInputs::new(t.each_ref().map(data))
}

/// Every f32 input contiguous, or `None` if one is not f32.
fn all_f32<const N: usize>(ts: [&FlexTensor; N]) -> Option<[FlexTensor; N]> {
    let mut out = Vec::with_capacity(N);
    for t in ts {
        out.push(f32_tensor(t)?);
    }
    out.try_into().ok()
}

fn attn_shape(q: &FlexTensor, k: &FlexTensor) -> AttnShape {
    let (qd, kd) = (dims(q), dims(k));
    AttnShape {
        batch: qd[0],
        seq: qd[1],
        heads: qd[2],
        kv_heads: kd[2],
        head_dim: qd[3],
    }
}

fn token_ids(t: FlexTensor, vocab: usize) -> Vec<i64> {
    let ids: Vec<i64> = Tensor::<Flex, 1, Int>::from_primitive(t)
        .into_data()
        .convert::<i64>()
        .to_vec()
        .expect("integer targets");
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        panic!("target token id {bad} lies outside the vocabulary of {vocab} logits");
    }
    ids
}

/// `t` contiguous from offset 0 (copied if not), so that `storage_mut` can write it in place
/// (itself copying first when another tensor shares the buffer).
fn owned_f32(t: FlexTensor) -> FlexTensor {
    let n = t.shape().num_elements();
    if t.layout().contiguous_offsets() == Some((0, n)) && t.bytes().len() == n * 4 {
        t
    } else {
        t.to_contiguous()
    }
}

impl Kernels for Flex {
    fn adamw_step(
        p: Tensor<Self, 1>,
        m: Tensor<Self, 1>,
        v: Tensor<Self, 1>,
        g: Tensor<Self, 1>,
        s: AdamwScalars,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let f32s = [&p, &m, &v, &g].iter().all(|t| t.dtype() == DType::F32);
        if !f32s {
            return reference::adamw_step(p, m, v, g, s);
        }
        let prim = |t: Tensor<Self, 1>| owned_f32(t.into_primitive().tensor());
        let (mut pt, mut mt, mut vt) = (prim(p), prim(m), prim(v));
        let gt = f32_tensor(&g.into_primitive().tensor()).expect("f32");
        let k = [
            s.grad_scale.unwrap_or(1.0) as f32,
            s.decay.unwrap_or(1.0) as f32,
            s.beta1 as f32,
            (1.0 - s.beta1) as f32,
            s.beta2 as f32,
            (1.0 - s.beta2) as f32,
            s.bc2_sqrt as f32,
            s.eps as f32,
            s.step_size as f32,
        ];
        cpu::adamw(
            pt.storage_mut::<f32>(),
            mt.storage_mut::<f32>(),
            vt.storage_mut::<f32>(),
            data(&gt),
            k,
        );
        let t = |x: FlexTensor| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(x));
        (t(pt), t(mt), t(vt))
    }

    fn squared_norms(ts: &[Tensor<Self, 1>]) -> Vec<f64> {
        let one = |t: &Tensor<Self, 1>| match f32_tensor(&t.clone().into_primitive().tensor()) {
            Some(x) => cpu::sum_squares(data(&x)),
            None => reference::squared_norms(std::slice::from_ref(t))[0],
        };
        ts.iter().map(one).collect()
    }

    fn linear_fwd(x: FloatTensor<Self>, w: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        let [x, w] = all_f32([&x, &w])?;
        let ([n, d_in], d_out) = ([dims(&x)[0], dims(&x)[1]], dims(&w)[0]);
        Some(new(
            cpu::linear(data(&x), data(&w), n, d_in, d_out),
            [n, d_out],
        ))
    }

    fn linear_bwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        want: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        let [x, w, dy] = all_f32([&x, &w, &dy]).expect("f32 as in forward");
        let ([n, d_in], d_out) = ([dims(&x)[0], dims(&x)[1]], dims(&w)[0]);
        let [dx, dw] = cpu::linear_backward(data(&dy), data(&x), data(&w), (n, d_in, d_out), want);
        [
            dx.map(|v| new(v, [n, d_in])),
            dw.map(|v| new(v, [d_out, d_in])),
        ]
    }

    fn selective_scan_fwd(
        ins: [FloatTensor<Self>; 6],
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let t = all_f32(ins.each_ref())?;
        let s = scan_shape(&t[0], &t[2]);
        let (y, states) = crate::scan::forward(&scan_inputs(&t), s);
        Some((new(y, [s.b, s.l, s.d]), new(states, [s.b, s.l, s.d, s.n])))
    }

    fn selective_scan_bwd(
        ins: [FloatTensor<Self>; 6],
        states: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 6] {
        let t = all_f32(ins.each_ref()).expect("f32 as in forward");
        let [states, dy] = all_f32([&states, &dy]).expect("f32 as in forward");
        let s = scan_shape(&t[0], &t[2]);
        let g = crate::scan::backward(&scan_inputs(&t), data(&states), data(&dy), s);
        let shapes = [
            vec![s.b, s.l, s.d],
            vec![s.b, s.l, s.d],
            vec![s.d, s.n],
            vec![s.b, s.l, s.n],
            vec![s.b, s.l, s.n],
            vec![s.d],
        ];
        let mut it = g.into_iter().zip(shapes).map(|(v, sh)| new(v, sh));
        std::array::from_fn(|_| it.next().expect("six gradients"))
    }

    fn rms_norm_fwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let [x, w] = all_f32([&x, &w])?;
        let (y, rstd) = cpu::rms_norm(data(&x), data(&w), eps as f32);
        let n = rstd.len();
        Some((new(y, dims(&x)), new(rstd, [n])))
    }

    fn rms_norm_bwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [x, w, rstd, dy] = all_f32([&x, &w, &rstd, &dy]).expect("f32 as in forward");
        let (dx, dw) = cpu::rms_norm_backward(data(&x), data(&w), data(&rstd), data(&dy));
        (new(dx, dims(&x)), new(dw, dims(&w)))
    }

    fn glu_fwd(g: FloatTensor<Self>, u: FloatTensor<Self>, act: Gate) -> Option<FloatTensor<Self>> {
        let [g, u] = all_f32([&g, &u])?;
        Some(new(cpu::glu(data(&g), data(&u), act), dims(&g)))
    }

    fn glu_bwd(
        g: FloatTensor<Self>,
        u: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        act: Gate,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [g, u, dy] = all_f32([&g, &u, &dy]).expect("f32 as in forward");
        let (dg, du) = cpu::glu_backward(data(&g), data(&u), data(&dy), act);
        (new(dg, dims(&g)), new(du, dims(&u)))
    }

    fn rope_fwd(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> Option<FloatTensor<Self>> {
        let [x, cos, sin] = all_f32([&x, &cos, &sin])?;
        let d = dims(&x);
        let y = cpu::rope(data(&x), data(&cos), data(&sin), d[1], d[2], inverse);
        Some(new(y, d))
    }

    fn attention_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let [q, k, v] = all_f32([&q, &k, &v])?;
        let s = attn_shape(&q, &k);
        let (out, lse) = cpu::attention(data(&q), data(&k), data(&v), s);
        Some((new(out, dims(&q)), new(lse, [s.batch, s.heads, s.seq])))
    }

    fn attention_bwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let [q, k, v, out, lse, dout] =
            all_f32([&q, &k, &v, &out, &lse, &dout]).expect("f32 as in forward");
        let s = attn_shape(&q, &k);
        let (dq, dk, dv) = cpu::attention_backward(
            data(&q),
            data(&k),
            data(&v),
            data(&out),
            data(&lse),
            data(&dout),
            s,
        );
        (new(dq, dims(&q)), new(dk, dims(&k)), new(dv, dims(&v)))
    }

    fn cross_entropy_fwd(
        logits: FloatTensor<Self>,
        targets: FlexTensor,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        let x = f32_tensor(&logits)?;
        let v = dims(&x)[1];
        let ids = token_ids(targets, v);
        let (loss, probs) = cpu::cross_entropy(data(&x), &ids, v);
        let n = ids.len();
        Some((new(loss, [n]), new(probs, dims(&x))))
    }

    fn cross_entropy_bwd(
        probs: FloatTensor<Self>,
        targets: FlexTensor,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [p, dl] = all_f32([&probs, &dloss]).expect("f32 as in forward");
        let v = dims(&p)[1];
        let ids = token_ids(targets, v);
        new(
            cpu::cross_entropy_backward(data(&p), &ids, data(&dl), v),
            dims(&p),
        )
    }

    fn ternary_fwd(w: FloatTensor<Self>, spec: TernarySpec) -> Option<FloatTensor<Self>> {
        let w = f32_tensor(&w)?;
        let d = dims(&w);
        let q = cpu::ternary(
            data(&w),
            d[0],
            d[1],
            spec.groups,
            spec.by_rows,
            spec.eps as f32,
        );
        Some(new(q, d))
    }
}
