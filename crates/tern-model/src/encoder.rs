//! The 1-bit input encoder of distillation students (the "auto quantization encoder" of
//! DarthMurse/SpikingLlama; docs/distill.md): `Linear(d -> d/2) -> ReLU -> Linear(d/2 -> d) ->`
//! per-channel Heaviside `alpha * sign(z - beta)`, so the projection behind it sees only the
//! values {-alpha, 0, +alpha} per channel. The step has no useful derivative; a surrogate stands in.
//! A calibrated start uses a residual form with an output offset ([`EncoderConfig::residual`]):
//! the projection then sees `offset ± alpha` per channel, still one bit an input.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tern_kernels::precision::product as matmul;

use crate::hooks::Hooks;

/// The surrogate derivative of the Heaviside step (`distill.surrogate`), with `y = z - beta` and
/// scale `s`: `arctan`: `alpha (2/pi) s / (1 + (s y)^2)`; `asinh`: `alpha (2/pi) s / sqrt((s y)^2 + 1)`
/// (the derivative the reference's code uses, although its comment says arctan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Surrogate {
    Arctan,
    #[default]
    Asinh,
}

/// Everything needed to build an [`Encoder`] in front of a projection with `d` inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    pub surrogate: Surrogate,
    pub scale: f64,
    /// The form of a calibrated start (`distill.init = "calibrated"`): `z = x + fc2(relu(fc1 x))`
    /// with `fc2` starting at zero, so that the code starts as `sign(x - beta)` (a hidden layer
    /// of `d/2` cannot pass `d` channels through), and a learned per-channel offset added to the
    /// output, the channel's centre that the sign drops: `offset + alpha * sign(z - beta)`.
    pub residual: bool,
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// `[d/2, d]`, as a bias-free `nn.Linear(d, d/2)` stores it.
    pub fc1: Param<Tensor<B, 2>>,
    /// `[d, d/2]`.
    pub fc2: Param<Tensor<B, 2>>,
    /// Per-channel output magnitude (init 1).
    pub alpha: Param<Tensor<B, 1>>,
    /// Per-channel threshold (init 0).
    pub beta: Param<Tensor<B, 1>>,
    /// Per-channel offset of the output (the residual form only).
    pub offset: Option<Param<Tensor<B, 1>>>,
    /// `z` adds the input itself to the fully connected net's output.
    #[module(skip)]
    pub residual: bool,
    #[module(skip)]
    pub surrogate: Surrogate,
    #[module(skip)]
    pub scale: f64,
}

impl EncoderConfig {
    /// An encoder for `d` input channels. The matrices start as PyTorch's `nn.Linear` default
    /// (uniform in `+-1/sqrt(fan_in)`, from `seed`), so that a run is reproducible; in the
    /// residual form `fc2` and the offset start at zero (a calibration then sets alpha, beta and
    /// the offset).
    pub fn init<B: Backend>(&self, d: usize, seed: u64, device: &B::Device) -> Encoder<B> {
        let h = (d / 2).max(1);
        let uniform = |rows: usize, cols: usize, seed: u64| {
            let bound = 1.0 / (cols as f64).sqrt();
            let mut state = seed;
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    // SplitMix64: stable and dependency-free.
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            Param::from_tensor(Tensor::from_data(TensorData::new(v, [rows, cols]), device))
        };
        let fc2 = match self.residual {
            true => Param::from_tensor(Tensor::zeros([d, h], device)),
            false => uniform(d, h, seed ^ 0x5555_5555_5555_5555),
        };
        Encoder {
            fc1: uniform(h, d, seed),
            fc2,
            alpha: Param::from_tensor(Tensor::ones([d], device)),
            beta: Param::from_tensor(Tensor::zeros([d], device)),
            offset: self
                .residual
                .then(|| Param::from_tensor(Tensor::zeros([d], device))),
            residual: self.residual,
            surrogate: self.surrogate,
            scale: self.scale,
        }
    }
}

impl<B: tern_kernels::Kernels> Encoder<B> {
    /// `x: [..., d]` -> values in `{-alpha, 0, alpha}` per channel, same shape. `hooks` are the
    /// projection's: under tensor parallelism an encoder in front of a row-parallel projection is
    /// split like Megatron's MLP the other way round (its hidden layer summed over the group after
    /// `fc1`, entered again before `fc2`), and one in front of a column-parallel projection hands
    /// its output to the group's split.
    pub fn forward<H: Hooks<B>, const D: usize>(&self, x: Tensor<B, D>, hooks: &H) -> Tensor<B, D> {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = x.shape().num_elements() / d;
        let x = x.reshape([rows, d]);
        let h = hooks.encoder_hidden(matmul(x.clone(), self.fc1.val().transpose()));
        let h = hooks.encoder_inner(relu(h));
        let z = matmul(h, self.fc2.val().transpose());
        let z = if self.residual { z + x } else { z };
        let out = heaviside(
            z,
            self.alpha.val(),
            self.beta.val(),
            self.surrogate,
            self.scale,
        );
        let out = match &self.offset {
            Some(o) => out + o.val().unsqueeze::<2>(),
            None => out,
        };
        hooks.encoder_output(out.reshape(dims))
    }
}

/// `alpha * sign(z - beta)` per channel (last dimension), with the surrogate gradients of docs/distill.md:
/// `d/dz` the surrogate, `d/dalpha = (2/pi) atan(z - beta)`, `d/dbeta = -d/dz`.
///
/// Written as `hard.detach() + (soft - soft.detach())`: the forward value is exactly the step
/// (`soft - soft.detach()` is exactly zero), the gradient is the one of `soft`, whose parts are
/// built so that each derivative is the wanted one.
pub fn heaviside<B: Backend, const D: usize>(
    z: Tensor<B, D>,
    alpha: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    surrogate: Surrogate,
    s: f64,
) -> Tensor<B, D> {
    let k = 2.0 / std::f64::consts::PI;
    let a = alpha.unsqueeze::<D>();
    let y = z - beta.unsqueeze::<D>();
    let hard = a.clone() * y.clone().sign();
    let sy = y.clone().mul_scalar(s);
    let primitive = match surrogate {
        // d/dy atan(s y) / s * s ... : the antiderivative of s / (1 + (s y)^2) is atan(s y).
        Surrogate::Arctan => sy.atan(),
        Surrogate::Asinh => sy.asinh(),
    };
    let soft =
        primitive.mul_scalar(k).mul(a.clone().detach()) + y.detach().atan().mul_scalar(k).mul(a);
    hard.detach() + (soft.clone() - soft.detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type AB = Autodiff<Flex>;

    fn vec1(t: Tensor<Flex, 1>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn heaviside_values_and_surrogate_gradients_match_closed_forms() {
        let dev = Default::default();
        let zs = [-1.5f32, -0.2, 0.0, 0.3, 2.0, 0.05];
        let (alpha, beta) = ([0.5f32, 2.0, 1.0], [0.1f32, -0.3, 0.0]);
        for surrogate in [Surrogate::Arctan, Surrogate::Asinh] {
            let s = 4.0;
            let z = Tensor::<AB, 2>::from_data(TensorData::new(zs.to_vec(), [2, 3]), &dev)
                .require_grad();
            let a = Tensor::<AB, 1>::from_floats(alpha, &dev).require_grad();
            let b = Tensor::<AB, 1>::from_floats(beta, &dev).require_grad();
            let out = heaviside(z.clone(), a.clone(), b.clone(), surrogate, s);
            let values: Vec<f32> = out.clone().into_data().to_vec().unwrap();
            // Weights per element so that each gradient entry is distinguishable.
            let w = [1.0f32, -2.0, 0.5, 3.0, 1.5, -1.0];
            let wt = Tensor::<AB, 2>::from_data(TensorData::new(w.to_vec(), [2, 3]), &dev);
            let g = (out * wt).sum().backward();
            let gz: Vec<f32> = z.grad(&g).unwrap().into_data().to_vec().unwrap();
            let ga = vec1(a.grad(&g).unwrap());
            let gb = vec1(b.grad(&g).unwrap());
            let k = 2.0 / std::f64::consts::PI;
            let (mut ea, mut eb) = ([0f64; 3], [0f64; 3]);
            for i in 0..6 {
                let c = i % 3;
                let y = zs[i] as f64 - beta[c] as f64;
                let sign = if y > 0.0 {
                    1.0
                } else if y < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                assert_eq!(values[i] as f64, alpha[c] as f64 * sign, "value {i}");
                let dz = match surrogate {
                    Surrogate::Arctan => alpha[c] as f64 * k * s / (1.0 + (s * y).powi(2)),
                    Surrogate::Asinh => alpha[c] as f64 * k * s / ((s * y).powi(2) + 1.0).sqrt(),
                };
                let dz = dz * w[i] as f64;
                assert!(
                    (gz[i] as f64 - dz).abs() < 1e-5 * dz.abs().max(1.0),
                    "{surrogate:?} dz[{i}] {} vs {dz}",
                    gz[i]
                );
                ea[c] += k * y.atan() * w[i] as f64;
                eb[c] -= dz;
            }
            for c in 0..3 {
                assert!(
                    (ga[c] as f64 - ea[c]).abs() < 1e-5,
                    "{surrogate:?} dalpha[{c}] {} vs {}",
                    ga[c],
                    ea[c]
                );
                assert!(
                    (gb[c] as f64 - eb[c]).abs() < 1e-4,
                    "{surrogate:?} dbeta[{c}] {} vs {}",
                    gb[c],
                    eb[c]
                );
            }
        }
    }

    #[test]
    fn encoder_outputs_are_plus_minus_alpha_and_follow_relu_mlp() {
        let dev = Default::default();
        let cfg = EncoderConfig {
            surrogate: Surrogate::Asinh,
            scale: 4.0,
            residual: false,
        };
        let mut enc = cfg.init::<Flex>(6, 7, &dev);
        assert_eq!(enc.fc1.dims(), [3, 6]);
        assert_eq!(enc.fc2.dims(), [6, 3]);
        let alpha = [0.5f32, 1.0, 1.5, 2.0, 2.5, 3.0];
        enc.alpha = Param::from_tensor(Tensor::from_floats(alpha, &dev));
        let x = Tensor::<Flex, 3>::random(
            [2, 4, 6],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &dev,
        );
        let out: Vec<f32> = enc
            .forward(x.clone(), &crate::hooks::NoHooks)
            .into_data()
            .to_vec()
            .unwrap();
        // The same computation by hand on the host.
        let xv: Vec<f32> = x.into_data().to_vec().unwrap();
        let w1: Vec<f32> = enc.fc1.val().into_data().to_vec().unwrap();
        let w2: Vec<f32> = enc.fc2.val().into_data().to_vec().unwrap();
        for r in 0..8 {
            let h: Vec<f64> = (0..3)
                .map(|j| {
                    (0..6)
                        .map(|i| w1[j * 6 + i] as f64 * xv[r * 6 + i] as f64)
                        .sum::<f64>()
                        .max(0.0)
                })
                .collect();
            for c in 0..6 {
                let z: f64 = (0..3).map(|j| w2[c * 3 + j] as f64 * h[j]).sum();
                let expect = alpha[c] as f64 * z.signum() * (z != 0.0) as u8 as f64;
                assert_eq!(
                    out[r * 6 + c] as f64,
                    expect,
                    "row {r} channel {c} (z = {z})"
                );
            }
        }
        // Reproducible from the seed, different for another seed.
        let again = cfg.init::<Flex>(6, 7, &dev);
        assert_eq!(vec1(again.fc1.val().reshape([18])), w1);
        let other = cfg.init::<Flex>(6, 8, &dev);
        assert_ne!(vec1(other.fc1.val().reshape([18])), w1);
        assert!(w1.iter().all(|v| v.abs() <= 1.0 / 6f32.sqrt()));
    }

    /// The residual form starts as `offset + alpha * sign(x - beta)` per channel (fc2 zero), and
    /// adds the input to the net's output once fc2 has moved.
    #[test]
    fn residual_encoder_starts_as_the_sign_of_the_centred_input_plus_the_offset() {
        let dev = Default::default();
        let cfg = EncoderConfig {
            surrogate: Surrogate::Asinh,
            scale: 4.0,
            residual: true,
        };
        let mut enc = cfg.init::<Flex>(4, 3, &dev);
        assert_eq!(vec1(enc.fc2.val().reshape([8])), vec![0.0; 8]);
        let (alpha, beta, offset) = (
            [0.5f32, 1.0, 2.0, 3.0],
            [0.1f32, -0.2, 0.0, 1.0],
            [1.0f32, 2.0, -1.0, 0.5],
        );
        enc.alpha = Param::from_tensor(Tensor::from_floats(alpha, &dev));
        enc.beta = Param::from_tensor(Tensor::from_floats(beta, &dev));
        enc.offset = Some(Param::from_tensor(Tensor::from_floats(offset, &dev)));
        let xv = [0.3f32, -0.5, 0.2, 0.9, -0.1, 0.4, -2.0, 1.5];
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(xv.to_vec(), [2, 4]), &dev);
        let expect = |z: &[f64]| -> Vec<f32> {
            (0..8)
                .map(|i| {
                    let c = i % 4;
                    let y = z[i] - beta[c] as f64;
                    (offset[c] as f64 + alpha[c] as f64 * y.signum() * (y != 0.0) as u8 as f64)
                        as f32
                })
                .collect()
        };
        let start = vec1(enc.forward(x.clone(), &crate::hooks::NoHooks).reshape([8]));
        let xz: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
        assert_eq!(start, expect(&xz));
        // With fc2 = 1 everywhere z = x + sum(relu(fc1 x)) per row.
        enc.fc2 = Param::from_tensor(Tensor::ones([4, 2], &dev));
        let w1 = vec1(enc.fc1.val().reshape([8]));
        let z: Vec<f64> = (0..8)
            .map(|i| {
                let r = i / 4;
                let h: f64 = (0..2)
                    .map(|j| {
                        (0..4)
                            .map(|k| w1[j * 4 + k] as f64 * xv[r * 4 + k] as f64)
                            .sum::<f64>()
                            .max(0.0)
                    })
                    .sum();
                xv[i] as f64 + h
            })
            .collect();
        let moved = vec1(enc.forward(x, &crate::hooks::NoHooks).reshape([8]));
        assert_eq!(moved, expect(&z));
    }
}
