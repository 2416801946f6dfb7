//! Times each CPU kernel on the tiny recipe's shapes: `cargo run --release -p tern-kernels --example kernel_times`.
use std::time::Instant;
use tern_kernels::cpu::{self, AttnShape, Gate};

fn time(what: &str, reps: usize, mut f: impl FnMut()) {
    f();
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    println!(
        "{what:>28}: {:8.3} ms",
        t0.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() {
    linear_times();
    scan_times();
    let s = AttnShape {
        batch: 8,
        seq: 128,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let v = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    };
    let (q, k, vv) = (
        v(8 * 128 * 4 * 32),
        v(8 * 128 * 2 * 32),
        v(8 * 128 * 2 * 32),
    );
    let (o, lse) = cpu::attention(&q, &k, &vv, s);
    time("attention fwd", 20, || {
        cpu::attention(&q, &k, &vv, s);
    });
    time("attention bwd", 20, || {
        cpu::attention_backward(&q, &k, &vv, &o, &lse, &q, s);
    });
    let logits = v(1024 * 4096);
    let t: Vec<i64> = (0..1024).map(|i| i * 3 % 4096).collect();
    let (_, z) = cpu::cross_entropy(&logits, &t, 4096);
    let dl = vec![1.0f32 / 1024.0; 1024];
    time("cross-entropy fwd", 20, || {
        cpu::cross_entropy(&logits, &t, 4096);
    });
    time("cross-entropy bwd", 20, || {
        cpu::cross_entropy_backward(&z, &t, &dl, 4096);
    });
    let (g, u) = (v(1024 * 384), v(1024 * 384));
    time("swiglu fwd", 50, || {
        cpu::glu(&g, &u, Gate::Silu);
    });
    time("swiglu bwd", 50, || {
        cpu::glu_backward(&g, &u, &g, Gate::Silu);
    });
    let x = v(1024 * 128);
    let w = v(128);
    let (_, r) = cpu::rms_norm(&x, &w, 1e-5);
    time("rms_norm fwd", 50, || {
        cpu::rms_norm(&x, &w, 1e-5);
    });
    time("rms_norm bwd", 50, || {
        cpu::rms_norm_backward(&x, &w, &r, &x);
    });
    let cs = v(128 * 32);
    time("rope", 50, || {
        cpu::rope(&q, &cs, &cs, 128, 4, false);
    });
    let wt = v(384 * 128);
    time("ternary 384x128", 50, || {
        cpu::ternary(&wt, 384, 128, 1, true, 1e-5);
    });
}

fn linear_times() {
    for (n, din, dout) in [
        (1024usize, 128usize, 384usize),
        (1024, 384, 128),
        (1024, 128, 4096),
        (1024, 128, 128),
        (512, 512, 1280),
        (512, 1280, 512),
        (512, 512, 50304),
    ] {
        let x: Vec<f32> = (0..n * din).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..dout * din).map(|i| (i % 7) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..n * dout).map(|i| (i % 5) as f32 * 0.1).collect();
        let gf = |ms: f64| 2.0 * (n * din * dout) as f64 / ms / 1e6;
        let t = |f: &mut dyn FnMut()| {
            f();
            let t0 = Instant::now();
            for _ in 0..20 {
                f();
            }
            t0.elapsed().as_secs_f64() * 1e3 / 20.0
        };
        let a = t(&mut || {
            cpu::linear(&x, &w, n, din, dout);
        });
        let sh = (n, din, dout);
        let b = t(&mut || {
            cpu::linear_backward(&dy, &x, &w, sh, [true, false]);
        });
        let c = t(&mut || {
            cpu::linear_backward(&dy, &x, &w, sh, [false, true]);
        });
        println!(
            "{n}x{din}->{dout}: fwd {a:.3} ms ({:.0} GF/s), dx {b:.3} ({:.0}), dw {c:.3} ({:.0})",
            gf(a),
            gf(b),
            gf(c)
        );
    }
}

/// Mamba's selective scan on a Jamba-tiny shape (batch 8, 128 tokens, 256 channels, state 16):
/// the fused forward and backward, and the reference composition of burn ops differentiated by
/// autodiff (forward + backward), on the same inputs.
fn scan_times() {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};
    use tern_kernels::scan::{self, ScanInputs, ScanShape};

    let s = ScanShape {
        b: 8,
        l: 128,
        d: 256,
        n: 16,
    };
    let v = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * ((i * 7919) % 1000) as f32 / 1000.0)
            .collect()
    };
    let (bld, bln) = (s.b * s.l * s.d, s.b * s.l * s.n);
    let data = [
        v(bld, -1.0, 1.0),
        v(bld, 0.01, 0.1),
        v(s.d * s.n, -2.0, -0.5),
        v(bln, -1.0, 1.0),
        v(bln, -1.0, 1.0),
        v(s.d, 0.5, 1.5),
    ];
    let x = ScanInputs::new(data.each_ref().map(|v| v.as_slice()));
    let (y, states) = scan::forward(&x, s);
    time("selective scan fwd", 10, || {
        scan::forward(&x, s);
    });
    time("selective scan bwd", 10, || {
        scan::backward(&x, &states, &y, s);
    });
    type AB = Autodiff<Flex>;
    let dev = Default::default();
    let t3 = |d: &Vec<f32>, n: usize| {
        Tensor::<AB, 3>::from_data(TensorData::new(d.clone(), [s.b, s.l, n]), &dev).require_grad()
    };
    time("scan reference fwd+bwd", 2, || {
        let a = Tensor::<AB, 2>::from_data(TensorData::new(data[2].clone(), [s.d, s.n]), &dev)
            .require_grad();
        let d = Tensor::<AB, 1>::from_data(TensorData::new(data[5].clone(), [s.d]), &dev)
            .require_grad();
        let y = tern_kernels::reference::selective_scan(
            t3(&data[0], s.d),
            t3(&data[1], s.d),
            a,
            t3(&data[3], s.n),
            t3(&data[4], s.n),
            d,
        );
        let _ = y.sum().backward();
    });
}
