use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use tern_data::sampler::SplitMix64;
use tern_model::Llama;
use tern_parallel::{parallelize, TpLlama};

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

/// Forward + backward of one micro-batch of random tokens, as the trainer runs it (with this
/// rank's tensor-parallel shard), then (under `mpirun`) the bucketed data-parallel gradient
/// all-reduce. Prints compute time, the time of the tensor-parallel collectives inside forward and
/// backward, and the gradient all-reduce with its bus bandwidth (NCCL's convention:
/// 2 (n-1)/n x bytes / time).
pub fn run(a: BenchArgs) -> Result<()> {
    if a.matmul {
        return crate::bench_matmul::run(&a.shapes, &a.batches);
    }
    let mut recipe = a.recipe.load()?;
    let dist = crate::start_job(&recipe)?;
    let vocab = *recipe.model.vocab_size.get_or_insert(a.vocab);
    let (mb, t) = (recipe.train.micro_batch, recipe.data.seq_len + 1);
    let device = crate::compute_device(&dist.topo);
    let model: TpLlama<TrainBackend> = parallelize(Llama::new(&recipe.model, &device), &dist.tp);
    let mut rng = SplitMix64(1 + dist.topo.rank as u64);
    let ids: Vec<i64> = (0..mb * t)
        .map(|_| rng.below(vocab as u64) as i64)
        .collect();
    let x = Tensor::<TrainBackend, 2, Int>::from_data(TensorData::new(ids, [mb, t]), &device);
    let (mut compute, mut comm, mut tp_comm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bytes, mut tp_bytes, mut tp_calls) = (0usize, 0u64, 0u64);
    for i in 0..=a.steps {
        dist.tp.stats().reset();
        let start = Instant::now();
        let loss = model.loss(x.clone());
        let grads = loss.backward();
        let flat = tern_train::params::flat_grads(&model, &grads);
        TrainBackend::sync(&device)?;
        let mid = Instant::now();
        bytes = flat.iter().map(|g| g.dims()[0] * 4).sum();
        let reduced = tern_dist::all_reduce_mean_tensors(
            dist.dp.as_ref(),
            flat,
            tern_dist::comm::BUCKET_ELEMS,
        );
        drop(reduced);
        TrainBackend::sync(&device)?;
        if i > 0 {
            let (tp_secs, b, calls) = dist.tp.stats().read();
            (tp_bytes, tp_calls) = (b, calls);
            compute.push(mid.duration_since(start).as_secs_f64() - tp_secs);
            tp_comm.push(tp_secs);
            comm.push(mid.elapsed().as_secs_f64());
        }
    }
    if !dist.topo.is_main() {
        return Ok(());
    }

    let (c, m, tpm) = (median(compute), median(comm), median(tp_comm));
    let n = dist.topo.dp as f64;
    let bus = if n > 1.0 {
        2.0 * (n - 1.0) / n * bytes as f64 / m / 1e9
    } else {
        0.0
    };
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
        tp_calls,
        tp_bytes as f64 / 1e6,
        m * 1e3,
        bytes as f64 / 1e6,
        bus,
        (mb * (t - 1)) as f64 / (c + tpm + m)
    );
    if recipe.optim.name == tern_optim::OptimizerName::GaloreAdamw {
        galore_refresh_cost(&recipe, &device);
    }
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
        if tern_parallel::block_matrix_dim(&name).is_some() {
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
