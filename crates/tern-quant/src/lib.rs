//! Post-training quantization of a float weight matrix `W [rows, cols]` (`y = W x`) to `bits`
//! bits per weight in groups of `group` consecutive input columns, each group of each row with its
//! own scale: round-to-nearest ([`rtn`]) and GPTQ ([`gptq`], Frantar et al. 2022).
//!
//! The grid is llama.cpp's symmetric one (Q8_0, Q6_K, Q4_0 and Q3_K store `d * q`): integers
//! `q` in `[-2^(b-1), 2^(b-1) - 1]` and, per group, `d = m / -2^(b-1)` where `m` is the group's
//! value of largest magnitude (so `m` itself is on the grid, at `q = -2^(b-1)`); 8 bits use
//! `d = max|w| / 127` and `q` in `[-127, 127]`, as Q8_0 does. Scales are rounded to f16 before
//! use, so a file that stores them in f16 (GGUF's Q8_0, Q4_0) holds exactly the quantized matrix.
//! With K-quant scales (Q6_K, Q3_K) each group of 16 takes `d = D * sc`, an integer `sc` times an
//! f16 `D` per 256 columns, both chosen before the group's codes.

pub mod gptq;
pub mod grid;

pub use gptq::{gptq, hessian, GptqConfig};
pub use grid::{rtn, Grid, Scales};
