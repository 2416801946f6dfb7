//! Global gradient-norm clipping over a flat gradient list.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_kernels::Kernels;

/// `sqrt(sum_i |g_i|^2)`, accumulated in f64 on the host, tensor by tensor in order.
pub fn global_norm<B: Kernels>(grads: &[Tensor<B, 1>]) -> f64 {
    squared_norms(grads).iter().sum::<f64>().sqrt()
}

/// `|g_i|^2` of every gradient, in f64 (so that a caller can sum parts held by other ranks).
pub fn squared_norms<B: Kernels>(grads: &[Tensor<B, 1>]) -> Vec<f64> {
    B::squared_norms(grads)
}

/// Scales `grads` so that their global norm is at most `max_norm` (0 disables clipping).
/// Returns the norm before clipping.
pub fn clip_global_norm<B: Kernels>(grads: &mut [Tensor<B, 1>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    scale_grads(grads, clip_scale(norm, max_norm));
    norm
}

/// The factor that brings a global norm `norm` down to `max_norm`, `None` when no clipping is
/// needed (or `max_norm` is 0).
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// Multiplies every gradient by `scale` (`None` leaves them as they are).
pub fn scale_grads<B: Backend>(grads: &mut [Tensor<B, 1>], scale: Option<f64>) {
    if let Some(s) = scale {
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn clips_to_max_norm() {
        let dev = Default::default();
        let mut g = vec![
            Tensor::<Flex, 1>::from_floats([3.0, 0.0], &dev),
            Tensor::<Flex, 1>::from_floats([4.0], &dev),
        ];
        let n = clip_global_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        let n2 = clip_global_norm(&mut g, 10.0);
        assert!((n2 - 1.0).abs() < 1e-5);
    }
}
