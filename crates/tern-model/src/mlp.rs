//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_dist::CollectiveBackend;

use crate::config::ModelConfig;
use crate::linear::{tapped, InputStyle, ProjLinear, ProjLinearConfig, ScaleAxis, Tap};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: ProjLinear<B>,
    pub up_proj: ProjLinear<B>,
    pub down_proj: ProjLinear<B>,
    #[module(skip)]
    pub input: InputStyle,
}

impl<B: Backend> Mlp<B> {
    pub fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let proj = |d_in, d_out, axis| ProjLinearConfig::block(c, d_in, d_out, axis).init(device);
        Self {
            gate_proj: proj(c.hidden, c.intermediate, ScaleAxis::Rows),
            up_proj: proj(c.hidden, c.intermediate, ScaleAxis::Rows),
            down_proj: proj(c.intermediate, c.hidden, ScaleAxis::Cols),
            input: InputStyle::AsIs,
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
        let h = silu(proj("mlp.gate_proj", &self.gate_proj, x.clone()))
            * proj("mlp.up_proj", &self.up_proj, x);
        proj("mlp.down_proj", &self.down_proj, h)
    }
}
