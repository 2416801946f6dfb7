//! Packed ternary weights, independent of any tensor library:
//! - [`codes`]: a ternary matrix (codes in {-1, 0, 1} and a grid of scales) packed 2 bits a weight
//!   or 5 weights a byte (base 3, 1.6 bits);
//! - [`file`]: tern's packed model file (safetensors with the codes, scales and metadata);
//! - [`ggml`] and [`gguf`]: llama.cpp's TQ2_0 / TQ1_0 blocks and the GGUF container.

pub mod codes;
pub mod file;
pub mod ggml;
pub mod gguf;
pub mod quant;

pub use codes::{Encoding, TernaryMatrix};
pub use file::{PackedModel, PackedTensor, SizeReport, StudentSpec};
pub use quant::QuantMatrix;
