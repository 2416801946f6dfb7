//! Each fused kernel against the reference composition of burn ops, on the same backend
//! (`Autodiff<Flex>`, f32): outputs and the gradients of every input, for a random upstream
//! gradient, on shapes that are not multiples of the vector width.

use burn::backend::ndarray::NdArray;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use tern_kernels::{reference, Gate, Kernels, TernarySpec};

type B = Autodiff<Flex>;

fn rand<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    // A seeded LCG: the same inputs on every run and machine.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default()).require_grad()
}

fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= tol * scale,
        "{what}: max difference {worst} of scale {scale}"
    );
}

/// Runs `f` fused and `r` as reference on the same inputs; compares outputs and input gradients.
fn check<const N: usize, const D: usize>(
    what: &str,
    inputs: [Tensor<B, D>; N],
    fused: impl Fn(&[Tensor<B, D>]) -> Tensor<B, D>,
    refer: impl Fn(&[Tensor<B, D>]) -> Tensor<B, D>,
    tol: f32,
) {
    let run = |f: &dyn Fn(&[Tensor<B, D>]) -> Tensor<B, D>| {
        let xs: Vec<Tensor<B, D>> = inputs
            .iter()
            .map(|t| Tensor::from_inner(t.clone().inner()).require_grad())
            .collect();
        let y = f(&xs);
        let up = rand(y.dims(), 99).detach();
        let grads = (y.clone() * up).sum().backward();
        let gs: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                x.grad(&grads)
                    .map(|g| g.into_data().to_vec().unwrap())
                    .unwrap_or_default()
            })
            .collect();
        (host(y), gs)
    };
    let (y1, g1) = run(&fused);
    let (y2, g2) = run(&refer);
    close(&format!("{what} output"), &y1, &y2, tol);
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        close(&format!("{what} gradient {i}"), a, b, tol);
    }
}

#[test]
fn rms_norm() {
    let x: Tensor<B, 2> = rand([37, 21], 1);
    let w: Tensor<B, 1> = rand([21], 2);
    let run = |fused: bool| {
        let (x, w) = (
            Tensor::<B, 2>::from_inner(x.clone().inner()).require_grad(),
            Tensor::<B, 1>::from_inner(w.clone().inner()).require_grad(),
        );
        let y = if fused {
            B::rms_norm(x.clone(), w.clone(), 1e-5)
        } else {
            reference::rms_norm(x.clone(), w.clone(), 1e-5)
        };
        let g = (y.clone() * rand([37, 21], 3).detach()).sum().backward();
        let gx: Vec<f32> = x.grad(&g).unwrap().into_data().to_vec().unwrap();
        let gw: Vec<f32> = w.grad(&g).unwrap().into_data().to_vec().unwrap();
        (host(y), gx, gw)
    };
    let (a, b) = (run(true), run(false));
    close("rms_norm output", &a.0, &b.0, 1e-6);
    close("rms_norm dx", &a.1, &b.1, 1e-5);
    close("rms_norm dw", &a.2, &b.2, 1e-5);
}

#[test]
fn gated_activations() {
    for act in [Gate::Silu, Gate::Relu2] {
        check(
            &format!("{act:?}"),
            [rand([3, 5, 37], 4), rand([3, 5, 37], 5)],
            |x| B::glu(x[0].clone(), x[1].clone(), act),
            |x| reference::glu(x[0].clone(), x[1].clone(), act),
            1e-6,
        );
    }
}

fn tables(t: usize, hd: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (mut c, mut s) = (vec![], vec![]);
    for p in 0..t {
        for j in 0..hd {
            let a = p as f64 * 10000f64.powf(-(2.0 * (j % (hd / 2)) as f64) / hd as f64);
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    let dev = Default::default();
    (
        Tensor::from_data(TensorData::new(c, [t, hd]), &dev),
        Tensor::from_data(TensorData::new(s, [t, hd]), &dev),
    )
}

#[test]
fn rope() {
    let (cos, sin) = tables(7, 10);
    check(
        "rope",
        [rand([2, 7, 3, 10], 6)],
        |x| B::rope(x[0].clone(), cos.clone(), sin.clone()),
        |x| reference::rope(x[0].clone(), cos.clone(), sin.clone()),
        1e-6,
    );
}

/// The query-chunked attention of the cuda build against the reference, chunks smaller than,
/// not dividing, and larger than the sequence.
#[test]
fn chunked_attention_equals_the_reference() {
    for (heads, kv, t, chunk) in [
        (4, 2, 37, 8),
        (3, 3, 19, 19),
        (6, 1, 33, 64),
        (2, 1, 64, 16),
    ] {
        let q = rand([2, t, heads, 12], 17);
        let k = rand([2, t, kv, 12], 18);
        let v = rand([2, t, kv, 12], 19);
        let run = |chunked: bool| {
            let p = |t: &Tensor<B, 4>| Tensor::<B, 4>::from_inner(t.clone().inner()).require_grad();
            let (q, k, v) = (p(&q), p(&k), p(&v));
            let y = if chunked {
                tern_kernels::chunked::causal_attention(q.clone(), k.clone(), v.clone(), chunk)
            } else {
                reference::causal_attention(q.clone(), k.clone(), v.clone())
            };
            let up = rand(y.dims(), 20).detach();
            let g = (y.clone() * up).sum().backward();
            let gr = |t: &Tensor<B, 4>| -> Vec<f32> {
                t.grad(&g).unwrap().into_data().to_vec().unwrap()
            };
            (host(y), gr(&q), gr(&k), gr(&v))
        };
        let (a, b) = (run(true), run(false));
        let what = format!("chunked attention {heads}/{kv} t {t} chunk {chunk}");
        close(&format!("{what} out"), &a.0, &b.0, 1e-5);
        close(&format!("{what} dq"), &a.1, &b.1, 1e-5);
        close(&format!("{what} dk"), &a.2, &b.2, 1e-5);
        close(&format!("{what} dv"), &a.3, &b.3, 1e-5);
        // Products in bf16 (the backward pass in the forward's precision, whatever the thread's
        // is by then): within bf16 rounding of f32.
        use tern_kernels::precision::{set_matmul_precision, Precision};
        set_matmul_precision(Precision::Bf16);
        let p = |t: &Tensor<B, 4>| Tensor::<B, 4>::from_inner(t.clone().inner()).require_grad();
        let (qb, kb, vb) = (p(&q), p(&k), p(&v));
        let y = tern_kernels::chunked::causal_attention(qb.clone(), kb.clone(), vb.clone(), chunk);
        set_matmul_precision(Precision::F32);
        let g = (y.clone() * rand(y.dims(), 20).detach()).sum().backward();
        let gr =
            |t: &Tensor<B, 4>| -> Vec<f32> { t.grad(&g).unwrap().into_data().to_vec().unwrap() };
        close(&format!("{what} bf16 out"), &host(y), &b.0, 2e-2);
        close(&format!("{what} bf16 dq"), &gr(&qb), &b.1, 3e-2);
        close(&format!("{what} bf16 dk"), &gr(&kb), &b.2, 3e-2);
        close(&format!("{what} bf16 dv"), &gr(&vb), &b.3, 3e-2);
    }
}

#[test]
fn causal_attention_grouped_and_plain() {
    // 150 positions: several blocks of query rows, the last one partial.
    for (heads, kv, t) in [(4, 2, 150), (3, 3, 19), (6, 1, 33)] {
        let q = rand([2, t, heads, 12], 7);
        let k = rand([2, t, kv, 12], 8);
        let v = rand([2, t, kv, 12], 9);
        let dev = Default::default();
        let run = |fused: bool| {
            let p = |t: &Tensor<B, 4>| Tensor::<B, 4>::from_inner(t.clone().inner()).require_grad();
            let (q, k, v) = (p(&q), p(&k), p(&v));
            let y = if fused {
                B::causal_attention(q.clone(), k.clone(), v.clone())
            } else {
                reference::causal_attention(q.clone(), k.clone(), v.clone())
            };
            let up = rand(y.dims(), 10).detach();
            let g = (y.clone() * up).sum().backward();
            let gr = |t: &Tensor<B, 4>| -> Vec<f32> {
                t.grad(&g).unwrap().into_data().to_vec().unwrap()
            };
            (host(y), gr(&q), gr(&k), gr(&v))
        };
        let _: &burn::backend::flex::FlexDevice = &dev;
        let (a, b) = (run(true), run(false));
        let what = format!("attention {heads}/{kv}");
        close(&format!("{what} out"), &a.0, &b.0, 1e-5);
        close(&format!("{what} dq"), &a.1, &b.1, 1e-5);
        close(&format!("{what} dk"), &a.2, &b.2, 1e-5);
        close(&format!("{what} dv"), &a.3, &b.3, 1e-5);
    }
}

#[test]
fn cross_entropy_rows() {
    let logits: Tensor<B, 2> = rand([13, 301], 11);
    let ids: Vec<i64> = (0..13).map(|i| (i * 37 % 301) as i64).collect();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [13]), &Default::default());
    let run = |fused: bool| {
        let x = Tensor::<B, 2>::from_inner(logits.clone().inner()).require_grad();
        let l = if fused {
            B::cross_entropy(x.clone(), targets.clone())
        } else {
            reference::cross_entropy(x.clone(), targets.clone())
        };
        let g = (l.clone() * rand([13], 12).detach()).sum().backward();
        (
            host(l),
            x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap(),
        )
    };
    let (a, b) = (run(true), run(false));
    close("cross-entropy loss", &a.0, &b.0, 1e-6);
    close("cross-entropy dlogits", &a.1, &b.1, 1e-6);
    // The cuda build's row-chunked op, 4 rows a chunk (the last one partial).
    let x = Tensor::<B, 2>::from_inner(logits.clone().inner()).require_grad();
    let l = tern_kernels::chunked::cross_entropy(x.clone(), targets.clone(), 4);
    let g = (l.clone() * rand([13], 12).detach()).sum().backward();
    let dx = x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
    close("chunked cross-entropy loss", &host(l), &b.0, 1e-5);
    close("chunked cross-entropy dlogits", &dx, &b.1, 1e-6);
}

#[test]
fn ternary_straight_through() {
    for spec in [
        TernarySpec {
            groups: 1,
            by_rows: true,
            eps: 1e-5,
        },
        TernarySpec {
            groups: 3,
            by_rows: true,
            eps: 1e-5,
        },
        TernarySpec {
            groups: 2,
            by_rows: false,
            eps: 1e-5,
        },
    ] {
        check(
            &format!("{spec:?}"),
            [rand([12, 34], 13)],
            |x| B::ternary_ste(x[0].clone(), spec),
            |x| reference::ternary_ste(x[0].clone(), spec),
            1e-6,
        );
    }
}

/// Backends without fused kernels (ndarray here, CUDA) run the reference and agree.
#[test]
fn reference_backends_agree() {
    type N = Autodiff<NdArray>;
    let dev = Default::default();
    let q: Vec<f32> = host(rand([1, 5, 2, 4], 14));
    let qn = Tensor::<N, 4>::from_data(TensorData::new(q.clone(), [1, 5, 2, 4]), &dev);
    let qf = Tensor::<B, 4>::from_data(TensorData::new(q, [1, 5, 2, 4]), &Default::default());
    let a: Vec<f32> = N::causal_attention(qn.clone(), qn.clone(), qn)
        .into_data()
        .to_vec()
        .unwrap();
    let b = host(B::causal_attention(qf.clone(), qf.clone(), qf));
    close("ndarray vs flex attention", &a, &b, 1e-5);
}

#[test]
fn linear_both_gradients() {
    let x: Tensor<B, 2> = rand([37, 21], 15);
    let w: Tensor<B, 2> = rand([19, 21], 16);
    let run = |fused: bool| {
        let p = |t: &Tensor<B, 2>| Tensor::<B, 2>::from_inner(t.clone().inner()).require_grad();
        let (x, w) = (p(&x), p(&w));
        let y = if fused {
            B::linear(x.clone(), w.clone())
        } else {
            x.clone().matmul(w.clone().transpose())
        };
        let g = (y.clone() * rand([37, 19], 17).detach()).sum().backward();
        let gr =
            |t: &Tensor<B, 2>| -> Vec<f32> { t.grad(&g).unwrap().into_data().to_vec().unwrap() };
        (host(y), gr(&x), gr(&w))
    };
    let (a, b) = (run(true), run(false));
    close("linear y", &a.0, &b.0, 1e-6);
    close("linear dx", &a.1, &b.1, 1e-6);
    close("linear dw", &a.2, &b.2, 1e-6);
}

/// Mamba's selective scan: the fused forward and its own backward against the step-by-step burn
/// composition differentiated by autodiff (every input's gradient).
#[test]
fn selective_scan() {
    let (b, l, d, n) = (2, 7, 5, 3);
    let u: Tensor<B, 3> = rand([b, l, d], 11);
    // Positive step sizes and negative A, as Mamba's softplus(delta) and -exp(A_log) give.
    let delta: Tensor<B, 3> = (rand([b, l, d], 12) * 0.2 + 0.5).detach().require_grad();
    let a: Tensor<B, 2> = (rand([d, n], 13) * 0.4 - 1.0).detach().require_grad();
    let (bm, cm): (Tensor<B, 3>, Tensor<B, 3>) = (rand([b, l, n], 14), rand([b, l, n], 15));
    let dskip: Tensor<B, 1> = rand([d], 16);
    let run = |fused: bool| {
        let g3 = |t: &Tensor<B, 3>| Tensor::<B, 3>::from_inner(t.clone().inner()).require_grad();
        let (u, delta, bm, cm) = (g3(&u), g3(&delta), g3(&bm), g3(&cm));
        let a = Tensor::<B, 2>::from_inner(a.clone().inner()).require_grad();
        let dskip = Tensor::<B, 1>::from_inner(dskip.clone().inner()).require_grad();
        let args = (
            u.clone(),
            delta.clone(),
            a.clone(),
            bm.clone(),
            cm.clone(),
            dskip.clone(),
        );
        let y = if fused {
            B::selective_scan(args.0, args.1, args.2, args.3, args.4, args.5)
        } else {
            reference::selective_scan(args.0, args.1, args.2, args.3, args.4, args.5)
        };
        let g = (y.clone() * rand([b, l, d], 17).detach()).sum().backward();
        let v3 =
            |t: &Tensor<B, 3>| -> Vec<f32> { t.grad(&g).unwrap().into_data().to_vec().unwrap() };
        let grads = vec![
            v3(&u),
            v3(&delta),
            a.grad(&g).unwrap().into_data().to_vec().unwrap(),
            v3(&bm),
            v3(&cm),
            dskip.grad(&g).unwrap().into_data().to_vec().unwrap(),
        ];
        (host(y), grads)
    };
    let (a_out, a_grads) = run(true);
    let (b_out, b_grads) = run(false);
    close("selective_scan output", &a_out, &b_out, 1e-5);
    for (name, (x, y)) in ["u", "delta", "A", "B", "C", "D"]
        .iter()
        .zip(a_grads.iter().zip(&b_grads))
    {
        close(&format!("selective_scan d{name}"), x, y, 1e-4);
    }
}
