use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use tern_data::sampler::SplitMix64;
use tern_model::Llama;
use tern_parallel::{parallelize, TpLlama};
use tern_train::params::param_infos;
use tern_train::slots::ParamSlots;
use tern_train::step::{optimizer_step, GradAccumulator, StepSettings};

use crate::train::RecipeArgs;

use crate::{backend_name, TrainBackend};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Vocabulary size when the recipe leaves it to the tokenizer.
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    /// Time the packed ternary matmul kernel against f32 products instead (no recipe used).
    #[arg(long)]
    pub matmul: bool,
    /// With --matmul: matrix shapes OUTxIN (repeatable; TinyLlama-1.1B's four when omitted).
    #[arg(long = "shape", requires = "matmul")]
    pub shapes: Vec<String>,
    /// With --matmul: batch sizes (repeatable; 1 and 64 when omitted).
    #[arg(long = "batch", requires = "matmul")]
    pub batches: Vec<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The machine's f32 peak as tern counts it: cores x f32 SIMD lanes x 2 FMA units x 2 flops x
/// clock (the clock /proc/cpuinfo reports), with the description printed beside it.
fn peak_flops(cores: usize) -> (f64, String) {
    #[cfg(target_arch = "x86_64")]
    let lanes = if std::is_x86_feature_detected!("avx512f") {
        16
    } else if std::is_x86_feature_detected!("avx2") {
        8
    } else {
        4
    };
    #[cfg(not(target_arch = "x86_64"))]
    let lanes = 4;
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let peak = cores as f64 * lanes as f64 * 2.0 * 2.0 * mhz * 1e6;
    let what = format!(
        "{cores} cores x {lanes} f32 lanes x 2 FMA units x 2 flops x {:.2} GHz",
        mhz / 1e3
    );
    (peak, what)
}

/// Training steps on random tokens, as the trainer runs them (this rank's tensor-parallel shard):
/// forward + backward of one micro-batch, then (under `mpirun`) the bucketed data-parallel
/// gradient all-reduce, then clipping and the optimizer's update. Prints compute time, the time
/// of the tensor-parallel collectives inside forward and backward, the gradient all-reduce with
/// its bus bandwidth (NCCL's convention: 2 (n-1)/n x bytes / time) and the optimizer's time, then
/// the whole step's tokens/s and achieved FLOP/s against the machine's peak.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.matmul {
        return crate::bench_matmul::run(&a.shapes, &a.batches);
    }
    let mut recipe = a.recipe.load()?;
    let dist = crate::start_job(&recipe)?;
    recipe
        .resolve_vocab(a.vocab)
        .map_err(|e| anyhow::anyhow!(e))?;
    let device = crate::compute_device(&dist.topo)?;
    let precision =
        tern_train::recipe::PrecisionName::resolve(recipe.train.precision, cfg!(feature = "cuda"));
    tern_kernels::precision::set_matmul_precision(precision);
    let times = time_steps(&recipe, &dist, &device, a.steps)?;
    if !dist.topo.is_main() {
        return Ok(());
    }
    let peak = crate::device_and_peak(&dist.topo, &recipe, precision);
    report(&recipe, &dist, &times, peak)?;
    if recipe.optim.name == tern_optim::OptimizerName::GaloreAdamw {
        galore_refresh_cost(&recipe, &device);
    }
    Ok(())
}

/// Each timed step's parts (seconds) and the volumes moved.
#[derive(Default)]
struct StepTimes {
    compute: Vec<f64>,
    tp_comm: Vec<f64>,
    all_reduce: Vec<f64>,
    optim: Vec<f64>,
    grad_bytes: usize,
    tp_bytes: u64,
    tp_calls: u64,
    /// The untimed first step (kernel compilation and autotuning on a GPU).
    first_step: f64,
}

/// `steps` training steps after one untimed one, on one micro-batch of random tokens.
fn time_steps(
    recipe: &tern_train::Recipe,
    dist: &tern_dist::Dist,
    device: &burn::tensor::Device<TrainBackend>,
    steps: usize,
) -> Result<StepTimes> {
    let (mb, t) = (recipe.train.micro_batch, recipe.data.seq_len + 1);
    let vocab = recipe.model.vocab_size.expect("set by run");
    let plain = Llama::<TrainBackend>::new(&recipe.model, device);
    let whole = param_infos::<TrainBackend, _>(&plain);
    let layout = recipe.parallel.layout();
    let mut model: TpLlama<TrainBackend> = parallelize(plain, &dist.tp, layout);
    let local = param_infos::<TrainBackend, _>(&model);
    let slots = ParamSlots::new(&whole, &local, dist.topo.tp, layout);
    let inner = Tensor::<TrainBackend, 1>::zeros([1], device)
        .inner()
        .device();
    let zero = recipe.parallel.zero == 1;
    let mut opt = slots.optimizer_for_rank(&recipe.optim, zero, dist, &inner)?;
    let (rules, trainable) = (slots.rules(), vec![true; slots.len()]);
    let settings = StepSettings {
        lr: recipe.optim.lr,
        weight_decay: recipe.optim.weight_decay,
        grad_clip: recipe.optim.grad_clip,
    };
    let mut rng = SplitMix64(1 + dist.topo.rank as u64);
    let ids: Vec<i64> = (0..mb * t)
        .map(|_| rng.below(vocab as u64) as i64)
        .collect();
    let x = Tensor::<TrainBackend, 2, Int>::from_data(TensorData::new(ids, [mb, t]), device);
    let mut times = StepTimes::default();
    for i in 0..=steps {
        dist.tp.stats().reset();
        let start = Instant::now();
        let mut acc = GradAccumulator::default();
        match recipe.train.recompute {
            tern_train::recipe::Recompute::None => acc.add(&model, model.loss(x.clone())),
            tern_train::recipe::Recompute::Block => {
                let (loss, _, grads) =
                    tern_train::recompute::loss_and_grads(&model, x.clone().inner());
                acc.push(loss, grads);
            }
        }
        let (loss, flat) = acc.mean();
        TrainBackend::sync(device)?;
        let mid = Instant::now();
        times.grad_bytes = flat.iter().map(|g| g.dims()[0] * 4).sum();
        let split = slots.state_split(zero, &recipe.optim, dist);
        let reduced =
            tern_train::step::reduce_gradients(flat, &slots.partial(), dist, split.chunked());
        TrainBackend::sync(device)?;
        let reduced_at = Instant::now();
        let tp = dist.tp.comm();
        let (m, _, _) = optimizer_step(
            model, reduced, loss, &mut opt, &rules, &trainable, settings, tp, &split,
        );
        model = m;
        TrainBackend::sync(device)?;
        if i == 0 {
            times.first_step = start.elapsed().as_secs_f64();
        }
        if i > 0 {
            let (tp_secs, b, calls) = dist.tp.stats().read();
            (times.tp_bytes, times.tp_calls) = (b, calls);
            times
                .compute
                .push(mid.duration_since(start).as_secs_f64() - tp_secs);
            times.tp_comm.push(tp_secs);
            times
                .all_reduce
                .push(reduced_at.duration_since(mid).as_secs_f64());
            times.optim.push(reduced_at.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

/// The two lines: the step's parts and communication, then the whole step against the peak.
/// The figures; `device` is what the rank computes on and its known matmul peak (a GPU's), else
/// the CPU's peak is counted from its cores, lanes and clock.
fn report(
    recipe: &tern_train::Recipe,
    dist: &tern_dist::Dist,
    times: &StepTimes,
    device: (String, Option<f64>),
) -> Result<()> {
    let (mb, t) = (recipe.train.micro_batch, recipe.data.seq_len + 1);
    let c = median(times.compute.clone());
    let m = median(times.all_reduce.clone());
    let tpm = median(times.tp_comm.clone());
    let o = median(times.optim.clone());
    let n = dist.topo.dp as f64;
    let bus = if n > 1.0 {
        2.0 * (n - 1.0) / n * times.grad_bytes as f64 / m / 1e9
    } else {
        0.0
    };
    let tokens = (mb * (t - 1)) as f64;
    println!(
        "bench {} | backend {} | {} process(es), tp {} x dp {} | {:.2}M params | micro_batch {mb} x seq {} \
         | compute (fwd+bwd) {:.1} ms | tensor-parallel collectives {:.1} ms ({} calls, {:.1} MB) \
         | gradient all-reduce {:.1} ms of {:.1} MB ({:.2} GB/s bus) | {:.0} tokens/s per data-parallel group",
        recipe.name(),
        backend_name(),
        dist.topo.world,
        dist.topo.tp,
        dist.topo.dp,
        recipe.model.num_params() as f64 / 1e6,
        t - 1,
        c * 1e3,
        tpm * 1e3,
        times.tp_calls,
        times.tp_bytes as f64 / 1e6,
        m * 1e3,
        times.grad_bytes as f64 / 1e6,
        bus,
        tokens / (c + tpm + m)
    );
    let step = c + tpm + m + o;
    let plan = tern_train::plan::plan(recipe, dist.topo.world).map_err(anyhow::Error::msg)?;
    // This rank's share: a tensor-parallel rank computes 1/tp of the block matrices' products.
    let flops = plan.train_flops_per_token * tokens / dist.topo.tp as f64;
    let (peak, what) = match device {
        (name, Some(tflops)) => (tflops * 1e12, format!("{name}, dense matmul peak")),
        _ => peak_flops(rayon::current_num_threads()),
    };
    println!(
        "train step | {} optimizer {:.1} ms | step {:.1} ms | {:.0} tokens/s | {:.1} GFLOP/s on this rank, \
         MFU {:.1}% of its peak {:.0} GFLOP/s ({what}) | first step {:.1} s",
        match recipe.optim.name {
            tern_optim::OptimizerName::Adamw => "adamw",
            tern_optim::OptimizerName::GaloreAdamw => "galore_adamw",
        },
        o * 1e3,
        step * 1e3,
        tokens / step,
        flops / step / 1e9,
        100.0 * flops / step / peak.max(1.0),
        peak / 1e9,
        times.first_step,
    );
    Ok(())
}

/// GaLore's projection refresh: every block matrix's leading singular vectors (each distinct
/// shape timed once on a random gradient, times its count), exact and randomized, per refresh and
/// amortised over the gap.
fn galore_refresh_cost(
    recipe: &tern_train::Recipe,
    device: &<crate::Compute as BackendTypes>::Device,
) {
    use tern_optim::galore::side_of;
    use tern_optim::svd::{leading_singular_vectors, randomized_singular_vectors};
    let o = &recipe.optim;
    let rank = o.rank.expect("validated");
    let mut shapes: Vec<(Vec<usize>, usize)> = Vec::new();
    for (name, shape) in recipe.model.param_shapes() {
        // What GaLore projects: block matrices whose smaller side reaches the rank.
        if tern_parallel::is_block_matrix(&name) && shape[0].min(shape[1]) >= rank {
            match shapes.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, n)) => *n += 1,
                None => shapes.push((shape, 1)),
            }
        }
    }
    let mut rng = SplitMix64(7);
    let (mut exact, mut randomized) = (0.0, 0.0);
    let mut parts = Vec::new();
    for (shape, count) in &shapes {
        let (m, n) = (shape[0], shape[1]);
        let side = side_of(o.proj_type, m, n);
        let g: Vec<f32> = (0..m * n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let start = Instant::now();
        drop(leading_singular_vectors(&g, m, n, rank, side));
        let e = start.elapsed().as_secs_f64();
        let t = Tensor::<crate::Compute, 2>::from_data(TensorData::new(g, [m, n]), device);
        let start = Instant::now();
        drop(randomized_singular_vectors(
            &t,
            rank,
            side,
            o.svd_oversample,
            o.svd_iters,
            1,
        ));
        let r = start.elapsed().as_secs_f64();
        exact += e * *count as f64;
        randomized += r * *count as f64;
        parts.push(format!(
            "{m}x{n} x {count}: {:.1} / {:.1} ms",
            e * 1e3,
            r * 1e3
        ));
    }
    let gap = o.update_proj_gap as f64;
    println!(
        "galore refresh, rank {rank} | exact SVD {:.2} s ({:.1} ms per step over update_proj_gap = {}) \
         | randomized ({} oversample, {} iterations) {:.2} s ({:.1} ms per step) | exact / randomized per matrix: {}",
        exact,
        exact * 1e3 / gap,
        o.update_proj_gap,
        o.svd_oversample,
        o.svd_iters,
        randomized,
        randomized * 1e3 / gap,
        parts.join(", ")
    );
}
