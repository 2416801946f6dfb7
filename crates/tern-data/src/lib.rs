//! Text sources, tokenisation and the deterministic sampler.
//!
//! Flow: SlimPajama-format JSONL(.zst) files -> [`tokenize`] -> a [`TokenStream`] -> fixed blocks
//! of `seq_len + 1` tokens -> [`Sampler`] (global order from the seed, position = consumed samples).

pub mod config;
pub mod litpkds;
pub mod prep;
pub mod sampler;
pub mod source;
pub mod tokenize;

pub use config::DataConfig;
pub use sampler::Sampler;
pub use tokenize::{TextTokenizer, TokenStream};
