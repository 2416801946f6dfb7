//! Seeded initialisation of a plain model on the host. Every matrix draws from N(0, std) with a
//! generator seeded by the run seed and the parameter's name, so the initial weights are the same
//! on every backend and for every parallel layout (a shard is a slice of the same matrix).

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use tern_data::sampler::SplitMix64;
use tern_model::name_seed;

use crate::params::{assign, flat_values, param_infos};

/// `n` samples of N(0, std) (Box-Muller) from the stream of (`seed`, `name`).
pub fn normal_values(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let mut rng = SplitMix64(name_seed(seed, name));
    let mut out = Vec::with_capacity(n + 1);
    let unit = |r: &mut SplitMix64| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    while out.len() < n {
        let (u1, u2) = (unit(&mut rng), unit(&mut rng));
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Re-draws every matrix of `m` from N(0, `std`); vectors (norm weights) keep their init (ones).
pub fn init_normal<B: Backend, M: Module<B>>(m: M, seed: u64, std: f64, device: &B::Device) -> M {
    let infos = param_infos::<B, M>(&m);
    let current = flat_values::<B, M>(&m);
    let values = infos
        .iter()
        .zip(current)
        .map(|(info, cur)| {
            if info.shape.len() >= 2 {
                let v = normal_values(seed, &info.name, info.numel(), std);
                Tensor::from_data(TensorData::new(v, [info.numel()]), device)
            } else {
                cur
            }
        })
        .collect();
    assign(m, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments_and_stability() {
        let v = normal_values(3, "w", 100_000, 0.02);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 3e-4, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 3e-4, "{}", var.sqrt());
        assert_eq!(normal_values(3, "w", 5, 1.0), normal_values(3, "w", 5, 1.0));
        assert_ne!(normal_values(3, "w", 5, 1.0), normal_values(3, "v", 5, 1.0));
    }
}
