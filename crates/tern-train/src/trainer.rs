//! The step loop: data -> forward/backward over micro-batches -> clip -> optimizer -> outputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use tern_data::sampler::dp_slice;
use tern_data::{TextTokenizer, TrainData, ValData};
use tern_dist::{all_reduce_mean_tensors, comm::BUCKET_ELEMS, to_host, CollectiveBackend, Dist};
use tern_model::{block_matrix_dim, parallelize, shard_values, Llama};
use tern_optim::{Optimizer, Schedule};

use crate::checkpoint::{self, Piece, TrainState};
use crate::distill::{check_teacher, distill_loss, projection_stats, student_of, ProjectionStat};
use crate::init::init_normal;
use crate::metrics::{Metrics, StepMetrics};
use crate::params::{assign_trainable, flat_values, param_infos, ParamInfo};
use crate::pretrained;
use crate::recipe::Recipe;
use crate::shards::shard_dims;
use crate::step::{optimizer_step, GradAccumulator, StepSettings, UpdateRules};
use serde_json::json;

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
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub start_step: u64,
    pub steps: u64,
    pub last_loss: f64,
    pub last_val_loss: Option<f64>,
    pub tokens: u64,
}

/// Blocks of `block_len` tokens, one after another, as a `[blocks, block_len]` int tensor.
fn batch_tensor<B: Backend>(
    tokens: &[u32],
    block_len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_data(
        TensorData::new(v, [tokens.len() / block_len, block_len]),
        device,
    )
}

fn from_host<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// The first `n` validation blocks, in order, as micro-batches.
fn validation_batches<B: Backend>(
    val: &mut ValData,
    n: usize,
    micro: usize,
    block_len: usize,
    device: &B::Device,
) -> Result<Vec<Tensor<B, 2, Int>>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let count = micro.min(n - start);
        out.push(batch_tensor::<B>(
            &val.read(start as u64, count)?,
            block_len,
            device,
        ));
        start += count;
    }
    Ok(out)
}

/// `act_sparsity/attn` and `act_sparsity/mlp`: the share of zero entries in the inputs of each type
/// of projection, on one sequence (over the whole tensor-parallel group).
fn activation_sparsity<B: CollectiveBackend>(
    model: &Llama<B>,
    x: Tensor<B, 2, Int>,
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

/// Mean loss of the model over validation micro-batches (weighted by their sizes).
fn validation_loss<B: CollectiveBackend>(model: &Llama<B>, batches: &[Tensor<B, 2, Int>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0);
    for x in batches {
        let count = x.dims()[0];
        let l: f32 = model.loss(x.clone()).into_scalar().elem();
        sum += l as f64 * count as f64;
        n += count;
    }
    sum / n as f64
}

use burn::tensor::ElementConversion;

/// `{projection: figure}` for `metrics.jsonl`.
fn stats_json(stats: &[ProjectionStat], figure: fn(&ProjectionStat) -> f64) -> serde_json::Value {
    serde_json::Value::Object(
        stats
            .iter()
            .map(|s| (s.name.clone(), json!(figure(s))))
            .collect(),
    )
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

/// Test switch for the fault tests: `TERN_TEST_NAN=STEP[,STEP...]` makes the loss and the gradients
/// of those steps non-finite on every rank, as an overflow would.
fn test_nan(step: u64) -> bool {
    std::env::var("TERN_TEST_NAN").is_ok_and(|v| v.split(',').any(|s| s.trim().parse() == Ok(step)))
}

/// Test switch for the failure tests: `TERN_TEST_PANIC=RANK:STEP` panics that rank at that step.
fn test_panic(rank: usize, step: u64) {
    if let Ok(v) = std::env::var("TERN_TEST_PANIC") {
        if v == format!("{rank}:{step}") {
            panic!("TERN_TEST_PANIC: rank {rank} panics at step {step} as asked");
        }
    }
}

/// A checksum of the weights: equal on every data-parallel rank when they hold the same weights.
fn weights_checksum(values: &[Vec<f32>]) -> f64 {
    values
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, &x)| x as f64 * (1.0 + (i % 7) as f64))
        .sum()
}

pub fn train<B>(
    recipe: &Recipe,
    opts: &TrainOptions,
    device: &B::Device,
    dist: &Dist,
) -> Result<TrainSummary>
where
    B: AutodiffBackend + CollectiveBackend,
    B::InnerBackend: CollectiveBackend,
{
    let topo = dist.topo;
    let main = topo.is_main();
    recipe.train.validate(topo.dp).map_err(|e| anyhow!(e))?;
    let run_dir = &opts.run_dir;
    let ckpt_root = run_dir.join("checkpoints");
    let (tc, dc) = (&recipe.train, &recipe.data);
    let block_len = dc.seq_len + 1;

    // Which checkpoint, if any, before any expensive work.
    let resume_dir = match &opts.resume {
        None => None,
        Some(Resume::Auto) => checkpoint::latest(&ckpt_root)?,
        Some(Resume::Path(p)) => Some(p.clone()),
    };

    // Data.
    let tok = TextTokenizer::load(Path::new(&dc.tokenizer), &dc.eos_token)?;
    let mut recipe = recipe.clone();
    // A distillation's teacher, whose architecture (and vocabulary) the student takes.
    let teacher_weights = match &recipe.distill {
        None => None,
        Some(d) => {
            let p = pretrained::load(Path::new(&d.teacher))
                .with_context(|| format!("distill.teacher = {}", d.teacher))?;
            if p.student.is_some() {
                bail!(
                    "distill.teacher: {} is itself a distillation student; give a plain model",
                    p.source.display()
                );
            }
            check_teacher(&recipe.model, &p.config, &p.source.display().to_string())
                .map_err(|e| anyhow!(e))?;
            recipe.model.vocab_size = p.config.vocab_size;
            Some(p)
        }
    };
    match recipe.model.vocab_size {
        None => recipe.model.vocab_size = Some(tok.vocab_size),
        Some(v) if v < tok.vocab_size => bail!(
            "model.vocab_size: {v} is smaller than the vocabulary of {} ({})",
            dc.tokenizer,
            tok.vocab_size
        ),
        Some(_) => {}
    }
    let t0 = Instant::now();
    let mut train_data = TrainData::open(dc, &tok, tc.seed)?;
    let mut val_data = ValData::open(dc, &tok)?;
    let n_train: u64 = train_data.sources.iter().map(|s| s.blocks()).sum();
    let n_val = ((tc.eval_batches * tc.micro_batch) as u64).min(val_data.source.blocks()) as usize;

    // A fresh start (also `--resume auto` with no checkpoint) never writes into an earlier run.
    if resume_dir.is_none() && main {
        move_aside_earlier_run(run_dir)?;
    }
    let recipe_toml = recipe.to_toml();

    // Model and optimizer. The full model is built and initialised (or loaded) on every rank, then
    // each tensor-parallel rank keeps its shard: shards are slices of the same matrices whatever
    // the layout.
    let mc = &recipe.model;
    let tp = dist.tp.comm();
    // Q-Sparse's achieved activation sparsity is logged when there is some to see.
    let measures_activations =
        recipe.model.sparsity.is_some() || recipe.model.mlp == tern_model::MlpKind::Relu2glu;
    let distill = recipe.distill.clone();
    // The teacher is built whole first: the student starts from its weights.
    let teacher: Option<Llama<B::InnerBackend>> =
        teacher_weights.map(|t| t.build(device)).transpose()?;
    let mut model: Llama<B> = match (&distill, &teacher) {
        (Some(d), Some(t)) => student_of::<B>(t, d, mc, tc.seed, device),
        _ => init_normal(Llama::new(mc, device), tc.seed, mc.init_std, device),
    };
    let full_infos = param_infos::<B, _>(&model);
    // The same device seen from the inner (non-autodiff) backend, where optimizer state lives.
    let inner_device = model.valid().embed_tokens.weight.val().device();
    // Split like the student: each rank's taps are then the blocks its projections hold.
    let teacher = teacher.map(|t| parallelize(t, &dist.tp));
    let mut resumed_moments = None;
    // The matrices GaLore projects: the block matrices (those tensor parallelism splits).
    let low_rank: Vec<bool> = full_infos
        .iter()
        .map(|i| block_matrix_dim(&i.name).is_some())
        .collect();

    let mut state = TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        step: 0,
        consumed_samples: 0,
        tokens_seen: 0,
        skipped_steps: 0,
        optimizer_step: 0,
        seed: tc.seed,
        tokenizer_sha256: tok.sha256.clone(),
        train_blocks: n_train,
        data_fingerprint: train_data.fingerprint(),
    };

    if let Some(dir) = &resume_dir {
        let mut l = checkpoint::load(dir)?;
        let saved: Recipe = toml::from_str(&l.recipe_toml)
            .with_context(|| format!("{}/recipe.toml", dir.display()))?;
        if saved.model != recipe.model {
            bail!("{}: the checkpoint's [model] differs from the recipe's; resume needs the same model", dir.display());
        }
        if l.state.tokenizer_sha256 != tok.sha256
            || l.state.data_fingerprint != state.data_fingerprint
            || l.state.seed != tc.seed
        {
            bail!(
                "{}: the checkpoint was trained on other data, tokenizer or seed (train.seed, data.*); \
                 resuming would not continue the same run",
                dir.display()
            );
        }
        let mpath = dir.join("model-*.safetensors");
        let opath = dir.join("optim-*.safetensors");
        let w = checkpoint::take_in_order(&mut l.model, &full_infos, "", &mpath)?;
        model = assign_trainable(
            model,
            w.into_iter().map(|w| from_host(w, &inner_device)).collect(),
        );
        resumed_moments = Some((l.optim, opath, l.state.optimizer_step));
        state = l.state;
        if state.step >= tc.steps {
            bail!(
                "{}: the checkpoint is at step {} and train.steps = {}: nothing left to do (raise train.steps)",
                dir.display(),
                state.step,
                tc.steps
            );
        }
    }

    let mut model = parallelize(model, &dist.tp);
    let infos = param_infos::<B, _>(&model);
    let shapes: Vec<Vec<usize>> = infos.iter().map(|i| i.shape.clone()).collect();
    let shard_dims = shard_dims(&full_infos, topo.tp);
    let is_sharded: Vec<bool> = shard_dims.iter().map(Option::is_some).collect();
    let rules = UpdateRules {
        decay: infos.iter().map(ParamInfo::decays).collect(),
        sharded: is_sharded.clone(),
    };
    let mut opt = Optimizer::<B::InnerBackend>::new(
        &recipe.optim,
        &shapes,
        &low_rank,
        &shard_dims,
        &dist.tp,
        &inner_device,
    );
    if let Some((mut saved, opath, step)) = resumed_moments {
        opt.set_steps(step);
        // Every state tensor of every parameter, in the shapes the recipe's optimizer keeps. A
        // checkpoint holds whole tensors: this rank keeps its block of each.
        for (i, info) in full_infos.iter().enumerate() {
            for (key, full, shard) in opt.layout(i, &info.shape, shard_dims[i]) {
                let name = format!("{}.{key}", info.name);
                if Optimizer::<B::InnerBackend>::optional_state(key) && !saved.contains_key(&name) {
                    if key == "step" {
                        // Written before per-parameter counts were kept: every parameter had
                        // the optimizer's count.
                        opt.set_param_step(i, step);
                    }
                    continue;
                }
                let want = ParamInfo {
                    name,
                    shape: full.clone(),
                };
                let v = checkpoint::take_in_order(&mut saved, &[want], "", &opath)?
                    .pop()
                    .expect("one tensor");
                let v = match shard {
                    Some(dim) => shard_values(&v, &full, dim, topo.tp_rank(), topo.tp),
                    None => v,
                };
                opt.set_state(i, key, from_host(v, &inner_device));
            }
        }
    }

    // Written only now that the checkpoint (if any) was accepted, and by the first rank only.
    let start_step = state.step;
    let mut metrics = if main {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        std::fs::write(run_dir.join("recipe.toml"), &recipe_toml)
            .with_context(|| format!("writing {}/recipe.toml", run_dir.display()))?;
        Metrics::open(run_dir, start_step, tc.steps, recipe.run.progress)?
    } else {
        Metrics::silent()
    };
    if topo.world > 1 {
        metrics.say(&format!(
            "job: {} processes, tensor-parallel {} x data-parallel {}",
            topo.world, topo.tp, topo.dp
        ));
    }
    metrics.say(&format!(
        "tern: {} | {:.2}M parameters ({:?} linears, {} scale groups) | data ready in {:.1}s",
        recipe.name(),
        full_infos.iter().map(ParamInfo::numel).sum::<usize>() as f64 / 1e6,
        mc.linear,
        mc.scale_groups,
        t0.elapsed().as_secs_f64(),
    ));
    for (s, w) in train_data.sources.iter().zip(&train_data.weights) {
        let docs = s
            .documents()
            .map_or(String::new(), |d| format!(", {d} docs"));
        metrics.say(&format!(
            "data: {} (weight {w}): {} shard(s), {} tokens{docs}, {} blocks",
            s.name,
            s.shards.len(),
            s.tokens(),
            s.blocks()
        ));
    }
    metrics.say(&format!(
        "data: validation: {} tokens, {} blocks ({n_val} per evaluation)",
        val_data.source.tokens(),
        val_data.source.blocks()
    ));
    // The first data-parallel group evaluates (all its tensor-parallel ranks take part), always
    // on the same blocks.
    let val_batches = if topo.dp_rank() == 0 && tc.eval_every > 0 {
        validation_batches::<B::InnerBackend>(
            &mut val_data,
            n_val,
            tc.micro_batch,
            block_len,
            &inner_device,
        )?
    } else {
        Vec::new()
    };
    if let (Some(d), Some(t)) = (&distill, &teacher) {
        let blocks = d.blocks(mc.n_layers);
        metrics.say(&format!(
            "distill: teacher {} | blocks {blocks:?}: {} steps each, then {} all together, then {} end to end | loss {} mse + {} ce + {} kl",
            d.teacher, d.block_steps, d.all_steps, d.e2e_steps, d.mse_weight, d.ce_weight, d.kl_weight
        ));
        if !val_batches.is_empty() {
            let v = validation_loss(t, &val_batches);
            metrics.note(json!({"step": start_step, "teacher_val_loss": v}))?;
            metrics.say(&format!(
                "teacher: validation loss {v:.4} (perplexity {:.2})",
                v.exp()
            ));
            if start_step == 0 {
                let stats = projection_stats(&model.valid(), t, &blocks, &val_batches, tp);
                metrics.note(json!({
                    "step": 0,
                    "val_mse": stats_json(&stats, |s| s.mse),
                    "val_teacher_y2": stats_json(&stats, |s| s.teacher_y2),
                }))?;
            }
        }
    }
    match &resume_dir {
        Some(d) => metrics.say(&format!(
            "resumed from {} at step {start_step}",
            d.display()
        )),
        None if opts.resume.is_some() => {
            metrics.say("no checkpoint to resume from: starting at step 0")
        }
        None => {}
    }

    // This rank's part of a checkpoint (a collective over the tensor-parallel group).
    let save_checkpoint = |state: &TrainState,
                           values: Vec<Vec<f32>>,
                           opt: &Optimizer<B::InnerBackend>|
     -> Result<PathBuf> {
        let model_pieces: Vec<Piece> = values
            .into_iter()
            .zip(&full_infos)
            .zip(&shard_dims)
            .map(|((v, info), dim)| Piece {
                name: info.name.clone(),
                full_shape: info.shape.clone(),
                dim: *dim,
                values: v,
            })
            .collect();
        let mut optim_pieces = Vec::new();
        for (i, info) in full_infos.iter().enumerate() {
            for e in opt.state(i, &info.shape, shard_dims[i]) {
                optim_pieces.push(Piece {
                    name: format!("{}.{}", info.name, e.key),
                    full_shape: e.full_shape,
                    dim: e.shard,
                    values: to_host(e.value),
                });
            }
        }
        checkpoint::save(
            &ckpt_root,
            state,
            &recipe_toml,
            &model_pieces,
            &optim_pieces,
            &checkpoint::Topology {
                tp: topo.tp,
                dp: topo.dp,
            },
            recipe.checkpoint.keep_last,
            tp,
        )
        .map_err(|e| anyhow!("saving checkpoint of step {}: {e:#}", state.step))
    };
    let schedule = Schedule::new(&recipe.optim, tc.steps);
    // This rank's share of every global batch, in micro-batches.
    let mine = dp_slice(tc.global_batch, topo.dp_rank(), topo.dp);
    let n_micro = mine.len() / tc.micro_batch;
    let mut last_loss = f64::NAN;
    let mut bad_in_a_row = 0u64;
    let mut last_val = None;
    let mut interval_start = Instant::now();
    let mut interval_tokens = 0u64;

    for step in start_step..tc.steps {
        let phase = distill.as_ref().map(|d| d.phase(step, mc.n_layers));
        let trainable: Vec<bool> = match (&distill, phase) {
            (Some(d), Some(ph)) => infos
                .iter()
                .map(|i| d.trains(ph, &i.name, mc.n_layers))
                .collect(),
            _ => vec![true; infos.len()],
        };
        let mut parts = [0.0f64; 4];
        let lr = schedule.lr(step);
        let wd = schedule.weight_decay(step);
        test_panic(topo.rank, step + 1);
        let blocks = train_data.samples(state.consumed_samples, tc.global_batch);
        let blocks = &blocks[mine.clone()];
        let mut acc = GradAccumulator::default();
        let mut first_block = Vec::new();
        for chunk in blocks.chunks(tc.micro_batch) {
            let tokens = train_data.read(chunk)?;
            if first_block.is_empty() {
                first_block = tokens[..block_len].to_vec();
            }
            let loss = match (&distill, &teacher, phase) {
                (Some(d), Some(t), Some(ph)) => {
                    let x = batch_tensor::<B::InnerBackend>(&tokens, block_len, &inner_device);
                    let l = distill_loss(d, ph, &model, t, x, topo.tp);
                    for (acc, v) in parts.iter_mut().zip([l.mse_split, l.mse_whole, l.ce, l.kl]) {
                        *acc += v / n_micro as f64;
                    }
                    l.total
                }
                _ => model.loss(batch_tensor::<B>(&tokens, block_len, device)),
            };
            acc.add(&model, loss);
        }
        let (loss, grads) = acc.mean();
        // Equal shares: the mean over data-parallel ranks is the mean of the global batch.
        let mut grads = all_reduce_mean_tensors(dist.dp.as_ref(), grads, BUCKET_ELEMS);
        let mut loss = dist.dp.all_reduce_sum_f64(loss) / topo.dp as f64;
        if test_nan(step + 1) {
            loss = f64::NAN;
            grads[0] = grads[0].clone().mul_scalar(f64::NAN);
        }
        let settings = StepSettings {
            lr,
            weight_decay: wd,
            grad_clip: recipe.optim.grad_clip,
        };
        let (updated, grad_norm, applied) = optimizer_step(
            model, grads, loss, &mut opt, &rules, &trainable, settings, tp,
        );
        model = updated;
        if applied {
            bad_in_a_row = 0;
        } else {
            state.skipped_steps += 1;
            bad_in_a_row += 1;
            metrics.say(&format!(
                "step {}: non-finite loss {loss} or gradient norm {grad_norm}: update skipped ({bad_in_a_row} in a row)",
                step + 1
            ));
        }
        state.step = step + 1;
        state.consumed_samples += tc.global_batch as u64;
        let step_tokens = (tc.global_batch * dc.seq_len) as u64;
        state.tokens_seen += step_tokens;
        state.optimizer_step = opt.steps();
        interval_tokens += step_tokens;
        last_loss = loss;

        // Every rank learns of a stop request that reached any of them (Slurm signals each task,
        // but a signal sent to one process must stop the whole job in step).
        let stop_here = opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        let stop_here = dist.world.all_reduce_sum_f64(stop_here as u8 as f64) > 0.0;
        let too_bad = bad_in_a_row >= tc.max_bad_steps;
        let last = state.step == tc.steps || stop_here || too_bad;
        let mut extra = serde_json::Map::new();
        if let (Some(d), Some(ph)) = (&distill, phase) {
            let [split, whole, ce, kl] =
                parts.map(|v| dist.dp.all_reduce_sum_f64(v) / topo.dp as f64);
            // Under tensor parallelism the ranks' totals differ (each holds its share of the
            // MSE): the logged loss is the whole one.
            let mse = tp.all_reduce_sum_f64(split) + whole;
            (loss, extra) = d.step_fields(ph, mse, ce, kl);
            last_loss = loss;
        }
        if state.step.is_multiple_of(tc.log_every) || state.step == 1 || last {
            let secs = interval_start.elapsed().as_secs_f64();
            let mut zeros = model.valid().ternary_zero_fractions();
            if topo.tp > 1 {
                // Equal-sized shards: the matrix's fraction is the mean of the shards'.
                let mut f: Vec<f32> = zeros.iter().map(|(_, z)| *z as f32).collect();
                tp.all_reduce_sum(&mut f);
                for ((_, z), s) in zeros.iter_mut().zip(f) {
                    *z = s as f64 / topo.tp as f64;
                }
            }
            if measures_activations {
                let x = batch_tensor::<B::InnerBackend>(&first_block, block_len, &inner_device);
                for (k, v) in activation_sparsity(&model.valid(), x, tp) {
                    extra.insert(k, json!(v));
                }
            }
            metrics.step(
                &StepMetrics {
                    step: state.step,
                    loss,
                    lr,
                    weight_decay: wd,
                    grad_norm,
                    tokens: state.tokens_seen,
                    tokens_per_s: interval_tokens as f64 / secs.max(1e-9),
                    skipped_steps: state.skipped_steps,
                    extra,
                },
                &zeros,
            )?;
            interval_start = Instant::now();
            interval_tokens = 0;
        }
        // The first data-parallel group evaluates (all its tensor-parallel ranks take part).
        if topo.dp_rank() == 0
            && tc.eval_every > 0
            && (state.step.is_multiple_of(tc.eval_every) || last)
        {
            let v = validation_loss(&model.valid(), &val_batches);
            metrics.validation(state.step, v)?;
            last_val = Some(v);
            if let (Some(d), Some(t)) = (&distill, &teacher) {
                let blocks = d.blocks(mc.n_layers);
                let stats = projection_stats(&model.valid(), t, &blocks, &val_batches, tp);
                metrics
                    .note(json!({"step": state.step, "val_mse": stats_json(&stats, |s| s.mse)}))?;
            }
        }
        if (tc.checkpoint_every > 0 && state.step.is_multiple_of(tc.checkpoint_every)) || last {
            let values: Vec<Vec<f32>> = flat_values::<B::InnerBackend, _>(&model.valid())
                .into_iter()
                .map(to_host)
                .collect();
            // Every data-parallel rank must hold the same weights, and every tensor-parallel rank
            // the same replicated ones.
            let sums = dist.dp.all_gather_f64(weights_checksum(&values));
            if sums.iter().any(|&c| c.to_bits() != sums[0].to_bits()) {
                bail!(
                    "step {}: the data-parallel ranks' weights differ (checksums {sums:?})",
                    state.step
                );
            }
            let replicated: Vec<Vec<f32>> = values
                .iter()
                .zip(&is_sharded)
                .filter(|(_, &s)| !s)
                .map(|(v, _)| v.clone())
                .collect();
            let rsums = tp.all_gather_f64(weights_checksum(&replicated));
            if rsums.iter().any(|&c| c.to_bits() != rsums[0].to_bits()) {
                bail!(
                    "step {}: the tensor-parallel ranks' replicated weights differ (checksums {rsums:?})",
                    state.step
                );
            }
            // The first data-parallel group writes: each tensor-parallel rank its own part.
            if topo.dp_rank() == 0 {
                let dir = save_checkpoint(&state, values, &opt)?;
                metrics.say(&format!(
                    "step {} | checkpoint {} | weights checksum {:.6e} on {} rank(s)",
                    state.step,
                    dir.display(),
                    sums[0],
                    sums.len()
                ));
            }
        }
        if last {
            // No rank leaves (or aborts the job) while the last checkpoint is being written.
            dist.world.barrier();
        }
        if too_bad {
            bail!(
                "step {}: {bad_in_a_row} non-finite steps in a row (train.max_bad_steps = {}): stopped; \
                 the weights of the last good step are in the checkpoint {}",
                state.step,
                tc.max_bad_steps,
                ckpt_root.join(checkpoint::step_dir_name(state.step)).display()
            );
        }
        if stop_here {
            metrics.say(&format!(
                "step {}: stop requested (SIGTERM): checkpoint written, exiting; resume with --resume auto",
                state.step
            ));
            break;
        }
    }
    metrics.finish()?;
    Ok(TrainSummary {
        start_step,
        steps: state.step,
        last_loss,
        last_val_loss: last_val,
        tokens: state.tokens_seen,
    })
}
