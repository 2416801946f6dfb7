//! Tensor parallelism applied from outside the model, as TorchTitan's `parallelize_llama`: a plain
//! [`Llama`] goes in, the same type comes out holding this rank's shard of every block matrix and
//! the Megatron layer style on each projection. `model.rs` knows nothing of it.
//!
//! The plan (Megatron's): q, k, v, gate and up are column-parallel (a block of output rows, whole
//! attention heads and KV heads per rank), o and down row-parallel (a block of input columns).
//! Attention and MLP apply f once to their input (one gradient all-reduce for q, k and v, one
//! for gate and up), the row-parallel outputs go through g.
//! Embedding, norms and the LM head are replicated: each rank holds them whole and computes the
//! same values, so their gradients are equal on every rank and need no tensor-parallel reduction.
//! Ternary scales: a shard owns `scale_groups / tp` whole groups and computes their scales
//! itself, with no communication, as TriLM's per-shard scales.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_dist::TpGroup;

use crate::attention::Attention;
use crate::config::{ModelConfig, ModelConfigError};
use crate::encoder::{Encoder, EncoderParallel};
use crate::linear::{InputStyle, LinearKind, ParallelStyle, ProjLinear};
use crate::mlp::Mlp;
use crate::model::{Block, Llama};

/// Parameters of a block that tensor parallelism splits, and the dimension of `W[out, in]` it
/// splits (0: output rows, column-parallel; 1: input columns, row-parallel).
pub const TP_PLAN: [(&str, usize); 7] = [
    ("self_attn.q_proj.weight", 0),
    ("self_attn.k_proj.weight", 0),
    ("self_attn.v_proj.weight", 0),
    ("self_attn.o_proj.weight", 1),
    ("mlp.gate_proj.weight", 0),
    ("mlp.up_proj.weight", 0),
    ("mlp.down_proj.weight", 1),
];

/// The dimension along which parameter `name` (e.g. `layers.3.mlp.up_proj.weight`) is split, or
/// `None` for a replicated parameter.
pub fn shard_dim(name: &str) -> Option<usize> {
    block_matrix_dim(name).or_else(|| encoder_shard_dim(name))
}

/// [`shard_dim`] of the seven block matrices only (the matrices GaLore projects).
pub fn block_matrix_dim(name: &str) -> Option<usize> {
    let (_, within) = name.strip_prefix("layers.")?.split_once('.')?;
    TP_PLAN.iter().find(|(p, _)| *p == within).map(|&(_, d)| d)
}

/// A distillation student's encoder in front of a row-parallel projection sees only this rank's
/// input channels: its `fc1 [d/2, d]` is split by input columns (row-parallel), `fc2 [d, d/2]`
/// by output rows (column-parallel) and `alpha`, `beta` `[d]` by channel. Encoders in front of
/// column-parallel projections are replicated.
fn encoder_shard_dim(name: &str) -> Option<usize> {
    let (_, within) = name.strip_prefix("layers.")?.split_once('.')?;
    let (proj, param) = within.split_once(".encoder.")?;
    let rowwise = TP_PLAN
        .iter()
        .any(|&(p, d)| d == 1 && p.strip_suffix(".weight") == Some(proj));
    match (rowwise, param) {
        (false, _) => None,
        (true, "fc1") => Some(1),
        (true, "fc2" | "alpha" | "beta") => Some(0),
        _ => None,
    }
}

/// Whether a model can be split `tp` ways; the error names the key and the numbers.
pub fn check_tp(c: &ModelConfig, tp: usize) -> Result<(), ModelConfigError> {
    let fail = |key: &str, message: String| {
        Err(ModelConfigError {
            key: key.into(),
            message,
        })
    };
    if tp <= 1 {
        return Ok(());
    }
    for (key, n, what) in [
        ("model.n_heads", c.n_heads, "attention heads "),
        ("model.n_kv_heads", c.kv_heads(), "key/value heads "),
        ("model.intermediate", c.intermediate, ""),
    ] {
        if !n.is_multiple_of(tp) {
            return fail(
                key,
                format!("{n} {what}cannot be split across parallel.tp = {tp} ranks"),
            );
        }
    }
    if c.linear != LinearKind::Float && !c.scale_groups.is_multiple_of(tp) {
        return fail(
            "model.scale_groups",
            format!(
                "{} scale groups cannot be split across parallel.tp = {tp} ranks: each rank computes \
                 the scales of its own shard, so model.scale_groups must be a multiple of parallel.tp \
                 (the scale groups are a property of the model; a run with another tp keeps them)",
                c.scale_groups
            ),
        );
    }
    Ok(())
}

/// This rank's block of a parameter along `dim`.
fn shard_param<B: Backend, const D: usize>(
    p: Param<Tensor<B, D>>,
    dim: usize,
    group: &TpGroup,
) -> Param<Tensor<B, D>> {
    let (rank, n) = (group.rank(), group.size());
    p.map(|w| {
        let len = w.dims()[dim] / n;
        let grad = w.is_require_grad();
        // detach: the shard must be a leaf of the autodiff graph, as a parameter is.
        w.narrow(dim, rank * len, len)
            .detach()
            .set_require_grad(grad)
    })
}

fn shard<B: Backend>(p: ProjLinear<B>, dim: usize, group: &TpGroup) -> ProjLinear<B> {
    let n = group.size();
    let weight = shard_param(p.weight, dim, group);
    let parallel = match dim {
        0 => ParallelStyle::Colwise,
        _ => ParallelStyle::Rowwise(group.clone()),
    };
    // See `encoder_shard_dim`.
    let encoder = p.encoder.map(|e| match dim {
        0 => Encoder {
            parallel: EncoderParallel::BeforeColwise(group.clone()),
            ..e
        },
        _ => Encoder {
            fc1: shard_param(e.fc1, 1, group),
            fc2: shard_param(e.fc2, 0, group),
            alpha: shard_param(e.alpha, 0, group),
            beta: shard_param(e.beta, 0, group),
            parallel: EncoderParallel::BeforeRowwise(group.clone()),
            ..e
        },
    });
    ProjLinear {
        weight,
        encoder,
        parallel,
        // Float layers ignore the groups; ternary ones were checked by `check_tp`.
        groups: (p.groups / n).max(1),
        ..p
    }
}

/// Splits a plain model across `group` (this process holds shard `group.rank()`). The model must
/// fit the split (`check_tp`); a group of one returns the model as it is.
pub fn parallelize<B: Backend>(model: Llama<B>, group: &TpGroup) -> Llama<B> {
    let n = group.size();
    if n == 1 {
        return model;
    }
    let layers = model
        .layers
        .into_iter()
        .map(|b| {
            let a = b.self_attn;
            let m = b.mlp;
            // Projections behind encoders get their gradient all-reduce (f) after each encoder
            // instead of once on the module's input.
            let input = |has_encoder: bool| match has_encoder {
                true => InputStyle::AsIs,
                false => InputStyle::CopyToGroup(group.clone()),
            };
            let (attn_input, mlp_input) = (
                input(a.q_proj.encoder.is_some()),
                input(m.gate_proj.encoder.is_some()),
            );
            Block {
                self_attn: Attention {
                    q_proj: shard(a.q_proj, 0, group),
                    k_proj: shard(a.k_proj, 0, group),
                    v_proj: shard(a.v_proj, 0, group),
                    o_proj: shard(a.o_proj, 1, group),
                    input: attn_input,
                    n_heads: a.n_heads / n,
                    n_kv_heads: a.n_kv_heads / n,
                    head_dim: a.head_dim,
                },
                mlp: Mlp {
                    gate_proj: shard(m.gate_proj, 0, group),
                    up_proj: shard(m.up_proj, 0, group),
                    down_proj: shard(m.down_proj, 1, group),
                    input: mlp_input,
                    kind: m.kind,
                },
                ..b
            }
        })
        .collect();
    Llama { layers, ..model }
}

/// Shard `rank` of `tp` of a row-major matrix `full` of `shape`, split along `dim`.
pub fn shard_values(full: &[f32], shape: &[usize], dim: usize, rank: usize, tp: usize) -> Vec<f32> {
    // A vector is a one-column matrix.
    let [rows, cols] = [shape[0], shape.get(1).copied().unwrap_or(1)];
    assert_eq!(full.len(), rows * cols, "shape {shape:?}");
    match dim {
        0 => {
            let r = rows / tp;
            full[rank * r * cols..(rank + 1) * r * cols].to_vec()
        }
        _ => {
            let c = cols / tp;
            full.chunks(cols)
                .flat_map(|row| &row[rank * c..(rank + 1) * c])
                .copied()
                .collect()
        }
    }
}

/// The full matrix from its `tp` shards laid end to end (what an all-gather returns);
/// `local_shape` is one shard's shape. Inverse of [`shard_values`].
pub fn unshard_values(gathered: &[f32], local_shape: &[usize], dim: usize, tp: usize) -> Vec<f32> {
    let [rows, cols] = [local_shape[0], local_shape.get(1).copied().unwrap_or(1)];
    let per = rows * cols;
    assert_eq!(gathered.len(), per * tp, "local shape {local_shape:?}");
    match dim {
        0 => gathered.to_vec(),
        _ => (0..rows)
            .flat_map(|i| (0..tp).flat_map(move |r| &gathered[r * per + i * cols..][..cols]))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn plan_by_name() {
        assert_eq!(shard_dim("layers.0.self_attn.q_proj.weight"), Some(0));
        assert_eq!(shard_dim("layers.11.self_attn.o_proj.weight"), Some(1));
        assert_eq!(shard_dim("layers.2.mlp.down_proj.weight"), Some(1));
        assert_eq!(shard_dim("layers.2.input_layernorm.weight"), None);
        assert_eq!(shard_dim("embed_tokens.weight"), None);
        assert_eq!(shard_dim("lm_head.weight"), None);
        assert_eq!(shard_dim("layers.1.mlp.down_proj.encoder.fc1"), Some(1));
        assert_eq!(
            shard_dim("layers.1.self_attn.o_proj.encoder.alpha"),
            Some(0)
        );
        assert_eq!(shard_dim("layers.1.mlp.up_proj.encoder.fc1"), None);
        assert_eq!(block_matrix_dim("layers.1.mlp.down_proj.encoder.fc1"), None);
    }

    #[test]
    fn shard_and_unshard_are_inverse() {
        let shape = [4usize, 6];
        let full: Vec<f32> = (0..24).map(|x| x as f32).collect();
        for dim in [0, 1] {
            for tp in [1, 2, 3] {
                if !shape[dim].is_multiple_of(tp) {
                    continue;
                }
                let shards: Vec<Vec<f32>> = (0..tp)
                    .map(|r| shard_values(&full, &shape, dim, r, tp))
                    .collect();
                let mut local = shape;
                local[dim] /= tp;
                assert_eq!(unshard_values(&shards.concat(), &local, dim, tp), full);
            }
        }
        // Columns 3..6 of each row.
        assert_eq!(
            shard_values(&full, &shape, 1, 1, 2),
            vec![3., 4., 5., 9., 10., 11., 15., 16., 17., 21., 22., 23.]
        );
    }

    #[test]
    fn tp_must_fit_heads_and_scale_groups() {
        let c = ModelConfig::tiny(64, LinearKind::Ternary); // 4 heads, 2 kv heads, 1 scale group
        assert_eq!(check_tp(&c, 2).unwrap_err().key, "model.scale_groups");
        let c2 = ModelConfig {
            scale_groups: 2,
            ..c.clone()
        };
        assert!(check_tp(&c2, 2).is_ok());
        assert_eq!(check_tp(&c2, 4).unwrap_err().key, "model.n_kv_heads");
        let f = ModelConfig::tiny(64, LinearKind::Float);
        assert!(
            check_tp(&f, 2).is_ok(),
            "float layers have no scales to split"
        );
        let e = check_tp(
            &ModelConfig {
                n_heads: 6,
                n_kv_heads: None,
                hidden: 36,
                ..f
            },
            4,
        );
        assert_eq!(e.unwrap_err().key, "model.n_heads");
    }

    fn one_group(mut b: Block<Flex>) -> Block<Flex> {
        for p in [
            &mut b.self_attn.q_proj,
            &mut b.self_attn.k_proj,
            &mut b.self_attn.v_proj,
            &mut b.self_attn.o_proj,
            &mut b.mlp.gate_proj,
            &mut b.mlp.up_proj,
            &mut b.mlp.down_proj,
        ] {
            p.groups = 1;
        }
        b
    }

    #[test]
    fn two_thread_ranks_compute_the_full_models_logits() {
        use burn::tensor::{Int, Tensor, TensorData};
        use std::sync::Arc;
        use tern_dist::ThreadComm;

        let dev = Default::default();
        // Q-Sparse on a ternary model with ReLU² GLU: the row-parallel inputs (o, down) choose
        // their top-K on the gathered whole row.
        let sparse = ModelConfig {
            mlp: crate::MlpKind::Relu2glu,
            sparsity: Some(crate::SparsityConfig {
                top_k: Some(0.5),
                attn_top_k: None,
                mlp_top_k: Some(0.4),
                quantized: true,
                rescale: true,
            }),
            ..ModelConfig::tiny(64, LinearKind::Ternary)
        };
        // BitNet with top-K: norm and 8-bit quantization of the whole row, then its top-K.
        let bitnet_sparse = ModelConfig {
            sparsity: sparse.sparsity.clone(),
            ..ModelConfig::tiny(64, LinearKind::Bitnet)
        };
        for base in [
            ModelConfig::tiny(64, LinearKind::Float),
            ModelConfig::tiny(64, LinearKind::Ternary),
            ModelConfig::tiny(64, LinearKind::Bitnet),
            sparse,
            bitnet_sparse,
        ] {
            let linear = base.linear;
            let c = ModelConfig {
                scale_groups: 2,
                ..base
            };
            let full = Llama::<Flex>::new(&c, &dev);
            let tokens = Tensor::<Flex, 2, Int>::from_data(
                TensorData::new(vec![1i32, 5, 9, 2, 33, 7, 7, 60], [2, 4]),
                &dev,
            );
            let want: Vec<f32> = full.forward(tokens.clone()).into_data().to_vec().unwrap();
            let outs: Vec<(Vec<f32>, Vec<usize>)> = std::thread::scope(|sc| {
                let hs: Vec<_> = ThreadComm::group(2)
                    .into_iter()
                    .map(|comm| {
                        let (full, tokens) = (full.clone(), tokens.clone());
                        sc.spawn(move || {
                            let m = parallelize(full, &TpGroup::new(Arc::new(comm)));
                            let a = &m.layers[0].self_attn;
                            let dims = [
                                a.q_proj.weight.dims(),
                                a.k_proj.weight.dims(),
                                a.o_proj.weight.dims(),
                                m.layers[0].mlp.down_proj.weight.dims(),
                            ]
                            .concat();
                            let y: Vec<f32> = m.forward(tokens).into_data().to_vec().unwrap();
                            (
                                y,
                                [dims, vec![a.n_heads, a.n_kv_heads, a.q_proj.groups]].concat(),
                            )
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (y, dims) in outs {
                // hidden 32, 4 heads of 8, 2 kv heads, intermediate 64: half of each split side.
                assert_eq!(dims, vec![16, 32, 8, 32, 32, 16, 32, 32, 2, 1, 1]);
                let worst = y
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{linear:?}: max |TP - full| = {worst}");
                if linear == LinearKind::Ternary && c.sparsity.is_none() {
                    // The shards' own scales are what the full model's 2 groups compute, not one
                    // scale over the whole matrix.
                    let one = Llama {
                        layers: full.layers.iter().map(|b| one_group(b.clone())).collect(),
                        ..full.clone()
                    };
                    let y1: Vec<f32> = one.forward(tokens.clone()).into_data().to_vec().unwrap();
                    let d = y1
                        .iter()
                        .zip(&y)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(d > 1e-4, "one scale per matrix gives the same logits ({d})");
                }
            }
        }
    }
}
