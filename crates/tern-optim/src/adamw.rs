//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` update order).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_kernels::{AdamwScalars, Kernels};

use crate::config::OptimConfig;

/// Moments are kept per parameter, flat, in the same order as the parameters. As in
/// `torch.optim.AdamW`, each parameter counts its own updates for the bias correction: a parameter
/// frozen for a while (a distillation phase) starts its moments as a fresh one would.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Number of optimizer steps applied so far.
    pub step: u64,
    /// Updates each parameter has received (its bias-correction step).
    pub param_steps: Vec<u64>,
    pub exp_avg: Vec<Tensor<B, 1>>,
    pub exp_avg_sq: Vec<Tensor<B, 1>>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(cfg: &OptimConfig, sizes: &[usize], device: &B::Device) -> Self {
        let zeros = || {
            sizes
                .iter()
                .map(|&n| Tensor::zeros([n], device))
                .collect::<Vec<_>>()
        };
        Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: 0,
            param_steps: vec![0; sizes.len()],
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
        }
    }
}

impl<B: Kernels> AdamW<B> {
    /// One update (one fused pass per parameter on the CPU backend). `decay[i]` says whether
    /// parameter i takes weight decay; parameters with `trainable[i]` false are left as they are,
    /// state included (frozen).
    pub fn step(
        &mut self,
        params: Vec<Tensor<B, 1>>,
        grads: &[Tensor<B, 1>],
        lr: f64,
        weight_decay: f64,
        decay: &[bool],
        trainable: &[bool],
    ) -> Vec<Tensor<B, 1>> {
        self.step_scaled(params, grads, None, lr, weight_decay, decay, trainable)
    }

    /// [`Self::step`] with every gradient first multiplied by `grad_scale` (gradient clipping,
    /// applied inside the fused update instead of in a pass of its own).
    #[allow(clippy::too_many_arguments)]
    pub fn step_scaled(
        &mut self,
        params: Vec<Tensor<B, 1>>,
        grads: &[Tensor<B, 1>],
        grad_scale: Option<f64>,
        lr: f64,
        weight_decay: f64,
        decay: &[bool],
        trainable: &[bool],
    ) -> Vec<Tensor<B, 1>> {
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.exp_avg.len());
        self.step += 1;
        params
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                if !trainable[i] {
                    return p;
                }
                self.param_steps[i] += 1;
                let t = self.param_steps[i] as i32;
                let step_size = lr / (1.0 - self.beta1.powi(t));
                let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
                let scalars = AdamwScalars {
                    grad_scale,
                    decay: (decay[i] && weight_decay > 0.0).then_some(1.0 - lr * weight_decay),
                    beta1: self.beta1,
                    beta2: self.beta2,
                    eps: self.eps,
                    step_size,
                    bc2_sqrt,
                };
                // Taken out of the state, so that the fused update can write them in place.
                let empty = || Tensor::<B, 1>::empty([0], &p.device());
                let m = std::mem::replace(&mut self.exp_avg[i], empty());
                let v = std::mem::replace(&mut self.exp_avg_sq[i], empty());
                let (p, m, v) = B::adamw_step(p, m, v, grads[i].clone(), scalars);
                self.exp_avg[i] = m;
                self.exp_avg_sq[i] = v;
                p
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Scalar reference of the same update in f64.
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64, b1: f64, b2: f64, eps: f64) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mhat = m / (1.0 - b1.powi(t));
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr * mhat / denom;
        }
        p
    }

    #[test]
    fn matches_scalar_reference_and_first_step_is_sign() {
        let dev = Default::default();
        let cfg = OptimConfig::default();
        let mut opt = AdamW::<Flex>::new(&cfg, &[3], &dev);
        let gs = [[0.5f32, -2.0, 1e-3], [0.1, -0.3, 0.2], [-1.0, 0.7, 0.05]];
        let p0 = [1.0f32, -1.0, 0.25];
        let mut p = vec![Tensor::<Flex, 1>::from_floats(p0, &dev)];
        for (k, g) in gs.iter().enumerate() {
            let g = [Tensor::<Flex, 1>::from_floats(*g, &dev)];
            p = opt.step(p, &g, 0.01, 0.1, &[true], &[true]);
            if k == 0 {
                // m_hat = g, v_hat = g^2: the first update is lr * sign(g) after decay.
                let v: Vec<f32> = p[0].to_data().to_vec().unwrap();
                for j in 0..3 {
                    let expect = p0[j] as f64 * (1.0 - 0.001) - 0.01 * (gs[0][j] as f64).signum();
                    assert!((v[j] as f64 - expect).abs() < 1e-5, "{} vs {expect}", v[j]);
                }
            }
        }
        let v: Vec<f32> = p[0].to_data().to_vec().unwrap();
        for j in 0..3 {
            let g: Vec<f64> = gs.iter().map(|g| g[j] as f64).collect();
            let r = reference(p0[j] as f64, &g, 0.01, 0.1, 0.9, 0.95, 1e-8);
            assert!((v[j] as f64 - r).abs() < 1e-5, "{} vs {r}", v[j]);
        }
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn frozen_parameters_and_their_state_stay_as_they_are() {
        let dev = Default::default();
        let mut opt = AdamW::<Flex>::new(&OptimConfig::default(), &[2, 2], &dev);
        let p0 = [0.5f32, -0.25];
        let mut p = vec![Tensor::<Flex, 1>::from_floats(p0, &dev); 2];
        let g = vec![Tensor::<Flex, 1>::from_floats([1.0, -1.0], &dev); 2];
        for _ in 0..3 {
            p = opt.step(p, &g, 0.1, 0.1, &[true, true], &[true, false]);
        }
        let frozen: Vec<f32> = p[1].to_data().to_vec().unwrap();
        assert_eq!(frozen, p0);
        let m: Vec<f32> = opt.exp_avg[1].to_data().to_vec().unwrap();
        assert_eq!(m, [0.0, 0.0]);
        let moved: Vec<f32> = p[0].to_data().to_vec().unwrap();
        assert!(moved[0] < p0[0] - 0.2, "{moved:?}");
        assert_eq!(opt.param_steps, [3, 0]);
    }

    /// A parameter that starts training late gets the bias correction of its own first update
    /// (as torch.optim.AdamW): its first step is lr * sign(g), not a step damped by the
    /// correction of the optimizer's third.
    #[test]
    fn a_late_parameter_starts_with_its_own_bias_correction() {
        let dev = Default::default();
        let cfg = OptimConfig::default();
        let mut opt = AdamW::<Flex>::new(&cfg, &[2], &dev);
        let p0 = [0.5f32, -0.25];
        let mut p = vec![Tensor::<Flex, 1>::from_floats(p0, &dev)];
        let g = vec![Tensor::<Flex, 1>::from_floats([0.3, -2.0], &dev)];
        for trained in [false, false, true] {
            p = opt.step(p, &g, 0.01, 0.0, &[true], &[trained]);
        }
        let v: Vec<f32> = p[0].to_data().to_vec().unwrap();
        for j in 0..2 {
            let want = p0[j] as f64 - 0.01 * (if j == 0 { 1.0 } else { -1.0 });
            assert!((v[j] as f64 - want).abs() < 1e-6, "{} vs {want}", v[j]);
        }
        assert_eq!((opt.step, opt.param_steps[0]), (3, 1));
    }
}
