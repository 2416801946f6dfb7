//! Causal self-attention with grouped-query heads and RoPE.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use tern_dist::CollectiveBackend;

use crate::config::ModelConfig;
use crate::linear::{tapped, InputStyle, ProjLinear, ProjLinearConfig, ScaleAxis, Tap};
use crate::rope::apply_rope;
use crate::sparsity::LayerType;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: ProjLinear<B>,
    pub k_proj: ProjLinear<B>,
    pub v_proj: ProjLinear<B>,
    pub o_proj: ProjLinear<B>,
    #[module(skip)]
    pub input: InputStyle,
    #[module(skip)]
    pub n_heads: usize,
    #[module(skip)]
    pub n_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let proj = |d_in, d_out, axis| {
            ProjLinearConfig::block(c, d_in, d_out, axis, LayerType::Attention).init(device)
        };
        let kv_dim = c.kv_heads() * c.head_dim();
        Self {
            q_proj: proj(c.hidden, c.hidden, ScaleAxis::Rows),
            k_proj: proj(c.hidden, kv_dim, ScaleAxis::Rows),
            v_proj: proj(c.hidden, kv_dim, ScaleAxis::Rows),
            o_proj: proj(c.hidden, c.hidden, ScaleAxis::Cols),
            input: InputStyle::AsIs,
            n_heads: c.n_heads,
            n_kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        }
    }
}

impl<B: CollectiveBackend> Attention<B> {
    /// `x: [batch, seq, hidden]`; `cos`/`sin`: `[seq, head_dim]` RoPE tables.
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        self.forward_tapped(x, cos, sin, None)
    }

    /// [`Self::forward`], also recording each projection's input and output in `taps`.
    pub fn forward_tapped(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
        mut taps: Option<&mut Vec<Tap<B>>>,
    ) -> Tensor<B, 3> {
        let x = self.input.prepare(x);
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let mut proj = |name, p: &ProjLinear<B>, x: Tensor<B, 3>| tapped(&mut taps, name, p, x);
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(
            heads(proj("self_attn.q_proj", &self.q_proj, x.clone()), nh),
            cos,
            sin,
        );
        let k = apply_rope(
            heads(proj("self_attn.k_proj", &self.k_proj, x.clone()), nkv),
            cos,
            sin,
        );
        let v = heads(proj("self_attn.v_proj", &self.v_proj, x), nkv);
        // Query head j reads key/value head j / (nh / nkv), as HF's repeat_kv.
        let repeat = |y: Tensor<B, 4>| {
            if nh == nkv {
                y
            } else {
                y.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, nh / nkv)
                    .reshape([b, nh, t, hd])
            }
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &scores.device()) // true above the diagonal
            .unsqueeze::<4>()
            .expand([b, nh, t, t]);
        // A large finite value, not -inf: a masked fill may be computed as a blend, and
        // -inf * 0 would be NaN.
        let probs = softmax(scores.mask_fill(mask, -1e9), 3);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, t, nh * hd]);
        proj("self_attn.o_proj", &self.o_proj, out)
    }
}
