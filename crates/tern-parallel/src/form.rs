//! The parallel forms of a projection, as TorchTitan's `ColwiseParallel`, `RowwiseParallel` and
//! `PrepareModuleInput`: what acts at each of the model's [`Hooks`] when a projection holds a shard.
//! The collectives are Megatron's conjugate pair from tern-dist (f: identity forward, gradient
//! summed backward; g: summed forward, identity backward) and tensor collectives for the row
//! statistics, which carry no gradient.

use burn::tensor::{Int, Tensor};
use tern_dist::{CollectiveBackend, TensorCollectives, TpGroup};
use tern_kernels::Kernels;
use tern_model::Hooks;

/// How one projection (or the input a module's column-parallel projections share) is split over
/// a tensor-parallel group.
#[derive(Debug, Clone, Default)]
pub enum TpForm {
    /// No collective at the projection: held whole on every rank (a group of one), or the LM
    /// head, whose split of the vocabulary the model's ends ([`TpForm::Ends`]) handle.
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
    /// [`TpForm::SharedInput`] coming from a sequence-parallel region: this rank's block of the
    /// positions, all-gathered along the sequence (the gradient reduce-scattered).
    SequenceInput(TpGroup),
    /// [`TpForm::Rowwise`] leaving into a sequence-parallel region: the partial output is
    /// reduce-scattered along the sequence instead of all-reduced (the gradient all-gathered).
    RowwiseToSequence(TpGroup),
    /// The model's ends ([`Split`]): the embedding, the head's input and the loss.
    Ends(Split),
}

/// What a tensor-parallel group splits at the model's ends beside the blocks.
#[derive(Debug, Clone)]
pub struct Split {
    pub group: TpGroup,
    /// The vocabulary: the embedding's and the head's rows (rank r holds ids
    /// `r * V/tp .. (r+1) * V/tp`), a masked lookup summed over the group, and a cross-entropy
    /// from the ranks' maxima and sums of exponentials that never gathers the logits.
    pub vocab: bool,
    /// The sequence (Megatron-SP): the norms and residuals between the blocks' parallel
    /// projections hold this rank's block of the positions.
    pub sequence: bool,
}

impl TpForm {
    fn rowwise(&self) -> Option<&TpGroup> {
        match self {
            TpForm::Rowwise(g) | TpForm::RowwiseToSequence(g) if g.size() > 1 => Some(g),
            _ => None,
        }
    }
}

/// This rank's block of `x` along `dim` (its positions of a sequence-parallel region).
fn own_block<B: burn::tensor::backend::Backend, const D: usize, K>(
    x: Tensor<B, D, K>,
    g: &TpGroup,
    dim: usize,
) -> Tensor<B, D, K>
where
    K: burn::tensor::BasicOps<B>,
{
    let n = x.dims()[dim];
    // The recipe checks data.seq_len; anything else is a bug, not a position to drop.
    assert!(
        n.is_multiple_of(g.size()),
        "internal: {n} positions do not split over {} ranks",
        g.size()
    );
    let len = n / g.size();
    x.narrow(dim, g.rank() * len, len)
}

/// Mean cross-entropy of this rank's block of the vocabulary's `logits: [batch, seq, V/tp]`
/// against `targets: [batch, seq]`: ln sum_j exp(z_j - m) - (z_t - m), with the maximum m (no
/// gradient: the loss does not depend on it), the sum of exponentials and the target's logit
/// (held by one rank, zero on the others) each summed over the group with g. Every rank gets the
/// whole loss; its backward gives each rank the gradient of its own block of logits.
fn vocab_parallel_loss<B: CollectiveBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    g: &TpGroup,
) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    let n = b * t;
    let z = logits.reshape([n, v]);
    let m = g
        .comm()
        .all_gather_tensor(z.clone().detach().max_dim(1), 1)
        .max_dim(1);
    let shifted = z - m;
    let sum_exp = B::reduce_from_group(shifted.clone().exp().sum_dim(1), g);
    let (ids, inside) = local_ids(targets.reshape([n]), v, g);
    let picked = shifted.gather(1, ids.reshape([n, 1])) * inside.reshape([n, 1]);
    let target = B::reduce_from_group(picked, g);
    (sum_exp.log() - target).mean()
}

/// Token ids as rows of this rank's block of `v` rows of the vocabulary: the row (0 for ids the
/// block does not hold) and 1.0 where the block holds the id, else 0.0.
fn local_ids<B: burn::tensor::backend::Backend, const D: usize>(
    ids: Tensor<B, D, Int>,
    v: usize,
    g: &TpGroup,
) -> (Tensor<B, D, Int>, Tensor<B, D>) {
    let ids = ids.sub_scalar((g.rank() * v) as i64);
    let inside = ids.clone().greater_equal_elem(0).int() * ids.clone().lower_elem(v as i64).int();
    let outside = inside.clone().equal_elem(0);
    (ids.mask_fill(outside, 0), inside.float())
}

impl<B: CollectiveBackend> Hooks<B> for TpForm {
    fn module_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            TpForm::SharedInput(g) => B::copy_to_group(x, g),
            TpForm::SequenceInput(g) => B::gather_from_group(x, g, 1),
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
            TpForm::RowwiseToSequence(g) => B::scatter_to_group(y, g, 1),
            _ => y,
        }
    }

    fn splits_input(&self) -> bool {
        matches!(self, TpForm::Rowwise(_) | TpForm::RowwiseToSequence(_))
    }

    fn splits_output(&self) -> bool {
        matches!(self, TpForm::Colwise(_))
    }

    /// Vocabulary split: each rank looks up the ids its rows hold (zero for the others), and the
    /// sum over the group (g) is the embedding; under sequence parallelism the sum is
    /// reduce-scattered, each rank keeping its positions. Sequence split alone: this rank's
    /// positions of the whole lookup.
    fn embed(&self, table: Tensor<B, 2>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let TpForm::Ends(s) = self else {
            return burn::tensor::module::embedding(table, tokens);
        };
        let g = &s.group;
        if !s.vocab {
            let e = burn::tensor::module::embedding(table, tokens);
            return if s.sequence { own_block(e, g, 1) } else { e };
        }
        let (ids, inside) = local_ids(tokens, table.dims()[0], g);
        let e = burn::tensor::module::embedding(table, ids) * inside.unsqueeze_dim(2);
        match s.sequence {
            true => B::scatter_to_group(e, g, 1),
            false => B::reduce_from_group(e, g),
        }
    }

    /// The vocabulary-parallel head is column-parallel: f on its replicated input, or under
    /// sequence parallelism the positions all-gathered. A head over the whole vocabulary under
    /// sequence parallelism alone sees this rank's positions only.
    fn head_input(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            TpForm::Ends(s) if s.vocab && s.sequence => B::gather_from_group(x, &s.group, 1),
            TpForm::Ends(s) if s.vocab => B::copy_to_group(x, &s.group),
            _ => x,
        }
    }

    /// Vocabulary split: the vocabulary-parallel cross-entropy. Sequence split alone: the mean
    /// over this rank's positions, divided by the group's size and summed over it (g), so every
    /// rank gets the whole loss and the gradient of its own positions.
    fn loss(&self, logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1>
    where
        B: Kernels,
    {
        match self {
            TpForm::Ends(s) if s.vocab => vocab_parallel_loss(logits, targets, &s.group),
            TpForm::Ends(s) if s.sequence => {
                let g = &s.group;
                let mine = tern_model::cross_entropy(logits, own_block(targets, g, 1));
                B::reduce_from_group(mine.div_scalar(g.size() as f64), g)
            }
            _ => tern_model::cross_entropy(logits, targets),
        }
    }

    fn whole_logits(&self, logits: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            TpForm::Ends(s) if s.vocab => s.group.comm().all_gather_tensor(logits, 2),
            TpForm::Ends(s) if s.sequence => s.group.comm().all_gather_tensor(logits, 1),
            _ => logits,
        }
    }
}
