//! A layer-wise distillation student made from a plain model, from outside the model code (as
//! `parallelize` is): the blocks being distilled get a 1-bit input encoder in front of every
//! projection and keep the recipe's linear kind (float or ternary); the other blocks stay float
//! copies of the teacher's.

use burn::tensor::backend::Backend;

use crate::attention::Attention;
use crate::encoder::EncoderConfig;
use crate::linear::{LinearKind, ProjLinear};
use crate::mlp::Mlp;
use crate::model::{Block, Llama};
use crate::seed::name_seed;

#[derive(Debug, Clone)]
pub struct StudentConfig {
    /// The blocks that get encoders (0-based).
    pub layers: Vec<usize>,
    pub encoder: EncoderConfig,
    /// Seeds the encoders' initial matrices (each projection's from its own stream).
    pub seed: u64,
}

/// Turns a plain model into the student of `c` (see the module comment). Encoder parameters are
/// named `layers.{i}.{projection}.encoder.{fc1,fc2,alpha,beta}`.
pub fn studentize<B: Backend>(model: Llama<B>, c: &StudentConfig, device: &B::Device) -> Llama<B> {
    let layers = model
        .layers
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let distilled = c.layers.contains(&i);
            let convert = |name: &str, p: ProjLinear<B>| -> ProjLinear<B> {
                if distilled {
                    let d_in = p.weight.dims()[1];
                    let seed = name_seed(c.seed, &format!("layers.{i}.{name}.encoder"));
                    ProjLinear {
                        encoder: Some(c.encoder.init(d_in, seed, device)),
                        ..p
                    }
                } else {
                    // A float copy of the teacher's block: dense, as the teacher is.
                    ProjLinear {
                        kind: LinearKind::Float,
                        sparsity: None,
                        ..p
                    }
                }
            };
            Block {
                self_attn: b.self_attn.map(|a| Attention {
                    q_proj: convert("self_attn.q_proj", a.q_proj),
                    k_proj: convert("self_attn.k_proj", a.k_proj),
                    v_proj: convert("self_attn.v_proj", a.v_proj),
                    o_proj: convert("self_attn.o_proj", a.o_proj),
                    ..a
                }),
                mlp: b.mlp.map(|m| Mlp {
                    gate_proj: convert("mlp.gate_proj", m.gate_proj),
                    up_proj: convert("mlp.up_proj", m.up_proj),
                    down_proj: convert("mlp.down_proj", m.down_proj),
                    ..m
                }),
                ..b
            }
        })
        .collect();
    Llama { layers, ..model }
}
