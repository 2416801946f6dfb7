//! The trainer's checkpoints: when to save, the check that every rank holds consistent weights,
//! this rank's pieces of the model and the optimizer, and a run's restore (its slices of every
//! tensor, whatever layout wrote them). The on-disk format and its atomic protocol are
//! [`crate::checkpoint`]'s.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use tern_dist::{to_host, Dist};
use tern_optim::Optimizer;
use tern_parallel::TpLlama;

use super::reader::{Kind, Reader};
use super::{OwnedSave, PendingSave, Piece, Topology, TrainState};
use crate::faults::Faults;
use crate::params::flat_values;
use crate::recipe::Recipe;
use crate::slots::ParamSlots;
use crate::step::StateSplit;
use crate::trainer::Resume;

pub struct CheckpointManager {
    root: PathBuf,
    /// The recipe as resolved, stored in every checkpoint.
    recipe_toml: String,
    keep_last: usize,
    every: u64,
    topology: Topology,
    faults: Faults,
    /// A save being written in the background, with its weights' checksum and rank count.
    pending: Option<(PendingSave, f64, usize)>,
    /// ZeRO-1: the optimizer holds this data-parallel rank's chunk of each moment (AdamW) or the
    /// state of the parameters it owns (GaLore); checkpoints hold them whole (gathered to save,
    /// cut or picked to restore).
    zero: bool,
    optim: tern_optim::OptimConfig,
}

/// A save that was asked for, on a rank of the first data-parallel group (the others write
/// nothing).
pub enum Saved {
    /// Complete: its directory, the weights' checksum, on how many data-parallel ranks.
    Done(PathBuf, f64, usize),
    /// Being written in the background; [`CheckpointManager::finish_pending`] completes it.
    Started(u64),
}

/// A checkpoint read back for this rank: its state, and the reader of its tensors.
pub struct Restored {
    pub state: TrainState,
    reader: Reader,
}

/// A checksum of the weights: equal on every data-parallel rank when they hold the same weights.
fn weights_checksum<'a>(values: impl Iterator<Item = &'a Vec<f32>>) -> f64 {
    values
        .flatten()
        .enumerate()
        .map(|(i, &x)| x as f64 * (1.0 + (i % 7) as f64))
        .sum()
}

fn to_device<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Every optimizer state tensor whole from the data-parallel ranks that own them (GaLore's
/// ZeRO-1): each rank gives the state of its own parameters and zeros for the others, and the
/// group's sum is each owner's value. The update counts and whether a projection exists yet
/// come first, so that every rank lists the same tensors.
fn owners_pieces<B: Backend>(
    opt: &Optimizer<B>,
    slots: &ParamSlots,
    dp: &dyn tern_dist::Comm,
    owns: &[bool],
    dist: &Dist,
) -> Vec<Piece> {
    let mut meta = vec![0f32; 2 * slots.len()];
    for (i, _) in owns.iter().enumerate().filter(|(_, &o)| o) {
        meta[2 * i] = opt.param_step(i) as f32;
        meta[2 * i + 1] = opt.has_projection(i) as u8 as f32;
    }
    dp.all_reduce_sum(&mut meta);
    let (mut pieces, mut values, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in slots.iter().enumerate() {
        let mine = opt.state(i, &s.shape, s.shard);
        let device = mine[0].value.device();
        for (key, full_shape, dim) in opt.layout(i, &s.shape, s.shard) {
            // This rank's length: a split state tensor holds its tensor-parallel block.
            let whole: usize = full_shape.iter().product();
            let len = if dim.is_some() {
                whole / dist.topo.tp
            } else {
                whole
            };
            let piece = |values| Piece {
                name: format!("{}.{key}", s.name),
                full_shape: full_shape.clone(),
                dim,
                values,
            };
            match key {
                "step" => pieces.push(piece(vec![meta[2 * i]])),
                "galore_proj" if meta[2 * i + 1] == 0.0 => {}
                _ => {
                    let own = mine.iter().find(|e| e.key == key).filter(|_| owns[i]);
                    values.push(match own {
                        Some(e) => e.value.clone(),
                        None => Tensor::zeros([len], &device),
                    });
                    at.push(pieces.len());
                    pieces.push(piece(Vec::new()));
                }
            }
        }
    }
    let bucket = tern_dist::comm::BUCKET_ELEMS;
    for (k, t) in at
        .into_iter()
        .zip(tern_dist::all_reduce_sum_tensors(dp, values, bucket))
    {
        pieces[k].values = to_host(t);
    }
    pieces
}

impl CheckpointManager {
    /// Checkpoints of `run_dir` (in `checkpoints/`), every `every` steps (0: only the last).
    pub fn new(run_dir: &Path, recipe: &Recipe, dist: &Dist, faults: Faults) -> Self {
        Self {
            root: run_dir.join("checkpoints"),
            recipe_toml: recipe.to_toml(),
            keep_last: recipe.checkpoint.keep_last,
            every: recipe.train.checkpoint_every,
            topology: Topology {
                tp: dist.topo.tp,
                dp: dist.topo.dp,
            },
            faults,
            pending: None,
            zero: recipe.parallel.zero == 1,
            optim: recipe.optim.clone(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The checkpoint to resume from, if any (before any expensive work).
    pub fn resume_dir(&self, resume: Option<&Resume>) -> Result<Option<PathBuf>> {
        match resume {
            None => Ok(None),
            Some(Resume::Auto) => super::latest(&self.root),
            Some(Resume::Path(p)) => Ok(Some(p.clone())),
        }
    }

    /// Whether to save after (1-based) step `step`.
    pub fn due(&self, step: u64, last: bool) -> bool {
        (self.every > 0 && step.is_multiple_of(self.every)) || last
    }

    /// Opens `dir` for this rank: the run must be the same (model, data, tokenizer, seed as in
    /// `fresh`) and not already finished.
    pub fn restore(&self, dir: &Path, recipe: &Recipe, fresh: &TrainState) -> Result<Restored> {
        let reader = Reader::open(dir)?;
        let saved: Recipe = toml::from_str(&reader.recipe_toml)
            .with_context(|| format!("{}/recipe.toml", dir.display()))?;
        if saved.model != recipe.model {
            bail!("{}: the checkpoint's [model] differs from the recipe's; resume needs the same model", dir.display());
        }
        let s = &reader.state;
        if s.tokenizer_sha256 != fresh.tokenizer_sha256
            || s.data_fingerprint != fresh.data_fingerprint
            || s.seed != fresh.seed
        {
            bail!(
                "{}: the checkpoint was trained on other data, tokenizer or seed (train.seed, data.*); \
                 resuming would not continue the same run",
                dir.display()
            );
        }
        if s.step >= recipe.train.steps {
            bail!(
                "{}: the checkpoint is at step {} and train.steps = {}: nothing left to do (raise train.steps)",
                dir.display(),
                s.step,
                recipe.train.steps
            );
        }
        Ok(Restored {
            state: reader.state.clone(),
            reader,
        })
    }

    /// This rank's block of every parameter, in slot order (read from the parts that hold it).
    pub fn restore_weights<B: Backend>(
        &self,
        r: &Restored,
        slots: &ParamSlots,
        dist: &Dist,
        device: &B::Device,
    ) -> Result<Vec<Tensor<B, 1>>> {
        let at = (dist.topo.tp_rank(), dist.topo.tp);
        slots
            .iter()
            .map(|s| {
                let v = r.reader.read(Kind::Model, &s.name, &s.shape, s.shard, at)?;
                Ok(to_device(v, device))
            })
            .collect()
    }

    /// Sets every optimizer state tensor from a restored checkpoint, in the shapes the recipe's
    /// optimizer keeps (this rank's block of each).
    pub fn restore_optimizer<B: Backend>(
        &self,
        r: &Restored,
        opt: &mut Optimizer<B>,
        slots: &ParamSlots,
        dist: &Dist,
        device: &B::Device,
    ) -> Result<()> {
        let at = (dist.topo.tp_rank(), dist.topo.tp);
        opt.set_steps(r.state.optimizer_step);
        let split = slots.state_split(self.zero, &self.optim, dist);
        for (i, s) in slots.iter().enumerate() {
            if let StateSplit::Owners(_, owns) = &split {
                if !owns[i] {
                    continue;
                }
            }
            for (key, full, shard) in opt.layout(i, &s.shape, s.shard) {
                let name = format!("{}.{key}", s.name);
                if Optimizer::<B>::optional_state(key) && !r.reader.has(Kind::Optim, &name) {
                    if key == "step" {
                        // Written before per-parameter counts were kept: every parameter had
                        // the optimizer's count.
                        opt.set_param_step(i, r.state.optimizer_step);
                    }
                    continue;
                }
                let mut v = r.reader.read(Kind::Optim, &name, &full, shard, at)?;
                if split.chunked() && key != "step" {
                    let (start, len) =
                        tern_dist::dp_chunk(v.len(), dist.topo.dp_rank(), dist.topo.dp);
                    v = v[start..start + len].to_vec();
                }
                opt.set_state(i, key, to_device(v, device));
            }
        }
        Ok(())
    }

    /// Every optimizer state tensor as this rank's tensor-parallel part holds it (with ZeRO-1
    /// gathered whole from the data-parallel ranks' chunks or owners: a collective over them).
    fn optim_pieces<B: Backend>(
        &self,
        opt: &Optimizer<B>,
        slots: &ParamSlots,
        dist: &Dist,
    ) -> Vec<Piece> {
        match slots.state_split(self.zero, &self.optim, dist) {
            StateSplit::Owners(dp, owns) => return owners_pieces(opt, slots, dp, &owns, dist),
            StateSplit::Whole | StateSplit::Chunks(_) => {}
        }
        let mut pieces = Vec::new();
        let (mut chunks, mut sizes, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in slots.iter().enumerate() {
            let n: usize = s.local.iter().product();
            for e in opt.state(i, &s.shape, s.shard) {
                if self.zero && e.key != "step" {
                    at.push(pieces.len());
                    chunks.push(e.value);
                    sizes.push(n);
                    pieces.push(Piece {
                        name: format!("{}.{}", s.name, e.key),
                        full_shape: e.full_shape,
                        dim: e.shard,
                        values: Vec::new(),
                    });
                    continue;
                }
                pieces.push(Piece {
                    name: format!("{}.{}", s.name, e.key),
                    full_shape: e.full_shape,
                    dim: e.shard,
                    values: to_host(e.value),
                });
            }
        }
        let bucket = tern_dist::comm::BUCKET_ELEMS;
        let whole = tern_dist::all_gather_chunks(dist.dp.as_ref(), chunks, &sizes, bucket);
        for (k, t) in at.into_iter().zip(whole) {
            pieces[k].values = to_host(t);
        }
        pieces
    }

    /// Completes the save being written in the background, if any (a collective over the
    /// writing ranks, who all have one at the same steps).
    pub fn finish_pending(&mut self, dist: &Dist) -> Result<Option<(PathBuf, f64, usize)>> {
        let Some((p, sum, ranks)) = self.pending.take() else {
            return Ok(None);
        };
        let step = p.step();
        let dir = p
            .finish(dist.tp.comm())
            .map_err(|e| anyhow!("saving checkpoint of step {step}: {e:#}"))?;
        Ok(Some((dir, sum, ranks)))
    }

    /// Saves the run at `state` (a collective over every rank): checks that the data-parallel
    /// ranks hold the same weights and the tensor-parallel ranks the same replicated ones, then
    /// the first data-parallel group writes, each tensor-parallel rank its part, from host copies
    /// taken now: at once, or (`background`) on a writer thread while training goes on. `None`
    /// on the ranks that do not write.
    pub fn save<B: Backend>(
        &mut self,
        state: &TrainState,
        model: &TpLlama<B>,
        opt: &Optimizer<B>,
        slots: &ParamSlots,
        dist: &Dist,
        background: bool,
    ) -> Result<Option<Saved>> {
        // A save still being written completes first (one at a time).
        if let Some((dir, sum, ranks)) = self.finish_pending(dist)? {
            return Err(anyhow!(
                "internal: checkpoint {} ({sum}, {ranks}) was still pending at the next save",
                dir.display()
            ));
        }
        let values: Vec<Vec<f32>> = flat_values::<B, _>(model)
            .into_iter()
            .map(to_host)
            .collect();
        let sums = dist.dp.all_gather_f64(weights_checksum(values.iter()));
        if sums.iter().any(|&c| c.to_bits() != sums[0].to_bits()) {
            bail!(
                "step {}: the data-parallel ranks' weights differ (checksums {sums:?})",
                state.step
            );
        }
        let replicated = values
            .iter()
            .zip(slots.iter())
            .filter(|(_, s)| s.shard.is_none())
            .map(|(v, _)| v);
        let rsums = dist.tp.comm().all_gather_f64(weights_checksum(replicated));
        if rsums.iter().any(|&c| c.to_bits() != rsums[0].to_bits()) {
            bail!(
                "step {}: the tensor-parallel ranks' replicated weights differ (checksums {rsums:?})",
                state.step
            );
        }
        // With ZeRO-1 every data-parallel rank takes part in gathering the moments whole.
        let optim_pieces = if self.zero {
            self.optim_pieces(opt, slots, dist)
        } else {
            Vec::new()
        };
        if dist.topo.dp_rank() != 0 {
            return Ok(None);
        }
        let model_pieces: Vec<Piece> = values
            .into_iter()
            .zip(slots.iter())
            .map(|(v, s)| Piece {
                name: s.name.clone(),
                full_shape: s.shape.clone(),
                dim: s.shard,
                values: v,
            })
            .collect();
        let optim_pieces = if self.zero {
            optim_pieces
        } else {
            self.optim_pieces(opt, slots, dist)
        };
        let owned = OwnedSave {
            root: self.root.clone(),
            state: state.clone(),
            recipe_toml: self.recipe_toml.clone(),
            model: model_pieces,
            optim: optim_pieces,
            topology: self.topology.clone(),
            keep_last: self.keep_last,
            faults: self.faults.clone(),
        };
        let failed = |e: anyhow::Error| anyhow!("saving checkpoint of step {}: {e:#}", state.step);
        if background {
            let p = PendingSave::start(owned, dist.tp.comm()).map_err(failed)?;
            self.pending = Some((p, sums[0], sums.len()));
            return Ok(Some(Saved::Started(state.step)));
        }
        let dir = super::save(&owned.request(), dist.tp.comm()).map_err(failed)?;
        Ok(Some(Saved::Done(dir, sums[0], sums.len())))
    }
}
