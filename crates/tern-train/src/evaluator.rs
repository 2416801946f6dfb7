//! Validation: the first `train.eval_batches * train.micro_batch` held-out blocks, always the same
//! ones, evaluated by the first data-parallel group (all its tensor-parallel ranks take part).

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use tern_data::ValData;
use tern_kernels::Kernels;
use tern_model::{Hooks, Llama};

use crate::objective::batch_tensor;

pub struct Evaluator<B: Backend> {
    /// The validation micro-batches (none on ranks that do not evaluate).
    pub batches: Vec<Tensor<B, 2, Int>>,
    every: u64,
}

impl<B: Kernels> Evaluator<B> {
    /// Reads `n` blocks of `block_len` tokens in micro-batches of `micro` when this rank
    /// `evaluates` and `every > 0` (every `every` steps and at the last).
    pub fn new(
        val: &mut ValData,
        n: usize,
        micro: usize,
        block_len: usize,
        every: u64,
        evaluates: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let mut batches = Vec::new();
        let mut start = 0;
        while evaluates && every > 0 && start < n {
            let count = micro.min(n - start);
            let tokens = val.read(start as u64, count)?;
            batches.push(batch_tensor::<B>(&tokens, block_len, device));
            start += count;
        }
        Ok(Self { batches, every })
    }

    /// Whether to evaluate after (1-based) step `step`.
    pub fn due(&self, step: u64, last: bool) -> bool {
        !self.batches.is_empty() && (step.is_multiple_of(self.every) || last)
    }

    /// The model's mean next-token loss over the validation micro-batches (weighted by their
    /// sizes; auxiliary losses are training's, not validation's).
    pub fn loss<H: Hooks<B>>(&self, model: &Llama<B, H>) -> f64 {
        let (mut sum, mut n) = (0.0, 0);
        for x in &self.batches {
            let count = x.dims()[0];
            let l: f64 = model.losses(x.clone()).0.into_scalar().elem();
            sum += l * count as f64;
            n += count;
        }
        sum / n as f64
    }
}
