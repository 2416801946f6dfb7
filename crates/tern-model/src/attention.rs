//! Causal self-attention with grouped-query heads and RoPE.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_kernels::Kernels;

use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{ProjLinear, ProjLinearConfig, ScaleAxis};
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

impl<B: Backend, H> Attention<B, H> {
    /// The four projections, named within the block.
    pub fn projections(&self) -> [(&'static str, &ProjLinear<B, H>); 4] {
        [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [&mut ProjLinear<B, H>; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ]
    }

    /// This layer with its hooks mapped by `f`, told each projection's name (`None` for the
    /// module input).
    pub fn map_hooks<H2>(
        self,
        f: &mut impl FnMut(Option<&'static str>, H) -> H2,
    ) -> Attention<B, H2> {
        let mut p = |name, x: ProjLinear<B, H>| x.map_hooks(|h| f(Some(name), h));
        let (q, k, v, o) = (
            p("self_attn.q_proj", self.q_proj),
            p("self_attn.k_proj", self.k_proj),
            p("self_attn.v_proj", self.v_proj),
            p("self_attn.o_proj", self.o_proj),
        );
        Attention {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            input: f(None, self.input),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Attention<B, H> {
    /// `x: [batch, seq, hidden]`; `cos`/`sin`: `[seq, head_dim]` RoPE tables.
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        let x = self.input.module_input(x);
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Heads stay in the projections' layout [batch, seq, heads, head_dim]: no transposed
        // copies, and the output reshapes back to [batch, seq, hidden] for free.
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]);
        let q = B::rope(
            heads(self.q_proj.forward(x.clone()), nh),
            cos.clone(),
            sin.clone(),
        );
        let k = B::rope(
            heads(self.k_proj.forward(x.clone()), nkv),
            cos.clone(),
            sin.clone(),
        );
        let v = heads(self.v_proj.forward(x), nkv);
        let out = B::causal_attention(q, k, v).reshape([b, t, nh * hd]);
        self.o_proj.forward(out)
    }
}
