use serde::{Deserialize, Serialize};

use crate::depth::ModConfig;
use crate::linear::LinearKind;
use crate::mamba::MambaConfig;
use crate::moa::MoaConfig;
use crate::moe::MoeConfig;
use crate::sparsity::SparsityConfig;

/// The feed-forward block (`model.mlp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// `down(silu(gate(x)) * up(x))` (LLaMA).
    #[default]
    Swiglu,
    /// `down(relu(gate(x))^2 * up(x))` (Q-Sparse's squared-ReLU GLU).
    Relu2glu,
}

/// `[model]` section of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size; when absent the tokenizer's vocabulary size is used.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    pub hidden: usize,
    /// SwiGLU inner size (the "GLU" column of the Spectra table).
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Grouped-query attention: number of key/value heads (defaults to `n_heads`).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_eps")]
    pub rms_eps: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
    #[serde(default)]
    pub linear: LinearKind,
    /// Scales per ternary matrix (the tensor-parallel shards of TriLM).
    #[serde(default = "default_scale_groups")]
    pub scale_groups: usize,
    /// `gamma = eps + mean|W|` of the ternary linears.
    #[serde(default = "default_ternary_eps")]
    pub ternary_eps: f64,
    /// Standard deviation of the normal initialisation of every matrix.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    #[serde(default)]
    pub mlp: MlpKind,
    /// Q-Sparse top-K activation sparsity (`[model.sparsity]`); dense when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<SparsityConfig>,
    /// Jamba's layout: block `i` mixes its sequence with attention when
    /// `i % attention_period == attention_offset`, with a Mamba mixer (`[model.mamba]`) otherwise.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub attention_period: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attention_offset: usize,
    /// The Mamba mixers' sizes (Mamba's defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mamba: Option<MambaConfig>,
    /// Mixture-of-experts feed-forward layers (`[model.moe]`, in the blocks its period picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// Mixture of attention heads in place of every attention mixer (`[model.moa]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moa: Option<MoaConfig>,
    /// Mixture-of-Depths routing of the blocks its period picks (`[model.mod]`).
    #[serde(rename = "mod", default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<ModConfig>,
}

/// A block's sequence mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixer {
    Attention,
    /// Mixture of attention heads.
    Moa,
    Mamba,
}

/// What block `i` of a model holds ([`ModelConfig::block_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockKind {
    pub mixer: Mixer,
    /// A mixture of experts in place of the MLP.
    pub moe: bool,
    /// Mixture-of-Depths: a router decides which tokens the block processes.
    pub routed: bool,
}

impl BlockKind {
    /// The plain LLaMA block (attention and MLP over every token).
    pub fn is_llama(&self) -> bool {
        self.mixer == Mixer::Attention && !self.moe && !self.routed
    }
}

pub(crate) fn one() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_zero(v: &usize) -> bool {
    *v == 0
}
/// Switch Transformer's and Mixtral's order of magnitude for a balancing loss.
pub(crate) fn default_aux_weight() -> f64 {
    0.01
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_scale_groups() -> usize {
    1
}
fn default_ternary_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}

/// A configuration error; `key` is the recipe key path it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ModelConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ModelConfigError {}

fn err(key: &str, message: String) -> Result<(), ModelConfigError> {
    Err(ModelConfigError {
        key: key.to_string(),
        message,
    })
}

impl ModelConfig {
    /// A small config for tests.
    pub fn tiny(vocab: usize, linear: LinearKind) -> Self {
        Self {
            vocab_size: Some(vocab),
            hidden: 32,
            intermediate: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: Some(2),
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tie_embeddings: false,
            linear,
            scale_groups: 1,
            ternary_eps: 1e-5,
            init_std: 0.02,
            mlp: MlpKind::Swiglu,
            sparsity: None,
            attention_period: 1,
            attention_offset: 0,
            mamba: None,
            moe: None,
            moa: None,
            depth: None,
        }
    }

    /// What block `i` holds: Jamba's periods and offsets applied.
    pub fn block_kind(&self, i: usize) -> BlockKind {
        let attention = i % self.attention_period.max(1) == self.attention_offset;
        let mixer = match (attention, &self.moa) {
            (false, _) => Mixer::Mamba,
            (true, None) => Mixer::Attention,
            (true, Some(_)) => Mixer::Moa,
        };
        let picks = |period: usize, offset: usize| i % period.max(1) == offset;
        BlockKind {
            mixer,
            moe: self.moe.as_ref().is_some_and(|m| picks(m.period, m.offset)),
            routed: self
                .depth
                .as_ref()
                .is_some_and(|d| picks(d.period, d.offset())),
        }
    }

    /// Every block is LLaMA's (what the packed format, the Hugging Face export, distillation
    /// and sequence parallelism take).
    pub fn is_llama(&self) -> bool {
        (0..self.n_layers).all(|i| self.block_kind(i).is_llama())
    }

    /// The Mamba sizes in use (Mamba's defaults when `[model.mamba]` is absent).
    pub fn mamba_config(&self) -> MambaConfig {
        self.mamba.clone().unwrap_or_default()
    }

    pub fn vocab(&self) -> usize {
        self.vocab_size
            .expect("model.vocab_size is resolved before the model is built")
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.n_heads
    }

    /// Every shape rule of the model, checked before anything is allocated.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        for (key, v) in [
            ("model.hidden", self.hidden),
            ("model.intermediate", self.intermediate),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.scale_groups", self.scale_groups),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if self.vocab_size == Some(0) {
            return err("model.vocab_size", "must be at least 1".into());
        }
        if !self.hidden.is_multiple_of(self.n_heads) {
            return err(
                "model.n_heads",
                format!(
                    "{} heads do not divide model.hidden = {}",
                    self.n_heads, self.hidden
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(
                "model.n_heads",
                format!(
                    "head dimension hidden / n_heads = {} must be even for RoPE",
                    self.head_dim()
                ),
            );
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return err(
                "model.n_kv_heads",
                format!(
                    "{kv} key/value heads do not divide model.n_heads = {}",
                    self.n_heads
                ),
            );
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return err("model.rope_theta", "must be positive".into());
        }
        if self.rms_eps.is_nan() || self.rms_eps <= 0.0 {
            return err("model.rms_eps", "must be positive".into());
        }
        if self.init_std.is_nan() || self.init_std <= 0.0 {
            return err("model.init_std", "must be positive".into());
        }
        if let Some(s) = &self.sparsity {
            if let Err((key, message)) = s.validate() {
                return err(&key, message);
            }
        }
        let g = self.scale_groups;
        // Column-parallel matrices (q, k, v, gate, up) split their output rows, row-parallel ones
        // (o, down) their input columns, into `scale_groups` blocks.
        let kv_dim = kv * self.head_dim();
        for (what, dim) in [
            ("the output rows of q/o's input (hidden)", self.hidden),
            ("the output rows of k and v (n_kv_heads * head_dim)", kv_dim),
            (
                "the output rows of gate/up and input of down (intermediate)",
                self.intermediate,
            ),
        ] {
            if dim % g != 0 {
                return err(
                    "model.scale_groups",
                    format!("{g} scale groups do not divide {what} = {dim}"),
                );
            }
        }
        self.validate_kinds()
    }

    /// The keys of the block kinds beyond LLaMA's: periods, offsets, expert counts, sizes.
    fn validate_kinds(&self) -> Result<(), ModelConfigError> {
        let period = |key: &str, period: usize, offset: usize| {
            if period == 0 {
                return err(&format!("{key}period"), "must be at least 1".into());
            }
            if offset >= period {
                return err(
                    &format!("{key}offset"),
                    format!("{offset} must be below the period {period}"),
                );
            }
            Ok(())
        };
        let weight = |key: &str, w: f64| {
            if !(w.is_finite() && w >= 0.0) {
                return err(key, format!("{w} must be a finite weight >= 0"));
            }
            Ok(())
        };
        let experts = |key: &str, e: usize, k: usize| {
            if e == 0 {
                return err(&format!("{key}.experts"), "must be at least 1".into());
            }
            if k == 0 || k > e {
                return err(
                    &format!("{key}.top_k"),
                    format!("{k} must be between 1 and the {e} experts"),
                );
            }
            Ok(())
        };
        period(
            "model.attention_",
            self.attention_period,
            self.attention_offset,
        )?;
        let g = self.scale_groups;
        let groups = |key: &str, what: &str, dim: usize| {
            if !dim.is_multiple_of(g) {
                return err(
                    key,
                    format!("{g} scale groups (model.scale_groups) do not divide {what} = {dim}"),
                );
            }
            Ok(())
        };
        if let Some(m) = &self.moe {
            experts("model.moe", m.experts, m.top_k)?;
            period("model.moe.", m.period, m.offset)?;
            weight("model.moe.aux_loss_weight", m.aux_loss_weight)?;
            let inner = m.intermediate.unwrap_or(self.intermediate);
            if inner == 0 {
                return err("model.moe.intermediate", "must be at least 1".into());
            }
            groups("model.moe.intermediate", "an expert's inner size", inner)?;
        }
        if let Some(m) = &self.moa {
            experts("model.moa", m.experts, m.top_k)?;
            weight("model.moa.aux_loss_weight", m.aux_loss_weight)?;
        }
        if let Some(d) = &self.depth {
            if !(d.capacity > 0.0 && d.capacity <= 1.0) {
                return err(
                    "model.mod.capacity",
                    format!("{} must be a fraction in (0, 1]", d.capacity),
                );
            }
            period("model.mod.", d.period, d.offset())?;
            weight("model.mod.aux_loss_weight", d.aux_loss_weight)?;
        }
        let any = |f: &dyn Fn(BlockKind) -> bool| (0..self.n_layers).any(|i| f(self.block_kind(i)));
        for (key, given, found, what) in [
            (
                "model.moe",
                self.moe.is_some(),
                any(&|k| k.moe),
                "experts (its period and offset)",
            ),
            (
                "model.mod",
                self.depth.is_some(),
                any(&|k| k.routed),
                "routing (its period and offset)",
            ),
            (
                "model.moa",
                self.moa.is_some(),
                any(&|k| k.mixer == Mixer::Moa),
                "attention to mix (model.attention_period and attention_offset)",
            ),
        ] {
            if given && !found {
                return err(
                    key,
                    format!("no block of the {} gets {what}", self.n_layers),
                );
            }
        }
        let has_mamba = any(&|k| k.mixer == Mixer::Mamba);
        if self.mamba.is_some() && !has_mamba {
            return err(
                "model.mamba",
                format!(
                    "no block has a Mamba mixer: set model.attention_period above 1 (every \
                     block i with i % attention_period != attention_offset is a Mamba block; \
                     now {} of {})",
                    self.attention_period, self.n_layers
                ),
            );
        }
        if has_mamba {
            let m = self.mamba_config();
            for (key, v) in [
                ("model.mamba.expand", m.expand),
                ("model.mamba.d_state", m.d_state),
                ("model.mamba.d_conv", m.d_conv),
                ("model.mamba.dt_rank", m.dt_rank(self.hidden)),
            ] {
                if v == 0 {
                    return err(key, "must be at least 1".into());
                }
            }
            groups(
                "model.mamba.d_state",
                "the rows of x_proj (dt_rank + 2 d_state)",
                m.dt_rank(self.hidden) + 2 * m.d_state,
            )?;
        }
        Ok(())
    }

    /// Names and shapes of every parameter in module order (what `Llama::new` builds), without
    /// building anything: for planning memory.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![(
            "embed_tokens.weight".to_string(),
            vec![self.vocab(), self.hidden],
        )];
        for l in 0..self.n_layers {
            for (name, shape) in self.block_shapes(self.block_kind(l)) {
                out.push((format!("layers.{l}.{name}"), shape));
            }
        }
        out.push(("norm.weight".into(), vec![self.hidden]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab(), self.hidden]));
        }
        out
    }

    /// The matrix weights of the blocks that one token multiplies, on average (the model FLOPs'
    /// count, without the embedding and head): an expert's matrices count `top_k / experts` of
    /// the time, a routed block's `capacity` of the time (what its router is trained to pick).
    /// The convolution and `A` of Mamba are not products.
    pub fn active_block_matmul_params(&self) -> f64 {
        let mut sum = 0.0;
        for l in 0..self.n_layers {
            let kind = self.block_kind(l);
            let routed = match (&self.depth, kind.routed) {
                (Some(d), true) => d.capacity,
                _ => 1.0,
            };
            for (name, shape) in self.block_shapes(kind) {
                if shape.len() != 2 || name.ends_with("conv_weight") || name.ends_with("a_log") {
                    continue;
                }
                let share = match (&self.moe, &self.moa) {
                    (Some(m), _) if name.starts_with("moe.experts.") => {
                        m.top_k as f64 / m.experts as f64
                    }
                    (_, Some(m))
                        if name.starts_with("moa.q_proj.") || name.starts_with("moa.o_proj.") =>
                    {
                        m.top_k as f64 / m.experts as f64
                    }
                    _ => 1.0,
                };
                sum += (shape[0] * shape[1]) as f64 * share * routed;
            }
        }
        sum
    }

    /// Attention layers' worth of score and value products per token: 1 per attention block,
    /// `top_k` per mixture of attention heads, none per Mamba block, times the capacity of a
    /// routed block.
    pub fn attention_layers_per_token(&self) -> f64 {
        (0..self.n_layers)
            .map(|l| {
                let kind = self.block_kind(l);
                let per = match kind.mixer {
                    Mixer::Attention => 1.0,
                    Mixer::Moa => self.moa.as_ref().map_or(1, |m| m.top_k) as f64,
                    Mixer::Mamba => 0.0,
                };
                match (&self.depth, kind.routed) {
                    (Some(d), true) => per * d.capacity,
                    _ => per,
                }
            })
            .sum()
    }

    /// The parameters of one block of kind `k`, named within the block, in module order.
    fn block_shapes(&self, k: BlockKind) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = self.kv_heads() * self.head_dim();
        let mut out: Vec<(String, Vec<usize>)> = vec![("input_layernorm.weight".into(), vec![h])];
        let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
        match k.mixer {
            Mixer::Attention => {
                for (p, shape) in [("q", [h, h]), ("k", [kv, h]), ("v", [kv, h]), ("o", [h, h])] {
                    push(format!("self_attn.{p}_proj.weight"), shape.to_vec());
                }
            }
            Mixer::Moa => {
                let e = self.moa.as_ref().map_or(1, |m| m.experts);
                push("moa.router".into(), vec![e, h]);
                for x in 0..e {
                    push(format!("moa.q_proj.{x}.weight"), vec![h, h]);
                }
                push("moa.k_proj.weight".into(), vec![kv, h]);
                push("moa.v_proj.weight".into(), vec![kv, h]);
                for x in 0..e {
                    push(format!("moa.o_proj.{x}.weight"), vec![h, h]);
                }
            }
            Mixer::Mamba => {
                let m = self.mamba_config();
                let (di, r, n) = (m.expand * h, m.dt_rank(h), m.d_state);
                for (name, shape) in [
                    ("in_proj.weight", vec![2 * di, h]),
                    ("conv_weight", vec![di, m.d_conv]),
                    ("conv_bias", vec![di]),
                    ("x_proj.weight", vec![r + 2 * n, di]),
                    ("dt_proj_weight", vec![di, r]),
                    ("dt_proj_bias", vec![di]),
                    ("a_log", vec![di, n]),
                    ("d", vec![di]),
                    ("out_proj.weight", vec![h, di]),
                ] {
                    push(format!("mamba.{name}"), shape);
                }
            }
        }
        push("post_attention_layernorm.weight".into(), vec![h]);
        let mlp = |prefix: &str, i: usize| {
            [("gate", [i, h]), ("up", [i, h]), ("down", [h, i])]
                .map(|(p, shape)| (format!("{prefix}{p}_proj.weight"), shape.to_vec()))
        };
        match &self.moe {
            Some(m) if k.moe => {
                push("moe.router".into(), vec![m.experts, h]);
                for x in 0..m.experts {
                    let inner = m.intermediate.unwrap_or(i);
                    for (name, shape) in mlp(&format!("moe.experts.{x}."), inner) {
                        push(name, shape);
                    }
                }
            }
            _ => {
                for (name, shape) in mlp("mlp.", i) {
                    push(name, shape);
                }
            }
        }
        if k.routed {
            push("mod_router.weight".into(), vec![h]);
        }
        out
    }

    /// Parameter count (weights of every matrix, embedding, head and norms).
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_must_divide_hidden() {
        let mut c = ModelConfig::tiny(64, LinearKind::Float);
        c.n_heads = 5;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "model.n_heads");
        assert!(e.message.contains("do not divide model.hidden = 32"), "{e}");
    }

    #[test]
    fn kv_heads_and_scale_groups_checked() {
        let mut c = ModelConfig::tiny(64, LinearKind::Ternary);
        c.n_kv_heads = Some(3);
        assert_eq!(c.validate().unwrap_err().key, "model.n_kv_heads");
        let mut c = ModelConfig::tiny(64, LinearKind::Ternary);
        c.scale_groups = 3;
        assert_eq!(c.validate().unwrap_err().key, "model.scale_groups");
        c.scale_groups = 2;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn spectra_99m_param_count() {
        // Spectra's table: 99.74M for hidden 512, GLU 1280, 16 layers, vocab 50304, untied.
        let c = ModelConfig {
            vocab_size: Some(50304),
            hidden: 512,
            intermediate: 1280,
            n_layers: 16,
            n_heads: 8,
            n_kv_heads: None,
            ..ModelConfig::tiny(1, LinearKind::Ternary)
        };
        let p = c.num_params() as f64 / 1e6;
        assert!((p - 99.74).abs() < 0.05, "{p}");
    }
}
