//! The points of a projection's forward pass where something applied from outside the model acts,
//! as TorchTitan's parallel styles and PyTorch's forward hooks do: tensor parallelism's collectives
//! (crate tern-parallel), an observer of the projections' inputs and outputs (distillation's taps,
//! [`crate::taps`]). The model calls the hooks; it does not know what they do. The plain model's
//! [`NoHooks`] leaves every tensor as it is.

use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use tern_kernels::Kernels;

/// Hooks of one projection (and of the module input its column-parallel projections share). Every
/// default is the identity, which is the whole model in one process.
pub trait Hooks<B: Backend>: Clone + Debug + Send + Sync {
    /// The input an attention or MLP module hands to its column-parallel projections (once for
    /// q, k, v and once for gate, up).
    fn module_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x
    }

    /// A distillation encoder's hidden layer right after its first matrix.
    fn encoder_hidden<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        h
    }

    /// The encoder's hidden layer (after ReLU) as its second matrix takes it.
    fn encoder_inner<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        h
    }

    /// The encoder's output, as the projection's matmul takes it.
    fn encoder_output<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x
    }

    /// A per-row sum over the projection's input (BitNet's RMSNorm), `[.., 1]`.
    fn row_sum<const D: usize>(&self, s: Tensor<B, D>) -> Tensor<B, D> {
        s
    }

    /// The length of a whole input row when this tensor holds `local` entries of it.
    fn row_len(&self, local: usize) -> usize {
        local
    }

    /// A per-row maximum over the projection's input (BitNet's absmax), `[.., 1]`, no gradient.
    fn row_max<const D: usize>(&self, m: Tensor<B, D>) -> Tensor<B, D> {
        m
    }

    /// `f` applied to whole input rows (Q-Sparse's top-K): the result for this tensor's entries.
    /// No gradient flows through it.
    fn on_whole_rows<const D: usize>(
        &self,
        x: Tensor<B, D>,
        f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    ) -> Tensor<B, D> {
        f(x)
    }

    /// The projection's output.
    fn output<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        y
    }

    /// Sees the projection's input and output (as the block passes them).
    fn observe<const D: usize>(&self, _input: &Tensor<B, D>, _output: &Tensor<B, D>) {}

    /// This projection's input holds a block of the input's columns (a row-parallel shard).
    fn splits_input(&self) -> bool {
        false
    }

    /// This projection's output holds a block of the output's columns (a column-parallel shard).
    fn splits_output(&self) -> bool {
        false
    }

    // The model's ends, called on the hooks of the model itself ([`crate::Llama::ends`]): the
    // embedding, the head and the loss, where a vocabulary or a sequence split acts.

    /// The embedding of `tokens: [batch, seq]` from `table` (this rank's rows of the table when
    /// the vocabulary is split), `[batch, seq, hidden]` as the first block takes it.
    fn embed(&self, table: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(table, tokens)
    }

    /// The final norm's output as the LM head takes it.
    fn head_input(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }

    /// Mean next-token cross-entropy of the head's `logits: [batch, seq, vocab here]` against
    /// `targets: [batch, seq]` (all positions' targets, whatever the head saw).
    fn loss(&self, logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1>
    where
        B: Kernels,
    {
        crate::model::cross_entropy(logits, targets)
    }

    /// The whole logits `[batch, seq, vocab]` from the head's, for callers that read them (no
    /// gradient flows back through a gather).
    fn whole_logits(&self, logits: Tensor<B, 3>) -> Tensor<B, 3> {
        logits
    }
}

/// The plain model: no hook does anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoHooks;

impl<B: Backend> Hooks<B> for NoHooks {}
