//! Mixture-of-Depths (Raposo et al. 2024): a router scores each token entering a block, and only
//! the tokens it picks go through the block (its attention sees only them); the others pass
//! along the residual stream unchanged. A picked token's update is weighted by
//! `sigmoid(score)`, which is how the language-model loss reaches the router.
//!
//! The paper picks the top `capacity` share of each sequence's tokens in training. That choice
//! depends on every token of the sequence, later ones included, so a model trained that way
//! sees the future (the failure the optimized-LLM project reports). Here the pick is causal in
//! training and in generation alike: a token goes through the block when its score is above 0
//! (`sigmoid > 0.5`), which reads the token alone. The paper's top-`capacity` set only enters as
//! the target of the router's auxiliary loss (binary cross-entropy of `sigmoid(score)` against
//! membership of that set), which teaches the threshold to pick about `capacity` of the tokens.
//! Losses are not logits, so the targets' look at later scores changes no prediction.

use burn::module::{Module, Param};
use burn::tensor::activation::softplus;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_kernels::Kernels;

/// `[model.mod]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModConfig {
    /// The share of each sequence's tokens the router learns to send through a routed block
    /// (the paper's 12.5%).
    pub capacity: f64,
    /// Block `i` is routed when `i % period == offset` (the paper routes every other block);
    /// the offset is 1 when absent (0 with a period of 1).
    #[serde(default = "two")]
    pub period: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    /// Weight of the router's auxiliary loss in the training objective.
    #[serde(default = "crate::config::default_aux_weight")]
    pub aux_loss_weight: f64,
}

fn two() -> usize {
    2
}

impl ModConfig {
    pub fn offset(&self) -> usize {
        self.offset.unwrap_or(1.min(self.period.saturating_sub(1)))
    }
}

/// A block's router: one score per token, `x . weight`.
#[derive(Module, Debug)]
pub struct DepthRouter<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub capacity: f64,
}

impl<B: Kernels> DepthRouter<B> {
    /// Scores of `x: [batch, seq, hidden]`, `[batch, seq]`.
    pub fn scores(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, l, h] = x.dims();
        // B::linear: padded where a backend needs it (burn-cuda's k % 64 == 32).
        <B as Kernels>::linear(x.reshape([b * l, h]), self.weight.val().reshape([1, h]))
            .reshape([b, l])
    }
}

impl<B: Backend> DepthRouter<B> {
    /// The auxiliary loss: binary cross-entropy of `sigmoid(scores)` against each row's top
    /// `ceil(capacity * seq)` scores (`host`, the same scores read back), mean over tokens.
    pub fn aux_loss(&self, scores: Tensor<B, 2>, host: &[f32]) -> Tensor<B, 1> {
        let [b, l] = scores.dims();
        let k = ((self.capacity * l as f64).ceil() as usize).clamp(1, l);
        let mut target = vec![0f32; b * l];
        for (row, t) in host.chunks(l).zip(target.chunks_mut(l)) {
            let mut order: Vec<usize> = (0..l).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            for &i in &order[..k] {
                t[i] = 1.0;
            }
        }
        let target = Tensor::<B, 2>::from_data(TensorData::new(target, [b, l]), &scores.device());
        // -t log s(x) - (1 - t) log(1 - s(x)) = softplus(x) - t x
        (softplus(scores.clone(), 1.0) - scores * target).mean()
    }
}

/// A router's decision over `[batch, seq]` tokens.
pub struct Pick<B: Backend> {
    /// The scores, `[batch, seq]`.
    pub scores: Tensor<B, 2>,
    /// The same, read back (`[batch * seq]`).
    pub host: Vec<f32>,
    /// Each row's picked positions: the causal rule, score above 0.
    pub rows: Vec<Vec<i64>>,
}

impl<B: Kernels> DepthRouter<B> {
    /// Scores `x: [batch, seq, hidden]` and picks each row's tokens (one read-back).
    pub fn pick(&self, x: Tensor<B, 3>) -> Pick<B> {
        let seq = x.dims()[1];
        let scores = self.scores(x);
        let host: Vec<f32> =
            (scores.clone().into_data().convert::<f32>().to_vec()).expect("f32 scores");
        let rows = host
            .chunks(seq)
            .map(|row| (0..seq as i64).filter(|&t| row[t as usize] > 0.0).collect())
            .collect();
        Pick { scores, host, rows }
    }
}
