//! Tensor parallelism applied from outside the model, as TorchTitan's `parallelize_llama`: a plain
//! [`Llama`] goes in, one comes out holding this rank's shard of every block matrix and the
//! parallel form ([`TpForm`]) of each projection in its hooks. tern-model knows nothing of it.
//!
//! The plan (Megatron's, [`crate::plan::TP_PLAN`]): q, k, v, gate and up are column-parallel (a
//! block of output rows, whole attention heads and KV heads per rank), o and down row-parallel (a
//! block of input columns). Attention and MLP apply f once to their input, the row-parallel
//! outputs go through g. By default the embedding, norms and the LM head are replicated: each
//! rank holds them whole and computes the same values, so their gradients are equal on every
//! rank and need no tensor-parallel reduction. A [`TpLayout`] may split more: the vocabulary
//! (embedding and head by rows, a vocabulary-parallel loss) and the sequence (Megatron-SP:
//! between the projections each rank holds a block of the positions, f becomes an all-gather
//! and g a reduce-scatter along the sequence, and the whole parameters' gradients, each from its
//! rank's positions, are summed over the group by the trainer). Ternary scales: a shard owns `scale_groups / tp` whole groups and
//! computes their scales itself, with no communication, as TriLM's per-shard scales.

use std::marker::PhantomData;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_dist::TpGroup;
use tern_model::attention::Attention;
use tern_model::encoder::Encoder;
use tern_model::mlp::Mlp;
use tern_model::moa::Moa;
use tern_model::moe::Moe;
use tern_model::{Block, Llama, ProjLinear};

use crate::form::{Split, TpForm};
use crate::plan::TpLayout;

/// This rank's block of a parameter along `dim`. A parameter not initialized yet stays lazy at
/// the block's shape (a rank builds only its shard: the trainer then sets its values, and the
/// whole tensor is never made); were it read, it would hold the block of the whole initial value.
pub fn shard_param<B: Backend, const D: usize>(
    p: Param<Tensor<B, D>>,
    dim: usize,
    group: &TpGroup,
) -> Param<Tensor<B, D>> {
    let (rank, n) = (group.rank(), group.size());
    if !p.is_initialized() {
        let mut dims = p.lazy_shape().dims::<D>();
        let len = dims[dim] / n;
        dims[dim] = len;
        let shape = burn::tensor::Shape::new(dims);
        let (id, device) = (p.id, p.lazy_device());
        return Param::uninitialized(
            id,
            move |_, grad| {
                let w: Tensor<B, D> = p.val();
                w.narrow(dim, rank * len, len)
                    .detach()
                    .set_require_grad(grad)
            },
            device,
            true,
            shape,
        );
    }
    p.map(|w| {
        let len = w.dims()[dim] / n;
        let grad = w.is_require_grad();
        // detach: the shard must be a leaf of the autodiff graph, as a parameter is.
        w.narrow(dim, rank * len, len)
            .detach()
            .set_require_grad(grad)
    })
}

fn shard<B: Backend>(p: ProjLinear<B>, dim: usize, group: &TpGroup) -> ProjLinear<B, TpForm> {
    let n = group.size();
    let form = match dim {
        0 => TpForm::Colwise(group.clone()),
        _ => TpForm::Rowwise(group.clone()),
    };
    let p = p.map_hooks(|_| form);
    // In front of a row-parallel projection the encoder takes this rank's input channels.
    let encoder = p.encoder.map(|e| match dim {
        0 => e,
        _ => Encoder {
            fc1: shard_param(e.fc1, 1, group),
            fc2: shard_param(e.fc2, 0, group),
            alpha: shard_param(e.alpha, 0, group),
            beta: shard_param(e.beta, 0, group),
            offset: e.offset.map(|o| shard_param(o, 0, group)),
            ..e
        },
    });
    ProjLinear {
        weight: shard_param(p.weight, dim, group),
        encoder,
        // Float layers ignore the groups; ternary ones were checked by `check_tp`.
        groups: (p.groups / n).max(1),
        ..p
    }
}

/// Splits a plain model across `group` (this process holds shard `group.rank()`) as `layout`
/// says. The model must fit the split (`crate::plan::check_tp`); in a group of one every form is
/// `Replicated`.
pub fn parallelize<B: Backend>(
    model: Llama<B>,
    group: &TpGroup,
    layout: TpLayout,
) -> Llama<B, TpForm> {
    let n = group.size();
    if n == 1 {
        return model.map_hooks(|_, _| TpForm::Replicated);
    }
    // Projections behind encoders get f after each encoder instead of once on the module's input.
    let input = |has_encoder: bool| match (has_encoder, layout.sequence) {
        (true, _) => TpForm::Replicated,
        (false, false) => TpForm::SharedInput(group.clone()),
        (false, true) => TpForm::SequenceInput(group.clone()),
    };
    let out = match layout.sequence {
        false => TpForm::Rowwise(group.clone()),
        true => TpForm::RowwiseToSequence(group.clone()),
    };
    let shard = |p, dim| match dim {
        0 => shard(p, 0, group),
        _ => shard(p, 1, group).map_hooks(|_| out.clone()),
    };
    let split_mlp = |m: Mlp<B>| Mlp {
        input: input(m.gate_proj.encoder.is_some()),
        gate_proj: shard(m.gate_proj, 0),
        up_proj: shard(m.up_proj, 0),
        down_proj: shard(m.down_proj, 1),
        kind: m.kind,
    };
    // Held whole on every rank, which compute the same values from the same input.
    let whole = |_: Option<&'static str>, _| TpForm::Replicated;
    let layers = model
        .layers
        .into_iter()
        .map(|b| Block {
            input_layernorm: b.input_layernorm,
            self_attn: b.self_attn.map(|a| Attention {
                input: input(a.q_proj.encoder.is_some()),
                q_proj: shard(a.q_proj, 0),
                k_proj: shard(a.k_proj, 0),
                v_proj: shard(a.v_proj, 0),
                o_proj: shard(a.o_proj, 1),
                n_heads: a.n_heads / n,
                n_kv_heads: a.n_kv_heads / n,
                head_dim: a.head_dim,
            }),
            // Every expert's heads split as attention's; the router is replicated.
            moa: b.moa.map(|a| Moa {
                router: a.router,
                input: input(false),
                q_proj: a.q_proj.into_iter().map(|p| shard(p, 0)).collect(),
                k_proj: shard(a.k_proj, 0),
                v_proj: shard(a.v_proj, 0),
                o_proj: a.o_proj.into_iter().map(|p| shard(p, 1)).collect(),
                top_k: a.top_k,
                aux_weight: a.aux_weight,
                n_heads: a.n_heads / n,
                n_kv_heads: a.n_kv_heads / n,
                head_dim: a.head_dim,
                hooks: PhantomData,
            }),
            mamba: b.mamba.map(|m| m.map_hooks(&mut { whole })),
            post_attention_layernorm: b.post_attention_layernorm,
            mlp: b.mlp.map(split_mlp),
            // Every expert split as the MLP (Megatron's tensor parallelism within experts): all
            // ranks route the same tokens, so their collectives match.
            moe: b.moe.map(|m| Moe {
                router: m.router,
                experts: m.experts.into_iter().map(split_mlp).collect(),
                top_k: m.top_k,
                aux_weight: m.aux_weight,
                hooks: PhantomData,
            }),
            mod_router: b.mod_router,
            mod_aux_weight: b.mod_aux_weight,
            hooks: PhantomData,
        })
        .collect();
    let rows = |p| match layout.vocab {
        true => shard_param(p, 0, group),
        false => p,
    };
    let embed_tokens = burn::nn::Embedding {
        weight: rows(model.embed_tokens.weight),
    };
    let lm_head = model.lm_head.map(|h| {
        let h = h.map_hooks(|_| TpForm::Replicated);
        ProjLinear {
            weight: rows(h.weight),
            ..h
        }
    });
    Llama {
        embed_tokens,
        layers,
        norm: model.norm,
        lm_head,
        head_dim: model.head_dim,
        rope_theta: model.rope_theta,
        ends: TpForm::Ends(Split {
            group: group.clone(),
            vocab: layout.vocab,
            sequence: layout.sequence,
        }),
    }
}
