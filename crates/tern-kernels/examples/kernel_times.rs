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
