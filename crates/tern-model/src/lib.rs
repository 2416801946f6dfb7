//! The LLaMA / TriLM model. Plain model code: no ranks, no communicators. Tensor parallelism is
//! applied from outside by `parallelize.rs`, through the projections' layer style (column- or
//! row-parallel) and the collective operators of `tern-dist`.

pub mod attention;
pub mod config;
pub mod encoder;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod norm;
pub mod parallelize;
pub mod rope;
pub mod seed;
pub mod sparsity;
pub mod student;

pub use config::{MlpKind, ModelConfig, ModelConfigError};
pub use encoder::{Encoder, EncoderConfig, EncoderParallel, Surrogate};
pub use linear::{InputStyle, LinearKind, ParallelStyle, ProjLinear, ScaleAxis, Tap};
pub use model::{cross_entropy, Llama};
pub use parallelize::{
    block_matrix_dim, check_tp, parallelize, shard_dim, shard_values, unshard_values,
};
pub use seed::name_seed;
pub use sparsity::{LayerType, SparsityConfig, TopK};
pub use student::{studentize, StudentConfig};
