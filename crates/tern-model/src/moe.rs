//! A mixture-of-experts feed-forward layer (Switch / Mixtral style), dropless: a float router
//! scores every token against `experts` gated MLPs (each an [`Mlp`] of the model's linear kind),
//! each token goes to its `top_k` experts with the softmax weights of those renormalized to sum
//! to one, and every routed token is computed (no capacity, nothing dropped). Tokens never share
//! a computation, so a token's output depends on that token alone.
//!
//! The load-balancing loss (Switch Transformer): `E * sum_e f_e P_e`, where `f_e` is the share of
//! the `T * top_k` routing slots that went to expert `e` (a count: no gradient) and `P_e` the mean
//! router probability of `e` over the tokens. It is 1 when routing is uniform.

use std::marker::PhantomData;

use burn::module::{Initializer, Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_kernels::Kernels;

use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::ProjLinear;
use crate::mlp::Mlp;

/// The layer's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Each expert's inner size; the model's `intermediate` when absent.
    #[serde(default)]
    pub intermediate: Option<usize>,
    /// Block `i` has this layer instead of the MLP when `i % period == offset` (Jamba's expert
    /// layer period and offset).
    #[serde(default = "crate::config::one")]
    pub period: usize,
    #[serde(default)]
    pub offset: usize,
    /// Weight of the load-balancing loss in the training objective.
    #[serde(default = "crate::config::default_aux_weight")]
    pub aux_loss_weight: f64,
}

#[derive(Module, Debug)]
pub struct Moe<B: Backend, H = NoHooks> {
    /// `[experts, hidden]`, float.
    pub router: Param<Tensor<B, 2>>,
    pub experts: Vec<Mlp<B, H>>,
    #[module(skip)]
    pub top_k: usize,
    /// The balancing loss's weight in the objective ([`MoeConfig::aux_loss_weight`]).
    #[module(skip)]
    pub aux_weight: f64,
    /// Tells burn's derive that `H` is not a module (only the experts' projections carry hooks).
    #[module(skip)]
    pub hooks: PhantomData<H>,
}

impl<B: Backend> Moe<B> {
    pub fn new(c: &ModelConfig, m: &MoeConfig, device: &B::Device) -> Self {
        let expert = ModelConfig {
            intermediate: m.intermediate.unwrap_or(c.intermediate),
            ..c.clone()
        };
        Self {
            router: Initializer::Normal {
                mean: 0.0,
                std: c.init_std,
            }
            .init([m.experts, c.hidden], device),
            experts: (0..m.experts).map(|_| Mlp::new(&expert, device)).collect(),
            top_k: m.top_k,
            aux_weight: m.aux_loss_weight,
            hooks: PhantomData,
        }
    }
}

impl<B: Backend, H> Moe<B, H> {
    /// Every expert's projections, named within the block (`moe.experts.3.up_proj`).
    pub fn projections(&self) -> Vec<(&'static str, &ProjLinear<B, H>)> {
        let mut out = Vec::new();
        for (x, e) in self.experts.iter().enumerate() {
            for (name, p) in e.projections() {
                out.push((crate::model::intern(format!("moe.experts.{x}.{name}")), p));
            }
        }
        out
    }

    pub fn projections_mut(&mut self) -> Vec<&mut ProjLinear<B, H>> {
        self.experts
            .iter_mut()
            .flat_map(|e| e.projections_mut())
            .collect()
    }

    /// This layer with its hooks mapped by `f`, told each projection's name (`None` for the
    /// experts' module inputs).
    pub fn map_hooks<H2>(self, f: &mut impl FnMut(Option<&'static str>, H) -> H2) -> Moe<B, H2> {
        let experts = self
            .experts
            .into_iter()
            .enumerate()
            .map(|(x, e)| e.map_hooks(&format!("moe.experts.{x}."), f))
            .collect();
        Moe {
            router: self.router,
            experts,
            top_k: self.top_k,
            aux_weight: self.aux_weight,
            hooks: PhantomData,
        }
    }
}

/// A top-k routing of `T` tokens over `E` experts.
pub struct Routing<B: Backend> {
    /// `[T * k]`: each token's weights for its experts, renormalized to sum to one.
    pub weights: Tensor<B, 1>,
    /// `[T * k]` on the host: each token's experts, best first.
    pub experts: Vec<i64>,
    /// Switch's load-balancing loss, `[1]`.
    pub aux: Tensor<B, 1>,
}

/// Scores `x: [T, hidden]` against `router: [E, hidden]` and keeps each token's `k` best experts.
pub fn route<B: Kernels>(x: Tensor<B, 2>, router: Tensor<B, 2>, k: usize) -> Routing<B> {
    let [t, _] = x.dims();
    let e = router.dims()[0];
    let device = x.device();
    let probs = softmax(<B as Kernels>::linear(x, router), 1);
    let (w, idx) = probs.clone().topk_with_indices(k, 1);
    let weights = (w.clone() / w.sum_dim(1)).reshape([t * k]);
    let experts: Vec<i64> = idx.into_data().convert::<i64>().to_vec().expect("indices");
    let mut share = vec![0f32; e];
    for &ex in &experts {
        share[ex as usize] += 1.0 / (t * k) as f32;
    }
    let share = Tensor::<B, 1>::from_data(TensorData::new(share, [e]), &device);
    let aux = (probs.mean_dim(0).reshape([e]) * share).sum() * e as f64;
    Routing {
        weights,
        experts,
        aux,
    }
}

impl<B: Kernels, H: Hooks<B>> Moe<B, H> {
    /// `x: [batch, seq, hidden]` -> the output and the load-balancing loss (`[1]`).
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 1>) {
        let [b, l, h] = x.dims();
        let (t, k) = (b * l, self.top_k);
        let device = x.device();
        let x = x.reshape([t, h]);
        let r = route(x.clone(), self.router.val(), k);
        // Per expert: its tokens and their slots in the weights (token * k + rank).
        let mut tokens = vec![Vec::new(); self.experts.len()];
        let mut slots = vec![Vec::new(); self.experts.len()];
        for (s, &ex) in r.experts.iter().enumerate() {
            tokens[ex as usize].push((s / k) as i64);
            slots[ex as usize].push(s as i64);
        }
        let ints = |v: &[i64]| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device)
        };
        let mut out = Tensor::<B, 2>::zeros([t, h], &device);
        for (ex, expert) in self.experts.iter().enumerate() {
            let n = tokens[ex].len();
            if n == 0 {
                continue;
            }
            let ids = ints(&tokens[ex]);
            let y = expert
                .forward(x.clone().select(0, ids.clone()).reshape([1, n, h]))
                .reshape([n, h]);
            let gate = r
                .weights
                .clone()
                .select(0, ints(&slots[ex]))
                .reshape([n, 1]);
            out = out.select_assign(0, ids, y * gate, IndexingUpdateOp::Add);
        }
        (out.reshape([b, l, h]), r.aux)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearKind;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type AB = Autodiff<Flex>;

    fn layer(linear: LinearKind) -> (Moe<AB>, Tensor<AB, 3>) {
        let dev = Default::default();
        let mut c = ModelConfig::tiny(64, linear);
        c.hidden = 16;
        c.intermediate = 24;
        c.init_std = 0.5;
        let m = MoeConfig {
            experts: 4,
            top_k: 2,
            intermediate: Some(12),
            period: 1,
            offset: 0,
            aux_loss_weight: 0.01,
        };
        let x = Tensor::<AB, 3>::random([2, 6, 16], Distribution::Normal(0.0, 1.0), &dev);
        (Moe::new(&c, &m, &dev), x)
    }

    /// Each token's output is the renormalized top-2 mix of its experts, each run on every token
    /// here and picked out per token (an independent, dense computation of the same layer).
    #[test]
    fn dropless_routing_is_the_dense_top_k_mix() {
        for linear in [LinearKind::Float, LinearKind::Ternary] {
            let (moe, x) = layer(linear);
            let (y, _) = moe.forward(x.clone());
            let y: Vec<f32> = y.into_data().to_vec().unwrap();
            let xs = x.clone().reshape([12, 16]);
            let p: Vec<f32> = softmax(xs.clone().matmul(moe.router.val().transpose()), 1)
                .into_data()
                .to_vec()
                .unwrap();
            let dense: Vec<Vec<f32>> = moe
                .experts
                .iter()
                .map(|ex| ex.forward(x.clone()).into_data().to_vec().unwrap())
                .collect();
            for tok in 0..12 {
                let pt = &p[tok * 4..][..4];
                let mut order: Vec<usize> = (0..4).collect();
                order.sort_by(|&a, &b| pt[b].total_cmp(&pt[a]));
                let norm = pt[order[0]] + pt[order[1]];
                for j in 0..16 {
                    let want: f32 = order[..2]
                        .iter()
                        .map(|&ex| pt[ex] / norm * dense[ex][tok * 16 + j])
                        .sum();
                    let got = y[tok * 16 + j];
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{linear:?} token {tok}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Changing one token moves that token's output and no other.
    #[test]
    fn a_token_affects_only_itself() {
        let (moe, x) = layer(LinearKind::Ternary);
        let y0: Vec<f32> = moe.forward(x.clone()).0.into_data().to_vec().unwrap();
        let dev = Default::default();
        let bump = Tensor::<AB, 3>::random([1, 1, 16], Distribution::Normal(0.0, 1.0), &dev);
        let x2 = x.slice_assign([1..2, 3..4, 0..16], bump);
        let y: Vec<f32> = moe.forward(x2).0.into_data().to_vec().unwrap();
        for tok in 0..12 {
            let moved = (0..16).any(|j| y[tok * 16 + j] != y0[tok * 16 + j]);
            assert_eq!(moved, tok == 6 + 3, "token {tok}");
        }
    }

    /// A zero router gives uniform probabilities: the balancing loss is exactly 1 whatever the
    /// (tied) routing. A learned router's loss is `E sum_e f_e P_e` computed here from the
    /// probabilities on the host, and it reaches the router's gradient.
    #[test]
    fn balancing_loss_is_one_when_uniform_and_trains_the_router() {
        let (mut moe, x) = layer(LinearKind::Float);
        let router = moe.router.val();
        moe.router = Param::from_tensor(router.clone().zeros_like().require_grad());
        let (_, aux) = moe.forward(x.clone());
        assert!((aux.into_scalar() - 1.0).abs() < 1e-6);
        moe.router = Param::from_tensor(router.require_grad());
        let (y, aux) = moe.forward(x.clone());
        let p: Vec<f32> = softmax(x.reshape([12, 16]).matmul(moe.router.val().transpose()), 1)
            .into_data()
            .to_vec()
            .unwrap();
        let (mut f, mut mean) = ([0f64; 4], [0f64; 4]);
        for row in p.chunks(4) {
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for &e in &order[..2] {
                f[e] += 1.0 / 24.0;
            }
            for e in 0..4 {
                mean[e] += row[e] as f64 / 12.0;
            }
        }
        let want: f64 = 4.0 * (0..4).map(|e| f[e] * mean[e]).sum::<f64>();
        let got = aux.clone().into_scalar() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let g = (y.powf_scalar(2.0).sum() + aux).backward();
        let gr = moe.router.val().grad(&g).unwrap().abs().sum().into_scalar();
        assert!(gr > 0.0);
    }
}
