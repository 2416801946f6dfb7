//! The trainer, in the shape of TorchTitan's: [`Trainer::build`] assembles the components (data,
//! model and objective, optimizer, checkpoints, evaluation, metrics), [`Trainer::train_step`] runs
//! one optimizer step, and [`Trainer::run`] is the loop around it with logging, evaluation and
//! checkpoints beside it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tern_kernels::Kernels;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use serde_json::{json, Map, Value};
use tern_data::sampler::dp_slice;
use tern_data::TrainData;
use tern_dist::{CollectiveBackend, Dist};
use tern_model::{Hooks, Llama};
use tern_optim::{Optimizer, Schedule};
use tern_parallel::TpLlama;

use crate::build::{model_and_objective, Inputs};
use crate::checkpoint::manager::{CheckpointManager, Saved};
use crate::checkpoint::{self, TrainState};
use crate::evaluator::Evaluator;
use crate::faults::Faults;
use crate::metrics::{MetricsLogger, StepMetrics};
use crate::objective::{batch_tensor, LossParts, Objective};
use crate::params::{assign_some_trainable, assign_trainable};
use crate::recipe::{Recipe, Recompute};
use crate::slots::ParamSlots;
use crate::step::{optimizer_step, reduce_gradients, GradAccumulator, StepSettings};

#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest complete checkpoint of the run directory, or a fresh start if there is none.
    Auto,
    Path(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub resume: Option<Resume>,
    /// Set (by a SIGTERM handler) to end the run at the next step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// What each rank computes on (`cpu`, or the GPU's name) and its dense matmul peak in
    /// TFLOP/s when known (for the MFU).
    pub device_name: String,
    pub peak_tflops: Option<f64>,
    /// What the matrix products run in (`train.precision` resolved for the build).
    pub precision: tern_kernels::precision::Precision,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub start_step: u64,
    pub steps: u64,
    pub last_loss: f64,
    pub last_val_loss: Option<f64>,
    pub tokens: u64,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Steps completed (1-based).
    pub step: u64,
    /// The loss as logged (a distillation's whole loss over the tensor-parallel group).
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub weight_decay: f64,
    /// False when a non-finite loss or gradient norm skipped the update.
    pub applied: bool,
    /// More `metrics.jsonl` fields (a distillation's terms and phase).
    pub extra: Map<String, Value>,
    /// The step's first sequence (where activation sparsity is measured).
    first_block: Vec<u32>,
}

/// Trains a recipe: [`Trainer::build`] then [`Trainer::run`].
pub fn train<B>(
    recipe: &Recipe,
    opts: &TrainOptions,
    device: &B::Device,
    dist: &Dist,
) -> Result<TrainSummary>
where
    B: AutodiffBackend + CollectiveBackend + Kernels,
    B::InnerBackend: CollectiveBackend + Kernels,
{
    Trainer::<B>::build(recipe, opts, device, dist)?.run()
}

pub struct Trainer<'a, B: AutodiffBackend> {
    recipe: Recipe,
    dist: &'a Dist,
    model: TpLlama<B>,
    objective: Objective<B::InnerBackend>,
    slots: ParamSlots,
    opt: Optimizer<B::InnerBackend>,
    schedule: Schedule,
    data: TrainData,
    state: TrainState,
    checkpoints: CheckpointManager,
    evaluator: Evaluator<B::InnerBackend>,
    metrics: MetricsLogger,
    faults: Faults,
    stop: Option<Arc<AtomicBool>>,
    /// This rank's blocks of every global batch.
    mine: std::ops::Range<usize>,
    start_step: u64,
    bad_in_a_row: u64,
    last_val: Option<f64>,
    /// Since the last logged step: when it began, tokens trained.
    interval: (Instant, u64),
    /// Training FLOPs a token (the plan's), the devices of the job, one device's peak.
    flops_per_token: f64,
    peak_tflops: Option<f64>,
}

/// A fresh run never writes into an earlier run's folder (their checkpoints and metrics would mix):
/// a non-empty `run_dir` is renamed to `<run_dir>.1` (or the next free number) first.
fn move_aside_earlier_run(run_dir: &Path) -> Result<()> {
    let non_empty = std::fs::read_dir(run_dir).is_ok_and(|mut d| d.next().is_some());
    if !non_empty {
        return Ok(());
    }
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let free = (1..)
        .map(|i| run_dir.with_file_name(format!("{name}.{i}")))
        .find(|p| !p.exists())
        .expect("a free name");
    std::fs::rename(run_dir, &free)
        .with_context(|| format!("moving the earlier run {} aside", run_dir.display()))?;
    println!(
        "{} held an earlier run: moved it to {} (use --resume auto to continue a run)",
        run_dir.display(),
        free.display()
    );
    Ok(())
}

/// `act_sparsity/attn` and `act_sparsity/mlp`: the share of zero entries in the inputs of each type
/// of projection, on one sequence (over the whole tensor-parallel group).
fn activation_sparsity<B: Kernels, H: Hooks<B>>(
    model: &Llama<B, H>,
    x: burn::tensor::Tensor<B, 2, burn::tensor::Int>,
    tp: &dyn tern_dist::Comm,
) -> Vec<(String, f64)> {
    let counts = model.activation_counts(x);
    let mut out = Vec::new();
    for (key, layer) in [
        ("act_sparsity/attn", tern_model::LayerType::Attention),
        ("act_sparsity/mlp", tern_model::LayerType::Mlp),
    ] {
        let (mut zeros, mut total) = (0.0, 0.0);
        for c in counts.iter().filter(|c| c.layer == layer) {
            // A sharded input's counts add up over the group; a replicated one counts once.
            let n = if c.sharded { 1.0 } else { tp.size() as f64 };
            zeros += c.zeros / n;
            total += c.total / n;
        }
        let (zeros, total) = (tp.all_reduce_sum_f64(zeros), tp.all_reduce_sum_f64(total));
        out.push((key.to_string(), zeros / total.max(1.0)));
    }
    out
}

impl<'a, B> Trainer<'a, B>
where
    B: AutodiffBackend + CollectiveBackend + Kernels,
    B::InnerBackend: CollectiveBackend + Kernels,
{
    /// Everything a run needs, in the order it is checked: the recipe, the checkpoint to resume
    /// from, the data, the model and its objective, the optimizer (and their restored state),
    /// then the outputs.
    pub fn build(
        recipe: &Recipe,
        opts: &TrainOptions,
        device: &B::Device,
        dist: &'a Dist,
    ) -> Result<Self> {
        let topo = dist.topo;
        recipe.train.validate(topo.dp).map_err(|e| anyhow!(e))?;
        let faults = Faults::from_env()?;
        tern_kernels::precision::set_matmul_precision(opts.precision);
        let t0 = Instant::now();
        let mut inputs = Inputs::open(recipe)?;
        let recipe = inputs.recipe.clone();
        let checkpoints = CheckpointManager::new(&opts.run_dir, &recipe, dist, faults.clone());
        let resume_dir = checkpoints.resume_dir(opts.resume.as_ref())?;
        // A fresh start (also `--resume auto` with no checkpoint) never writes into an earlier run.
        if resume_dir.is_none() && topo.is_main() {
            move_aside_earlier_run(&opts.run_dir)?;
        }
        let (model, objective, slots) =
            model_and_objective::<B>(&recipe, inputs.teacher.take(), device, dist)?;
        let inner = model.valid().embed_tokens.weight.val().device();
        let zero = recipe.parallel.zero == 1;
        let mut opt = slots.optimizer_for_rank(&recipe.optim, zero, dist, &inner)?;
        let mut state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            step: 0,
            consumed_samples: 0,
            tokens_seen: 0,
            skipped_steps: 0,
            optimizer_step: 0,
            seed: recipe.train.seed,
            tokenizer_sha256: inputs.tokenizer.sha256.clone(),
            train_blocks: inputs.train.sources.iter().map(|s| s.blocks()).sum(),
            data_fingerprint: inputs.train.fingerprint(),
        };
        let mut model = model;
        let block_len = recipe.data.seq_len + 1;
        let tc = &recipe.train;
        let calibrated = match resume_dir {
            None => objective.calibrated_start(
                &mut inputs.train,
                tc.micro_batch,
                block_len,
                &slots,
                &inner,
            )?,
            Some(_) => None,
        };
        if let Some(values) = calibrated {
            model = assign_some_trainable(model, values);
        }
        if let Some(dir) = &resume_dir {
            let r = checkpoints.restore(dir, &recipe, &state)?;
            let weights = checkpoints.restore_weights(&r, &slots, dist, &inner)?;
            model = assign_trainable(model, weights);
            checkpoints.restore_optimizer(&r, &mut opt, &slots, dist, &inner)?;
            state = r.state;
        }
        // The step-0 validation MSEs see the weights of the first step; later evaluations see
        // those of the step just run (`train_step` sets the mix).
        objective.set_quant_mix(state.step, &mut model);
        let tc = &recipe.train;
        let n_val =
            ((tc.eval_batches * tc.micro_batch) as u64).min(inputs.val.source.blocks()) as usize;
        let metrics = Self::open_metrics(&recipe, opts, dist, state.step)?;
        metrics.say(&format!(
            "tern: {} | {:.2}M parameters ({:?} linears, {} scale groups) | data ready in {:.1}s",
            recipe.name(),
            slots.millions(),
            recipe.model.linear,
            recipe.model.scale_groups,
            t0.elapsed().as_secs_f64(),
        ));
        inputs.describe(&metrics, n_val);
        let mut val = inputs.val;
        let evaluator = Evaluator::new(
            &mut val,
            n_val,
            tc.micro_batch,
            recipe.data.seq_len + 1,
            tc.eval_every,
            topo.dp_rank() == 0,
            &inner,
        )?;
        let flops_per_token = crate::plan::plan(&recipe, topo.world)
            .map_err(|e| anyhow!(e))?
            .train_flops_per_token;
        let mut trainer = Self {
            flops_per_token,
            peak_tflops: opts.peak_tflops,
            schedule: Schedule::new(&recipe.optim, tc.steps),
            mine: dp_slice(tc.global_batch, topo.dp_rank(), topo.dp),
            start_step: state.step,
            bad_in_a_row: 0,
            last_val: None,
            interval: (Instant::now(), 0),
            stop: opts.stop.clone(),
            data: inputs.train,
            recipe,
            dist,
            model,
            objective,
            slots,
            opt,
            state,
            checkpoints,
            evaluator,
            metrics,
            faults,
        };
        trainer.introduce(resume_dir.as_deref(), opts.resume.is_some())?;
        Ok(trainer)
    }

    /// The outputs (metrics.jsonl, TensorBoard, the recipe as resolved), written by the first
    /// rank only and only once a checkpoint, if any, was accepted.
    fn open_metrics(
        recipe: &Recipe,
        opts: &TrainOptions,
        dist: &Dist,
        start: u64,
    ) -> Result<MetricsLogger> {
        let run_dir = &opts.run_dir;
        let metrics = if dist.topo.is_main() {
            std::fs::create_dir_all(run_dir)
                .with_context(|| format!("creating run directory {}", run_dir.display()))?;
            std::fs::write(run_dir.join("recipe.toml"), recipe.to_toml())
                .with_context(|| format!("writing {}/recipe.toml", run_dir.display()))?;
            MetricsLogger::open(run_dir, start, recipe.train.steps, recipe.run.progress)?
        } else {
            MetricsLogger::silent()
        };
        let t = dist.topo;
        if t.world > 1 {
            metrics.say(&format!(
                "job: {} processes, tensor-parallel {} x data-parallel {}",
                t.world, t.tp, t.dp
            ));
        }
        Ok(metrics)
    }

    /// The objective's lines, a distillation teacher's validation loss and step-0 projection
    /// figures, and where the run starts.
    fn introduce(&mut self, resumed: Option<&Path>, asked: bool) -> Result<()> {
        if let Some(line) = self.objective.describe() {
            self.metrics.say(&line);
        }
        if !self.evaluator.batches.is_empty() {
            if let Some(v) = self.objective.teacher_loss(&self.evaluator) {
                let step = self.start_step;
                self.metrics
                    .note(json!({"step": step, "teacher_val_loss": v}))?;
                self.metrics.say(&format!(
                    "teacher: validation loss {v:.4} (perplexity {:.2})",
                    v.exp()
                ));
                if step == 0 {
                    self.note_projection_stats(true)?;
                }
            }
        }
        match resumed {
            Some(d) => self.metrics.say(&format!(
                "resumed from {} at step {}",
                d.display(),
                self.start_step
            )),
            None if asked => self
                .metrics
                .say("no checkpoint to resume from: starting at step 0"),
            None => {}
        }
        Ok(())
    }

    /// A distillation's per-projection validation MSE (and at step 0 the teacher's mean squared
    /// outputs) in metrics.jsonl.
    fn note_projection_stats(&mut self, with_teacher: bool) -> Result<()> {
        let Some(stats) = self.objective.projection_stats(
            &self.model.valid(),
            &self.evaluator.batches,
            self.dist.tp.comm(),
        ) else {
            return Ok(());
        };
        let figure = |f: fn(&crate::distill::ProjectionStat) -> f64| -> Value {
            Value::Object(
                stats
                    .iter()
                    .map(|s| (s.name.clone(), json!(f(s))))
                    .collect(),
            )
        };
        let mut line = json!({"step": self.state.step, "val_mse": figure(|s| s.mse)});
        if with_teacher {
            line["val_teacher_y2"] = figure(|s| s.teacher_y2);
        }
        self.metrics.note(line)
    }

    /// One optimizer step: this rank's micro-batches forward and backward, the gradients averaged
    /// over the data-parallel group, clipped, and applied (unless not finite).
    pub fn train_step(&mut self) -> Result<StepOutput> {
        let (tc, dist) = (&self.recipe.train, self.dist);
        let step = self.state.step;
        self.faults.maybe_panic(dist.topo.rank, step + 1);
        self.objective.set_quant_mix(step, &mut self.model);
        let block_len = self.recipe.data.seq_len + 1;
        let blocks = self
            .data
            .samples(self.state.consumed_samples, tc.global_batch);
        let blocks = &blocks[self.mine.clone()];
        let n_micro = blocks.len() / tc.micro_batch;
        let (mut acc, mut parts) = (GradAccumulator::default(), LossParts::default());
        let mut first_block = Vec::new();
        for chunk in blocks.chunks(tc.micro_batch) {
            let tokens = self.data.read(chunk)?;
            if first_block.is_empty() {
                first_block = tokens[..block_len].to_vec();
            }
            if tc.recompute == Recompute::Block {
                let device = self.model.embed_tokens.weight.val().inner().device();
                let x = batch_tensor(&tokens, block_len, &device);
                let (loss, aux, grads) = crate::recompute::loss_and_grads(&self.model, x);
                if let Some(a) = aux {
                    // As `Objective::micro_loss` reports it: logged as `aux_loss`.
                    let v: f64 = burn::tensor::ElementConversion::elem(a.into_scalar());
                    parts.0[0] += v / n_micro as f64;
                }
                acc.push(loss, grads);
                continue;
            }
            let (loss, p) = self.objective.micro_loss(
                step,
                &self.model,
                &tokens,
                block_len,
                n_micro,
                dist.topo.tp,
            );
            parts.0.iter_mut().zip(p.0).for_each(|(a, v)| *a += v);
            acc.add(&self.model, loss);
        }
        let (loss, grads) = acc.mean();
        let zero = self.recipe.parallel.zero == 1;
        // Equal shares: the mean over data-parallel ranks is the mean of the global batch (with
        // ZeRO-1 each rank receives its chunks of it).
        let split = self.slots.state_split(zero, &self.recipe.optim, dist);
        let mut grads = reduce_gradients(grads, &self.slots.partial(), dist, split.chunked());
        let mut loss = dist.dp.all_reduce_sum_f64(loss) / dist.topo.dp as f64;
        if self.faults.nan(step + 1) {
            loss = f64::NAN;
            grads[0] = grads[0].clone().mul_scalar(f64::NAN);
        }
        let settings = StepSettings {
            lr: self.schedule.lr(step),
            weight_decay: self.schedule.weight_decay(step),
            grad_clip: self.recipe.optim.grad_clip,
        };
        let trainable = self.objective.trainable(step, &self.slots);
        let model = self.model.clone();
        let rules = self.slots.rules();
        let (opt, tp) = (&mut self.opt, dist.tp.comm());
        let (model, grad_norm, applied) = optimizer_step(
            model, grads, loss, opt, &rules, &trainable, settings, tp, &split,
        );
        self.model = model;
        let step_tokens = (tc.global_batch * self.recipe.data.seq_len) as u64;
        let s = &mut self.state;
        s.step = step + 1;
        s.consumed_samples += tc.global_batch as u64;
        s.tokens_seen += step_tokens;
        s.skipped_steps += (!applied) as u64;
        s.optimizer_step = self.opt.steps();
        self.interval.1 += step_tokens;
        let (loss, extra) =
            self.objective
                .logged(step, loss, parts, dist.dp.as_ref(), dist.tp.comm());
        Ok(StepOutput {
            step: step + 1,
            loss,
            grad_norm,
            lr: settings.lr,
            weight_decay: settings.weight_decay,
            applied,
            extra,
            first_block,
        })
    }

    /// The loop: a step, then its log line, evaluation and checkpoint when due; stops at
    /// `train.steps`, on SIGTERM (with a checkpoint) or after `train.max_bad_steps` non-finite
    /// steps in a row (with a checkpoint of the last good weights, and an error).
    pub fn run(mut self) -> Result<TrainSummary> {
        let mut last_loss = f64::NAN;
        while self.state.step < self.recipe.train.steps {
            // This process's first step is timed: on a GPU, kernels are compiled and tuned there.
            let (first, t0) = (self.state.step == self.start_step, Instant::now());
            let out = self.train_step()?;
            if first {
                let s = t0.elapsed().as_secs_f64();
                self.metrics.say(&format!(
                    "first step: {s:.2} s (on a GPU this includes compiling and autotuning kernels)"
                ));
                self.metrics
                    .note(json!({"step": out.step, "first_step_s": s}))?;
            }
            last_loss = out.loss;
            self.bad_in_a_row = if out.applied {
                0
            } else {
                self.bad_in_a_row + 1
            };
            if !out.applied {
                self.metrics.say(&format!(
                    "step {}: non-finite loss {} or gradient norm {}: update skipped ({} in a row)",
                    out.step, out.loss, out.grad_norm, self.bad_in_a_row
                ));
            }
            // Every rank learns of a stop request that reached any of them (Slurm signals each
            // task, but a signal sent to one process must stop the whole job in step).
            let asked = self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
            let stop = self.dist.world.all_reduce_sum_f64(asked as u8 as f64) > 0.0;
            let too_bad = self.bad_in_a_row >= self.recipe.train.max_bad_steps;
            let last = out.step == self.recipe.train.steps || stop || too_bad;
            self.after_step(&out, last)?;
            if too_bad {
                bail!(
                    "step {}: {} non-finite steps in a row (train.max_bad_steps = {}): stopped; \
                     the weights of the last good step are in the checkpoint {}",
                    out.step,
                    self.bad_in_a_row,
                    self.recipe.train.max_bad_steps,
                    self.checkpoints
                        .root()
                        .join(checkpoint::step_dir_name(out.step))
                        .display()
                );
            }
            if stop {
                self.metrics.say(&format!(
                    "step {}: stop requested (SIGTERM): checkpoint written, exiting; resume with --resume auto",
                    out.step
                ));
                break;
            }
        }
        self.metrics.finish()?;
        Ok(TrainSummary {
            start_step: self.start_step,
            steps: self.state.step,
            last_loss,
            last_val_loss: self.last_val,
            tokens: self.state.tokens_seen,
        })
    }

    /// What follows a step: its metrics line, evaluation and checkpoint, each when due.
    fn after_step(&mut self, out: &StepOutput, last: bool) -> Result<()> {
        let step = out.step;
        if step.is_multiple_of(self.recipe.train.log_every) || step == 1 || last {
            self.log(out)?;
        }
        if self.evaluator.due(step, last) {
            let v = self.evaluator.loss(&self.model.valid());
            self.metrics.validation(step, v)?;
            self.last_val = Some(v);
            self.note_projection_stats(false)?;
        }
        // A checkpoint written in the background since the previous step is completed now.
        if let Some(done) = self.checkpoints.finish_pending(self.dist)? {
            self.say_saved(step, done);
        }
        if self.checkpoints.due(step, last) {
            // The last one is written at once: the job ends after it.
            let background = self.recipe.checkpoint.async_save && !last;
            let saved = self.checkpoints.save(
                &self.state,
                &self.model.valid(),
                &self.opt,
                &self.slots,
                self.dist,
                background,
            )?;
            match saved {
                Some(Saved::Done(dir, checksum, ranks)) => {
                    self.say_saved(step, (dir, checksum, ranks))
                }
                Some(Saved::Started(s)) => self.metrics.say(&format!(
                    "step {step} | checkpoint of step {s} being written in the background"
                )),
                None => {}
            }
        }
        if last {
            // No rank leaves (or aborts the job) while the last checkpoint is being written.
            self.dist.world.barrier();
        }
        Ok(())
    }

    fn say_saved(&self, step: u64, (dir, checksum, ranks): (PathBuf, f64, usize)) {
        self.metrics.say(&format!(
            "step {step} | checkpoint {} | weights checksum {checksum:.6e} on {ranks} rank(s)",
            dir.display()
        ));
    }

    /// The step's metrics.jsonl line and TensorBoard scalars, with the share of zero ternary codes
    /// per layer and, when there is sparsity to see, the activations' zeros; with
    /// Mixture-of-Depths, the share of one sequence's tokens each routed block picks.
    fn log(&mut self, out: &StepOutput) -> Result<()> {
        let tp = self.dist.tp.comm();
        let valid = self.model.valid();
        let mut zeros = valid.ternary_zero_fractions();
        if tp.size() > 1 {
            // Equal-sized shards: the matrix's fraction is the mean of the shards'.
            let mut f: Vec<f32> = zeros.iter().map(|(_, z)| *z as f32).collect();
            tp.all_reduce_sum(&mut f);
            for ((_, z), s) in zeros.iter_mut().zip(f) {
                *z = s as f64 / tp.size() as f64;
            }
        }
        let mut extra = out.extra.clone();
        let mc = &self.recipe.model;
        // The step's first sequence, which the diagnostics below run through the model.
        let first = || {
            let device = valid.embed_tokens.weight.device();
            batch_tensor(&out.first_block, out.first_block.len(), &device)
        };
        if mc.sparsity.is_some() || mc.mlp == tern_model::MlpKind::Relu2glu {
            for (k, v) in activation_sparsity(&valid, first(), tp) {
                extra.insert(k, json!(v));
            }
        }
        // Not training time: the extra forward pass below is taken out of the step's rate.
        let mut diagnostics = 0.0;
        if mc.depth.is_some() {
            let t0 = std::time::Instant::now();
            for (layer, share) in valid.routed_shares(first()) {
                extra.insert(format!("mod_share/layers.{layer}"), json!(share));
            }
            diagnostics = t0.elapsed().as_secs_f64();
        }
        let secs = self.interval.0.elapsed().as_secs_f64() - diagnostics;
        let tokens_per_s = self.interval.1 as f64 / secs.max(1e-9);
        let (tflops, mfu) = crate::mfu::utilisation(
            tokens_per_s,
            self.flops_per_token,
            self.dist.topo.world,
            self.peak_tflops,
        );
        self.metrics.step(
            &StepMetrics {
                step: out.step,
                loss: out.loss,
                lr: out.lr,
                weight_decay: out.weight_decay,
                grad_norm: out.grad_norm,
                tokens: self.state.tokens_seen,
                tokens_per_s,
                tflops_per_device: tflops,
                mfu,
                skipped_steps: self.state.skipped_steps,
                extra,
            },
            &zeros,
        )?;
        self.interval = (Instant::now(), 0);
        Ok(())
    }
}
