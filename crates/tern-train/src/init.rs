//! Seeded initialisation of a plain model on the host. Every matrix draws from N(0, std) with a
//! generator seeded by the run seed and the parameter's name, so the initial weights are the same
//! on every backend and for every parallel layout (a shard is a slice of the same matrix).

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use tern_data::sampler::SplitMix64;
use tern_model::name_seed;

use crate::params::{assign, flat_values, param_infos};
use crate::slots::ParamSlot;

/// `n` samples of N(0, std) (Box-Muller) from the stream of (`seed`, `name`).
pub fn normal_values(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    normal_range(seed, name, 0, n, std)
}

/// Samples `start..start + len` of [`normal_values`], without drawing the ones before: each pair
/// of samples takes two draws, and the generator can jump.
pub fn normal_range(seed: u64, name: &str, start: usize, len: usize, std: f64) -> Vec<f32> {
    let mut rng = SplitMix64(name_seed(seed, name));
    let first = start / 2 * 2;
    rng.skip(first as u64);
    let mut out = Vec::with_capacity(len + 1);
    let unit = |r: &mut SplitMix64| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut k = first;
    while out.len() < len {
        let (u1, u2) = (unit(&mut rng), unit(&mut rng));
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        for v in [r * a.cos(), r * a.sin()] {
            if k >= start && out.len() < len {
                out.push(v as f32);
            }
            k += 1;
        }
    }
    out
}

/// This rank's block of a parameter's initial value: N(0, `std`) from (`seed`, name) for a
/// matrix, split as the tensor-parallel group splits it (computed for the block only); `None` for
/// a vector (norm weights keep their module's ones).
pub fn initial_shard(
    seed: u64,
    slot: &ParamSlot,
    std: f64,
    rank: usize,
    tp: usize,
) -> Option<Vec<f32>> {
    // Mamba's and the depth router's own rules; those parameters are never split.
    if let Some(v) = tern_model::special_initial_values(seed, &slot.name, &slot.shape, std) {
        return Some(v);
    }
    if slot.shape.len() < 2 {
        return None;
    }
    let rows = slot.shape[0];
    let cols: usize = slot.shape[1..].iter().product();
    let name = &slot.name;
    Some(match slot.shard.filter(|_| tp > 1) {
        None => normal_range(seed, name, 0, rows * cols, std),
        Some(0) => {
            let r = rows / tp;
            normal_range(seed, name, rank * r * cols, r * cols, std)
        }
        Some(_) => {
            let c = cols / tp;
            (0..rows)
                .flat_map(|i| normal_range(seed, name, i * cols + rank * c, c, std))
                .collect()
        }
    })
}

/// Re-draws every matrix of `m` from N(0, `std`); vectors (norm weights) keep their init (ones).
pub fn init_normal<B: Backend, M: Module<B>>(m: M, seed: u64, std: f64, device: &B::Device) -> M {
    let infos = param_infos::<B, M>(&m);
    let current = flat_values::<B, M>(&m);
    let values = infos
        .iter()
        .zip(current)
        .map(|(info, cur)| {
            if let Some(v) = tern_model::special_initial_values(seed, &info.name, &info.shape, std)
            {
                Tensor::from_data(TensorData::new(v, [info.numel()]), device)
            } else if info.shape.len() >= 2 {
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

    /// A shard's values computed alone are the matching block of the whole matrix's, bit for
    /// bit, for row and column splits starting at odd offsets.
    #[test]
    fn a_shard_is_the_block_of_the_whole_initial_matrix() {
        let whole = normal_values(9, "m", 6 * 7, 0.5);
        for v in [1, 5, 13] {
            assert_eq!(normal_range(9, "m", v, 11, 0.5), whole[v..v + 11]);
        }
        for (dim, tp, shape) in [(0, 3, [6, 7]), (1, 2, [7, 6]), (1, 3, [7, 6])] {
            let slot = ParamSlot {
                name: "m".into(),
                shape: shape.to_vec(),
                shard: Some(dim),
                local: vec![],
                partial: false,
            };
            for rank in 0..tp {
                let want = tern_parallel::shard_values(&whole, &shape, dim, rank, tp);
                assert_eq!(initial_shard(9, &slot, 0.5, rank, tp).unwrap(), want);
            }
        }
        let norm = ParamSlot {
            name: "n".into(),
            shape: vec![7],
            shard: None,
            local: vec![7],
            partial: false,
        };
        assert_eq!(initial_shard(9, &norm, 0.5, 0, 1), None);
    }
}
