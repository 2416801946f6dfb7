use serde::{Deserialize, Serialize};

use crate::linear::LinearKind;
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
        }
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
        Ok(())
    }

    /// Names and shapes of every parameter in module order (what `Llama::new` builds), without
    /// building anything: for planning memory.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![("embed_tokens.weight".to_string(), vec![self.vocab(), h])];
        for l in 0..self.n_layers {
            for (name, shape) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ] {
                out.push((format!("layers.{l}.{name}"), shape));
            }
        }
        out.push(("norm.weight".into(), vec![h]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab(), h]));
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
