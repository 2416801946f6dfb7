//! The optimizer a recipe names, behind one type: its step and its state as named tensors (what
//! checkpoints store).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use tern_dist::TpGroup;

use crate::config::{OptimConfig, OptimizerName};
use crate::galore::{side_of, GaLoreAdamW, LowRank};
use crate::AdamW;

pub enum Optimizer<B: Backend> {
    AdamW(AdamW<B>),
    GaLore(GaLoreAdamW<B>),
}

/// One state tensor of a parameter as this rank holds it.
pub struct StateTensor<B: Backend> {
    /// `exp_avg`, `exp_avg_sq` or `galore_proj`.
    pub key: &'static str,
    /// Shape of the whole tensor (what a one-process run holds and a checkpoint stores).
    pub full_shape: Vec<usize>,
    /// The dimension along which this rank holds a block of it (`None`: whole).
    pub shard: Option<usize>,
    /// This rank's values, flat.
    pub value: Tensor<B, 1>,
}

impl<B: Backend> Optimizer<B> {
    /// `shapes[i]` of every parameter (this rank's block); `low_rank[i]` marks the matrices
    /// GaLore projects; `shard_dims[i]` the dimension the tensor-parallel group `tp` splits.
    pub fn new(
        cfg: &OptimConfig,
        shapes: &[Vec<usize>],
        low_rank: &[bool],
        shard_dims: &[Option<usize>],
        tp: &TpGroup,
        device: &B::Device,
    ) -> Self {
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        match cfg.name {
            OptimizerName::Adamw => Self::AdamW(AdamW::new(cfg, &sizes, device)),
            OptimizerName::GaloreAdamw => {
                let matrices: Vec<Option<(usize, usize)>> = shapes
                    .iter()
                    .zip(low_rank)
                    .map(|(s, &low)| (low && s.len() == 2).then(|| (s[0], s[1])))
                    .collect();
                Self::GaLore(GaLoreAdamW::new(
                    cfg, &sizes, &matrices, shard_dims, tp, device,
                ))
            }
        }
    }

    pub fn step(
        &mut self,
        params: Vec<Tensor<B, 1>>,
        grads: &[Tensor<B, 1>],
        lr: f64,
        weight_decay: f64,
        decay: &[bool],
    ) -> Vec<Tensor<B, 1>> {
        match self {
            Self::AdamW(o) => o.step(params, grads, lr, weight_decay, decay),
            Self::GaLore(o) => o.step(params, grads, lr, weight_decay, decay),
        }
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        match self {
            Self::AdamW(o) => o.step,
            Self::GaLore(o) => o.step,
        }
    }

    pub fn set_steps(&mut self, s: u64) {
        match self {
            Self::AdamW(o) => o.step = s,
            Self::GaLore(o) => o.step = s,
        }
    }

    /// The keys and shapes of the state of a parameter of `shape` (what a checkpoint holds).
    pub fn state_shapes(
        cfg: &OptimConfig,
        shape: &[usize],
        low_rank: bool,
    ) -> Vec<(&'static str, Vec<usize>)> {
        let full = || vec![("exp_avg", shape.to_vec()), ("exp_avg_sq", shape.to_vec())];
        match (cfg.name, low_rank && shape.len() == 2) {
            (OptimizerName::GaloreAdamw, true) => {
                let (m, n) = (shape[0], shape[1]);
                let rank = cfg.rank.expect("validated");
                let l = LowRank::whole(m, n, rank, side_of(cfg.proj_type, m, n));
                vec![
                    ("exp_avg", l.projected_full().to_vec()),
                    ("exp_avg_sq", l.projected_full().to_vec()),
                    ("galore_proj", l.proj_full().to_vec()),
                ]
            }
            _ => full(),
        }
    }

    /// The state of parameter `i`, as [`Self::state_shapes`] lists it for the full parameter
    /// (`full_shape`), with the block this rank holds (`shard`: the parameter's split dimension).
    pub fn state(
        &self,
        i: usize,
        full_shape: &[usize],
        shard: Option<usize>,
    ) -> Vec<StateTensor<B>> {
        let entry = |key, full_shape: Vec<usize>, shard, value| StateTensor {
            key,
            full_shape,
            shard,
            value,
        };
        let (m, v) = match self {
            Self::AdamW(o) => (&o.exp_avg[i], &o.exp_avg_sq[i]),
            Self::GaLore(o) => (&o.exp_avg[i], &o.exp_avg_sq[i]),
        };
        // A projection not computed yet (before the first step) reads as zeros.
        let low = match self {
            Self::GaLore(o) => o.layout[i].map(|l| {
                let p = o.proj[i]
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(l.proj(), &m.device()));
                (l, p)
            }),
            Self::AdamW(_) => None,
        };
        match low {
            None => vec![
                entry("exp_avg", full_shape.to_vec(), shard, m.clone()),
                entry("exp_avg_sq", full_shape.to_vec(), shard, v.clone()),
            ],
            Some((l, p)) => {
                let pr = l.projected_full().to_vec();
                let n = l.proj().iter().product::<usize>();
                vec![
                    entry("exp_avg", pr.clone(), l.moments_shard(), m.clone()),
                    entry("exp_avg_sq", pr, l.moments_shard(), v.clone()),
                    entry(
                        "galore_proj",
                        l.proj_full().to_vec(),
                        l.proj_shard(),
                        p.reshape([n]),
                    ),
                ]
            }
        }
    }

    /// Sets one state tensor of parameter `i` (shape checked by the caller).
    pub fn set_state(&mut self, i: usize, key: &str, value: Tensor<B, 1>) {
        let (m, v) = match self {
            Self::AdamW(o) => (&mut o.exp_avg, &mut o.exp_avg_sq),
            Self::GaLore(o) => {
                if key == "galore_proj" {
                    let l = o.layout[i].expect("a projected parameter");
                    o.proj[i] = Some(value.reshape(l.proj()));
                    return;
                }
                (&mut o.exp_avg, &mut o.exp_avg_sq)
            }
        };
        match key {
            "exp_avg" => m[i] = value,
            "exp_avg_sq" => v[i] = value,
            other => panic!("unknown optimizer state {other}"),
        }
    }

    /// Bytes of optimizer state held now.
    pub fn state_bytes(&self) -> usize {
        match self {
            Self::AdamW(o) => o.exp_avg.iter().map(|t| t.dims()[0] * 8).sum(),
            Self::GaLore(o) => o.state_bytes(),
        }
    }
}
