//! The points of a projection's forward pass where something applied from outside the model acts,
//! as TorchTitan's parallel styles and PyTorch's forward hooks do: tensor parallelism's collectives
//! (crate tern-parallel), an observer of the projections' inputs and outputs (distillation's taps,
//! [`crate::taps`]). The model calls the hooks; it does not know what they do. The plain model's
//! [`NoHooks`] leaves every tensor as it is.

use std::fmt::Debug;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

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
}

/// The plain model: no hook does anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoHooks;

impl<B: Backend> Hooks<B> for NoHooks {}
