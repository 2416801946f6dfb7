//! The CUDA matmul guard on the CPU: with padding forced, a whole forward and backward pass of a
//! model whose every product has an inner dimension of 32 mod 64 (hidden 96, GLU 160, head_dim
//! 32, 32 tokens) pads exactly the products that `tern_train::products` lists, and gives the
//! losses and gradients of the unpadded pass. Its own test binary: forcing is process-wide.

use burn::backend::ndarray::NdArray;
use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use tern_kernels::guard;
use tern_model::{LinearKind, Llama, ModelConfig};
use tern_train::params::flat_grads;
use tern_train::products::products;

type B = Autodiff<NdArray<f32>>;

fn host(t: Tensor<NdArray<f32>, 1>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn padded_products_are_the_listed_ones_and_change_nothing() {
    for (linear, tie) in [(LinearKind::Ternary, false), (LinearKind::Float, true)] {
        let c = ModelConfig {
            hidden: 96,
            intermediate: 160,
            n_heads: 3,
            n_kv_heads: Some(3),
            tie_embeddings: tie,
            ..ModelConfig::tiny(160, linear)
        };
        let dev = Default::default();
        let model = Llama::<B>::new(&c, &dev);
        let ids: Vec<i64> = (0..33).map(|i| (i * 37 % 160) as i64).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 33]), &dev);
        let run = |force: bool| {
            guard::force(force);
            let before = guard::padded_count();
            let loss = model.loss(tokens.clone());
            let padded = guard::padded_count() - before;
            let value = loss.clone().into_scalar();
            let grads = flat_grads(&model, &loss.backward());
            guard::force(false);
            (padded, value, grads)
        };
        let listed: usize = products(&c, 1, Default::default(), 1, 32, vec![])
            .iter()
            .filter(|p| p.hits_the_rule())
            .map(|p| p.calls)
            .sum();
        // 7 projections and 2 attention products in each of 2 layers, and the head.
        assert_eq!(listed, 2 * 9 + 1);
        let (none, plain_loss, plain) = run(false);
        let (padded, loss, grads) = run(true);
        assert_eq!(none, 0);
        assert_eq!(padded, listed, "{linear:?}");
        assert!(
            (loss - plain_loss).abs() <= 1e-5 * plain_loss.abs(),
            "{loss} {plain_loss}"
        );
        for (g, p) in grads.into_iter().zip(plain) {
            let (g, p) = (host(g), host(p));
            let scale = p.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            let diff = g
                .iter()
                .zip(&p)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-4 * scale, "{linear:?}: {diff} against {scale}");
        }
    }
}
