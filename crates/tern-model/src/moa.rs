//! Mixture of attention heads (MoA, Zhang et al. 2022, as JetMoE uses it): `experts` sets of
//! query and output projections share one key and one value projection; a float router sends
//! each token to its `top_k` experts ([`crate::moe::route`], with the same load-balancing loss),
//! and the token's output is the weighted sum of those experts' attention outputs. Each expert
//! has `n_heads` query heads over the shared `n_kv_heads` key/value heads (grouped-query).
//!
//! Every expert's attention is computed for every token here and the unrouted ones weighted by
//! zero: exact and dropless, at `experts / top_k` times the routed work (a kernel that runs a
//! query subset against all keys would remove that). Routing reads only the token itself and
//! attention only earlier keys, so outputs never depend on later tokens.

use std::marker::PhantomData;

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_kernels::Kernels;

use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::moe::route;
use crate::sparsity::LayerType;

/// The layer's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoaConfig {
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Weight of the load-balancing loss in the training objective.
    #[serde(default = "crate::config::default_aux_weight")]
    pub aux_loss_weight: f64,
}

#[derive(Module, Debug)]
pub struct Moa<B: Backend, H = NoHooks> {
    /// `[experts, hidden]`, float.
    pub router: Param<Tensor<B, 2>>,
    /// Per expert, `[n_heads * head_dim, hidden]`.
    pub q_proj: Vec<ProjLinear<B, H>>,
    /// Shared, `[n_kv_heads * head_dim, hidden]`.
    pub k_proj: ProjLinear<B, H>,
    pub v_proj: ProjLinear<B, H>,
    /// Per expert, `[hidden, n_heads * head_dim]`.
    pub o_proj: Vec<ProjLinear<B, H>>,
    /// What acts on the input the query, key and value projections share
    /// ([`Hooks::module_input`]; the router reads the input as it is).
    #[module(skip)]
    pub input: H,
    #[module(skip)]
    pub top_k: usize,
    /// The balancing loss's weight in the objective ([`MoaConfig::aux_loss_weight`]).
    #[module(skip)]
    pub aux_weight: f64,
    #[module(skip)]
    pub n_heads: usize,
    #[module(skip)]
    pub n_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    /// Tells burn's derive that `H` is not a module.
    #[module(skip)]
    pub hooks: PhantomData<H>,
}

impl<B: Backend> Moa<B> {
    pub fn new(c: &ModelConfig, m: &MoaConfig, device: &B::Device) -> Self {
        let proj = |d_in, d_out, axis| {
            ProjLinearConfig::block(c, d_in, d_out, axis, LayerType::Attention).init(device)
        };
        let (qd, kvd) = (c.n_heads * c.head_dim(), c.kv_heads() * c.head_dim());
        Self {
            router: Initializer::Normal {
                mean: 0.0,
                std: c.init_std,
            }
            .init([m.experts, c.hidden], device),
            q_proj: (0..m.experts)
                .map(|_| proj(c.hidden, qd, ScaleAxis::Rows))
                .collect(),
            k_proj: proj(c.hidden, kvd, ScaleAxis::Rows),
            v_proj: proj(c.hidden, kvd, ScaleAxis::Rows),
            o_proj: (0..m.experts)
                .map(|_| proj(qd, c.hidden, ScaleAxis::Cols))
                .collect(),
            input: NoHooks,
            top_k: m.top_k,
            aux_weight: m.aux_loss_weight,
            n_heads: c.n_heads,
            n_kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            hooks: PhantomData,
        }
    }
}

impl<B: Backend, H> Moa<B, H> {
    /// The projections, named within the block (`moa.q_proj.2`, `moa.k_proj`, ...), in module
    /// order.
    pub fn projections(&self) -> Vec<(&'static str, &ProjLinear<B, H>)> {
        let name = |s: String| crate::model::intern(s);
        let mut out: Vec<_> = (self.q_proj.iter().enumerate())
            .map(|(x, p)| (name(format!("moa.q_proj.{x}")), p))
            .collect();
        out.push(("moa.k_proj", &self.k_proj));
        out.push(("moa.v_proj", &self.v_proj));
        out.extend(
            (self.o_proj.iter().enumerate()).map(|(x, p)| (name(format!("moa.o_proj.{x}")), p)),
        );
        out
    }

    pub fn projections_mut(&mut self) -> Vec<&mut ProjLinear<B, H>> {
        let mut out: Vec<_> = self.q_proj.iter_mut().collect();
        out.push(&mut self.k_proj);
        out.push(&mut self.v_proj);
        out.extend(self.o_proj.iter_mut());
        out
    }

    /// This layer with its hooks mapped by `f`, told each projection's name.
    pub fn map_hooks<H2>(self, f: &mut impl FnMut(Option<&'static str>, H) -> H2) -> Moa<B, H2> {
        let name = |s: String| crate::model::intern(s);
        let q_proj = (self.q_proj.into_iter().enumerate())
            .map(|(x, p)| p.map_hooks(|h| f(Some(name(format!("moa.q_proj.{x}"))), h)))
            .collect();
        let k_proj = self.k_proj.map_hooks(|h| f(Some("moa.k_proj"), h));
        let v_proj = self.v_proj.map_hooks(|h| f(Some("moa.v_proj"), h));
        let o_proj = (self.o_proj.into_iter().enumerate())
            .map(|(x, p)| p.map_hooks(|h| f(Some(name(format!("moa.o_proj.{x}"))), h)))
            .collect();
        Moa {
            router: self.router,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            input: f(None, self.input),
            top_k: self.top_k,
            aux_weight: self.aux_weight,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            hooks: PhantomData,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Moa<B, H> {
    /// `x: [batch, seq, hidden]`, RoPE tables `[seq, head_dim]` -> the output and the
    /// load-balancing loss (`[1]`).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Tensor<B, 1>) {
        let [b, t, h] = x.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let device = x.device();
        let (gates, aux) = self.gates(x.clone());
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]);
        let x = self.input.module_input(x);
        let key = B::rope(
            heads(self.k_proj.forward(x.clone()), nkv),
            cos.clone(),
            sin.clone(),
        );
        let value = heads(self.v_proj.forward(x.clone()), nkv);
        let mut out = Tensor::<B, 3>::zeros([b, t, h], &device);
        for (ex, (qp, op)) in self.q_proj.iter().zip(&self.o_proj).enumerate() {
            let q = B::rope(heads(qp.forward(x.clone()), nh), cos.clone(), sin.clone());
            let att = B::causal_attention(q, key.clone(), value.clone()).reshape([b, t, nh * hd]);
            let gate = gates
                .clone()
                .slice([0..b * t, ex..ex + 1])
                .reshape([b, t, 1]);
            out = out + op.forward(att) * gate;
        }
        (out, aux)
    }

    /// The routing of `x: [batch, seq, hidden]` as a dense `[tokens, experts]` gate (zero where
    /// a token does not go) and the load-balancing loss.
    pub(crate) fn gates(&self, x: Tensor<B, 3>) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let [b, t, h] = x.dims();
        let (k, e) = (self.top_k, self.q_proj.len());
        let device = x.device();
        let r = route(x.reshape([b * t, h]), self.router.val(), k);
        let idx =
            Tensor::<B, 2, Int>::from_data(TensorData::new(r.experts.clone(), [b * t, k]), &device);
        let gates = Tensor::<B, 2>::zeros([b * t, e], &device).scatter(
            1,
            idx,
            r.weights.reshape([b * t, k]),
            IndexingUpdateOp::Add,
        );
        (gates, r.aux)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::Attention;
    use crate::linear::LinearKind;
    use crate::rope::rope_tables;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type AB = Autodiff<Flex>;

    fn setup(linear: LinearKind, experts: usize, top_k: usize) -> (ModelConfig, Moa<AB>) {
        let dev = Default::default();
        let mut c = ModelConfig::tiny(64, linear);
        c.hidden = 32;
        c.n_heads = 4;
        c.n_kv_heads = Some(2);
        (
            c.clone(),
            Moa::new(
                &c,
                &MoaConfig {
                    experts,
                    top_k,
                    aux_loss_weight: 0.01,
                },
                &dev,
            ),
        )
    }

    fn tables(c: &ModelConfig, t: usize) -> (Tensor<AB, 2>, Tensor<AB, 2>) {
        rope_tables(t, c.head_dim(), c.rope_theta, &Default::default())
    }

    /// One expert chosen by every token is plain grouped-query attention with that expert's
    /// query and output projections.
    #[test]
    fn one_expert_is_attention() {
        let (c, moa) = setup(LinearKind::Ternary, 1, 1);
        let dev = Default::default();
        let x = Tensor::<AB, 3>::random([2, 7, 32], Distribution::Normal(0.0, 1.0), &dev);
        let (cos, sin) = tables(&c, 7);
        // First, so that the lazily initialised parameters exist before they are copied.
        let (y, aux) = moa.forward(x.clone(), &cos, &sin);
        let mut att = Attention::<AB>::new(&c, &dev);
        att.q_proj = moa.q_proj[0].clone();
        att.k_proj = moa.k_proj.clone();
        att.v_proj = moa.v_proj.clone();
        att.o_proj = moa.o_proj[0].clone();
        let want: Vec<f32> = att.forward(x, &cos, &sin).into_data().to_vec().unwrap();
        let got: Vec<f32> = y.into_data().to_vec().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert!((aux.into_scalar() - 1.0).abs() < 1e-6);
    }

    /// No output at position t moves when a later token changes; the changed token's own output
    /// does (the control).
    #[test]
    fn outputs_do_not_depend_on_later_tokens() {
        for linear in [LinearKind::Float, LinearKind::Bitnet] {
            let (c, moa) = setup(linear, 4, 2);
            let dev = Default::default();
            let x = Tensor::<AB, 3>::random([1, 8, 32], Distribution::Normal(0.0, 1.0), &dev);
            let (cos, sin) = tables(&c, 8);
            let y0: Vec<f32> = moa
                .forward(x.clone(), &cos, &sin)
                .0
                .into_data()
                .to_vec()
                .unwrap();
            for s in [2, 7] {
                let bump =
                    Tensor::<AB, 3>::random([1, 1, 32], Distribution::Normal(0.0, 1.0), &dev);
                let x2 = x.clone().slice_assign([0..1, s..s + 1, 0..32], bump);
                let y: Vec<f32> = moa.forward(x2, &cos, &sin).0.into_data().to_vec().unwrap();
                for p in 0..8 {
                    let moved = (0..32).any(|j| y[p * 32 + j] != y0[p * 32 + j]);
                    assert_eq!(moved, p >= s, "{linear:?}: token {s} changed, position {p}");
                }
            }
        }
    }
}
