//! Gated feed-forward: SwiGLU `down(silu(gate(x)) * up(x))` or, for Q-Sparse, ReLU² GLU
//! `down(relu(gate(x))^2 * up(x))`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_dist::CollectiveBackend;

use crate::config::{MlpKind, ModelConfig};
use crate::linear::{tapped, InputStyle, ProjLinear, ProjLinearConfig, ScaleAxis, Tap};
use crate::sparsity::LayerType;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: ProjLinear<B>,
    pub up_proj: ProjLinear<B>,
    pub down_proj: ProjLinear<B>,
    #[module(skip)]
    pub input: InputStyle,
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
            input: InputStyle::AsIs,
            kind: c.mlp,
        }
    }
}

impl<B: CollectiveBackend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_tapped(x, None)
    }

    /// [`Self::forward`], also recording each projection's input and output in `taps`.
    pub fn forward_tapped(
        &self,
        x: Tensor<B, 3>,
        mut taps: Option<&mut Vec<Tap<B>>>,
    ) -> Tensor<B, 3> {
        let x = self.input.prepare(x);
        let mut proj = |name, p: &ProjLinear<B>, x: Tensor<B, 3>| tapped(&mut taps, name, p, x);
        // silu(x) = x * sigmoid(x) with sigmoid(x) = (1 + tanh(x / 2)) / 2: burn's sigmoid goes
        // through f32 whatever the tensor's precision, which breaks f64 gradient checks.
        let silu =
            |x: Tensor<B, 3>| x.clone() * x.div_scalar(2.0).tanh().add_scalar(1.0).div_scalar(2.0);
        let gate = proj("mlp.gate_proj", &self.gate_proj, x.clone());
        let gate = match self.kind {
            MlpKind::Swiglu => silu(gate),
            MlpKind::Relu2glu => burn::tensor::activation::relu(gate).powi_scalar(2),
        };
        let h = gate * proj("mlp.up_proj", &self.up_proj, x);
        proj("mlp.down_proj", &self.down_proj, h)
    }
}
