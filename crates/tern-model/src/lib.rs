//! The LLaMA / TriLM model. Plain model code: no ranks, no communicators. Parallelism is applied
//! from outside (a later `tern-dist` crate) through the layer types.

pub mod attention;
pub mod config;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod norm;
pub mod rope;

pub use config::{ModelConfig, ModelConfigError};
pub use linear::{LinearKind, ProjLinear, ScaleAxis};
pub use model::{cross_entropy, Llama};
