//! The LLaMA / TriLM model. Plain model code: no ranks, no communicators. What acts on it from
//! outside (tensor parallelism, in crate tern-parallel; distillation's taps) does so through the
//! projections' [`Hooks`], which the plain model leaves as [`NoHooks`].

pub mod attention;
pub mod config;
pub mod decode;
pub mod depth;
pub mod encoder;
pub mod hooks;
pub mod linear;
pub mod mamba;
pub mod mlp;
pub mod moa;
pub mod model;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod seed;
pub mod sparsity;
pub mod student;
pub mod taps;

pub use config::{BlockKind, Mixer, MlpKind, ModelConfig, ModelConfigError};
pub use encoder::{Encoder, EncoderConfig, Surrogate};
pub use hooks::{Hooks, NoHooks};
pub use linear::{LinearKind, ProjLinear, ScaleAxis};
pub use model::{cross_entropy, Block, Llama};
pub use seed::{name_seed, special_initial_values};
pub use sparsity::{LayerType, SparsityConfig, TopK};
pub use student::{studentize, StudentConfig};
pub use taps::{tap, Recorder, Tap, Tapped};
