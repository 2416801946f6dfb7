//! Tensor-parallel forms on two thread ranks against the whole model in one process.

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use tern_dist::{ThreadComm, TpGroup};
use tern_model::linear::bitnet_input;
use tern_model::{Block, LinearKind, Llama, ModelConfig, NoHooks};

use crate::{parallelize, TpForm};

type AB = Autodiff<Flex>;

/// A row-parallel BitNet input on two ranks (threads): the same values and the same gradient
/// as the whole row in one process. The sum of squares goes through f then g, so each rank's
/// gradient includes what the other rank's block contributes through the shared norm.
#[test]
fn bitnet_input_split_over_two_ranks_equals_the_whole_row() {
    let dev = Default::default();
    let (rows, d) = (3, 8);
    let xv: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let wv: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5)
        .collect();
    let full_x =
        Tensor::<AB, 2>::from_data(TensorData::new(xv.clone(), [rows, d]), &dev).require_grad();
    let w = Tensor::<AB, 2>::from_data(TensorData::new(wv.clone(), [rows, d]), &dev);
    let y = bitnet_input(full_x.clone(), 1e-5, &NoHooks);
    let want_y: Vec<f32> = y.clone().inner().into_data().to_vec().unwrap();
    let g = (y * w).sum().backward();
    let want_g: Vec<f32> = full_x.grad(&g).unwrap().into_data().to_vec().unwrap();
    let halves: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let (xv, wv) = (xv.clone(), wv.clone());
                sc.spawn(move || {
                    let group = TpGroup::new(Arc::new(comm));
                    let cols = |v: &[f32]| -> Vec<f32> {
                        v.chunks(d)
                            .flat_map(|row| row[r * d / 2..][..d / 2].to_vec())
                            .collect()
                    };
                    let dev = Default::default();
                    let x =
                        Tensor::<AB, 2>::from_data(TensorData::new(cols(&xv), [rows, d / 2]), &dev)
                            .require_grad();
                    let w =
                        Tensor::<AB, 2>::from_data(TensorData::new(cols(&wv), [rows, d / 2]), &dev);
                    let y = bitnet_input(x.clone(), 1e-5, &TpForm::Rowwise(group));
                    let yv: Vec<f32> = y.clone().inner().into_data().to_vec().unwrap();
                    let g = (y * w).sum().backward();
                    (yv, x.grad(&g).unwrap().into_data().to_vec().unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in 0..rows {
        for c in 0..d {
            let (part, j) = (c / (d / 2), c % (d / 2));
            let (y, g) = (&halves[part].0, &halves[part].1);
            let k = r * d / 2 + j;
            assert!((y[k] - want_y[r * d + c]).abs() < 1e-6, "value ({r}, {c})");
            assert!(
                (g[k] - want_g[r * d + c]).abs() < 1e-5,
                "gradient ({r}, {c}): {} vs {}",
                g[k],
                want_g[r * d + c]
            );
        }
    }
}

fn one_group(mut b: Block<Flex>) -> Block<Flex> {
    for p in b.projections_mut() {
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
        mlp: tern_model::MlpKind::Relu2glu,
        sparsity: Some(tern_model::SparsityConfig {
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
                        let m =
                            parallelize(full, &TpGroup::new(Arc::new(comm)), Default::default());
                        let a = m.layers[0].attention();
                        let dims = [
                            a.q_proj.weight.dims(),
                            a.k_proj.weight.dims(),
                            a.o_proj.weight.dims(),
                            m.layers[0].mlp().down_proj.weight.dims(),
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

/// Every float parameter's gradient (flattened, module order) and its shape.
fn grads_of(m: &Llama<AB, TpForm>, loss: Tensor<AB, 1>) -> Vec<(Vec<usize>, Vec<f32>)> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Grads<'a>(
        &'a <AB as burn::tensor::backend::AutodiffBackend>::Gradients,
        Vec<(Vec<usize>, Vec<f32>)>,
    );
    impl ModuleVisitor<AB> for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            let g = p
                .val()
                .grad(self.0)
                .expect("every parameter gets a gradient");
            self.1
                .push((g.dims().to_vec(), g.into_data().to_vec().unwrap()));
        }
    }
    let grads = loss.backward();
    let mut v = Grads(&grads, vec![]);
    m.visit(&mut v);
    v.1
}

/// Block `r` of 2 of a row-major `full` of `shape` along the dimension where `local` differs.
fn block_of(full: &[f32], shape: &[usize], local: &[usize], r: usize) -> Vec<f32> {
    let dim = (0..shape.len()).find(|&d| shape[d] != local[d]).unwrap();
    crate::shard_values(full, shape, dim, r, 2)
}

/// The vocabulary split (embedding and head by rows, the vocabulary-parallel loss) and the
/// sequence split (Megatron-SP), alone and together, tied and untied: on two thread ranks the
/// loss and the logits are the whole model's, each split parameter's gradient is its block of
/// the whole gradient, and each whole parameter's gradient is the whole one (summed over the
/// ranks under sequence parallelism, where each rank's covers its own positions).
#[test]
fn vocabulary_and_sequence_splits_give_the_whole_models_loss_and_gradients() {
    use crate::TpLayout;
    use burn::tensor::Int;
    let dev = Default::default();
    let ids: Vec<i32> = (0..2 * 9).map(|i| i * 23 % 64).collect();
    for tie in [false, true] {
        let c = ModelConfig {
            scale_groups: 2,
            tie_embeddings: tie,
            ..ModelConfig::tiny(64, LinearKind::Ternary)
        };
        let full = Llama::<AB>::new(&c, &dev);
        let block = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 9]), &dev);
        let inputs = block.clone().narrow(1, 0, 8);
        let want_logits: Vec<f32> = full.forward(inputs.clone()).into_data().to_vec().unwrap();
        let whole = full.clone().map_hooks(|_, _| TpForm::Replicated);
        let want_loss = whole.loss(block.clone());
        let want_value: f32 = want_loss.clone().into_scalar();
        let want = grads_of(&whole, want_loss);
        for (vocab, sequence) in [(true, false), (false, true), (true, true)] {
            let layout = TpLayout { vocab, sequence };
            let what = format!("tie {tie}, {layout:?}");
            let ranks: Vec<_> = std::thread::scope(|sc| {
                let hs: Vec<_> = ThreadComm::group(2)
                    .into_iter()
                    .map(|comm| {
                        let (full, block, inputs) = (full.clone(), block.clone(), inputs.clone());
                        sc.spawn(move || {
                            let m = parallelize(full, &TpGroup::new(Arc::new(comm)), layout);
                            let logits: Vec<f32> = m.forward(inputs).into_data().to_vec().unwrap();
                            let loss = m.loss(block);
                            let value: f32 = loss.clone().into_scalar();
                            (logits, value, grads_of(&m, loss))
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, (logits, value, grads)) in ranks.iter().enumerate() {
                let worst = logits
                    .iter()
                    .zip(&want_logits)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{what}: logits differ by {worst}");
                assert!(
                    (value - want_value).abs() <= 1e-6 * want_value.abs(),
                    "{what}, rank {r}: loss {value} vs {want_value}"
                );
                assert_eq!(grads.len(), want.len());
                for (i, ((local, g), (shape, w))) in grads.iter().zip(&want).enumerate() {
                    let (g, w): (Vec<f32>, Vec<f32>) = match local == shape {
                        true if sequence => {
                            let other = &ranks[1 - r].2[i].1;
                            (g.iter().zip(other).map(|(a, b)| a + b).collect(), w.clone())
                        }
                        true => (g.clone(), w.clone()),
                        false => (g.clone(), block_of(w, shape, local, r)),
                    };
                    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let worst = g
                        .iter()
                        .zip(&w)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst <= 1e-5 * scale.max(1e-3),
                        "{what}, rank {r}, parameter {i} {local:?}: gradient differs by {worst} \
                         (largest {scale})"
                    );
                }
            }
        }
    }
}
