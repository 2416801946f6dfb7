//! Gated feed-forward: SwiGLU `down(silu(gate(x)) * up(x))` or, for Q-Sparse, ReLU² GLU
//! `down(relu(gate(x))^2 * up(x))`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_kernels::{Gate, Kernels};

use crate::config::{MlpKind, ModelConfig};
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::sparsity::LayerType;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend, H = NoHooks> {
    pub gate_proj: ProjLinear<B, H>,
    pub up_proj: ProjLinear<B, H>,
    pub down_proj: ProjLinear<B, H>,
    /// What acts on the input gate and up share ([`Hooks::module_input`]).
    #[module(skip)]
    pub input: H,
    #[module(skip)]
    pub kind: MlpKind,
}

impl<B: Backend> Mlp<B> {
    pub fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let proj = |d_in, d_out, axis| {
            ProjLinearConfig::block(c, d_in, d_out, axis, LayerType::Mlp).init(device)
        };
        Self {
            gate_proj: proj(c.hidden, c.intermediate, ScaleAxis::Rows),
            up_proj: proj(c.hidden, c.intermediate, ScaleAxis::Rows),
            down_proj: proj(c.intermediate, c.hidden, ScaleAxis::Cols),
            input: NoHooks,
            kind: c.mlp,
        }
    }
}

impl<B: Backend, H> Mlp<B, H> {
    /// The three projections as `gate`, `up`, `down`.
    pub fn projections(&self) -> [(&'static str, &ProjLinear<B, H>); 3] {
        [
            ("gate_proj", &self.gate_proj),
            ("up_proj", &self.up_proj),
            ("down_proj", &self.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [&mut ProjLinear<B, H>; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }

    /// This layer with its hooks mapped by `f`, told each projection's name (`prefix` and
    /// `gate_proj`, ...; `None` for the module input).
    pub fn map_hooks<H2>(
        self,
        prefix: &str,
        f: &mut impl FnMut(Option<&'static str>, H) -> H2,
    ) -> Mlp<B, H2> {
        let name = |p: &str| crate::model::intern(format!("{prefix}{p}"));
        let gate = self.gate_proj.map_hooks(|h| f(Some(name("gate_proj")), h));
        let up = self.up_proj.map_hooks(|h| f(Some(name("up_proj")), h));
        let down = self.down_proj.map_hooks(|h| f(Some(name("down_proj")), h));
        Mlp {
            gate_proj: gate,
            up_proj: up,
            down_proj: down,
            input: f(None, self.input),
            kind: self.kind,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Mlp<B, H> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.input.module_input(x);
        let act = match self.kind {
            MlpKind::Swiglu => Gate::Silu,
            MlpKind::Relu2glu => Gate::Relu2,
        };
        let gate = self.gate_proj.forward(x.clone());
        let h = B::glu(gate, self.up_proj.forward(x), act);
        self.down_proj.forward(h)
    }
}
