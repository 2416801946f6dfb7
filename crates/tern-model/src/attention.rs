//! Causal self-attention with grouped-query heads and RoPE.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::rope::apply_rope;
use crate::sparsity::LayerType;

#[derive(Module, Debug)]
pub struct Attention<B: Backend, H = NoHooks> {
    pub q_proj: ProjLinear<B, H>,
    pub k_proj: ProjLinear<B, H>,
    pub v_proj: ProjLinear<B, H>,
    pub o_proj: ProjLinear<B, H>,
    /// What acts on the input q, k and v share ([`Hooks::module_input`]).
    #[module(skip)]
    pub input: H,
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
            input: NoHooks,
            n_heads: c.n_heads,
            n_kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        }
    }
}

impl<B: Backend, H: Hooks<B>> Attention<B, H> {
    /// `x: [batch, seq, hidden]`; `cos`/`sin`: `[seq, head_dim]` RoPE tables.
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        let x = self.input.module_input(x);
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = apply_rope(heads(self.q_proj.forward(x.clone()), nh), cos, sin);
        let k = apply_rope(heads(self.k_proj.forward(x.clone()), nkv), cos, sin);
        let v = heads(self.v_proj.forward(x), nkv);
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
        self.o_proj.forward(out)
    }
}
