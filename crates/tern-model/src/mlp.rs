//! Gated feed-forward: SwiGLU `down(silu(gate(x)) * up(x))` or, for Q-Sparse, ReLU² GLU
//! `down(relu(gate(x))^2 * up(x))`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

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

impl<B: Backend, H: Hooks<B>> Mlp<B, H> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.input.module_input(x);
        // silu(x) = x * sigmoid(x) with sigmoid(x) = (1 + tanh(x / 2)) / 2: burn's sigmoid goes
        // through f32 whatever the tensor's precision, which breaks f64 gradient checks.
        let silu =
            |x: Tensor<B, 3>| x.clone() * x.div_scalar(2.0).tanh().add_scalar(1.0).div_scalar(2.0);
        let gate = self.gate_proj.forward(x.clone());
        let gate = match self.kind {
            MlpKind::Swiglu => silu(gate),
            MlpKind::Relu2glu => burn::tensor::activation::relu(gate).powi_scalar(2),
        };
        let h = gate * self.up_proj.forward(x);
        self.down_proj.forward(h)
    }
}
