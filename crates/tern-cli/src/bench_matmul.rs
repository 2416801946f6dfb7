//! `tern bench --matmul`: the packed ternary kernel against f32 products of the same shape, at
//! decode (batch 1) and prefill-like batches.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::{Distribution, Tensor, TensorData};
use tern_data::sampler::SplitMix64;
use tern_infer::{Dense, Matrix, PackedTernary};
use tern_pack::TernaryMatrix;

use crate::{backend_name, Compute};

/// Shapes `OUTxIN` (TinyLlama-1.1B's projections when none are given).
pub const DEFAULT_SHAPES: [&str; 4] = ["2048x2048", "256x2048", "5632x2048", "2048x5632"];

/// f32 bytes the timed products cycle through (four times this machine's 32 MB L3).
const STREAM_BYTES: usize = 128 << 20;

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shape {s:?}: expected OUTxIN, e.g. 5632x2048");
    let (a, b) = s.split_once('x').ok_or_else(bad)?;
    let (r, c) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if r == 0 || c == 0 {
        bail!("--shape {s:?}: sizes must be at least 1");
    }
    Ok((r, c))
}

/// Median seconds of `f` over enough calls to fill about half a second (at least 5).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let n = ((0.5 / once) as usize).clamp(5, 2000);
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[n / 2]
}

pub fn run(shapes: &[String], batches: &[usize]) -> Result<()> {
    let shapes: Vec<(usize, usize)> = if shapes.is_empty() {
        DEFAULT_SHAPES
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    } else {
        shapes
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    };
    if batches.contains(&0) {
        bail!("--batch must be at least 1");
    }
    let batches = if batches.is_empty() {
        vec![1, 64]
    } else {
        batches.to_vec()
    };
    let device = Default::default();
    let mut rng = SplitMix64(11);
    println!(
        "matmul y = x W^T | {} threads | kernels {:?} | packed: f32 inputs, and int8 (inputs \
         quantized per 256, quantization timed) | f32 reference: burn {} backend (as the model \
         multiplies) and tern-infer's dense kernel",
        rayon::current_num_threads(),
        tern_infer::Isa::detect(),
        backend_name()
    );
    for &(rows, cols) in &shapes {
        let m = TernaryMatrix {
            rows,
            cols,
            row_groups: 1,
            col_groups: 1,
            codes: (0..rows * cols).map(|_| rng.below(3) as i8 - 1).collect(),
            scales: vec![0.02],
        };
        // A model's matrices do not stay in cache between two tokens: the products cycle through
        // distinct copies of at least STREAM_BYTES of f32 weights, as a decode step walks the layers.
        let copies = (STREAM_BYTES / (4 * rows * cols)).max(1);
        let packed: Vec<Matrix> = (0..copies)
            .map(|_| Matrix::Ternary(PackedTernary::new(&m)))
            .collect();
        let values = m.dequantize();
        let w: Vec<Tensor<Compute, 2>> = (0..copies)
            .map(|_| Tensor::from_data(TensorData::new(values.clone(), [rows, cols]), &device))
            .collect();
        let dense: Vec<Matrix> = (0..copies)
            .map(|_| {
                Matrix::Dense(Dense {
                    rows,
                    cols,
                    values: values.clone(),
                })
            })
            .collect();
        let (packed_mb, dense_mb) = (
            packed[0].bytes() as f64 / 1e6,
            dense[0].bytes() as f64 / 1e6,
        );
        println!(
            "{rows}x{cols}: cycling through {copies} copies ({:.0} MB f32, {:.1} MB packed)",
            dense_mb * copies as f64,
            packed_mb * copies as f64
        );
        for &b in &batches {
            let x =
                Tensor::<Compute, 2>::random([b, cols], Distribution::Normal(0.0, 1.0), &device);
            let xv: Vec<f32> = x.to_data().to_vec().unwrap();
            let mut k = 0;
            let mut next = || {
                k = (k + 1) % copies;
                k
            };
            let t_packed = time(|| drop(packed[next()].matmul(&xv, b)));
            let t_int8 = time(|| {
                let p = &packed[next()];
                if let Matrix::Ternary(t) = p {
                    drop(p.matmul_q8(&t.quantize(&xv, b)));
                }
            });
            let t_dense = time(|| drop(dense[next()].matmul(&xv, b)));
            let t_burn = time(|| drop(x.clone().matmul(w[next()].clone().transpose()).into_data()));
            let flops = 2.0 * (rows * cols * b) as f64;
            println!(
                "{rows}x{cols} batch {b:>3} | packed {:>8.3} ms ({:>6.1} GFLOP/s, {:.1} MB) | packed int8 \
                 {:>8.3} ms ({:>6.1} GFLOP/s) | burn f32 {:>8.3} ms | dense f32 {:>8.3} ms ({:.1} MB) | \
                 packed speed-up {:.2}x vs burn, {:.2}x vs dense; int8 {:.2}x vs dense",
                t_packed * 1e3,
                flops / t_packed / 1e9,
                packed_mb,
                t_int8 * 1e3,
                flops / t_int8 / 1e9,
                t_burn * 1e3,
                t_dense * 1e3,
                dense_mb,
                t_burn / t_packed,
                t_dense / t_packed,
                t_dense / t_int8
            );
        }
    }
    Ok(())
}
