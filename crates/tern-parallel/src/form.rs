//! The parallel forms of a projection, as TorchTitan's `ColwiseParallel`, `RowwiseParallel` and
//! `PrepareModuleInput`: what acts at each of the model's [`Hooks`] when a projection holds a shard.
//! The collectives are Megatron's conjugate pair from tern-dist (f: identity forward, gradient
//! summed backward; g: summed forward, identity backward) and tensor collectives for the row
//! statistics, which carry no gradient.

use burn::tensor::Tensor;
use tern_dist::{CollectiveBackend, TensorCollectives, TpGroup};
use tern_model::Hooks;

/// How one projection (or the input a module's column-parallel projections share) is split over
/// a tensor-parallel group.
#[derive(Debug, Clone, Default)]
pub enum TpForm {
    /// Held whole on every rank (the embedding's head, a group of one).
    #[default]
    Replicated,
    /// A block of output rows: its replicated input needs f, which the module applies once to its
    /// input ([`TpForm::SharedInput`]) or, behind a distillation encoder, this projection applies
    /// to the encoder's output.
    Colwise(TpGroup),
    /// A block of input columns: its partial output goes through g. BitNet's norm and absmax and
    /// Q-Sparse's top-K are over the whole row; a distillation encoder in front of it is split
    /// like Megatron's MLP the other way round (`fc1` by input columns, then g; f before `fc2`,
    /// split by output rows).
    Rowwise(TpGroup),
    /// The input of an attention or MLP module, shared by its column-parallel projections: f once
    /// (one gradient all-reduce for q, k and v, one for gate and up).
    SharedInput(TpGroup),
}

impl TpForm {
    fn rowwise(&self) -> Option<&TpGroup> {
        match self {
            TpForm::Rowwise(g) if g.size() > 1 => Some(g),
            _ => None,
        }
    }
}

impl<B: CollectiveBackend> Hooks<B> for TpForm {
    fn module_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            TpForm::SharedInput(g) => B::copy_to_group(x, g),
            _ => x,
        }
    }

    fn encoder_hidden<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        match self.rowwise() {
            Some(g) => B::reduce_from_group(h, g),
            None => h,
        }
    }

    fn encoder_inner<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        match self.rowwise() {
            Some(g) => B::copy_to_group(h, g),
            None => h,
        }
    }

    fn encoder_output<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            TpForm::Colwise(g) => B::copy_to_group(x, g),
            _ => x,
        }
    }

    /// f then g: the sum is all-reduced forward and its gradient all-reduced backward, since
    /// every rank's block of the row depends on it.
    fn row_sum<const D: usize>(&self, s: Tensor<B, D>) -> Tensor<B, D> {
        match self.rowwise() {
            Some(g) => B::reduce_from_group(B::copy_to_group(s, g), g),
            None => s,
        }
    }

    fn row_len(&self, local: usize) -> usize {
        self.rowwise().map_or(local, |g| local * g.size())
    }

    /// The ranks' row maxima, gathered side by side, and their maximum.
    fn row_max<const D: usize>(&self, m: Tensor<B, D>) -> Tensor<B, D> {
        match self.rowwise() {
            Some(g) => g.comm().all_gather_tensor(m, D - 1).max_dim(D - 1),
            None => m,
        }
    }

    fn on_whole_rows<const D: usize>(
        &self,
        x: Tensor<B, D>,
        f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self.rowwise() {
            Some(g) => {
                let d = x.dims()[D - 1];
                let whole = g.comm().all_gather_tensor(x, D - 1);
                f(whole).narrow(D - 1, g.rank() * d, d)
            }
            None => f(x),
        }
    }

    fn output<const D: usize>(&self, y: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            TpForm::Rowwise(g) => B::reduce_from_group(y, g),
            _ => y,
        }
    }

    fn splits_input(&self) -> bool {
        matches!(self, TpForm::Rowwise(_))
    }

    fn splits_output(&self) -> bool {
        matches!(self, TpForm::Colwise(_))
    }
}
