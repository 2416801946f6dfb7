//! Mamba's selective state-space mixer (Gu and Dao, 2023), the sequence layer of Jamba's Mamba
//! blocks, as a layer beside attention: `in_proj` splits into `x` and a gate `z`; `x` goes
//! through a causal depthwise convolution and SiLU; `x_proj` gives each token its step-size rank
//! vector and its `B`, `C` (`d_state` each); `dt_proj` and softplus give the per-channel step
//! `delta`; the selective scan ([`tern_kernels::Kernels::selective_scan`]) runs
//! `h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t`, `y_t = C_t h_t + D x_t` with
//! `A = -exp(A_log)`; `y * silu(z)` goes through `out_proj`. Every step looks only backwards, so
//! a token's output never depends on later tokens. `in_proj`, `x_proj` and `out_proj` are the
//! model's linear kind (float, ternary, BitNet); the small `dt_proj`, the convolution, `A_log`
//! and `D` stay float, as in BitNet-style Mamba variants.

use burn::module::{Initializer, Module, Param};
use burn::tensor::activation::{silu, softplus};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_kernels::Kernels;

use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::sparsity::LayerType;

/// The mixer's sizes (Mamba's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MambaConfig {
    /// Inner width over the model's hidden size.
    #[serde(default = "default_expand")]
    pub expand: usize,
    /// State values per channel.
    #[serde(default = "default_d_state")]
    pub d_state: usize,
    /// Width of the causal convolution.
    #[serde(default = "default_d_conv")]
    pub d_conv: usize,
    /// Rank of the step-size projection; `ceil(hidden / 16)` when absent.
    #[serde(default)]
    pub dt_rank: Option<usize>,
}

fn default_expand() -> usize {
    2
}
fn default_d_state() -> usize {
    16
}
fn default_d_conv() -> usize {
    4
}

impl Default for MambaConfig {
    fn default() -> Self {
        Self {
            expand: default_expand(),
            d_state: default_d_state(),
            d_conv: default_d_conv(),
            dt_rank: None,
        }
    }
}

impl MambaConfig {
    pub fn dt_rank(&self, hidden: usize) -> usize {
        self.dt_rank.unwrap_or(hidden.div_ceil(16))
    }
}

#[derive(Module, Debug)]
pub struct Mamba<B: Backend, H = NoHooks> {
    /// `[2 d_inner, hidden]`: `x` then `z`.
    pub in_proj: ProjLinear<B, H>,
    /// Depthwise causal convolution, `[d_inner, d_conv]` (tap `d_conv - 1` on the current token).
    pub conv_weight: Param<Tensor<B, 2>>,
    pub conv_bias: Param<Tensor<B, 1>>,
    /// `[dt_rank + 2 d_state, d_inner]`: the step-size rank vector, then `B`, then `C`.
    pub x_proj: ProjLinear<B, H>,
    /// `[d_inner, dt_rank]` and its bias.
    pub dt_proj_weight: Param<Tensor<B, 2>>,
    pub dt_proj_bias: Param<Tensor<B, 1>>,
    /// `[d_inner, d_state]`: `A = -exp(A_log)`.
    pub a_log: Param<Tensor<B, 2>>,
    /// `[d_inner]`: the skip `D x_t`.
    pub d: Param<Tensor<B, 1>>,
    /// `[hidden, d_inner]`.
    pub out_proj: ProjLinear<B, H>,
    /// What acts on the mixer's input ([`Hooks::module_input`]).
    #[module(skip)]
    pub input: H,
    #[module(skip)]
    pub d_state: usize,
    #[module(skip)]
    pub dt_rank: usize,
}

impl<B: Backend> Mamba<B> {
    /// Mamba's initialisation: `A_log = log(1..=d_state)` per channel (S4D-real), `D = 1`, the
    /// step bias the inverse softplus of steps log-uniform in [0.001, 0.1], `dt_proj` uniform
    /// in `+-dt_rank^-0.5`, the convolution uniform in `+-d_conv^-0.5`.
    pub fn new(c: &ModelConfig, m: &MambaConfig, device: &B::Device) -> Self {
        let d_inner = m.expand * c.hidden;
        let dt_rank = m.dt_rank(c.hidden);
        let proj = |d_in, d_out, axis| {
            let mut p = ProjLinearConfig::block(c, d_in, d_out, axis, LayerType::Mlp);
            p.sparsity = None;
            p.init(device)
        };
        let uniform = |shape: [usize; 2], bound: f64| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Uniform(-bound, bound),
                device,
            ))
        };
        let (lo, hi) = (0.001f64.ln(), 0.1f64.ln());
        let dt = Tensor::<B, 1>::random([d_inner], Distribution::Uniform(lo, hi), device).exp();
        // softplus^-1(dt) = dt + log(1 - exp(-dt))
        let dt_bias = dt.clone() + (-(dt.neg().exp()) + 1.0).log();
        let a_log: Vec<f32> = (0..d_inner * m.d_state)
            .map(|i| ((i % m.d_state) as f32 + 1.0).ln())
            .collect();
        Self {
            in_proj: proj(c.hidden, 2 * d_inner, ScaleAxis::Rows),
            conv_weight: uniform([d_inner, m.d_conv], (m.d_conv as f64).powf(-0.5)),
            conv_bias: Initializer::Zeros.init([d_inner], device),
            x_proj: proj(d_inner, dt_rank + 2 * m.d_state, ScaleAxis::Rows),
            dt_proj_weight: uniform([d_inner, dt_rank], (dt_rank as f64).powf(-0.5)),
            dt_proj_bias: Param::from_tensor(dt_bias),
            a_log: Param::from_tensor(Tensor::from_data(
                TensorData::new(a_log, [d_inner, m.d_state]),
                device,
            )),
            d: Initializer::Ones.init([d_inner], device),
            out_proj: proj(d_inner, c.hidden, ScaleAxis::Cols),
            input: NoHooks,
            d_state: m.d_state,
            dt_rank,
        }
    }
}

impl<B: Backend, H> Mamba<B, H> {
    /// The three projections of the model's linear kind, named within the block.
    pub fn projections(&self) -> [(&'static str, &ProjLinear<B, H>); 3] {
        [
            ("mamba.in_proj", &self.in_proj),
            ("mamba.x_proj", &self.x_proj),
            ("mamba.out_proj", &self.out_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [&mut ProjLinear<B, H>; 3] {
        [&mut self.in_proj, &mut self.x_proj, &mut self.out_proj]
    }

    /// This mixer with its hooks mapped by `f`, told each projection's name (`None` for the
    /// module input).
    pub fn map_hooks<H2>(self, f: &mut impl FnMut(Option<&'static str>, H) -> H2) -> Mamba<B, H2> {
        let in_proj = self.in_proj.map_hooks(|h| f(Some("mamba.in_proj"), h));
        let x_proj = self.x_proj.map_hooks(|h| f(Some("mamba.x_proj"), h));
        let out_proj = self.out_proj.map_hooks(|h| f(Some("mamba.out_proj"), h));
        Mamba {
            in_proj,
            conv_weight: self.conv_weight,
            conv_bias: self.conv_bias,
            x_proj,
            dt_proj_weight: self.dt_proj_weight,
            dt_proj_bias: self.dt_proj_bias,
            a_log: self.a_log,
            d: self.d,
            out_proj,
            input: f(None, self.input),
            d_state: self.d_state,
            dt_rank: self.dt_rank,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Mamba<B, H> {
    /// `x: [batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (x, z) = self.split_input(x);
        let [b, _, d_inner] = x.dims();
        let k = self.conv_weight.dims()[1];
        // Zeros before the first token.
        let past = Tensor::zeros([b, k - 1, d_inner], &x.device());
        let u = self.conv(Tensor::cat(vec![past, x], 1));
        let (delta, bm, cm) = self.selection(u.clone());
        let a = self.a_log.val().exp().neg();
        let y = B::selective_scan(u, delta, a, bm, cm, self.d.val());
        self.out_proj.forward(y * silu(z))
    }

    /// `in_proj` of the mixer's input, split into the convolution's input `x` and the gate `z`
    /// (`[batch, seq, d_inner]` each).
    pub(crate) fn split_input(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, l, _] = x.dims();
        let d_inner = self.d.dims()[0];
        let xz = self.in_proj.forward(self.input.module_input(x));
        let z = xz.clone().slice([0..b, 0..l, d_inner..2 * d_inner]);
        (xz.slice([0..b, 0..l, 0..d_inner]), z)
    }

    /// The causal depthwise convolution and SiLU over `window: [batch, d_conv - 1 + seq,
    /// d_inner]` (the `d_conv - 1` inputs before the sequence, then the sequence's):
    /// `u[t] = silu(bias + sum_j w[j] window[t + j])`, `[batch, seq, d_inner]`.
    pub(crate) fn conv(&self, window: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, len, d] = window.dims();
        let w = self.conv_weight.val();
        let k = w.dims()[1];
        let l = len - (k - 1);
        let mut y = self.conv_bias.val().reshape([1, 1, d]);
        for j in 0..k {
            let tap = w.clone().slice([0..d, j..j + 1]).reshape([1, 1, d]);
            y = y + window.clone().slice([0..b, j..j + l, 0..d]) * tap;
        }
        silu(y)
    }

    /// Each token's step sizes `delta` (`dt_proj` and softplus, `[batch, seq, d_inner]`) and its
    /// `B`, `C` (`[batch, seq, d_state]`), from the convolved input `u`.
    pub(crate) fn selection(&self, u: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let [b, l, d_inner] = u.dims();
        let (r, n) = (self.dt_rank, self.d_state);
        let dbc = self.x_proj.forward(u);
        let part = |from: usize, to: usize| dbc.clone().slice([0..b, 0..l, from..to]);
        // B::linear: products padded where a backend needs it (burn-cuda's k % 64 == 32).
        let delta =
            <B as Kernels>::linear(part(0, r).reshape([b * l, r]), self.dt_proj_weight.val())
                + self.dt_proj_bias.val().reshape([1, d_inner]);
        let delta = softplus(delta, 1.0).reshape([b, l, d_inner]);
        (delta, part(r, r + n), part(r + n, r + 2 * n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearKind;
    use burn::backend::{Autodiff, Flex};

    type AB = Autodiff<Flex>;

    fn config(linear: LinearKind) -> (ModelConfig, MambaConfig) {
        let mut c = ModelConfig::tiny(64, linear);
        c.hidden = 32;
        let m = MambaConfig {
            d_state: 4,
            ..Default::default()
        };
        (c, m)
    }

    /// No output at position t moves when any token after t changes, for every linear kind; an
    /// earlier token does move it (the control).
    #[test]
    fn outputs_do_not_depend_on_later_tokens() {
        let dev = Default::default();
        for linear in [LinearKind::Float, LinearKind::Ternary, LinearKind::Bitnet] {
            let (c, m) = config(linear);
            let mixer = Mamba::<AB>::new(&c, &m, &dev);
            let x = Tensor::<AB, 3>::random([2, 9, 32], Distribution::Normal(0.0, 1.0), &dev);
            let y0: Vec<f32> = mixer.forward(x.clone()).into_data().to_vec().unwrap();
            for t in [0, 4, 8] {
                let bump =
                    Tensor::<AB, 3>::random([2, 1, 32], Distribution::Normal(0.0, 1.0), &dev);
                let mut parts = vec![x.clone().slice([0..2, 0..t, 0..32]), bump];
                if t + 1 < 9 {
                    parts.push(x.clone().slice([0..2, t + 1..9, 0..32]));
                }
                let x2 = Tensor::cat(parts.into_iter().filter(|p| p.dims()[1] > 0).collect(), 1);
                let y: Vec<f32> = mixer.forward(x2).into_data().to_vec().unwrap();
                for bi in 0..2 {
                    for p in 0..9 {
                        let row = |v: &[f32]| v[(bi * 9 + p) * 32..][..32].to_vec();
                        let moved = row(&y0).iter().zip(row(&y)).any(|(a, b)| a != &b);
                        assert_eq!(
                            moved,
                            p >= t,
                            "{linear:?}: token {t} changed, position {p} moved: {moved}"
                        );
                    }
                }
            }
        }
    }

    /// One backward pass reaches every parameter.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let dev = Default::default();
        let (c, m) = config(LinearKind::Ternary);
        let mixer = Mamba::<AB>::new(&c, &m, &dev);
        let x = Tensor::<AB, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &dev);
        let g = mixer.forward(x).powf_scalar(2.0).sum().backward();
        let n2 = |p: &Param<Tensor<AB, 2>>| p.val().grad(&g).unwrap().abs().sum().into_scalar();
        let n1 = |p: &Param<Tensor<AB, 1>>| p.val().grad(&g).unwrap().abs().sum().into_scalar();
        let sums = [
            n2(&mixer.in_proj.weight),
            n2(&mixer.x_proj.weight),
            n2(&mixer.out_proj.weight),
            n2(&mixer.conv_weight),
            n2(&mixer.dt_proj_weight),
            n2(&mixer.a_log),
            n1(&mixer.conv_bias),
            n1(&mixer.dt_proj_bias),
            n1(&mixer.d),
        ];
        assert!(sums.iter().all(|&v| v > 0.0), "{sums:?}");
    }
}
