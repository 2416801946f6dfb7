//! Inference on packed ternary models: the packed-code matmul kernel ([`kernel`]), a LLaMA
//! forward pass with a KV cache ([`model`]), sampling and generation ([`sample`]), and the step
//! from a trained model's tensors to its packed form ([`convert`]); a distillation student's
//! projections take their input through their 1-bit encoders ([`encoder`]).

pub mod burn_decode;
pub mod convert;
pub mod encoder;
pub mod input;
pub mod kernel;
pub mod model;
pub mod sample;
/// The kernels' inner loops: crate-private, since their callers guarantee the slice lengths and
/// instruction sets the `unsafe` vector code relies on.
pub(crate) mod simd;
pub use simd::Isa;
pub mod ternary;
pub mod trilm;

pub use burn_decode::BurnDecoder;
pub use convert::{effective_tensors, pack_model, packed_config, packed_shapes, ternary_matrix};
pub use encoder::{BitEncoder, Proj};
pub use kernel::{Dense, Matrix, PackedTernary};
pub use model::{InferModel, KvCache};
pub use sample::{generate, Conversation, Decode, Generated, Sampler, SamplerConfig};
