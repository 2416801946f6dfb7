//! What a run is built from: its data and tokenizer, a distillation's teacher, the vocabulary the
//! model takes from them, and the model itself (this rank's shard, initialised) with its
//! objective.

use std::path::Path;
use tern_kernels::Kernels;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use tern_data::{TextTokenizer, TrainData, ValData};
use tern_dist::{CollectiveBackend, Dist};
use tern_model::{studentize, Llama};
use tern_parallel::{parallelize, TpLlama};

use crate::distill::{check_teacher, teacher_shards, Teacher};
use crate::init::initial_shard;
use crate::metrics::MetricsLogger;
use crate::objective::Objective;
use crate::params::{assign_some_trainable, param_infos};
use crate::pretrained::{self, Pretrained};
use crate::recipe::Recipe;
use crate::slots::ParamSlots;

/// The inputs of a run, with the recipe as resolved (the vocabulary size filled in).
pub struct Inputs {
    pub recipe: Recipe,
    pub tokenizer: TextTokenizer,
    pub train: TrainData,
    pub val: ValData,
    /// A distillation's teacher weights.
    pub teacher: Option<Pretrained>,
}

impl Inputs {
    /// Loads the tokenizer, the teacher (whose architecture and vocabulary the student takes) and
    /// opens the training and validation data.
    pub fn open(recipe: &Recipe) -> Result<Self> {
        let dc = &recipe.data;
        let tokenizer = TextTokenizer::load(Path::new(&dc.tokenizer), &dc.eos_token)?;
        let mut recipe = recipe.clone();
        let teacher = match &recipe.distill {
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
            Some(v) if v < tokenizer.vocab_size => bail!(
                "model.vocab_size: {v} is smaller than the vocabulary of {} ({})",
                dc.tokenizer,
                tokenizer.vocab_size
            ),
            _ => recipe
                .resolve_vocab(tokenizer.vocab_size)
                .map_err(|e| anyhow!(e))?,
        }
        let train = TrainData::open(&recipe.data, &tokenizer, recipe.train.seed)?;
        let val = ValData::open(&recipe.data, &tokenizer)?;
        Ok(Self {
            recipe,
            tokenizer,
            train,
            val,
            teacher,
        })
    }

    /// The data lines of the log.
    pub fn describe(&self, metrics: &MetricsLogger, n_val: usize) {
        for (s, w) in self.train.sources.iter().zip(&self.train.weights) {
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
            self.val.source.tokens(),
            self.val.source.blocks()
        ));
    }
}

/// The model a run trains (this rank's shard over the tensor-parallel group, initialised), the
/// objective it minimises, and its parameter slots. Each rank builds only its shard: the model is
/// made lazily, split, and only then given values, this rank's blocks of the seeded
/// initialisation (pretraining) or of its teacher's weights (a distillation student, whose
/// encoders keep their seeded values).
pub fn model_and_objective<B>(
    recipe: &Recipe,
    teacher: Option<Pretrained>,
    device: &B::Device,
    dist: &Dist,
) -> Result<(TpLlama<B>, Objective<B::InnerBackend>, ParamSlots)>
where
    B: AutodiffBackend + CollectiveBackend + Kernels,
    B::InnerBackend: CollectiveBackend + Kernels,
{
    let (mc, seed) = (&recipe.model, recipe.train.seed);
    let (rank, tp) = (dist.topo.tp_rank(), dist.topo.tp);
    let plain = match &recipe.distill {
        Some(d) => studentize(
            Llama::<B>::new(mc, device),
            &d.student(mc.n_layers, seed),
            device,
        ),
        None => Llama::<B>::new(mc, device),
    };
    let whole = param_infos::<B, _>(&plain);
    let layout = recipe.parallel.layout();
    let model = parallelize(plain, &dist.tp, layout);
    let slots = ParamSlots::new(&whole, &param_infos::<B, _>(&model), tp, layout);
    match (&recipe.distill, teacher) {
        (Some(d), Some(t)) => {
            // The teacher is built whole: the student's blocks come from its weights.
            let t: Llama<B::InnerBackend> = t.build(device)?;
            let model = assign_some_trainable(model, teacher_shards(&t, &slots, rank, tp));
            // Split like the student: each rank's taps are then the blocks its projections hold.
            let teacher = Teacher::new(parallelize(t, &dist.tp, layout), &d.blocks(mc.n_layers));
            let objective = Objective::Distill {
                cfg: d.clone(),
                teacher: Box::new(teacher),
                n_layers: mc.n_layers,
            };
            Ok((model, objective, slots))
        }
        _ => {
            let inner = Tensor::<B, 1>::zeros([1], device).inner().device();
            let values = slots
                .iter()
                .map(|s| {
                    let v = initial_shard(seed, s, mc.init_std, rank, tp)?;
                    let n = v.len();
                    Some(Tensor::from_data(TensorData::new(v, [n]), &inner))
                })
                .collect();
            Ok((
                assign_some_trainable(model, values),
                Objective::Pretrain,
                slots,
            ))
        }
    }
}
