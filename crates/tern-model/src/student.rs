//! A layer-wise distillation student made from a plain model, from outside the model code (as
//! `parallelize` is): the blocks being distilled get a 1-bit input encoder in front of every
//! projection and keep the recipe's linear kind (float or ternary); the other blocks stay float
//! copies of the teacher's.

use burn::tensor::backend::Backend;

use crate::encoder::EncoderConfig;
use crate::linear::{LinearKind, ProjLinear};
use crate::model::Llama;

#[derive(Debug, Clone)]
pub struct StudentConfig {
    /// The blocks that get encoders (0-based).
    pub layers: Vec<usize>,
    pub encoder: EncoderConfig,
    /// Seeds the encoders' initial matrices (each projection's from its own stream).
    pub seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name: stable across Rust versions.
    seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Turns a plain model into the student of `c` (see the module comment). Encoder parameters are
/// named `layers.{i}.{projection}.encoder.{fc1,fc2,alpha,beta}`.
pub fn studentize<B: Backend>(model: Llama<B>, c: &StudentConfig, device: &B::Device) -> Llama<B> {
    let layers = model
        .layers
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
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
                    ProjLinear {
                        kind: LinearKind::Float,
                        ..p
                    }
                }
            };
            let a = &mut b.self_attn;
            take(&mut a.q_proj, |p| convert("self_attn.q_proj", p));
            take(&mut a.k_proj, |p| convert("self_attn.k_proj", p));
            take(&mut a.v_proj, |p| convert("self_attn.v_proj", p));
            take(&mut a.o_proj, |p| convert("self_attn.o_proj", p));
            let m = &mut b.mlp;
            take(&mut m.gate_proj, |p| convert("mlp.gate_proj", p));
            take(&mut m.up_proj, |p| convert("mlp.up_proj", p));
            take(&mut m.down_proj, |p| convert("mlp.down_proj", p));
            b
        })
        .collect();
    Llama { layers, ..model }
}

/// Replaces `*slot` by `f(*slot)`.
fn take<T: Clone>(slot: &mut T, f: impl FnOnce(T) -> T) {
    *slot = f(slot.clone());
}
