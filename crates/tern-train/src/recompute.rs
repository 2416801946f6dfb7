//! Activation recompute by blocks (`train.recompute = "block"`), as Megatron's full recompute
//! and `torch.utils.checkpoint` over a sequence of blocks do: the forward pass keeps only each
//! block's input (no autodiff graph); the backward pass then goes block by block from the top,
//! running each block's forward again with its graph and backpropagating the gradient of its
//! output through it. Only one block's activations are held at a time, for one more forward
//! pass of the blocks. Each segment's backward is a backward pass of its own (burn's autodiff
//! cannot run one inside another), so the segments are chained here, outside the model.

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use tern_kernels::Kernels;
use tern_model::{Hooks, Llama};

use crate::params::add_grads;

/// The loss of `block` (`[batch, seq + 1]` tokens, the next-token objective), the blocks'
/// weighted auxiliary losses within it (`None` for a LLaMA model) and every parameter's gradient
/// (module order), computed with block recompute.
#[allow(clippy::type_complexity)]
pub fn loss_and_grads<AB, H>(
    model: &Llama<AB, H>,
    block: Tensor<AB::InnerBackend, 2, Int>,
) -> (
    Tensor<AB::InnerBackend, 1>,
    Option<Tensor<AB::InnerBackend, 1>>,
    Vec<Tensor<AB::InnerBackend, 1>>,
)
where
    AB: AutodiffBackend + Kernels,
    AB::InnerBackend: Kernels,
    H: Hooks<AB>,
    Llama<AB, H>: AutodiffModule<AB, InnerModule = Llama<AB::InnerBackend, H>>,
    H: Hooks<AB::InnerBackend>,
{
    let [_, t1] = block.dims();
    let inputs = block.clone().narrow(1, 0, t1 - 1);
    let targets = Tensor::<AB, 2, Int>::from_inner(block.narrow(1, 1, t1 - 1));
    let device = targets.device();
    let plain = model.valid();
    let values = crate::params::flat_values(&plain);
    let mut slots: Vec<Option<Tensor<AB::InnerBackend, 1>>> = vec![None; values.len()];

    // Forward without a graph: the input of every block and of the head.
    let (cos, sin) = plain.rope(t1 - 1, &inputs.device());
    let mut kept = vec![plain.embed(inputs.clone())];
    let mut aux_value = None;
    for layer in &plain.layers {
        let (x, aux) = layer.forward_aux(kept.last().expect("the embedding").clone(), &cos, &sin);
        kept.push(x);
        aux_value = tern_model::model::add_aux(aux_value, aux);
    }

    // The head and the loss, from the last hidden state.
    let x = leaf::<AB>(kept.pop().expect("the head's input"));
    let loss = model.head_loss(x.clone(), targets);
    // The blocks' auxiliary losses (balancing, routing) join the value; their gradients come
    // with each block's pass below.
    let value = match &aux_value {
        Some(a) => loss.clone().inner() + a.clone(),
        None => loss.clone().inner(),
    };
    let grads = loss.backward();
    add_grads(model, &grads, &mut slots);
    let mut dy = x.grad(&grads).expect("the head's input gets a gradient");

    // Each block again, from the top, its output's gradient pulled through it.
    let (cos, sin) = model.rope(t1 - 1, &device);
    for layer in model.layers.iter().rev() {
        let x = leaf::<AB>(kept.pop().expect("a block's input"));
        let (y, aux) = layer.forward_aux(x.clone(), &cos, &sin);
        let objective = match aux {
            Some(a) => pull(y, dy) + a,
            None => pull(y, dy),
        };
        let grads = objective.backward();
        add_grads(model, &grads, &mut slots);
        dy = x.grad(&grads).expect("a block's input gets a gradient");
    }
    let e = model.embed(Tensor::<AB, 2, Int>::from_inner(inputs));
    add_grads(model, &pull(e, dy).backward(), &mut slots);

    let grads = slots
        .into_iter()
        .zip(values)
        .map(|(g, v)| g.unwrap_or_else(|| v.zeros_like()))
        .collect();
    (value, aux_value, grads)
}

/// A kept activation as a graph leaf whose gradient is wanted.
fn leaf<AB: AutodiffBackend>(x: Tensor<AB::InnerBackend, 3>) -> Tensor<AB, 3> {
    Tensor::from_inner(x).require_grad()
}

/// `sum(y * dy)`: its backward pass gives `y`'s inputs the gradients `dy` implies.
fn pull<AB: AutodiffBackend>(y: Tensor<AB, 3>, dy: Tensor<AB::InnerBackend, 3>) -> Tensor<AB, 1> {
    (y * Tensor::from_inner(dy)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;
    use tern_model::{LinearKind, ModelConfig};

    type AB = Autodiff<Flex>;

    /// The loss and every gradient equal those of one backward pass through the whole model
    /// (ternary and float, tied and untied head).
    #[test]
    fn block_recompute_gives_the_plain_gradients() {
        let dev = Default::default();
        let hybrid = ModelConfig {
            attention_period: 2,
            mamba: Some(tern_model::mamba::MambaConfig {
                d_state: 4,
                ..Default::default()
            }),
            moe: Some(tern_model::moe::MoeConfig {
                experts: 3,
                top_k: 2,
                intermediate: None,
                period: 2,
                offset: 1,
                aux_loss_weight: 0.1,
            }),
            depth: Some(tern_model::depth::ModConfig {
                capacity: 0.5,
                period: 3,
                offset: Some(2),
                aux_loss_weight: 0.1,
            }),
            ..ModelConfig::tiny(50, LinearKind::Ternary)
        };
        for (linear, tie, kinds) in [
            (LinearKind::Ternary, false, None),
            (LinearKind::Float, true, None),
            (LinearKind::Ternary, false, Some(hybrid)),
        ] {
            let c = ModelConfig {
                tie_embeddings: tie,
                n_layers: 3,
                ..kinds.unwrap_or_else(|| ModelConfig::tiny(50, linear))
            };
            let model = Llama::<AB>::new(&c, &dev);
            let ids: Vec<i64> = (0..2 * 17).map(|i| (i * 13 % 50) as i64).collect();
            let block = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [2, 17]), &dev);
            let loss = model.loss(Tensor::from_inner(block.clone()));
            let plain = crate::params::flat_grads(&model, &loss.backward());
            let (value, _, grads) = loss_and_grads(&model, block);
            let (a, b): (f32, f32) = (loss.inner().into_scalar(), value.into_scalar());
            assert_eq!(a, b, "{linear:?}");
            assert_eq!(grads.len(), plain.len());
            for (g, p) in grads.into_iter().zip(plain) {
                let (g, p) = (g.into_data().to_vec::<f32>().unwrap(), p.into_data());
                let p = p.to_vec::<f32>().unwrap();
                let scale = p.iter().fold(1e-8f32, |m, x| m.max(x.abs()));
                let diff = g
                    .iter()
                    .zip(&p)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-5 * scale,
                    "{linear:?} tie {tie}: {diff} of {scale}"
                );
            }
        }
    }
}
