//! The optimizer a recipe names, behind one type: its step and its state as named tensors (what
//! checkpoints store).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::{OptimConfig, OptimizerName};
use crate::galore::{side_of, GaLoreAdamW, LowRank};
use crate::AdamW;

pub enum Optimizer<B: Backend> {
    AdamW(AdamW<B>),
    GaLore(GaLoreAdamW<B>),
}

/// One state tensor of a parameter: its key (`exp_avg`, `exp_avg_sq`, `galore_proj`), shape
/// and value, flat.
pub type StateTensor<B> = (&'static str, Vec<usize>, Tensor<B, 1>);

impl<B: Backend> Optimizer<B> {
    /// `shapes[i]` of every parameter; `low_rank[i]` marks the matrices GaLore projects.
    pub fn new(
        cfg: &OptimConfig,
        shapes: &[Vec<usize>],
        low_rank: &[bool],
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
                Self::GaLore(GaLoreAdamW::new(cfg, &sizes, &matrices, device))
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
                let l = LowRank {
                    m,
                    n,
                    rank: cfg.rank.expect("validated"),
                    side: side_of(cfg.proj_type, m, n),
                };
                vec![
                    ("exp_avg", l.projected().to_vec()),
                    ("exp_avg_sq", l.projected().to_vec()),
                    ("galore_proj", l.proj().to_vec()),
                ]
            }
            _ => full(),
        }
    }

    /// The state of parameter `i` (of `shape`), as [`Self::state_shapes`] lists it.
    pub fn state(&self, i: usize, shape: &[usize]) -> Vec<StateTensor<B>> {
        match self {
            Self::AdamW(o) => vec![
                ("exp_avg", shape.to_vec(), o.exp_avg[i].clone()),
                ("exp_avg_sq", shape.to_vec(), o.exp_avg_sq[i].clone()),
            ],
            Self::GaLore(o) => match (o.layout[i], &o.proj[i]) {
                (Some(l), Some(p)) => vec![
                    ("exp_avg", l.projected().to_vec(), o.exp_avg[i].clone()),
                    (
                        "exp_avg_sq",
                        l.projected().to_vec(),
                        o.exp_avg_sq[i].clone(),
                    ),
                    (
                        "galore_proj",
                        l.proj().to_vec(),
                        p.clone().reshape([l.proj().iter().product::<usize>()]),
                    ),
                ],
                _ => vec![
                    ("exp_avg", shape.to_vec(), o.exp_avg[i].clone()),
                    ("exp_avg_sq", shape.to_vec(), o.exp_avg_sq[i].clone()),
                ],
            },
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
