//! Text sources, tokenisation, token shards and the deterministic sampler.
//!
//! Flow: SlimPajama-format JSONL(.zst) files -> [`prep`] (or [`tokenize`] at start) -> token
//! shards ([`litpkds`] `.bin`, [`h5`] `.h5`) -> [`dataset`] sources of `seq_len + 1`-token blocks
//! -> [`sampler`] (weighted blend, per-source shuffle from the seed, position = consumed samples).

pub mod config;
pub mod dataset;
pub mod h5;
pub mod litpkds;
pub mod prep;
pub mod sampler;
pub mod shard;
pub mod source;
pub mod tokenize;
pub mod train_tokenizer;

pub use config::{DataConfig, SourceConfig};
pub use dataset::{BlockRef, TrainData, ValData};
pub use tokenize::{TextTokenizer, TokenStream};
