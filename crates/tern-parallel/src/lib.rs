//! Tensor parallelism for tern's LLaMA, applied from outside the model: the Megatron plan
//! ([`plan`]), the parallel forms of a projection ([`TpForm`], acting at tern-model's hooks with
//! tern-dist's collectives) and [`parallelize`], which turns a plain model into one rank's shard.

pub mod form;
pub mod parallelize;
pub mod plan;

pub use form::{Split, TpForm};
pub use parallelize::{parallelize, shard_param};
pub use plan::{
    block_matrix_dim, check_tp, is_block_matrix, shard_dim, shard_values, unshard_values, TpLayout,
    TP_PLAN,
};

/// A model split over a tensor-parallel group (a group of one holds it whole).
pub type TpLlama<B> = tern_model::Llama<B, TpForm>;

#[cfg(test)]
mod tests;
