//! Recipes: a TOML file composed of each crate's own config section.
//!
//! Everything is checked here, before any data is read or any tensor allocated: unknown keys,
//! wrong types, and shape rules, each error naming the file and the key path.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tern_data::DataConfig;
use tern_model::ModelConfig;
use tern_optim::OptimConfig;

use crate::distill::DistillConfig;

/// `[train]`: the step loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps to run in total.
    pub steps: u64,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Sequences per optimizer step, over all data-parallel ranks.
    pub global_batch: usize,
    /// Sequences per forward/backward pass; `global_batch / micro_batch` passes are accumulated.
    pub micro_batch: usize,
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    /// Validation loss every this many steps (and at the last step); 0 turns it off.
    #[serde(default = "d_eval_every")]
    pub eval_every: u64,
    /// Micro-batches of held-out data per validation.
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the last step); 0: only at the last step.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Non-finite losses or gradients in a row after which the job stops (with a checkpoint of
    /// the last good state); each such step's update is skipped.
    #[serde(default = "d_max_bad_steps")]
    pub max_bad_steps: u64,
    /// What the matrix products run in; unset: bf16 with the cuda build, f32 on the CPU (whose
    /// fused kernels are f32).
    #[serde(default)]
    pub precision: Option<PrecisionName>,
    /// `block`: keep only each block's input in the forward pass and run the block again in the
    /// backward pass (activation memory of one block instead of all, for one more forward pass).
    #[serde(default)]
    pub recompute: Recompute,
}

/// `recompute` of `[train]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    #[default]
    None,
    Block,
}

/// `precision` of `[train]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionName {
    F32,
    Bf16,
}

impl PrecisionName {
    /// The recipe's precision, or the build's default (`gpu`: the cuda build).
    pub fn resolve(recipe: Option<Self>, gpu: bool) -> tern_kernels::precision::Precision {
        use tern_kernels::precision::Precision;
        match recipe {
            Some(PrecisionName::F32) => Precision::F32,
            Some(PrecisionName::Bf16) => Precision::Bf16,
            None if gpu => Precision::Bf16,
            None => Precision::F32,
        }
    }
}

fn d_max_bad_steps() -> u64 {
    10
}

fn d_seed() -> u64 {
    1234
}
fn d_log_every() -> u64 {
    10
}
fn d_eval_every() -> u64 {
    100
}
fn d_eval_batches() -> usize {
    4
}

impl TrainConfig {
    /// Checks against the data-parallel size `dp` (known once the job has started).
    pub fn validate(&self, dp: usize) -> Result<(), String> {
        if self.steps == 0 {
            return Err("train.steps: must be at least 1".into());
        }
        if self.max_bad_steps == 0 {
            return Err("train.max_bad_steps: must be at least 1".into());
        }
        if self.micro_batch == 0 {
            return Err("train.micro_batch: must be at least 1".into());
        }
        if self.log_every == 0 {
            return Err("train.log_every: must be at least 1".into());
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.micro_batch * dp) {
            return Err(format!(
                "train.global_batch: {} is not a positive multiple of train.micro_batch ({}) x data-parallel size ({dp})",
                self.global_batch, self.micro_batch
            ));
        }
        Ok(())
    }
}

/// `progress` of `[run]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Progress {
    /// A progress bar on a terminal, plain log lines otherwise.
    #[default]
    Auto,
    Bar,
    Plain,
}

/// `[run]`: where outputs go.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name; defaults to the recipe file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Run directory; defaults to `runs/<name>` (relative to the working directory).
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    /// Dense matmul peak of one device in TFLOP/s, for the MFU in the metrics; by default the
    /// table of known GPUs (`tern_train::mfu`), none on the CPU.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
}

/// `[parallel]`: how the processes of an `mpirun` job split the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Tensor-parallel degree.
    #[serde(default = "d_one")]
    pub tp: usize,
    /// Data-parallel degree; defaults to world size / tp.
    #[serde(default)]
    pub dp: Option<usize>,
    /// 1: the distributed optimizer (ZeRO-1): each data-parallel rank keeps the AdamW moments of
    /// its chunk of every parameter, gradients are reduce-scattered and the updated weights
    /// all-gathered. 0: every rank keeps all of them.
    #[serde(default)]
    pub zero: u8,
    /// Split the embedding's and the LM head's rows over the tensor-parallel group, with a
    /// vocabulary-parallel cross-entropy (no rank computes all logits).
    #[serde(default)]
    pub vocab: bool,
    /// Sequence parallelism (Megatron-SP): between the blocks' parallel projections each
    /// tensor-parallel rank holds a block of the positions (norms, residuals); all-gathers
    /// before the column-parallel projections, reduce-scatters after the row-parallel ones.
    #[serde(default)]
    pub sequence: bool,
}

impl ParallelConfig {
    /// What tensor parallelism splits beyond the blocks' matrices.
    pub fn layout(&self) -> tern_parallel::TpLayout {
        tern_parallel::TpLayout {
            vocab: self.vocab,
            sequence: self.sequence,
        }
    }
}

fn d_one() -> usize {
    1
}

/// `[checkpoint]`: what is kept on disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Complete checkpoints kept (older ones are removed once a newer one is complete); 0: all.
    #[serde(default)]
    pub keep_last: usize,
    /// Write checkpoints on a background thread from host copies, completing each at the next
    /// step (the last checkpoint of a run is written at once).
    #[serde(default)]
    pub async_save: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tp: 1,
            dp: None,
            zero: 0,
            vocab: false,
            sequence: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Present for a layer-wise distillation run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

/// Where a recipe came from.
#[derive(Debug, Clone)]
pub enum RecipeSource {
    File(PathBuf),
    /// Text compiled into the binary, with the directory its relative paths refer to.
    Embedded {
        name: String,
        text: String,
        base: PathBuf,
    },
}

impl RecipeSource {
    pub fn label(&self) -> String {
        match self {
            RecipeSource::File(p) => p.display().to_string(),
            RecipeSource::Embedded { name, .. } => format!("<embedded {name}>"),
        }
    }

    fn stem(&self) -> String {
        match self {
            RecipeSource::File(p) => p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("run")
                .to_string(),
            RecipeSource::Embedded { name, .. } => name.clone(),
        }
    }
}

/// Recipe keys that hold input paths: relative values in a recipe file are relative to the file's
/// directory (as paths in Cargo.toml are); values given with `--set` are relative to the working
/// directory.
const PATH_KEYS: [(&str, &str); 4] = [
    ("data", "train"),
    ("data", "validation"),
    ("data", "tokenizer"),
    ("distill", "teacher"),
];

fn rebase(v: &mut toml::Value, base: &Path) {
    let fix = |s: &mut String| {
        let p = Path::new(s.as_str());
        if p.is_relative() {
            *s = base.join(p).to_string_lossy().into_owned();
        }
    };
    match v {
        toml::Value::String(s) => fix(s),
        toml::Value::Array(a) => {
            for x in a {
                if let toml::Value::String(s) = x {
                    fix(s)
                }
            }
        }
        _ => {}
    }
}

/// Applies `section.key=value`; the value is TOML (`3`, `1e-3`, `"x"`, `[1, 2]`) or else a bare string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment:?}: expected section.key=value"))?;
    let path = path.trim();
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set {assignment:?}: bad key path {path:?}");
    }
    let mut t = table;
    for (i, k) in keys[..keys.len() - 1].iter().enumerate() {
        let entry = t
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        t = entry.as_table_mut().ok_or_else(|| {
            anyhow!(
                "--set {assignment:?}: {} is not a section",
                keys[..=i].join(".")
            )
        })?;
    }
    t.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads, overrides, types and validates a recipe. Errors name the recipe and the key.
    pub fn load(source: &RecipeSource, overrides: &[String]) -> Result<Recipe> {
        let label = source.label();
        let (text, base) = match source {
            RecipeSource::File(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading recipe {}", p.display()))?,
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            RecipeSource::Embedded { text, base, .. } => (text.clone(), base.clone()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("{label}: {e}"))?;
        for (section, key) in PATH_KEYS {
            if let Some(v) = table.get_mut(section).and_then(|s| s.get_mut(key)) {
                rebase(v, &base);
            }
        }
        // `[[data.sources]]`: each entry's `paths`.
        if let Some(toml::Value::Array(sources)) =
            table.get_mut("data").and_then(|d| d.get_mut("sources"))
        {
            for s in sources {
                if let Some(v) = s.get_mut("paths") {
                    rebase(v, &base);
                }
            }
        }
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                anyhow!("{label}: {path}: {}", e.into_inner())
            })?;
        if recipe.run.name.is_none() {
            recipe.run.name = Some(source.stem());
        }
        recipe.validate().map_err(|e| anyhow!("{label}: {e}"))?;
        Ok(recipe)
    }

    /// Sets the vocabulary size (when the recipe has none) from the tokenizer or a teacher, and
    /// checks what depends on it.
    pub fn resolve_vocab(&mut self, v: usize) -> Result<(), String> {
        self.model.vocab_size.get_or_insert(v);
        let (tp, layout) = (self.parallel.tp, self.parallel.layout());
        tern_parallel::check_tp(&self.model, tp, layout).map_err(|e| e.to_string())
    }

    /// Every rule that does not need the data or the world size.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        self.data.validate()?;
        self.optim.validate()?;
        if self.parallel.zero > 1 {
            return Err(format!(
                "parallel.zero = {}: 0 (off) or 1 (optimizer state split over the data-parallel ranks)",
                self.parallel.zero
            ));
        }
        if self.parallel.tp == 0 {
            return Err("parallel.tp: must be at least 1".into());
        }
        let (tp, layout) = (self.parallel.tp, self.parallel.layout());
        tern_parallel::check_tp(&self.model, tp, layout).map_err(|e| e.to_string())?;
        if layout.sequence && tp == 1 {
            return Err(
                "parallel.sequence = true splits the sequence over the tensor-parallel \
                        group: it needs parallel.tp > 1"
                    .into(),
            );
        }
        if layout.sequence && !self.data.seq_len.is_multiple_of(tp) {
            return Err(format!(
                "data.seq_len: {} positions cannot be split across parallel.tp = {tp} ranks \
                 (parallel.sequence = true)",
                self.data.seq_len
            ));
        }
        if let Some(rank) = self.optim.rank {
            let m = &self.model;
            let kv = m.kv_heads() * m.head_dim();
            // LLaMA's matrices, where a block has them (the other kinds' smaller matrices take
            // AdamW: docs/architectures.md).
            let kinds: Vec<_> = (0..m.n_layers).map(|i| m.block_kind(i)).collect();
            let attention = kinds.iter().any(|k| k.mixer != tern_model::Mixer::Mamba);
            let mlp = kinds.iter().any(|k| !k.moe);
            for (what, rows, cols, present) in [
                ("self_attn.q_proj / o_proj", m.hidden, m.hidden, attention),
                ("self_attn.k_proj / v_proj", kv, m.hidden, attention),
                (
                    "mlp.gate_proj / up_proj / down_proj",
                    m.intermediate,
                    m.hidden,
                    mlp,
                ),
            ] {
                if !present {
                    continue;
                }
                if rank > rows.min(cols) {
                    return Err(format!(
                        "optim.rank: {rank} is above min(m, n) = {} of the {rows} x {cols} matrices {what}",
                        rows.min(cols)
                    ));
                }
            }
        }
        let dp = self.parallel.dp.unwrap_or(1);
        if dp == 0 {
            return Err("parallel.dp: must be at least 1".into());
        }
        self.train.validate(dp)?;
        if let Some(d) = &self.distill {
            if !self.model.is_llama() {
                return Err(
                    "[distill]: the teacher and the student are LLaMA models; model.moe, \
                     model.moa, model.mod and model.attention_period are for pretraining"
                        .into(),
                );
            }
            d.validate(&self.model, self.train.steps)?;
            for (key, on) in [
                ("parallel.vocab", layout.vocab),
                ("parallel.sequence", layout.sequence),
            ] {
                if on {
                    return Err(format!(
                        "{key} = true is for pretraining: a distillation compares the student's \
                         projections and whole logits with the teacher's, which these splits \
                         do not keep on each rank"
                    ));
                }
            }
            if self.train.recompute != Recompute::None {
                return Err(
                    "train.recompute: \"block\" is for pretraining; a distillation \
                            trains one block at a time and keeps its taps' activations"
                        .into(),
                );
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        self.run.name.as_deref().unwrap_or("run")
    }

    /// The run directory: `--run-dir`, else `run.dir`, else `runs/<name>`.
    pub fn run_dir(&self, cli: Option<&Path>) -> PathBuf {
        match (cli, &self.run.dir) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(d)) => PathBuf::from(d),
            (None, None) => Path::new("runs").join(self.name()),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
vocab_size = 64
hidden = 32
intermediate = 64
n_layers = 2
n_heads = 4

[data]
train = ["train"]
validation = ["val"]
tokenizer = "tok.json"
seq_len = 16

[train]
steps = 10
global_batch = 4
micro_batch = 2
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<Recipe> {
        let src = RecipeSource::Embedded {
            name: "t".into(),
            text: text.into(),
            base: PathBuf::from("/base"),
        };
        Recipe::load(
            &src,
            &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn good_recipe_with_defaults_and_rebased_paths() {
        let r = load(GOOD, &[]).unwrap();
        assert_eq!(r.data.tokenizer, "/base/tok.json");
        assert_eq!(r.data.train, vec!["/base/train".to_string()]);
        assert_eq!(r.train.seed, 1234);
        assert_eq!(r.model.scale_groups, 1);
        assert_eq!(r.name(), "t");
        // Round trip through the saved form.
        let again: Recipe = toml::from_str(&r.to_toml()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn unknown_key_named_with_its_path() {
        let e = load(
            &GOOD.replace("n_layers = 2", "n_layers = 2\nn_layer = 3"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("<embedded t>")
                && e.contains("model.n_layer")
                && e.contains("unknown field"),
            "{e}"
        );
        let e = load(GOOD, &["optim.learning_rate=3"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("optim.learning_rate"), "{e}");
        let e = load(GOOD, &["bogus.x=3"]).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_named_with_its_path() {
        let e = load(&GOOD.replace("hidden = 32", "hidden = \"wide\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.hidden") && e.contains("invalid type"),
            "{e}"
        );
        let e = load(GOOD, &["train.steps=-4"]).unwrap_err().to_string();
        assert!(e.contains("train.steps"), "{e}");
    }

    #[test]
    fn shape_rules_name_the_key() {
        let e = load(GOOD, &["model.n_heads=5"]).unwrap_err().to_string();
        assert!(
            e.contains("model.n_heads") && e.contains("do not divide model.hidden = 32"),
            "{e}"
        );
        let e = load(GOOD, &["train.global_batch=5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.global_batch"), "{e}");
    }

    #[test]
    fn overrides_set_any_key() {
        let r = load(
            GOOD,
            &[
                "train.steps=40",
                "optim.lr=2e-3",
                "model.linear=float",
                "data.tokenizer=rel.json",
            ],
        )
        .unwrap();
        assert_eq!(r.train.steps, 40);
        assert_eq!(r.optim.lr, 2e-3);
        assert_eq!(r.model.linear, tern_model::LinearKind::Float);
        // --set paths are relative to the working directory, not rebased.
        assert_eq!(r.data.tokenizer, "rel.json");
        assert!(load(GOOD, &["train.steps"]).is_err());
    }
}
