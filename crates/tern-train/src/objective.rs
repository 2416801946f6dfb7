//! What a step minimises: next-token cross-entropy (pretraining), or a distillation's phases
//! (docs/distill.md). The step loop asks the objective for each micro-batch's loss, which
//! parameters train at a step, and what to log; it does not branch on distillation itself.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde_json::{Map, Value};
use tern_dist::Comm;
use tern_kernels::Kernels;
use tern_model::Llama;
use tern_parallel::{TpForm, TpLlama};

use crate::distill::{
    distill_loss, projection_stats, DistillConfig, Phase, ProjectionStat, Teacher,
};
use crate::slots::ParamSlots;

pub enum Objective<B: Backend> {
    /// Mean next-token cross-entropy.
    Pretrain,
    /// Layer-wise distillation from `teacher` (split like the student).
    Distill {
        cfg: DistillConfig,
        teacher: Box<Teacher<B, TpForm>>,
        n_layers: usize,
    },
}

/// A step's loss terms averaged over its micro-batches, this rank's share: the MSE of
/// projections whose output this rank holds a block of (to be summed over the tensor-parallel
/// group), the other projections' MSE, CE, KL, the blocks' output MSE and this rank's share of
/// the attention-relation loss (summed over the group). Pretraining uses the first for the
/// blocks' weighted auxiliary losses.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossParts(pub [f64; 6]);

/// Blocks of `block_len` tokens, one after another, as a `[blocks, block_len]` int tensor.
pub fn batch_tensor<B: Backend>(
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

impl<B: Kernels> Objective<B>
where
    TpForm: tern_model::Hooks<B>,
{
    /// The distillation phase of (0-based) step `step`.
    pub fn phase(&self, step: u64) -> Option<Phase> {
        match self {
            Objective::Pretrain => None,
            Objective::Distill { cfg, n_layers, .. } => Some(cfg.phase(step, *n_layers)),
        }
    }

    /// A calibrated start's encoder values for `slots` ([`crate::distill::calibrated_encoders`])
    /// from the first `calibration_batches` micro-batches of `data` (the same blocks on every
    /// rank); `None` unless the objective is a distillation with `distill.init = "calibrated"`.
    pub fn calibrated_start(
        &self,
        data: &mut tern_data::TrainData,
        micro_batch: usize,
        block_len: usize,
        slots: &ParamSlots,
        device: &B::Device,
    ) -> anyhow::Result<Option<Vec<Option<Tensor<B, 1>>>>> {
        let Objective::Distill {
            cfg,
            teacher,
            n_layers,
        } = self
        else {
            return Ok(None);
        };
        if cfg.init != crate::distill::DistillInit::Calibrated {
            return Ok(None);
        }
        let mut blocks = Vec::with_capacity(cfg.calibration_batches);
        for b in 0..cfg.calibration_batches {
            let refs = data.samples((b * micro_batch) as u64, micro_batch);
            blocks.push(batch_tensor::<B>(&data.read(&refs)?, block_len, device));
        }
        let layers = cfg.blocks(*n_layers);
        Ok(Some(crate::distill::calibrated_encoders(
            teacher, &layers, &blocks, slots,
        )))
    }

    /// Sets each distilled block's quantization mix for step `step` (`distill.quant_ramp_steps`;
    /// nothing to do without a ramp).
    pub fn set_quant_mix<AB: Backend>(&self, step: u64, model: &mut TpLlama<AB>) {
        let Objective::Distill { cfg, n_layers, .. } = self else {
            return;
        };
        if cfg.quant_ramp_steps == 0 {
            return;
        }
        for b in cfg.blocks(*n_layers) {
            model.layers[b].set_quant_mix(cfg.quant_mix(b, step, *n_layers));
        }
    }

    /// Which parameters step `step` trains (the others keep their values and optimizer state).
    pub fn trainable(&self, step: u64, slots: &ParamSlots) -> Vec<bool> {
        match (self, self.phase(step)) {
            (Objective::Distill { cfg, n_layers, .. }, Some(ph)) => slots
                .iter()
                .map(|s| cfg.trains(ph, &s.name, *n_layers))
                .collect(),
            _ => vec![true; slots.len()],
        }
    }

    /// The loss of one micro-batch of blocks (`tokens`, `block_len` each) at step `step`, and its
    /// terms (divided by `n_micro`, so that a step's sum is their mean).
    pub fn micro_loss<AB>(
        &self,
        step: u64,
        model: &TpLlama<AB>,
        tokens: &[u32],
        block_len: usize,
        n_micro: usize,
        tp: usize,
    ) -> (Tensor<AB, 1>, LossParts)
    where
        AB: AutodiffBackend<InnerBackend = B> + Kernels,
        B: Kernels,
        TpForm: tern_model::Hooks<AB>,
    {
        let weight = model.embed_tokens.weight.val();
        match (self, self.phase(step)) {
            (Objective::Distill { cfg, teacher, .. }, Some(ph)) => {
                let x = batch_tensor::<B>(tokens, block_len, &weight.inner().device());
                let l = distill_loss(cfg, ph, model, teacher, x, tp);
                let parts = [
                    l.mse_split,
                    l.mse_whole,
                    l.ce,
                    l.kl,
                    l.hidden,
                    l.attention_split,
                ]
                .map(|v| v / n_micro as f64);
                (l.total, LossParts(parts))
            }
            _ => {
                let x = batch_tensor::<AB>(tokens, block_len, &weight.device());
                let (ce, aux) = model.losses(x);
                let mut parts = LossParts::default();
                match aux {
                    Some(a) => {
                        // The blocks' weighted auxiliary losses, logged as `aux_loss`.
                        let v: f64 = a.clone().inner().into_scalar().elem();
                        parts.0[0] = v / n_micro as f64;
                        (ce + a, parts)
                    }
                    None => (ce, parts),
                }
            }
        }
    }

    /// The step's loss as logged and its extra `metrics.jsonl` fields: the mean loss for
    /// pretraining; a distillation's whole loss and its terms (`mse`, `ce`, `kl`, `phase`,
    /// `block`), the MSE summed over the tensor-parallel group.
    pub fn logged(
        &self,
        step: u64,
        loss: f64,
        parts: LossParts,
        dp: &dyn Comm,
        tp: &dyn Comm,
    ) -> (f64, Map<String, Value>) {
        let (Objective::Distill { cfg, .. }, Some(ph)) = (self, self.phase(step)) else {
            // Pretraining: the blocks' weighted auxiliary losses (balancing, routing), averaged
            // over the data-parallel ranks; a LLaMA model has none (0 on every rank, not logged).
            let aux = dp.all_reduce_sum_f64(parts.0[0]) / dp.size() as f64;
            let mut fields = Map::new();
            if aux != 0.0 {
                fields.insert("aux_loss".into(), Value::from(aux));
            }
            return (loss, fields);
        };
        let n = dp.size() as f64;
        let [split, whole, ce, kl, hidden, attention] =
            parts.0.map(|v| dp.all_reduce_sum_f64(v) / n);
        // Under tensor parallelism the ranks' totals differ (each holds its share of the MSE and
        // of the attention relations).
        let mse = tp.all_reduce_sum_f64(split) + whole;
        let attention = tp.all_reduce_sum_f64(attention);
        cfg.step_fields(ph, [mse, hidden, ce, kl, attention])
    }

    /// Every distilled projection's validation MSE against the teacher (`None` when pretraining).
    pub fn projection_stats(
        &self,
        student: &Llama<B, TpForm>,
        batches: &[Tensor<B, 2, Int>],
        tp: &dyn Comm,
    ) -> Option<Vec<ProjectionStat>> {
        match self {
            Objective::Pretrain => None,
            Objective::Distill {
                cfg,
                teacher,
                n_layers,
            } => Some(projection_stats(
                student,
                teacher,
                &cfg.blocks(*n_layers),
                batches,
                tp,
            )),
        }
    }

    /// The teacher's validation loss (`None` when pretraining).
    pub fn teacher_loss(&self, eval: &crate::evaluator::Evaluator<B>) -> Option<f64> {
        match self {
            Objective::Pretrain => None,
            Objective::Distill { teacher, .. } => Some(eval.loss(teacher.model())),
        }
    }

    /// A line describing the objective for the log (`None` when pretraining).
    pub fn describe(&self) -> Option<String> {
        let Objective::Distill {
            cfg: d, n_layers, ..
        } = self
        else {
            return None;
        };
        Some(format!(
            "distill: teacher {} | blocks {:?}: {} steps each, then {} all together, then {} end to end | loss {} mse + {} hidden + {} attention (block {}) + {} ce + {} kl | {:?} start | quantization ramp {} steps",
            d.teacher, d.blocks(*n_layers), d.block_steps, d.all_steps, d.e2e_steps, d.mse_weight, d.hidden_weight, d.attention_weight, d.attention_block(*n_layers), d.ce_weight, d.kl_weight, d.init, d.quant_ramp_steps
        ))
    }
}
