//! The parity harness: tern against an independent PyTorch reference (`data-prep/parity_fixture.py`)
//! for every kind of model tern trains: logits, loss, the gradient of every parameter, then ten
//! optimizer steps (AdamW, and GaLore where the fixture has it) with their losses, gradient norms
//! and final parameters, in one process and split over two tensor-parallel thread ranks.
//!
//! Inputs (`tests/fixtures/parity/inputs.json`, `init.safetensors`) come from tern itself: the
//! ignored test `write_inputs` builds every case's initial model through the trainer's own
//! initialisation and tokenizes a fixed batch of the sample; the script reads them and writes
//! `reference.json` and `<case>.safetensors`. docs/parity.md has the commands, the bounds and why
//! each is what it is.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::ndarray::NdArray;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_dist::{CollectiveBackend, ThreadComm, TpGroup};
use tern_model::depth::ModConfig;
use tern_model::mamba::MambaConfig;
use tern_model::moa::MoaConfig;
use tern_model::moe::MoeConfig;
use tern_model::{studentize, Llama};
use tern_model::{LinearKind, MlpKind, ModelConfig, SparsityConfig};
use tern_optim::{OptimConfig, Optimizer, OptimizerName, Schedule};
use tern_parallel::{parallelize, shard_dim, shard_values, TpLlama};
use tern_train::distill::{student_of, DistillConfig, Teacher};
use tern_train::init::init_normal;
use tern_train::objective::{LossParts, Objective};
use tern_train::params::{assign_trainable, flat_values, param_infos, ParamInfo};
use tern_train::slots::ParamSlots;
use tern_train::step::{optimizer_step, GradAccumulator, StateSplit, StepSettings};

type F64 = Autodiff<NdArray<f64>>;
type F32 = Autodiff<Flex>;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity")
}

/// What the reference needs besides the weights (written by `write_inputs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Inputs {
    /// The command that wrote this file.
    written_by: String,
    seed: u64,
    /// `[sequences][seq_len + 1]` token ids of the sample (the training batch of every step).
    tokens: Vec<Vec<u32>>,
    /// Sequences per forward/backward: `tokens.len() / micro_batch` passes are accumulated.
    micro_batch: usize,
    steps: u64,
    cases: BTreeMap<String, Case>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    model: ModelConfig,
    /// Optimizer runs by name (`adamw`, `galore`).
    optims: BTreeMap<String, OptimConfig>,
    /// A distillation student of the float model with the same weights (the teacher).
    distill: Option<DistillConfig>,
}

// ---------------------------------------------------------------------------------------------
// The inputs, written by tern.

/// Hidden 64, 2 blocks, 4 heads on 2 key/value heads, an odd vocabulary (389, above the
/// tokenizer's 384: the last rows are never inputs), ternary with 2 scale groups.
fn base_model() -> ModelConfig {
    ModelConfig {
        hidden: 64,
        intermediate: 128,
        scale_groups: 2,
        ..ModelConfig::tiny(389, LinearKind::Ternary)
    }
}

/// Warmup, cosine, TriLM's LR drop at half and weight decay off at 70 % of the ten steps, and a
/// clipping threshold below the gradient norms of the first steps.
fn schedule(lr: f64) -> OptimConfig {
    OptimConfig {
        lr,
        min_lr_ratio: 0.1,
        warmup_steps: 3,
        decay_steps: Some(10),
        weight_decay: 0.1,
        lr_drop_at: Some(0.5),
        lr_drop_factor: 0.5,
        wd_off_at: Some(0.7),
        grad_clip: 0.5,
        ..OptimConfig::default()
    }
}

fn galore() -> OptimConfig {
    OptimConfig {
        name: OptimizerName::GaloreAdamw,
        rank: Some(8),
        update_proj_gap: 3,
        scale: 0.25,
        ..schedule(1e-2)
    }
}

fn cases() -> BTreeMap<String, Case> {
    let both = || {
        BTreeMap::from([
            ("adamw".into(), schedule(3e-3)),
            ("galore".into(), galore()),
        ])
    };
    let adamw = || BTreeMap::from([("adamw".into(), schedule(3e-3))]);
    let with = |f: &dyn Fn(&mut ModelConfig)| {
        let mut m = base_model();
        f(&mut m);
        m
    };
    let case = |model, optims, distill| Case {
        model,
        optims,
        distill,
    };
    let experts = |period| MoeConfig {
        experts: 4,
        top_k: 2,
        intermediate: Some(64),
        period,
        offset: 1,
        aux_loss_weight: 0.05,
    };
    BTreeMap::from([
        (
            "float".into(),
            case(with(&|m| m.linear = LinearKind::Float), both(), None),
        ),
        // Block 0 a Mamba mixer with an MLP, block 1 attention with 4 experts (top 2).
        (
            "jamba".into(),
            case(
                with(&|m| {
                    m.attention_period = 2;
                    m.attention_offset = 1;
                    m.mamba = Some(MambaConfig {
                        d_state: 4,
                        ..Default::default()
                    });
                    m.moe = Some(experts(2));
                }),
                both(),
                None,
            ),
        ),
        // Mixture of attention heads (3 experts, top 2) in both blocks, BitNet projections.
        (
            "moa".into(),
            case(
                with(&|m| {
                    m.linear = LinearKind::Bitnet;
                    m.moa = Some(MoaConfig {
                        experts: 3,
                        top_k: 2,
                        aux_loss_weight: 0.05,
                    });
                }),
                adamw(),
                None,
            ),
        ),
        // Block 1 routed (Mixture-of-Depths) around attention and 4 experts; float projections.
        (
            "routed".into(),
            case(
                with(&|m| {
                    m.linear = LinearKind::Float;
                    m.moe = Some(experts(2));
                    m.depth = Some(ModConfig {
                        capacity: 0.25,
                        period: 2,
                        offset: Some(1),
                        aux_loss_weight: 0.05,
                    });
                }),
                adamw(),
                None,
            ),
        ),
        ("trilm".into(), case(base_model(), both(), None)),
        (
            "bitnet".into(),
            case(
                with(&|m| {
                    m.linear = LinearKind::Bitnet;
                    m.tie_embeddings = true;
                }),
                adamw(),
                None,
            ),
        ),
        (
            "qsparse".into(),
            case(
                with(&|m| {
                    m.mlp = MlpKind::Relu2glu;
                    m.sparsity = Some(SparsityConfig {
                        top_k: Some(0.5),
                        attn_top_k: None,
                        mlp_top_k: None,
                        quantized: true,
                        rescale: true,
                    });
                }),
                adamw(),
                None,
            ),
        ),
        (
            "student".into(),
            case(
                base_model(),
                both(),
                Some(DistillConfig {
                    teacher: "the float case's weights".into(),
                    blocks: Some(vec![1]),
                    block_steps: 4,
                    all_steps: 3,
                    e2e_steps: 3,
                    mse_weight: 0.7,
                    ce_weight: 0.3,
                    kl_weight: 0.1,
                    hidden_weight: 0.0,
                    attention_weight: 0.0,
                    attention_layer: None,
                    temperature: 2.0,
                    surrogate: tern_model::Surrogate::Asinh,
                    surrogate_scale: 4.0,
                    train_embeddings: false,
                    train_head: false,
                    init: tern_train::distill::DistillInit::Unit,
                    calibration_batches: 8,
                    quant_ramp_steps: 0,
                }),
            ),
        ),
    ])
}

/// The teacher of a distillation case: the same architecture with float projections.
fn teacher_config(m: &ModelConfig) -> ModelConfig {
    ModelConfig {
        linear: LinearKind::Float,
        sparsity: None,
        ..m.clone()
    }
}

/// Named f32 tensors of a safetensors file.
type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

fn write_tensors(path: &Path, t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// Every parameter of a model by name, host values.
fn named_values<B: Backend>(m: &Llama<B>) -> Vec<(ParamInfo, Vec<f32>)> {
    param_infos::<B, _>(m)
        .into_iter()
        .zip(flat_values::<B, _>(m))
        .map(|(i, v)| (i, v.into_data().convert::<f32>().to_vec().unwrap()))
        .collect()
}

/// Writes `inputs.json` and `init.safetensors`: a fixed batch of the sample tokenized with a small
/// byte-level BPE tokenizer trained on the sample (so that the vocabulary, and the fixtures,
/// stay small), and every case's initial weights as the trainer makes them (name-seeded normal
/// matrices, unit norms; a student's encoders from their own seeded streams). Cases share one
/// file: equal names hold equal values, which this checks.
#[test]
#[ignore = "regenerates the inputs of the parity fixtures (docs/parity.md)"]
fn write_inputs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let tok_path = tmp.path().join("tokenizer.json");
    tern_data::train_tokenizer::train(&tern_data::train_tokenizer::TokenizerOptions {
        inputs: vec![repo.join("data/sample/train").display().to_string()],
        out: tok_path.clone(),
        vocab_size: 384,
        text_field: "text".into(),
        skip_sets: vec![],
        max_bytes: 1 << 20,
    })
    .unwrap();
    let tok = tern_data::TextTokenizer::load(&tok_path, "</s>").unwrap();
    assert_eq!(tok.vocab_size, 384);
    let docs: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(
        zstd::Decoder::new(
            std::fs::File::open(
                repo.join("data/sample/validation/chunk1/example_holdout_0.jsonl.zst"),
            )
            .unwrap(),
        )
        .unwrap(),
    ))
    .take(2)
    .map(|l| {
        let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
        v["text"].as_str().unwrap().to_string()
    })
    .collect();
    let seq = 33;
    let tokens: Vec<Vec<u32>> = tok
        .encode_batch(docs)
        .unwrap()
        .into_iter()
        .map(|ids| {
            assert!(ids.len() >= seq, "a document of {} tokens", ids.len());
            ids[..seq].to_vec()
        })
        .collect();
    let inputs = Inputs {
        written_by: "cargo test --release --test parity -- --ignored write_inputs".into(),
        seed: 1234,
        tokens,
        micro_batch: 1,
        steps: 10,
        cases: cases(),
    };
    let dev = Default::default();
    let mut all: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (name, case) in &inputs.cases {
        case.model.validate().unwrap();
        let m = &case.model;
        let model: Llama<F32> = match &case.distill {
            None => init_normal(Llama::new(m, &dev), inputs.seed, m.init_std, &dev),
            Some(d) => {
                let tc = teacher_config(m);
                let teacher = init_normal(
                    Llama::<Flex>::new(&tc, &dev),
                    inputs.seed,
                    tc.init_std,
                    &dev,
                );
                student_of::<F32>(&teacher, d, m, inputs.seed, &dev)
            }
        };
        for (info, v) in named_values(&model.valid()) {
            match all.get(&info.name) {
                Some((_, old)) => {
                    assert_eq!(old, &v, "{name}: {} differs between cases", info.name)
                }
                None => {
                    all.insert(info.name, (info.shape, v));
                }
            }
        }
    }
    std::fs::create_dir_all(dir()).unwrap();
    write_tensors(&dir().join("init.safetensors"), &all);
    let json = serde_json::to_string_pretty(&inputs).unwrap();
    std::fs::write(dir().join("inputs.json"), json + "\n").unwrap();
}

// ---------------------------------------------------------------------------------------------
// tern's side of a case.

struct Fixture {
    inputs: Inputs,
    init: Tensors,
    reference: serde_json::Value,
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let read = |n: &str| std::fs::read_to_string(dir().join(n)).unwrap();
        Fixture {
            inputs: serde_json::from_str(&read("inputs.json")).unwrap(),
            init: read_tensors(&dir().join("init.safetensors")),
            reference: serde_json::from_str(&read("reference.json")).unwrap(),
        }
    })
}

/// `m` with every parameter set from `init` by name (the trainer's `assign` in module order).
fn load<B: AutodiffBackend>(m: Llama<B>, init: &Tensors, dev: &B::Device) -> Llama<B> {
    let values = param_infos::<B, _>(&m)
        .iter()
        .map(|i| {
            let (shape, v) = init
                .get(&i.name)
                .unwrap_or_else(|| panic!("init has no {}", i.name));
            assert_eq!(shape, &i.shape, "{}", i.name);
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v.clone(), [v.len()]), dev)
        })
        .collect();
    assign_trainable(m, values)
}

/// A plain (inner-backend) model with the weights of `init`.
fn load_plain<B: Backend>(c: &ModelConfig, init: &Tensors, dev: &B::Device) -> Llama<B> {
    let m = Llama::<B>::new(c, dev);
    let values = param_infos::<B, _>(&m)
        .iter()
        .map(|i| {
            let (_, v) = &init[&i.name];
            Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), dev)
        })
        .collect();
    tern_train::params::assign(m, values)
}

/// What tern computed for a case (this rank's shards under tensor parallelism).
#[derive(Default)]
struct Outcome {
    logits: Vec<f64>,
    loss: f64,
    grads: Vec<(String, Vec<f64>)>,
    /// Per optimizer run: step losses, gradient norms, final parameters.
    runs: BTreeMap<String, Run>,
}

#[derive(Default)]
struct Run {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    params: Vec<(String, Vec<f64>)>,
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// The model (split over `tp`) with the fixture's initial weights and its objective (a
/// distillation student's teacher split the same way), as the trainer's `model_and_objective`
/// makes them; and its parameter slots.
struct Models<B: AutodiffBackend> {
    model: TpLlama<B>,
    objective: Objective<B::InnerBackend>,
    slots: ParamSlots,
}

fn build<B: AutodiffBackend>(case: &Case, f: &Fixture, tp: &TpGroup, dev: &B::Device) -> Models<B> {
    let m = &case.model;
    let (model, objective) = match &case.distill {
        None => (Llama::<B>::new(m, dev), Objective::Pretrain),
        Some(d) => {
            let student = studentize(
                Llama::<B>::new(m, dev),
                &d.student(m.n_layers, f.inputs.seed),
                dev,
            );
            let teacher = load_plain::<B::InnerBackend>(&teacher_config(m), &f.init, dev);
            let objective = Objective::Distill {
                cfg: d.clone(),
                teacher: Box::new(Teacher::new(
                    parallelize(teacher, tp, Default::default()),
                    &d.blocks(m.n_layers),
                )),
                n_layers: m.n_layers,
            };
            (student, objective)
        }
    };
    let model = load(model, &f.init, dev);
    let whole = param_infos::<B, _>(&model);
    let model = parallelize(model, tp, Default::default());
    let slots = ParamSlots::new(
        &whole,
        &param_infos::<B, _>(&model),
        tp.size(),
        Default::default(),
    );
    Models {
        model,
        objective,
        slots,
    }
}

/// The batch's loss as the trainer logs it and its mean gradients, accumulated over micro-batches
/// as the trainer does, with the objective's loss.
fn batch_gradients<B>(
    ms: &Models<B>,
    f: &Fixture,
    step: u64,
    tp: &TpGroup,
) -> (f64, Vec<Tensor<B::InnerBackend, 1>>)
where
    B: AutodiffBackend + CollectiveBackend + tern_kernels::Kernels,
    B::InnerBackend: CollectiveBackend + tern_kernels::Kernels,
{
    let mut acc = GradAccumulator::default();
    let mut parts = LossParts::default();
    let block_len = f.inputs.tokens[0].len();
    let chunks: Vec<Vec<u32>> = f
        .inputs
        .tokens
        .chunks(f.inputs.micro_batch)
        .map(|c| c.concat())
        .collect();
    for tokens in &chunks {
        let (loss, p) =
            ms.objective
                .micro_loss(step, &ms.model, tokens, block_len, chunks.len(), tp.size());
        parts.0.iter_mut().zip(p.0).for_each(|(a, v)| *a += v);
        acc.add(&ms.model, loss);
    }
    let (loss, grads) = acc.mean();
    let (logged, _) = ms
        .objective
        .logged(step, loss, parts, &tern_dist::SoloComm, tp.comm());
    (logged, grads)
}

fn run_case<B>(name: &str, tp: &TpGroup, dev: &B::Device) -> Outcome
where
    B: AutodiffBackend + CollectiveBackend + tern_kernels::Kernels,
    B::InnerBackend: CollectiveBackend + tern_kernels::Kernels,
{
    let f = fixture();
    let case = &f.inputs.cases[name];
    let ms = build::<B>(case, f, tp, dev);
    let names = |v: Vec<Tensor<B::InnerBackend, 1>>| -> Vec<(String, Vec<f64>)> {
        ms.slots
            .iter()
            .map(|s| s.name.clone())
            .zip(v.into_iter().map(host))
            .collect()
    };
    let mut out = Outcome::default();
    let inputs: Vec<i64> = f
        .inputs
        .tokens
        .iter()
        .flat_map(|s| s[..s.len() - 1].iter().map(|&t| t as i64))
        .collect();
    let shape = [f.inputs.tokens.len(), f.inputs.tokens[0].len() - 1];
    let x = Tensor::<B::InnerBackend, 2, Int>::from_data(TensorData::new(inputs, shape), dev);
    out.logits = host(ms.model.valid().forward(x));
    let (loss, grads) = batch_gradients(&ms, f, 0, tp);
    out.loss = loss;
    out.grads = names(grads);
    let rules = ms.slots.rules();
    for (opt_name, oc) in &case.optims {
        let mut ms = build::<B>(case, f, tp, dev);
        let inner = ms.model.valid().embed_tokens.weight.val().device();
        let s = &ms.slots;
        let (shapes, low, dims) = (s.local_shapes(), s.low_rank(oc.rank), s.shard_dims());
        let all = vec![true; shapes.len()];
        let mut opt = Optimizer::<B::InnerBackend>::new(oc, &shapes, &low, &dims, tp, &inner, &all);
        let schedule = Schedule::new(oc, f.inputs.steps);
        let mut run = Run::default();
        for step in 0..f.inputs.steps {
            let (loss, grads) = batch_gradients(&ms, f, step, tp);
            let settings = StepSettings {
                lr: schedule.lr(step),
                weight_decay: schedule.weight_decay(step),
                grad_clip: oc.grad_clip,
            };
            let train = ms.objective.trainable(step, &ms.slots);
            let (model, norm, applied) = optimizer_step(
                ms.model,
                grads,
                loss,
                &mut opt,
                &rules,
                &train,
                settings,
                tp.comm(),
                &StateSplit::Whole,
            );
            assert!(applied, "{name} {opt_name}: step {} skipped", step + 1);
            ms.model = model;
            run.losses.push(loss);
            run.grad_norms.push(norm);
        }
        run.params = names(flat_values::<B::InnerBackend, _>(&ms.model.valid()));
        out.runs.insert(opt_name.clone(), run);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Comparison.

/// How close tern must be, as fractions of the reference's own scale (docs/parity.md).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Logits: max |diff| over max |reference logit|.
    logits: f64,
    /// The loss at the initial weights, relative.
    loss: f64,
    /// Each gradient: max |diff| <= grad * max |g| + grad_floor.
    grad: f64,
    grad_floor: f64,
    /// Each step's loss, relative.
    step_loss: f64,
    /// Each step's gradient norm (before clipping), relative.
    grad_norm: f64,
    /// Each final parameter: ||p - p_ref|| <= update * ||p_ref - p_0|| + 1e-7 sqrt(n) +
    /// 2^-24 ||p_ref|| (the reference's f32 storage), the error of
    /// the ten steps' update relative to the update.
    update: f64,
}

/// tern in f64 against the f64 reference. Tensors to 1e-6 of their scale: the fixtures store
/// them in f32, whose rounding (6e-8 relative) is the floor. Losses and gradient norms are stored
/// exactly: AdamW runs agree to 2e-16; GaLore's to 6e-10 (losses) and 2e-8 (norms), because its
/// SVD reads an f32 host copy of the gradient.
const F64_BOUNDS: Bounds = Bounds {
    logits: 1e-6,
    loss: 1e-8,
    grad: 1e-6,
    grad_floor: 1e-9,
    step_loss: 1e-8,
    grad_norm: 1e-7,
    update: 1e-6,
};

/// tern's f32 training arithmetic (burn's flex backend): 1e-5 of the scale, the bounds of
/// llm.c's test_gpt2 kind, for everything a continuous function of the weights computes.
const F32_BOUNDS: Bounds = Bounds {
    logits: 1e-5,
    loss: 1e-5,
    grad: 1e-5,
    grad_floor: 1e-7,
    step_loss: 1e-5,
    grad_norm: 1e-5,
    // Adam divides each element's step by its own gradient scale, so an element whose gradient
    // is small next to its tensor's largest carries the tensor's f32 error (1e-7 of the largest)
    // into its update at full weight: measured 1.1e-5 of the update (a norm weight).
    update: 1e-4,
};

/// f32 with quantized weights or activations (ternary codes, 8-bit levels, a top-K choice): the
/// step-0 checks as [`F32_BOUNDS`]; the trajectory only until the first rounding decision that
/// f32 and the f64 reference take differently (a weight or activation within its f32 error of a
/// rounding boundary), after which the two runs are different, equally valid runs. Measured
/// (docs/parity.md): the losses agree to 1e-7 until such a step, then drift to 4.2e-4; gradient
/// norms to 4.5e-2, updates to 2.6e-2. These bounds catch a gross trajectory error only; the f64
/// run is the net for the trajectory's arithmetic.
const F32_QUANTIZED_BOUNDS: Bounds = Bounds {
    step_loss: 1e-2,
    grad_norm: 0.25,
    update: 0.1,
    ..F32_BOUNDS
};

/// The reference's tensors of a case.
fn reference_tensors(case: &str) -> &'static Tensors {
    static R: std::sync::OnceLock<std::sync::Mutex<HashMap<String, &'static Tensors>>> =
        std::sync::OnceLock::new();
    let mut map = R.get_or_init(Default::default).lock().unwrap();
    map.entry(case.to_string()).or_insert_with(|| {
        Box::leak(Box::new(read_tensors(
            &dir().join(format!("{case}.safetensors")),
        )))
    })
}

/// Collects the checks of one run: the worst ratio of each kind of check, and every failure.
struct Report {
    label: String,
    worst: BTreeMap<&'static str, (f64, String)>,
    failures: Vec<String>,
}

impl Report {
    fn new(label: String) -> Self {
        Self {
            label,
            worst: BTreeMap::new(),
            failures: Vec::new(),
        }
    }

    /// `diff <= bound`, recorded as a ratio under `check`.
    fn check(&mut self, check: &'static str, what: &str, diff: f64, bound: f64) {
        let ratio = if bound > 0.0 {
            diff / bound
        } else {
            f64::INFINITY
        };
        let e = self.worst.entry(check).or_insert((0.0, String::new()));
        if ratio > e.0 || e.1.is_empty() {
            *e = (ratio, format!("{what}: {diff:.3e} (bound {bound:.3e})"));
        }
        // NaN fails too.
        if diff.is_nan() || diff > bound {
            self.failures.push(format!(
                "{check} {what}: |diff| {diff:.3e} > bound {bound:.3e}"
            ));
        }
    }

    fn finish(self) {
        for (check, (ratio, what)) in &self.worst {
            println!(
                "parity {} {check}: worst {what} = {ratio:.3} of the bound",
                self.label
            );
        }
        assert!(
            self.failures.is_empty(),
            "{}: {} check(s) failed:\n{}",
            self.label,
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

fn max_abs(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    max_abs(a.iter().zip(b).map(|(x, y)| x - *y as f64))
}

/// This rank's block of a reference tensor (`rank` of `tp` along the parameter's split).
fn slice_of(name: &str, shape: &[usize], v: &[f32], rank: usize, tp: usize) -> Vec<f32> {
    match shard_dim(name).filter(|_| tp > 1) {
        Some(dim) => shard_values(v, shape, dim, rank, tp),
        None => v.to_vec(),
    }
}

fn compare(case: &str, out: &Outcome, rank: usize, tp: usize, b: Bounds, r: &mut Report) {
    let f = fixture();
    let json = &f.reference["cases"][case];
    let t = reference_tensors(case);
    let (_, logits) = &t["logits"];
    r.check(
        "logits",
        "max |diff|",
        max_diff(&out.logits, logits),
        b.logits * max_abs(logits.iter().map(|&x| x as f64)),
    );
    let want = json["loss"].as_f64().unwrap();
    r.check(
        "loss",
        "relative",
        (out.loss - want).abs(),
        b.loss * want.abs(),
    );
    for (name, g) in &out.grads {
        let (shape, full) = &t[&format!("grad.{name}")];
        let want = slice_of(name, shape, full, rank, tp);
        let scale = max_abs(full.iter().map(|&x| x as f64));
        r.check(
            "grad",
            name,
            max_diff(g, &want),
            b.grad * scale + b.grad_floor,
        );
    }
    for (opt, run) in &out.runs {
        let j = &json[opt.as_str()];
        let num = |k: &str| -> Vec<f64> {
            j[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        // Where a run leaves the reference shows in its step losses (docs/parity.md).
        if rank == 0 {
            let rel: Vec<String> = run
                .losses
                .iter()
                .zip(num("losses"))
                .map(|(g, w)| format!("{:.1e}", (g - w).abs() / w))
                .collect();
            println!(
                "parity {} {opt} step losses, relative diff: {}",
                r.label,
                rel.join(" ")
            );
        }
        // Each step's loss and gradient norm, relative.
        for (check, got, key, tol) in [
            ("step loss", &run.losses, "losses", b.step_loss),
            ("grad norm", &run.grad_norms, "grad_norms", b.grad_norm),
        ] {
            for (k, (got, want)) in got.iter().zip(num(key)).enumerate() {
                let what = format!("{opt} step {}", k + 1);
                r.check(check, &what, (got - want).abs(), tol * want.abs());
            }
        }
        // The update's error relative to the update: ||p - p_ref|| against ||p_ref - p_0|| (this
        // rank's block of both), with a floor for the reference's f32 rounding.
        for (name, p) in &run.params {
            let (shape, full) = &t[&format!("{opt}.{name}")];
            let (_, init) = &f.init[name];
            let want = slice_of(name, shape, full, rank, tp);
            let p0 = slice_of(name, shape, init, rank, tp);
            let l2 = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
            let moved = l2(&mut want.iter().zip(&p0).map(|(a, b)| (a - b) as f64));
            let diff = l2(&mut p.iter().zip(&want).map(|(a, b)| a - *b as f64));
            // The reference is stored in f32: half an ulp of each value, 2^-24 |v| (Mamba's step
            // biases sit near -5, where that exceeds the 1e-7 of values near 1).
            let stored = l2(&mut want.iter().map(|&v| v as f64)) * 2f64.powi(-24);
            let floor = 1e-7 * (p.len() as f64).sqrt() + stored;
            r.check(
                "update",
                &format!("{opt} {name}"),
                diff,
                b.update * moved + floor,
            );
        }
    }
}

fn one_process<B>(case: &str, b: Bounds, label: &str)
where
    B: AutodiffBackend + CollectiveBackend + tern_kernels::Kernels,
    B::InnerBackend: CollectiveBackend + tern_kernels::Kernels,
{
    let out = run_case::<B>(case, &TpGroup::default(), &Default::default());
    let mut r = Report::new(format!("{case} {label}"));
    compare(case, &out, 0, 1, b, &mut r);
    r.finish();
}

/// Two tensor-parallel ranks on threads; each rank's shards against the matching slices.
fn two_ranks(case: &str, b: Bounds) {
    let outs: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let group = TpGroup::new(Arc::new(comm));
                    run_case::<F32>(case, &group, &Default::default())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut r = Report::new(format!("{case} f32 tp=2"));
    for (rank, out) in outs.iter().enumerate() {
        compare(case, out, rank, 2, b, &mut r);
    }
    r.finish();
}

/// Three tests a case: `f64::<case>`, `f32::<case>` and `tp2::<case>`, with the f32 bounds given.
macro_rules! parity {
    ($($case:ident: $f32:expr, $tp:expr;)*) => {
        mod f64 {
            use super::*;
            $(#[test]
            fn $case() {
                one_process::<F64>(stringify!($case), F64_BOUNDS, "f64");
            })*
        }
        mod f32 {
            use super::*;
            $(#[test]
            fn $case() {
                one_process::<F32>(stringify!($case), $f32, "f32");
            })*
        }
        mod tp2 {
            use super::*;
            $(#[test]
            fn $case() {
                two_ranks(stringify!($case), $tp);
            })*
        }
    };
}

parity! {
    float: F32_BOUNDS, F32_BOUNDS;
    trilm: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    bitnet: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    qsparse: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    student: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    jamba: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    moa: F32_QUANTIZED_BOUNDS, F32_QUANTIZED_BOUNDS;
    routed: F32_BOUNDS, F32_BOUNDS;
}

#[test]
fn inputs_are_what_write_inputs_writes() {
    let f = fixture();
    let cases = serde_json::to_value(cases()).unwrap();
    assert_eq!(
        serde_json::to_value(&f.inputs.cases).unwrap(),
        cases,
        "inputs.json is stale: rerun write_inputs and the script"
    );
}
