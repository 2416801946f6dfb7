//! The arithmetic of one optimizer step, shared by the trainer and the parity tests: gradients
//! accumulated over micro-batches, the global gradient norm over the tensor-parallel group,
//! clipping, and the optimizer's update of the trainable parameters.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use tern_dist::Comm;
use tern_optim::{clip_scale, squared_norms, Optimizer};

use crate::params::{assign_some_trainable, assign_trainable, flat_grads, flat_values};

/// The sum of the micro-batches' gradients (module order) and losses. The losses are summed on
/// the device and read back once, in [`GradAccumulator::mean`]: a read per micro-batch would make
/// the host wait for the device after every backward pass.
pub struct GradAccumulator<B: Backend> {
    sum: Option<Vec<Tensor<B, 1>>>,
    loss_sum: Option<Tensor<B, 1>>,
    count: usize,
}

impl<B: Backend> Default for GradAccumulator<B> {
    fn default() -> Self {
        Self {
            sum: None,
            loss_sum: None,
            count: 0,
        }
    }
}

impl<B: Backend> GradAccumulator<B> {
    /// Runs the backward pass of one micro-batch's `loss` and adds its gradients and its value.
    pub fn add<AB, M>(&mut self, model: &M, loss: Tensor<AB, 1>)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let value = loss.clone().inner();
        let g = flat_grads(model, &loss.backward());
        self.push(value, g);
    }

    /// Adds one micro-batch's loss value and gradients computed elsewhere (block recompute).
    pub fn push(&mut self, value: Tensor<B, 1>, g: Vec<Tensor<B, 1>>) {
        self.sum = Some(match self.sum.take() {
            None => g,
            Some(a) => a.into_iter().zip(g).map(|(a, g)| a + g).collect(),
        });
        self.loss_sum = Some(match self.loss_sum.take() {
            None => value,
            Some(s) => s + value,
        });
        self.count += 1;
    }

    /// The mean loss and the mean gradients over the micro-batches added (equal sizes: the
    /// gradient of the mean loss over all their sequences).
    pub fn mean(self) -> (f64, Vec<Tensor<B, 1>>) {
        let n = self.count.max(1) as f64;
        let sum = self.sum.expect("at least one micro-batch");
        let loss: f64 = self.loss_sum.expect("a loss").into_scalar().elem();
        // One micro-batch: the sum is the mean (x / 1 is x), no pass over the gradients.
        let grads = if self.count == 1 {
            sum
        } else {
            sum.into_iter().map(|g| g.div_scalar(n)).collect()
        };
        (loss / n, grads)
    }
}

/// The step's gradients (module order) as the update takes them: those of whole parameters
/// that cover this rank's positions only (`partial`, sequence parallelism) summed over the
/// tensor-parallel group, then every one averaged over the data-parallel group (with ZeRO-1,
/// `zero`, this rank's chunk of each).
pub fn reduce_gradients<B: Backend>(
    grads: Vec<Tensor<B, 1>>,
    partial: &[bool],
    dist: &tern_dist::Dist,
    zero: bool,
) -> Vec<Tensor<B, 1>> {
    let mut grads: Vec<Option<Tensor<B, 1>>> = grads.into_iter().map(Some).collect();
    let which: Vec<usize> = (0..grads.len()).filter(|&i| partial[i]).collect();
    if !which.is_empty() {
        let parts = which
            .iter()
            .map(|&i| grads[i].take().expect("once"))
            .collect();
        let summed = tern_dist::comm::all_reduce_sum_tensors(
            dist.tp.comm(),
            parts,
            tern_dist::comm::BUCKET_ELEMS,
        );
        for (i, g) in which.into_iter().zip(summed) {
            grads[i] = Some(g);
        }
    }
    let grads = grads
        .into_iter()
        .map(|g| g.expect("every gradient"))
        .collect();
    tern_dist::comm::mean_gradients(dist.dp.as_ref(), grads, zero)
}

/// How the optimizer's state is split over the data-parallel group (`parallel.zero`).
pub enum StateSplit<'a> {
    /// Every rank holds all of it.
    Whole,
    /// ZeRO-1 for AdamW: each rank the moments of its chunk of every parameter
    /// ([`tern_dist::dp_chunk`]); gradients reduce-scattered, weights all-gathered.
    Chunks(&'a dyn Comm),
    /// ZeRO-1 with whole parameters (GaLore, whose projection needs a matrix's whole gradient):
    /// each parameter's state on one rank, its owner (`owns[i]`: this rank), which alone
    /// updates it; gradients all-reduced, and the owners' new weights summed over the group
    /// (every other rank adds zeros, so the sum is the owner's value exactly).
    Owners(&'a dyn Comm, Vec<bool>),
}

impl StateSplit<'_> {
    /// The gradients are reduce-scattered: each rank receives its chunks.
    pub fn chunked(&self) -> bool {
        matches!(self, Self::Chunks(_))
    }
}

/// What an update needs to know of each parameter, in module order.
#[derive(Debug, Clone)]
pub struct UpdateRules {
    /// Takes weight decay (matrices).
    pub decay: Vec<bool>,
    /// This rank holds a tensor-parallel block of it (its squared norm is summed over the group).
    pub sharded: Vec<bool>,
}

/// The settings of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    pub weight_decay: f64,
    /// Global-norm clipping threshold (0: off).
    pub grad_clip: f64,
}

/// The gradient norm of the whole model: replicated gradients once (they are equal on every
/// tensor-parallel rank), the shards' squares summed over the group `tp`. With `chunks` (ZeRO-1)
/// each gradient is this rank's chunk of it, and the squares are first summed over that group.
pub fn global_grad_norm<B: tern_kernels::Kernels>(
    grads: &[Tensor<B, 1>],
    sharded: &[bool],
    tp: &dyn Comm,
    chunks: Option<&dyn Comm>,
) -> f64 {
    let (mut replicated, mut shards) = (0.0, 0.0);
    for (x, &s) in squared_norms(grads).iter().zip(sharded) {
        *(if s { &mut shards } else { &mut replicated }) += x;
    }
    if let Some(dp) = chunks {
        (replicated, shards) = (
            dp.all_reduce_sum_f64(replicated),
            dp.all_reduce_sum_f64(shards),
        );
    }
    (replicated + tp.all_reduce_sum_f64(shards)).sqrt()
}

/// One optimizer step from the batch's mean gradients: frozen parameters' gradients zeroed (they
/// take no part in the norm and no update), the global norm clipped, then the update, unless the
/// loss or the norm is not finite (the step is skipped). Returns the model, the gradient norm
/// before clipping and whether the update was applied.
///
/// With a distributed optimizer (ZeRO-1, `split`): with [`StateSplit::Chunks`] `grads` are this
/// rank's chunks of the mean gradients ([`tern_dist::reduce_scatter_mean_tensors`]), `opt`
/// holds the moments of those chunks only, each rank updates its chunks and the updated weights
/// are all-gathered whole; with [`StateSplit::Owners`] each rank updates the parameters it owns
/// and the group sums the new weights (zeros from the others).
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B, M>(
    model: M,
    mut grads: Vec<Tensor<B::InnerBackend, 1>>,
    loss: f64,
    opt: &mut Optimizer<B::InnerBackend>,
    rules: &UpdateRules,
    trainable: &[bool],
    s: StepSettings,
    tp: &dyn Comm,
    split: &StateSplit,
) -> (M, f64, bool)
where
    B: AutodiffBackend,
    B::InnerBackend: tern_kernels::Kernels,
    M: AutodiffModule<B>,
{
    for (g, &t) in grads.iter_mut().zip(trainable) {
        if !t {
            *g = g.zeros_like();
        }
    }
    let chunks = match split {
        StateSplit::Chunks(dp) => Some(*dp),
        _ => None,
    };
    let norm = global_grad_norm(&grads, &rules.sharded, tp, chunks);
    if !(loss.is_finite() && norm.is_finite()) {
        return (model, norm, false);
    }
    let params = flat_values::<B::InnerBackend, _>(&model.valid());
    let sizes: Vec<usize> = params.iter().map(|p| p.dims()[0]).collect();
    let params = match chunks {
        Some(dp) => params
            .into_iter()
            .map(|p| {
                let (start, len) = tern_dist::dp_chunk(p.dims()[0], dp.rank(), dp.size());
                p.narrow(0, start, len)
            })
            .collect(),
        None => params,
    };
    let here: Vec<bool> = match split {
        StateSplit::Owners(_, owns) => trainable.iter().zip(owns).map(|(&t, &o)| t && o).collect(),
        _ => trainable.to_vec(),
    };
    let updated = opt.step(
        params,
        grads,
        clip_scale(norm, s.grad_clip),
        s.lr,
        s.weight_decay,
        &rules.decay,
        &here,
    );
    let bucket = tern_dist::comm::BUCKET_ELEMS;
    let updated = match split {
        StateSplit::Chunks(dp) => {
            // Each bucket's gathered weights replace the old ones at once: one bucket, not the
            // whole model, is held twice.
            let mut model = Some(model);
            tern_dist::comm::all_gather_chunks_each(*dp, updated, &sizes, bucket, |at, whole| {
                let mut values: Vec<Option<_>> = vec![None; sizes.len()];
                for (i, w) in at.zip(whole) {
                    values[i] = Some(w);
                }
                model = model.take().map(|m| assign_some_trainable(m, values));
            });
            return (model.expect("the model"), norm, true);
        }
        StateSplit::Owners(dp, owns) => {
            let mine = updated
                .into_iter()
                .zip(owns)
                .map(|(w, &o)| if o { w } else { w.zeros_like() })
                .collect();
            tern_dist::all_reduce_sum_tensors(*dp, mine, bucket)
        }
        StateSplit::Whole => updated,
    };
    (assign_trainable(model, updated), norm, true)
}
