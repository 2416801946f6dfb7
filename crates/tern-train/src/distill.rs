//! Layer-wise distillation (`[distill]`): a float teacher, a student made of the teacher's
//! weights with a 1-bit input encoder in front of every projection of the distilled blocks, and
//! the loss `mse_weight * sum_i MSE(W_i Enc_i(x_i), y_i) + ce_weight * CE + kl_weight * KL`, where
//! `x_i`, `y_i` are projection i's input and output in the teacher's forward pass (docs/distill.md).
//!
//! Schedule: each distilled block alone for `block_steps` steps (the others frozen), then all of
//! them together for `all_steps`, then `e2e_steps` end to end (every parameter, CE and KL only).

use std::collections::HashMap;
use tern_kernels::Kernels;

use crate::params::{assign_some_trainable, flat_values, param_infos};
use crate::slots::ParamSlots;

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use serde::{Deserialize, Serialize};
use tern_dist::Comm;
use tern_model::{
    cross_entropy, studentize, tap, EncoderConfig, Hooks, Llama, ModelConfig, Recorder,
    StudentConfig, Surrogate, Tap, Tapped,
};

/// `[distill]` of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: a Hugging Face Llama directory, a tern checkpoint, or a run's checkpoints.
    pub teacher: String,
    /// Blocks to distil (0-based); all when absent.
    #[serde(default)]
    pub blocks: Option<Vec<usize>>,
    /// Steps for each block alone, in order.
    #[serde(default)]
    pub block_steps: u64,
    /// Steps for all distilled blocks at once, after the per-block phase.
    #[serde(default)]
    pub all_steps: u64,
    /// Steps end to end (every parameter, loss `ce_weight * CE + kl_weight * KL`), last.
    #[serde(default)]
    pub e2e_steps: u64,
    #[serde(default = "d_mse")]
    pub mse_weight: f64,
    #[serde(default = "d_ce")]
    pub ce_weight: f64,
    #[serde(default)]
    pub kl_weight: f64,
    /// Weight of each distilled block's output MSE against the teacher's (the block run on the
    /// teacher's input to it), in the block phases.
    #[serde(default)]
    pub hidden_weight: f64,
    /// Weight of the attention-relation loss (MiniLM-v2 / BitDistill) on `attention_layer`, in
    /// the phases that train that block.
    #[serde(default)]
    pub attention_weight: f64,
    /// The block whose q, k and v relations are matched (default: the last entry of `blocks`).
    #[serde(default)]
    pub attention_layer: Option<usize>,
    /// Softmax temperature of the KL term (scaled by temperature^2, as Hinton et al.).
    #[serde(default = "d_one")]
    pub temperature: f64,
    #[serde(default)]
    pub surrogate: Surrogate,
    /// Scale `s` of the surrogate gradient.
    #[serde(default = "d_scale")]
    pub surrogate_scale: f64,
    /// Train the embedding during the block phases too (frozen by default).
    #[serde(default)]
    pub train_embeddings: bool,
    /// Train the final norm and LM head during the block phases too (frozen by default).
    #[serde(default)]
    pub train_head: bool,
    /// How the encoders start: `unit` (alpha 1, beta 0, random nets: the reference's) or
    /// `calibrated` (the residual form, alpha, beta and offset from the teacher's inputs).
    #[serde(default)]
    pub init: DistillInit,
    /// Micro-batches of the first training blocks that a calibrated start reads.
    #[serde(default = "d_calibration")]
    pub calibration_batches: usize,
    /// A ramp into quantization: over the first `quant_ramp_steps` steps that train a distilled
    /// block, its weight goes from float to the linear kind's quantized one (0: quantized from
    /// the start).
    #[serde(default)]
    pub quant_ramp_steps: u64,
}

/// `distill.init`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillInit {
    #[default]
    Unit,
    /// Each encoder in the residual form (`EncoderConfig::residual`), its code starting as
    /// `sign(x - beta)`, with per channel `beta`, the output offset and `alpha` the best one-bit
    /// code of the teacher's input over the calibration blocks ([`calibrated_encoders`]): the
    /// student's projection starts from `beta + alpha * sign(x - beta)`.
    Calibrated,
}

fn d_calibration() -> usize {
    8
}

fn d_mse() -> f64 {
    0.7
}
fn d_ce() -> f64 {
    0.3
}
fn d_one() -> f64 {
    1.0
}
fn d_scale() -> f64 {
    4.0
}

/// What a step trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Block(usize),
    AllBlocks,
    EndToEnd,
}

impl Phase {
    pub fn label(&self) -> String {
        match self {
            Phase::Block(b) => format!("block {b}"),
            Phase::AllBlocks => "all blocks".into(),
            Phase::EndToEnd => "end to end".into(),
        }
    }
}

impl DistillConfig {
    pub fn blocks(&self, n_layers: usize) -> Vec<usize> {
        self.blocks
            .clone()
            .unwrap_or_else(|| (0..n_layers).collect())
    }

    /// Steps of the whole schedule.
    pub fn total_steps(&self, n_layers: usize) -> u64 {
        self.blocks(n_layers).len() as u64 * self.block_steps + self.all_steps + self.e2e_steps
    }

    /// The phase of (0-based) step `step`.
    pub fn phase(&self, step: u64, n_layers: usize) -> Phase {
        let blocks = self.blocks(n_layers);
        let per_block = blocks.len() as u64 * self.block_steps;
        if step < per_block {
            Phase::Block(blocks[(step / self.block_steps) as usize])
        } else if step < per_block + self.all_steps {
            Phase::AllBlocks
        } else {
            Phase::EndToEnd
        }
    }

    /// The blocks whose projections the loss matches in `phase`.
    pub fn matched_blocks(&self, phase: Phase, n_layers: usize) -> Vec<usize> {
        match phase {
            Phase::Block(b) => vec![b],
            Phase::AllBlocks => self.blocks(n_layers),
            Phase::EndToEnd => vec![],
        }
    }

    /// Whether parameter `name` (tern's module path) is trained in `phase`.
    pub fn trains(&self, phase: Phase, name: &str, n_layers: usize) -> bool {
        let layer = name
            .strip_prefix("layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        match (phase, layer) {
            (Phase::EndToEnd, _) => true,
            (_, Some(l)) => self.matched_blocks(phase, n_layers).contains(&l),
            (_, None) if name.starts_with("embed_tokens.") => self.train_embeddings,
            (_, None) => self.train_head,
        }
    }

    /// How far block `b`'s weights are quantized in (0-based) step `step`: `k / quant_ramp_steps`
    /// where `k` counts the steps up to and including `step` that train the block (its own phase,
    /// then the all-blocks and end-to-end phases; steps where it is frozen do not count), 1 once
    /// `k` reaches the ramp (always 1 without a ramp).
    pub fn quant_mix(&self, b: usize, step: u64, n_layers: usize) -> f64 {
        let blocks = self.blocks(n_layers);
        let Some(k) = blocks.iter().position(|&x| x == b) else {
            return 1.0;
        };
        if self.quant_ramp_steps == 0 {
            return 1.0;
        }
        // Steps of [lo, hi) up to and including `step`.
        let within = |lo: u64, hi: u64| (step + 1).clamp(lo, hi) - lo;
        let (bs, per_block) = (self.block_steps, blocks.len() as u64 * self.block_steps);
        let own = within(k as u64 * bs, (k as u64 + 1) * bs);
        let together = within(per_block, per_block + self.all_steps + self.e2e_steps);
        ((own + together) as f64 / self.quant_ramp_steps as f64).min(1.0)
    }

    /// The block of the attention-relation loss.
    pub fn attention_block(&self, n_layers: usize) -> usize {
        self.attention_layer
            .unwrap_or_else(|| *self.blocks(n_layers).last().unwrap_or(&0))
    }

    pub fn student(&self, n_layers: usize, seed: u64) -> StudentConfig {
        StudentConfig {
            layers: self.blocks(n_layers),
            encoder: EncoderConfig {
                surrogate: self.surrogate,
                scale: self.surrogate_scale,
                residual: self.init == DistillInit::Calibrated,
            },
            seed,
        }
    }

    /// The weights of (projection MSE, CE, KL, block output MSE, attention relations) in
    /// `phase`: the end-to-end phase has none of the local terms.
    pub fn weights(&self, phase: Phase) -> [f64; 5] {
        let local = |w: f64| if phase == Phase::EndToEnd { 0.0 } else { w };
        [
            local(self.mse_weight),
            self.ce_weight,
            self.kl_weight,
            local(self.hidden_weight),
            local(self.attention_weight),
        ]
    }

    /// Whether `phase` runs the student's whole forward pass (for CE or KL); an MSE-only block
    /// phase runs only the block's projections.
    pub fn runs_student(&self, phase: Phase) -> bool {
        phase == Phase::EndToEnd || self.ce_weight > 0.0 || self.kl_weight > 0.0
    }

    /// A step's loss and its `metrics.jsonl` fields (`mse`, `hidden`, `attention`, `ce`, `kl`,
    /// `phase`, `block`) from its whole-batch projection MSE, block output MSE, CE, KL and
    /// attention-relation loss (CE is not a number when the phase did not compute it).
    pub fn step_fields(
        &self,
        phase: Phase,
        [mse, hidden, ce, kl, attention]: [f64; 5],
    ) -> (f64, serde_json::Map<String, serde_json::Value>) {
        use serde_json::json;
        let [wm, wc, wk, wh, wa] = self.weights(phase);
        let ran = self.runs_student(phase);
        let loss =
            wm * mse + if ran { wc * ce } else { 0.0 } + wk * kl + wh * hidden + wa * attention;
        let mut f = serde_json::Map::new();
        if phase != Phase::EndToEnd {
            f.insert("mse".into(), json!(mse));
            if self.hidden_weight > 0.0 {
                f.insert("hidden".into(), json!(hidden));
            }
            if self.attention_weight > 0.0 {
                f.insert("attention".into(), json!(attention));
            }
        }
        if ran {
            f.insert("ce".into(), json!(ce));
        }
        if self.kl_weight > 0.0 {
            f.insert("kl".into(), json!(kl));
        }
        f.insert("phase".into(), json!(phase.label()));
        let block = match phase {
            Phase::Block(b) => json!(b),
            _ => serde_json::Value::Null,
        };
        f.insert("block".into(), block);
        (loss, f)
    }

    /// Names and shapes of the student's encoder parameters (what `studentize` adds).
    pub fn encoder_shapes(&self, m: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for l in self.blocks(m.n_layers) {
            for (name, d) in [
                ("self_attn.q_proj", m.hidden),
                ("self_attn.k_proj", m.hidden),
                ("self_attn.v_proj", m.hidden),
                ("self_attn.o_proj", m.hidden),
                ("mlp.gate_proj", m.hidden),
                ("mlp.up_proj", m.hidden),
                ("mlp.down_proj", m.intermediate),
            ] {
                let h = (d / 2).max(1);
                let p = format!("layers.{l}.{name}.encoder");
                out.push((format!("{p}.fc1"), vec![h, d]));
                out.push((format!("{p}.fc2"), vec![d, h]));
                out.push((format!("{p}.alpha"), vec![d]));
                out.push((format!("{p}.beta"), vec![d]));
                if self.init == DistillInit::Calibrated {
                    out.push((format!("{p}.offset"), vec![d]));
                }
            }
        }
        out
    }

    /// The rules that need only the recipe.
    pub fn validate(&self, model: &ModelConfig, train_steps: u64) -> Result<(), String> {
        if model.linear == tern_model::LinearKind::Bitnet {
            return Err("model.linear = \"bitnet\": a distilled projection takes its 1-bit encoder's output; BitNet's norm and 8-bit quantization after it would undo that (use \"ternary\" or \"float\")".into());
        }
        let n = model.n_layers;
        let blocks = self.blocks(n);
        if blocks.is_empty() {
            return Err("distill.blocks: must name at least one block".into());
        }
        for (k, &b) in blocks.iter().enumerate() {
            if b >= n {
                return Err(format!(
                    "distill.blocks: block {b} does not exist (model.n_layers = {n})"
                ));
            }
            if blocks[..k].contains(&b) {
                return Err(format!("distill.blocks: block {b} is listed twice"));
            }
        }
        for (key, v) in [
            ("distill.mse_weight", self.mse_weight),
            ("distill.ce_weight", self.ce_weight),
            ("distill.kl_weight", self.kl_weight),
            ("distill.hidden_weight", self.hidden_weight),
            ("distill.attention_weight", self.attention_weight),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(format!("{key}: must be at least 0"));
            }
        }
        if self.mse_weight
            + self.ce_weight
            + self.kl_weight
            + self.hidden_weight
            + self.attention_weight
            == 0.0
        {
            return Err(
                "distill: mse_weight, hidden_weight, attention_weight, ce_weight and kl_weight \
                 are all 0: nothing to learn"
                    .into(),
            );
        }
        if let Some(l) = self.attention_layer {
            if !blocks.contains(&l) {
                return Err(format!(
                    "distill.attention_layer: block {l} is not one of distill.blocks {blocks:?} \
                     (the loss trains a distilled block's encoders)"
                ));
            }
        }
        if self.e2e_steps > 0 && self.ce_weight + self.kl_weight == 0.0 {
            return Err("distill.e2e_steps: the end-to-end phase trains on ce_weight * CE + kl_weight * KL, both 0".into());
        }
        for (key, v) in [
            ("distill.temperature", self.temperature),
            ("distill.surrogate_scale", self.surrogate_scale),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(format!("{key}: must be positive"));
            }
        }
        if self.quant_ramp_steps > 0 {
            if model.linear == tern_model::LinearKind::Float {
                return Err(
                    "distill.quant_ramp_steps: model.linear = \"float\" has nothing to quantize"
                        .into(),
                );
            }
            let last = self.block_steps + self.all_steps + self.e2e_steps;
            if self.quant_ramp_steps > last {
                return Err(format!(
                    "distill.quant_ramp_steps: {} is more than the {last} steps that train the last \
                     block; its weights would end the run not fully quantized",
                    self.quant_ramp_steps
                ));
            }
        }
        if self.init == DistillInit::Calibrated && self.calibration_batches == 0 {
            return Err("distill.calibration_batches: a calibrated start needs at least 1".into());
        }
        let total = self.total_steps(n);
        if total != train_steps {
            return Err(format!(
                "distill: the schedule has {total} steps ({} blocks x block_steps {} + all_steps {} + e2e_steps {}) \
                 but train.steps = {train_steps}; make them equal",
                blocks.len(),
                self.block_steps,
                self.all_steps,
                self.e2e_steps
            ));
        }
        Ok(())
    }
}

/// The student's `[model]` must be the teacher's architecture; only the kind of linear and its
/// ternary settings may differ.
pub fn check_teacher(
    student: &ModelConfig,
    teacher: &ModelConfig,
    source: &str,
) -> Result<(), String> {
    if !teacher.is_llama() {
        return Err(format!(
            "distill.teacher = {source}: a teacher of LLaMA blocks is needed; this one has Mamba \
             mixers, experts or routed blocks (model.attention_period, model.moe, model.moa, \
             model.mod)"
        ));
    }
    let pairs: [(&str, f64, f64); 8] = [
        ("model.hidden", student.hidden as f64, teacher.hidden as f64),
        (
            "model.intermediate",
            student.intermediate as f64,
            teacher.intermediate as f64,
        ),
        (
            "model.n_layers",
            student.n_layers as f64,
            teacher.n_layers as f64,
        ),
        (
            "model.n_heads",
            student.n_heads as f64,
            teacher.n_heads as f64,
        ),
        (
            "model.n_kv_heads",
            student.kv_heads() as f64,
            teacher.kv_heads() as f64,
        ),
        ("model.rope_theta", student.rope_theta, teacher.rope_theta),
        ("model.rms_eps", student.rms_eps, teacher.rms_eps),
        (
            "model.tie_embeddings",
            student.tie_embeddings as u8 as f64,
            teacher.tie_embeddings as u8 as f64,
        ),
    ];
    for (key, s, t) in pairs {
        if s != t {
            return Err(format!("{key} = {s} but the teacher {source} has {t}: the student is the teacher's architecture"));
        }
    }
    if student.mlp != teacher.mlp {
        return Err(format!(
            "model.mlp = {:?} but the teacher {source} has {:?}: the student keeps the teacher's feed-forward",
            student.mlp, teacher.mlp
        ));
    }
    if student.vocab_size.is_some() && student.vocab_size != teacher.vocab_size {
        return Err(format!(
            "model.vocab_size = {} but the teacher {source} has {}",
            student.vocab(),
            teacher.vocab()
        ));
    }
    Ok(())
}

/// The student of `teacher` in one process: `Llama::new(model)` made a student (`studentize`),
/// holding the teacher's weights; its encoders keep their seeded initial values. `check_teacher`
/// must have passed, so every other parameter has its twin, by name and shape, in the teacher.
pub fn student_of<B: AutodiffBackend>(
    teacher: &Llama<B::InnerBackend>,
    cfg: &DistillConfig,
    model: &ModelConfig,
    seed: u64,
    device: &B::Device,
) -> Llama<B> {
    let student = studentize(
        Llama::<B>::new(model, device),
        &cfg.student(model.n_layers, seed),
        device,
    );
    let infos = param_infos::<B, _>(&student);
    let slots = ParamSlots::new(&infos, &infos, 1, Default::default());
    assign_some_trainable(student, teacher_shards(teacher, &slots, 0, 1))
}

/// The teacher's value of each of a student's `slots`, this rank's block of it (`rank` of `tp`),
/// flat, on the teacher's device; `None` for the student's encoders, which keep their seeded
/// values. `check_teacher` must have passed.
pub fn teacher_shards<B: Backend>(
    teacher: &Llama<B>,
    slots: &ParamSlots,
    rank: usize,
    tp: usize,
) -> Vec<Option<Tensor<B, 1>>> {
    let mut by_name: HashMap<String, Tensor<B, 1>> = param_infos::<B, _>(teacher)
        .into_iter()
        .map(|i| i.name)
        .zip(flat_values::<B, _>(teacher))
        .collect();
    slots
        .iter()
        .map(|s| {
            let Some(whole) = by_name.remove(&s.name) else {
                assert!(
                    s.name.contains(".encoder."),
                    "the teacher has no {}",
                    s.name
                );
                return None;
            };
            let n: usize = s.local.iter().product();
            Some(match s.shard {
                Some(d) => {
                    let rows = s.shape[0];
                    let cols = s.shape[1..].iter().product::<usize>();
                    let len = s.shape[d] / tp;
                    whole
                        .reshape([rows, cols])
                        .narrow(d, rank * len, len)
                        .reshape([n])
                }
                None => whole,
            })
        })
        .collect()
}

/// One micro-batch's loss and its parts (host values for the logs).
pub struct DistillLoss<B: Backend> {
    pub total: Tensor<B, 1>,
    /// The MSE of projections whose output this tensor-parallel rank holds a block of (column-
    /// parallel), divided by the group size: summed over the group it is their MSE.
    pub mse_split: f64,
    /// The MSE of the other projections (equal on every rank of the group).
    pub mse_whole: f64,
    /// NaN when the phase does not compute it (CE and KL weights 0).
    pub ce: f64,
    pub kl: f64,
    /// The distilled blocks' output MSE (equal on every rank of the group).
    pub hidden: f64,
    /// The attention-relation loss of this rank's heads, divided by the group size (summed over
    /// the group it is the loss).
    pub attention_split: f64,
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    t.clone().into_scalar().elem()
}

/// A distillation's teacher, recording the inputs and outputs of its distilled blocks'
/// projections (taps, applied from outside the model).
pub struct Teacher<B: Backend, H> {
    model: Llama<B, Tapped<H>>,
    recorder: Recorder,
}

impl<B: Backend, H: Clone> Teacher<B, H> {
    /// `model` with its blocks `blocks` tapped; they record only within [`Self::run`].
    pub fn new(model: Llama<B, H>, blocks: &[usize]) -> Self {
        let (model, recorder) = tap(model, blocks);
        recorder.record(false);
        Self { model, recorder }
    }

    pub fn model(&self) -> &Llama<B, Tapped<H>> {
        &self.model
    }
}

impl<B: Kernels, H: Hooks<B>> Teacher<B, H> {
    /// The logits when `logits` (a full pass) and the taps of `layers` (which must be tapped);
    /// without logits the pass stops after the last of `layers`.
    pub fn run(
        &self,
        inputs: Tensor<B, 2, Int>,
        layers: &[usize],
        logits: bool,
    ) -> (Option<Tensor<B, 3>>, Vec<Vec<Tap<B>>>) {
        let (out, taps, _) = self.run_blocks(inputs, layers, logits);
        (out, taps)
    }

    /// [`Self::run`], with the input and output of each of `layers` (in `layers`' order).
    #[allow(clippy::type_complexity)]
    pub fn run_blocks(
        &self,
        inputs: Tensor<B, 2, Int>,
        layers: &[usize],
        logits: bool,
    ) -> (
        Option<Tensor<B, 3>>,
        Vec<Vec<Tap<B>>>,
        Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
    ) {
        let m = &self.model;
        let last = match logits {
            true => m.layers.len(),
            false => layers.iter().max().map_or(0, |&l| l + 1),
        };
        let [_, t] = inputs.dims();
        let (cos, sin) = m.rope(t, &inputs.device());
        self.recorder.record(true);
        let mut x = m.embed(inputs);
        let mut ends = vec![None; m.layers.len()];
        for (i, block) in m.layers.iter().enumerate().take(last) {
            let y = block.forward(x.clone(), &cos, &sin);
            if layers.contains(&i) {
                ends[i] = Some((x, y.clone()));
            }
            x = y;
        }
        self.recorder.record(false);
        let out = logits.then(|| m.ends.whole_logits(m.head(x)));
        let ends = layers
            .iter()
            .map(|&l| ends[l].clone().expect("a block that ran"))
            .collect();
        (out, self.recorder.take(layers), ends)
    }
}

/// The loss of `student` on `block` (`[batch, seq + 1]` tokens) in `phase`; the teacher runs
/// once, without gradients.
pub fn distill_loss<B, H>(
    cfg: &DistillConfig,
    phase: Phase,
    student: &Llama<B, H>,
    teacher: &Teacher<B::InnerBackend, H>,
    block: Tensor<B::InnerBackend, 2, Int>,
    tp: usize,
) -> DistillLoss<B>
where
    B: AutodiffBackend + Kernels,
    B::InnerBackend: Kernels,
    H: Hooks<B> + Hooks<B::InnerBackend>,
{
    let [_, t1] = block.dims();
    let inputs = block.clone().narrow(1, 0, t1 - 1);
    let targets = block.narrow(1, 1, t1 - 1);
    let n_layers = student.layers.len();
    let matched = cfg.matched_blocks(phase, n_layers);
    // What this phase needs: the teacher's logits only for KL, the student's whole forward pass
    // only for CE or KL (an MSE-only block phase runs the teacher up to the block and the
    // student's projections of the block, nothing else).
    let (t_logits, taps, ends) = teacher.run_blocks(inputs.clone(), &matched, cfg.kl_weight > 0.0);

    let device = student.embed_tokens.weight.device();
    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let (mut split, mut whole, mut attention) = (zero(), zero(), zero());
    let relations = cfg.weights(phase)[4] > 0.0;
    let relation_block = cfg.attention_block(n_layers);
    for (&l, taps) in matched.iter().zip(taps) {
        for tap in taps {
            let proj = student.layers[l].projection(tap.name);
            let y = proj.forward(Tensor::<B, 3>::from_inner(tap.input));
            let target = Tensor::<B, 3>::from_inner(tap.output);
            if relations
                && l == relation_block
                && matches!(
                    tap.name,
                    "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
                )
            {
                // A third of the mean over q, k and v; q, k and v are column-parallel, so this
                // rank's heads' share is divided by the group size like their MSE.
                let hd = student.layers[l].attention().head_dim;
                let r = relation_kl(target.clone().detach(), y.clone(), hd);
                attention = attention + r.div_scalar(3.0 * tp as f64);
            }
            let mse = (y - target).powi_scalar(2).mean();
            // Under tensor parallelism the teacher is split like the student: a column-parallel
            // projection's tap holds this rank's block of outputs. Its share of the loss is
            // divided by the group size, so that the gradient all-reduce after its encoder sums
            // to the whole projection's gradient.
            match <H as Hooks<B>>::splits_output(&proj.hooks) {
                true => split = split + mse.div_scalar(tp as f64),
                false => whole = whole + mse,
            }
        }
    }
    let mse = split.clone() + whole.clone();
    // Each block's output from the teacher's input to it (replicated under tensor parallelism).
    let mut hidden = zero();
    if cfg.weights(phase)[3] > 0.0 {
        let [_, t] = inputs.dims();
        let (cos, sin) = student.rope(t, &device);
        for (&l, (x, y)) in matched.iter().zip(ends) {
            let s = student.layers[l].forward(Tensor::from_inner(x), &cos, &sin);
            hidden = hidden + (s - Tensor::<B, 3>::from_inner(y)).powi_scalar(2).mean();
        }
    }
    let (ce, kl) = match cfg.runs_student(phase) {
        false => (None, zero()),
        true => {
            let s_logits = student.forward(Tensor::from_inner(inputs));
            let ce = cross_entropy(s_logits.clone(), Tensor::from_inner(targets));
            let kl = match t_logits {
                Some(t_logits) => {
                    let temp = cfg.temperature;
                    let log_t =
                        log_softmax(Tensor::<B, 3>::from_inner(t_logits).div_scalar(temp), 2);
                    let log_s = log_softmax(s_logits.div_scalar(temp), 2);
                    let [b, t, _] = log_s.dims();
                    kl_of_logs(log_t, log_s)
                        .div_scalar((b * t) as f64)
                        .mul_scalar(temp * temp)
                }
                None => zero(),
            };
            (Some(ce), kl)
        }
    };
    let ce_value = ce.as_ref().map_or(f64::NAN, scalar);
    let ce = ce.unwrap_or_else(zero);
    let [wm, wc, wk, wh, wa] = cfg.weights(phase);
    let total = mse.mul_scalar(wm)
        + ce.mul_scalar(wc)
        + kl.clone().mul_scalar(wk)
        + hidden.clone().mul_scalar(wh)
        + attention.clone().mul_scalar(wa);
    DistillLoss {
        mse_split: scalar(&split),
        mse_whole: scalar(&whole),
        ce: ce_value,
        kl: scalar(&kl),
        hidden: scalar(&hidden),
        attention_split: scalar(&attention),
        total,
    }
}

/// The attention-relation loss of one projection's outputs (MiniLM-v2, as BitDistill uses it):
/// `teacher`, `student`: `[batch, seq, heads * hd]`, split into heads of `hd`; per head the
/// relation `R = softmax(A A^T / sqrt(hd))` over the positions a causal model sees (up to and
/// including its own), and the loss `KL(R_teacher || R_student)` summed over a row, averaged over
/// batch, heads and rows.
pub fn relation_kl<B: Backend>(
    teacher: Tensor<B, 3>,
    student: Tensor<B, 3>,
    hd: usize,
) -> Tensor<B, 1> {
    let [b, t, d] = student.dims();
    let heads = d / hd;
    let device = student.device();
    // A large finite negative, not -inf: a masked entry then has p = 0 and adds exactly 0.
    let mask = Tensor::<B, 2>::ones([t, t], &device)
        .triu(1)
        .mul_scalar(-1e9)
        .unsqueeze::<4>();
    let log_relation = |a: Tensor<B, 3>| {
        let a = a.reshape([b, t, heads, hd]).swap_dims(1, 2);
        let scores = a
            .clone()
            .matmul(a.transpose())
            .div_scalar((hd as f64).sqrt());
        log_softmax(scores + mask.clone(), 3)
    };
    let (lt, ls) = (log_relation(teacher), log_relation(student));
    kl_of_logs(lt, ls).div_scalar((b * heads * t) as f64)
}

/// `sum p (log p - log q)` over every element, from `log p` and `log q`: the KL of each row of
/// distributions, summed.
fn kl_of_logs<B: Backend, const D: usize>(
    log_p: Tensor<B, D>,
    log_q: Tensor<B, D>,
) -> Tensor<B, 1> {
    (log_p.clone().exp() * (log_p - log_q)).sum()
}

/// Per-channel sums over a tap's input rows `x: [rows, d]`, given a per-channel threshold.
type RowSums<'a, B> = dyn Fn(Tensor<B, 2>, Option<&Tensor<B, 1>>) -> Vec<Tensor<B, 1>> + 'a;

/// Lloyd iterations of a calibrated start (after the mean): each moves a channel's threshold to
/// the midpoint of its two levels.
const CALIBRATION_ROUNDS: usize = 2;

/// The calibrated start of the encoders (`distill.init = "calibrated"`): for every projection of
/// the distilled `layers`, per channel of the teacher's input `x` over `blocks` (`[batch, seq +
/// 1]` tokens), the best two-level code `offset ± alpha` of `x` in L2 around a threshold `beta`
/// (Lloyd-Max for one bit): starting from `beta` = the mean, the levels are the means of `x`
/// above and below `beta` (`offset` their midpoint, `alpha` half their distance), and `beta`
/// moves to that midpoint, [`CALIBRATION_ROUNDS`] times. Values for the slots
/// `layers.{l}.{projection}.encoder.{beta,offset,alpha}`, `None` for every other slot. Each rank
/// computes its own channels (a row-parallel projection's input is split) from the same blocks,
/// so the values are the one-process ones under any layout, with no communication.
pub fn calibrated_encoders<B: Kernels, H: Hooks<B>>(
    teacher: &Teacher<B, H>,
    layers: &[usize],
    blocks: &[Tensor<B, 2, Int>],
    slots: &ParamSlots,
) -> Vec<Option<Tensor<B, 1>>> {
    // Per tap, summed over rows: `f(x, threshold)` -> [d] tensors (with the row count).
    let pass = |f: &RowSums<'_, B>, at: Option<&HashMap<String, Tensor<B, 1>>>| {
        let mut acc: HashMap<String, (Vec<Tensor<B, 1>>, usize)> = HashMap::new();
        for block in blocks {
            let [_, t1] = block.dims();
            let (_, taps) = teacher.run(block.clone().narrow(1, 0, t1 - 1), layers, false);
            for (l, taps) in layers.iter().zip(taps) {
                for tap in taps {
                    let key = format!("layers.{l}.{}.encoder", tap.name);
                    let d = tap.input.dims()[2];
                    let x = tap.input.reshape([-1, d as i32]);
                    let rows = x.dims()[0];
                    let parts = f(x, at.map(|m| &m[&key]));
                    let e = acc
                        .entry(key)
                        .or_insert_with(|| (parts.iter().map(|p| p.zeros_like()).collect(), 0));
                    e.0 = e.0.iter().zip(parts).map(|(a, p)| a.clone() + p).collect();
                    e.1 += rows;
                }
            }
        }
        acc
    };
    let sum = |x: Tensor<B, 2>| x.sum_dim(0).squeeze_dim::<1>(0);
    let mean: HashMap<String, Tensor<B, 1>> = pass(&|x, _| vec![sum(x)], None)
        .into_iter()
        .map(|(k, (s, n))| (k, s[0].clone().div_scalar(n as f64)))
        .collect();
    let (mut beta, mut levels) = (mean, HashMap::new());
    for _ in 0..CALIBRATION_ROUNDS {
        // Sums and counts of the rows above the threshold; the rest are below.
        let split = |x: Tensor<B, 2>, c: Option<&Tensor<B, 1>>| {
            let c = c.expect("a threshold").clone().unsqueeze::<2>();
            let above = x.clone().greater(c).float();
            vec![sum(x.clone() * above.clone()), sum(above), sum(x)]
        };
        levels = pass(&split, Some(&beta))
            .into_iter()
            .map(|(k, (s, n))| {
                let (up, n_up, all) = (s[0].clone(), s[1].clone(), s[2].clone());
                let n_down = n_up.clone().neg().add_scalar(n as f64);
                // A side with no rows takes the threshold's value (alpha then near 0).
                let c = beta[&k].clone();
                let hi = (up.clone() / n_up.clone().clamp_min(1.0))
                    .mask_where(n_up.equal_elem(0.0), c.clone());
                let lo = ((all - up) / n_down.clone().clamp_min(1.0))
                    .mask_where(n_down.equal_elem(0.0), c);
                (k, (hi, lo))
            })
            .collect::<HashMap<_, _>>();
        beta = levels
            .iter()
            .map(|(k, (hi, lo))| (k.clone(), (hi.clone() + lo.clone()).div_scalar(2.0)))
            .collect();
    }
    slots
        .iter()
        .map(|s| {
            let (enc, param) = s.name.rsplit_once('.')?;
            let (hi, lo) = levels.get(enc)?;
            match param {
                "beta" | "offset" => beta.get(enc).cloned(),
                // A channel that never varies keeps a small positive scale.
                "alpha" => Some((hi.clone() - lo.clone()).div_scalar(2.0).clamp_min(1e-6)),
                _ => None,
            }
        })
        .collect()
}

/// One projection's figures on the validation blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStat {
    /// `layers.{i}.self_attn.q_proj`, ...
    pub name: String,
    /// `MSE(W Enc(x), y)` against the teacher: the figure the layer-wise phase lowers.
    pub mse: f64,
    /// `mean(y^2)` of the teacher's output, the MSE of predicting zero: the scale to read `mse`
    /// against.
    pub teacher_y2: f64,
}

/// [`ProjectionStat`] of every projection of the distilled `layers`, averaged over `blocks`
/// (`[batch, seq + 1]` tokens each). Every rank of the tensor-parallel group `tp` must call it
/// (each holds its block of the column-parallel projections' outputs); all get the whole figures.
pub fn projection_stats<B: Kernels, H: Hooks<B>>(
    student: &Llama<B, H>,
    teacher: &Teacher<B, H>,
    layers: &[usize],
    blocks: &[Tensor<B, 2, Int>],
    tp: &dyn Comm,
) -> Vec<ProjectionStat> {
    let mut stats: Vec<ProjectionStat> = Vec::new();
    // Each rank's share: its block's mean, divided by the group size (replicated outputs too),
    // so that a sum over the group is the whole projection's mean.
    let share = 1.0 / (blocks.len() * tp.size()) as f64;
    let mean_sq = |t: Tensor<B, 3>| -> f64 {
        let v: f32 = t.powi_scalar(2).mean().into_scalar().elem();
        v as f64 * share
    };
    for block in blocks {
        let [_, t1] = block.dims();
        let (_, taps) = teacher.run(block.clone().narrow(1, 0, t1 - 1), layers, false);
        let taps = layers
            .iter()
            .zip(taps)
            .flat_map(|(&l, t)| t.into_iter().map(move |t| (l, t)));
        for (k, (l, tap)) in taps.enumerate() {
            let y = student.layers[l].projection(tap.name).forward(tap.input);
            if stats.len() <= k {
                stats.push(ProjectionStat {
                    name: format!("layers.{l}.{}", tap.name),
                    mse: 0.0,
                    teacher_y2: 0.0,
                });
            }
            stats[k].mse += mean_sq(y - tap.output.clone());
            stats[k].teacher_y2 += mean_sq(tap.output);
        }
    }
    let mut v: Vec<f32> = stats
        .iter()
        .flat_map(|s| [s.mse as f32, s.teacher_y2 as f32])
        .collect();
    tp.all_reduce_sum(&mut v);
    for (s, pair) in stats.iter_mut().zip(v.chunks(2)) {
        s.mse = pair[0] as f64;
        s.teacher_y2 = pair[1] as f64;
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    type AB = burn::backend::Autodiff<burn::backend::Flex>;

    /// A float model of 3 blocks, normal weights (std 0.3) from `seed`.
    fn three_blocks(seed: u64) -> Llama<AB> {
        let m = ModelConfig {
            n_layers: 3,
            ..ModelConfig::tiny(20, tern_model::LinearKind::Float)
        };
        let dev = Default::default();
        crate::init::init_normal(Llama::<AB>::new(&m, &dev), seed, 0.3, &dev)
    }

    /// Two blocks of 5 tokens (4 inputs and their targets).
    fn two_sequences() -> Tensor<burn::backend::Flex, 2, Int> {
        let data = burn::tensor::TensorData::new(vec![1i64, 4, 7, 2, 9, 3, 0, 5, 8, 6], [2, 5]);
        Tensor::from_data(data, &Default::default())
    }

    fn cfg() -> DistillConfig {
        toml::from_str(
            r#"
            teacher = "t"
            blocks = [2, 0]
            block_steps = 3
            all_steps = 2
            e2e_steps = 1
            "#,
        )
        .unwrap()
    }

    /// A teacher with Mamba mixers, experts or routed blocks is refused by name, not panicked on.
    #[test]
    fn a_teacher_must_be_llama() {
        let student = ModelConfig::tiny(50, tern_model::LinearKind::Ternary);
        let teacher = ModelConfig {
            attention_period: 2,
            ..ModelConfig::tiny(50, tern_model::LinearKind::Float)
        };
        let e = check_teacher(&student, &teacher, "runs/jamba").unwrap_err();
        assert!(
            e.contains("distill.teacher = runs/jamba") && e.contains("LLaMA"),
            "{e}"
        );
    }

    #[test]
    fn schedule_goes_block_by_block_then_all_then_end_to_end() {
        let c = cfg();
        let phases: Vec<Phase> = (0..9).map(|s| c.phase(s, 4)).collect();
        use Phase::*;
        assert_eq!(
            phases,
            [
                Block(2),
                Block(2),
                Block(2),
                Block(0),
                Block(0),
                Block(0),
                AllBlocks,
                AllBlocks,
                EndToEnd
            ]
        );
        assert_eq!(c.total_steps(4), 9);
        assert!(c.trains(Block(2), "layers.2.mlp.up_proj.encoder.alpha", 4));
        assert!(!c.trains(Block(2), "layers.0.mlp.up_proj.weight", 4));
        assert!(!c.trains(Block(2), "embed_tokens.weight", 4));
        assert!(!c.trains(AllBlocks, "layers.1.input_layernorm.weight", 4));
        assert!(c.trains(AllBlocks, "layers.0.input_layernorm.weight", 4));
        assert!(!c.trains(AllBlocks, "lm_head.weight", 4));
        assert!(c.trains(EndToEnd, "lm_head.weight", 4));
        assert!(c.trains(EndToEnd, "layers.1.self_attn.q_proj.weight", 4));
        let c = DistillConfig {
            train_head: true,
            train_embeddings: true,
            ..cfg()
        };
        assert!(
            c.trains(Block(0), "norm.weight", 4) && c.trains(Block(0), "embed_tokens.weight", 4)
        );
    }

    #[test]
    fn bad_settings_name_the_key() {
        let m = ModelConfig::tiny(10, tern_model::LinearKind::Ternary);
        let c = cfg();
        assert!(c
            .validate(&m, 9)
            .unwrap_err()
            .contains("block 2 does not exist"));
        let c = DistillConfig {
            blocks: Some(vec![1, 1]),
            ..cfg()
        };
        assert!(c.validate(&m, 9).unwrap_err().contains("listed twice"));
        let c = DistillConfig {
            blocks: Some(vec![1, 0]),
            ..cfg()
        };
        assert!(c.validate(&m, 9).is_ok());
        assert!(c
            .validate(&m, 8)
            .unwrap_err()
            .contains("the schedule has 9 steps"));
        let c = DistillConfig {
            mse_weight: -1.0,
            blocks: Some(vec![0]),
            ..cfg()
        };
        assert!(c
            .validate(&m, 6)
            .unwrap_err()
            .starts_with("distill.mse_weight"));
        let c = DistillConfig {
            ce_weight: 0.0,
            blocks: Some(vec![0]),
            ..cfg()
        };
        assert!(c
            .validate(&m, 6)
            .unwrap_err()
            .starts_with("distill.e2e_steps"));
    }

    #[test]
    fn encoder_shapes_are_what_studentize_adds() {
        use burn::backend::Flex;
        let m = ModelConfig::tiny(10, tern_model::LinearKind::Ternary);
        let c = DistillConfig {
            blocks: Some(vec![1]),
            ..cfg()
        };
        let dev = Default::default();
        let student = tern_model::studentize(Llama::<Flex>::new(&m, &dev), &c.student(2, 1), &dev);
        let added: Vec<(String, Vec<usize>)> = crate::params::param_infos::<Flex, _>(&student)
            .into_iter()
            .filter(|i| i.name.contains(".encoder."))
            .map(|i| (i.name, i.shape))
            .collect();
        assert_eq!(added, c.encoder_shapes(&m));
        // Block 0 stays a float copy, block 1 keeps the recipe's ternary kind.
        assert_eq!(
            student.layers[0].mlp().up_proj.kind,
            tern_model::LinearKind::Float
        );
        assert_eq!(
            student.layers[1].mlp().up_proj.kind,
            tern_model::LinearKind::Ternary
        );
        assert!(student.layers[0].mlp().up_proj.encoder.is_none());
    }

    #[test]
    fn kl_is_zero_for_the_teacher_itself_and_positive_otherwise() {
        use burn::module::AutodiffModule;
        let m = ModelConfig::tiny(20, tern_model::LinearKind::Float);
        let dev = Default::default();
        let student = crate::init::init_normal(Llama::<AB>::new(&m, &dev), 3, 0.3, &dev);
        let teacher = Teacher::new(student.valid(), &[]);
        let c = DistillConfig {
            kl_weight: 1.0,
            temperature: 2.0,
            ..cfg()
        };
        let block = two_sequences();
        let l = distill_loss(&c, Phase::EndToEnd, &student, &teacher, block.clone(), 1);
        assert!(l.kl.abs() < 1e-6, "KL(p || p) = {}", l.kl);
        let ce = scalar(&teacher.model().loss(block.clone()));
        assert!((l.ce - ce).abs() < 1e-6, "{} vs {ce}", l.ce);
        // Another student: KL > 0, and the total is ce_weight * CE + kl_weight * KL (no MSE end to end).
        let other = three_blocks(4);
        let l = distill_loss(&c, Phase::EndToEnd, &other, &teacher, block, 1);
        assert!(l.kl > 1e-3, "{}", l.kl);
        let total = scalar(&l.total);
        assert!(
            (total - (0.3 * l.ce + l.kl)).abs() < 1e-5 * total.abs(),
            "{total}"
        );
    }

    /// The block output MSE: block 1 of another model run on the teacher's input to block 1,
    /// against the teacher's output of it, computed here from two of the teacher's passes that
    /// stop early; zero for the teacher itself, and the total is its weight times it.
    #[test]
    fn hidden_mse_is_the_blocks_output_error_on_the_teachers_input() {
        use burn::module::AutodiffModule;
        let dev = Default::default();
        let student = three_blocks(3);
        let teacher_model = student.valid();
        let teacher = Teacher::new(teacher_model.clone(), &[1]);
        let c = DistillConfig {
            blocks: Some(vec![1]),
            mse_weight: 0.0,
            ce_weight: 0.0,
            hidden_weight: 2.0,
            ..cfg()
        };
        let block = two_sequences();
        let l = distill_loss(&c, Phase::Block(1), &student, &teacher, block.clone(), 1);
        assert!(l.hidden.abs() < 1e-12, "the teacher itself: {}", l.hidden);
        let other = three_blocks(4);
        let l = distill_loss(&c, Phase::Block(1), &other, &teacher, block.clone(), 1);
        let inputs = block.narrow(1, 0, 4);
        let x = teacher_model.forward_blocks(inputs.clone(), 1);
        let y = teacher_model.forward_blocks(inputs, 2);
        let (cos, sin) = teacher_model.rope(4, &dev);
        let s = other.valid().layers[1].forward(x, &cos, &sin);
        let want = scalar(&(s - y).powi_scalar(2).mean());
        assert!(
            want > 1e-3 && (l.hidden - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            l.hidden
        );
        assert!((scalar(&l.total) - 2.0 * want).abs() <= 1e-6 * want);
    }

    /// The ramp into quantization: per block over the steps that train it (blocks [2, 0], 3 steps
    /// each, then 2 together and 1 end to end), and its errors.
    #[test]
    fn quantization_ramp_starts_with_each_blocks_training() {
        let c = DistillConfig {
            quant_ramp_steps: 2,
            ..cfg()
        };
        let mix =
            |c: &DistillConfig, b: usize| (0..9).map(|s| c.quant_mix(b, s, 3)).collect::<Vec<_>>();
        assert_eq!(mix(&c, 2), [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(mix(&c, 0), [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // A ramp longer than a block's phase waits while the block is frozen (block 0's phase
        // for block 2) and goes on in the all-blocks phase (steps 6 and 7).
        let c4 = DistillConfig {
            quant_ramp_steps: 4,
            ..cfg()
        };
        assert_eq!(
            mix(&c4, 2),
            [0.25, 0.5, 0.75, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0]
        );
        assert_eq!(mix(&c4, 0), [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(c4.quant_mix(1, 0, 3), 1.0, "block 1 is not distilled");
        assert_eq!(
            cfg().quant_mix(0, 0, 3),
            1.0,
            "no ramp: quantized from the start"
        );
        let three = |kind| ModelConfig {
            n_layers: 3,
            ..ModelConfig::tiny(20, kind)
        };
        let tern = three(tern_model::LinearKind::Ternary);
        let steps = c.total_steps(3);
        assert!(c.validate(&tern, steps).is_ok());
        let float = three(tern_model::LinearKind::Float);
        let e = c.validate(&float, steps).unwrap_err();
        assert!(
            e.contains("distill.quant_ramp_steps") && e.contains("float"),
            "{e}"
        );
        let long = DistillConfig {
            quant_ramp_steps: 7,
            ..cfg()
        };
        let e = long.validate(&tern, steps).unwrap_err();
        assert!(
            e.contains("distill.quant_ramp_steps: 7") && e.contains("6 steps"),
            "{e}"
        );
    }

    /// The attention-relation loss against the formula computed here in f64: a two-position case
    /// written out (the first row sees only itself, so only the second row counts), and a case
    /// of 2 sequences x 3 heads x 5 positions; zero for equal states.
    #[test]
    fn relation_kl_is_the_kl_of_causal_attention_relations() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let dev = Default::default();
        let t3 = |v: &[f64], shape: [usize; 3]| {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::<Flex, 3>::from_data(TensorData::new(v, shape), &dev)
        };
        let softmax = |s: &[f64]| {
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            s.iter().map(|x| (x - m).exp() / z).collect::<Vec<f64>>()
        };
        let kl = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(p, q)| p * (p / q).ln()).sum::<f64>();
        // Teacher rows (1, 0), (0.5, 1); student rows (0.2, 0.3), (1, -1); hd 2.
        let r2 = 2f64.sqrt();
        let p = softmax(&[0.5 / r2, 1.25 / r2]);
        let q = softmax(&[-0.1 / r2, 2.0 / r2]);
        let want = kl(&p, &q) / 2.0;
        let got = scalar(&relation_kl(
            t3(&[1.0, 0.0, 0.5, 1.0], [1, 2, 2]),
            t3(&[0.2, 0.3, 1.0, -1.0], [1, 2, 2]),
            2,
        ));
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");

        let (b, t, heads, hd) = (2, 5, 3, 4);
        let d = heads * hd;
        let wave = |k: f64| -> Vec<f64> {
            (0..b * t * d)
                .map(|i| ((i as f64) * k + 0.3).sin())
                .collect()
        };
        let (ta, sa) = (wave(0.37), wave(0.91));
        let rel = |a: &[f64], bi: usize, h: usize, i: usize| -> Vec<f64> {
            let row = |j: usize| &a[(bi * t + j) * d + h * hd..][..hd];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    row(i).iter().zip(row(j)).map(|(x, y)| x * y).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            softmax(&scores)
        };
        let mut want = 0.0;
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    want += kl(&rel(&ta, bi, h, i), &rel(&sa, bi, h, i));
                }
            }
        }
        want /= (b * heads * t) as f64;
        let got = scalar(&relation_kl(t3(&ta, [b, t, d]), t3(&sa, [b, t, d]), hd));
        assert!(
            want > 1e-2 && (got - want).abs() <= 1e-5 * want,
            "{got} vs {want}"
        );
        let same = scalar(&relation_kl(t3(&ta, [b, t, d]), t3(&ta, [b, t, d]), hd));
        assert!(same.abs() < 1e-7, "{same}");
    }

    /// In `distill_loss` the relations are those of the chosen block only, in the phases that
    /// train it: zero for the teacher itself, positive for another model, and nothing in block
    /// 0's phase when the chosen block is 1.
    #[test]
    fn attention_relations_count_on_the_chosen_block_only() {
        use burn::module::AutodiffModule;
        let student = three_blocks(3);
        let teacher = Teacher::new(student.valid(), &[0, 1]);
        let c = DistillConfig {
            blocks: Some(vec![0, 1]),
            mse_weight: 0.0,
            ce_weight: 0.0,
            attention_weight: 2.0,
            attention_layer: Some(1),
            ..cfg()
        };
        let block = two_sequences();
        let l = distill_loss(&c, Phase::Block(1), &student, &teacher, block.clone(), 1);
        assert!(
            l.attention_split.abs() < 1e-7,
            "the teacher itself: {}",
            l.attention_split
        );
        let other = three_blocks(4);
        let l = distill_loss(&c, Phase::Block(1), &other, &teacher, block.clone(), 1);
        assert!(l.attention_split > 1e-4, "{}", l.attention_split);
        let total = scalar(&l.total);
        assert!(
            (total - 2.0 * l.attention_split).abs() <= 1e-6 * total,
            "{total}"
        );
        let l0 = distill_loss(&c, Phase::Block(0), &other, &teacher, block, 1);
        assert_eq!(l0.attention_split, 0.0);
    }

    /// The calibrated start: per channel of each distilled projection's teacher input over the
    /// blocks, the Lloyd-Max one-bit code (threshold and offset the midpoint of the means above
    /// and below it, alpha half their distance), against the same iterations on the host; under TP=2 (thread ranks)
    /// each rank gets its block of the row-parallel projections' channels and the whole
    /// column-parallel ones, the one-process values.
    #[test]
    fn calibrated_encoders_are_the_one_bit_lloyd_codes_of_the_inputs_also_under_tp2() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        use std::sync::Arc;
        use tern_dist::{ThreadComm, TpGroup};
        use tern_model::LinearKind;
        let dev = Default::default();
        let m = ModelConfig {
            n_layers: 2,
            ..ModelConfig::tiny(64, LinearKind::Float)
        };
        let cfg = DistillConfig {
            blocks: Some(vec![1]),
            init: DistillInit::Calibrated,
            ..cfg()
        };
        let teacher_model = Llama::<Flex>::new(&m, &dev);
        let blocks: Vec<Tensor<Flex, 2, Int>> = (0..2)
            .map(|b| {
                let ids: Vec<i64> = (0..2 * 9).map(|i| ((i * 7 + b * 29) % 64) as i64).collect();
                Tensor::from_data(TensorData::new(ids, [2, 9]), &dev)
            })
            .collect();
        // Lazy parameters take their values when first read: before any clone.
        teacher_model.forward(blocks[0].clone());
        // The host's figures from the one-process teacher's taps.
        let teacher = Teacher::new(teacher_model.clone(), &[1]);
        let mut inputs: HashMap<String, Vec<Vec<f64>>> = HashMap::new();
        for b in &blocks {
            let (_, taps) = teacher.run(b.clone().narrow(1, 0, 8), &[1], false);
            for tap in taps.into_iter().flatten() {
                let d = tap.input.dims()[2];
                let v: Vec<f32> = tap.input.into_data().to_vec().unwrap();
                let rows = inputs
                    .entry(format!("layers.1.{}.encoder", tap.name))
                    .or_default();
                rows.extend(v.chunks(d).map(|r| r.iter().map(|&x| x as f64).collect()));
            }
        }
        let want = |name: &str| -> Vec<f32> {
            let (enc, param) = name.rsplit_once('.').unwrap();
            let rows = &inputs[enc];
            let n = rows.len() as f64;
            (0..rows[0].len())
                .map(|c| {
                    let mut t = rows.iter().map(|r| r[c]).sum::<f64>() / n;
                    let (mut hi, mut lo) = (t, t);
                    for _ in 0..CALIBRATION_ROUNDS {
                        let (up, down): (Vec<f64>, Vec<f64>) =
                            rows.iter().map(|r| r[c]).partition(|&x| x > t);
                        hi = up.iter().sum::<f64>() / up.len() as f64;
                        lo = down.iter().sum::<f64>() / down.len() as f64;
                        t = (hi + lo) / 2.0;
                    }
                    (if param == "alpha" { (hi - lo) / 2.0 } else { t }) as f32
                })
                .collect()
        };
        let student = studentize(Llama::<Flex>::new(&m, &dev), &cfg.student(2, 1), &dev);
        let whole = param_infos::<Flex, _>(&student);
        let check = |slots: &ParamSlots, got: Vec<Option<Tensor<Flex, 1>>>, rank: usize| {
            let mut seen = 0;
            for (s, v) in slots.iter().zip(got) {
                let calibrated = [".alpha", ".beta", ".offset"]
                    .iter()
                    .any(|p| s.name.ends_with(p));
                let Some(v) = v else {
                    assert!(!calibrated, "{} has no value", s.name);
                    continue;
                };
                let mut w = want(&s.name);
                if s.shard.is_some() {
                    w = tern_parallel::shard_values(&w, &s.shape, 0, rank, 2);
                }
                let v: Vec<f32> = v.into_data().to_vec().unwrap();
                let worst = v
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{} rank {rank}: differs by {worst}", s.name);
                seen += 1;
            }
            // 7 projections x alpha, beta, offset.
            assert_eq!(seen, 21);
        };
        let one = ParamSlots::new(&whole, &whole, 1, Default::default());
        check(&one, calibrated_encoders(&teacher, &[1], &blocks, &one), 0);
        std::thread::scope(|sc| {
            for (r, comm) in ThreadComm::group(2).into_iter().enumerate() {
                let (teacher_model, student, blocks) =
                    (teacher_model.clone(), student.clone(), blocks.clone());
                let (check, whole) = (&check, &whole);
                sc.spawn(move || {
                    let group = TpGroup::new(Arc::new(comm));
                    let t = Teacher::new(
                        tern_parallel::parallelize(teacher_model, &group, Default::default()),
                        &[1],
                    );
                    let s = tern_parallel::parallelize(student, &group, Default::default());
                    let slots =
                        ParamSlots::new(whole, &param_infos::<Flex, _>(&s), 2, Default::default());
                    assert!(slots
                        .iter()
                        .any(|s| s.shard.is_some() && s.name.ends_with(".alpha")));
                    check(&slots, calibrated_encoders(&t, &[1], &blocks, &slots), r);
                });
            }
        });
    }
}
