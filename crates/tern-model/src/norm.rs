//! RMSNorm with a learned weight, `x / sqrt(mean(x^2) + eps) * weight`, as in LLaMA.
//! (burn's own RmsNorm casts to f32 inside, which breaks f64 gradient checks.) One fused kernel on
//! the CPU backend ([`tern_kernels::Kernels::rms_norm`]).

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_kernels::Kernels;

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([dim], device),
            eps,
        }
    }
}

impl<B: Kernels> RmsNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = x.shape().num_elements() / d;
        B::rms_norm(x.reshape([rows, d]), self.weight.val(), self.eps).reshape(dims)
    }
}
