use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use tern_data::sampler::SplitMix64;
use tern_model::Llama;

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
}

/// Forward + backward of one micro-batch of random tokens, as the trainer runs it.
pub fn run(a: BenchArgs) -> Result<()> {
    let mut recipe = a.recipe.load()?;
    let vocab = *recipe.model.vocab_size.get_or_insert(a.vocab);
    let (mb, t) = (recipe.train.micro_batch, recipe.data.seq_len + 1);
    crate::check_device()?;
    let device = Default::default();
    let model: Llama<TrainBackend> = Llama::new(&recipe.model, &device);
    let mut rng = SplitMix64(1);
    let ids: Vec<i64> = (0..mb * t)
        .map(|_| rng.below(vocab as u64) as i64)
        .collect();
    let x = Tensor::<TrainBackend, 2, Int>::from_data(TensorData::new(ids, [mb, t]), &device);
    let mut times = Vec::new();
    for i in 0..=a.steps {
        let start = Instant::now();
        let loss = model.loss(x.clone());
        let grads = loss.backward();
        drop(grads);
        TrainBackend::sync(&device)?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let tokens = (mb * (t - 1)) as f64;
    println!(
        "bench {} | backend {} | {:.2}M params | micro_batch {mb} x seq {} | fwd+bwd median {:.1} ms (min {:.1}) | {:.0} tokens/s",
        recipe.name(),
        backend_name(),
        recipe.model.num_params() as f64 / 1e6,
        t - 1,
        median * 1e3,
        times[0] * 1e3,
        tokens / median
    );
    Ok(())
}
