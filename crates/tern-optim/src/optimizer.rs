//! The optimizer a recipe names, behind one type: its step and its state as named tensors (what
//! checkpoints store).

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use tern_dist::TpGroup;

use crate::config::{OptimConfig, OptimizerName};
use crate::galore::GaLoreAdamW;
use crate::AdamW;

pub enum Optimizer<B: Backend> {
    AdamW(AdamW<B>),
    GaLore(GaLoreAdamW<B>),
}

/// One state tensor of a parameter as this rank holds it.
pub struct StateTensor<B: Backend> {
    /// `exp_avg`, `exp_avg_sq`, `galore_proj` or `step` (the parameter's update count, one value).
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
    /// GaLore projects; `shard_dims[i]` the dimension the tensor-parallel group `tp` splits;
    /// `owns[i]`: this rank keeps parameter i's state (all but under ZeRO-1 with whole
    /// parameters on their owners, where the others are never updated here).
    pub fn new(
        cfg: &OptimConfig,
        shapes: &[Vec<usize>],
        low_rank: &[bool],
        shard_dims: &[Option<usize>],
        tp: &TpGroup,
        device: &B::Device,
        owns: &[bool],
    ) -> Self {
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        match cfg.name {
            OptimizerName::Adamw => {
                let kept: Vec<usize> = sizes
                    .iter()
                    .zip(owns)
                    .map(|(&n, &o)| if o { n } else { 0 })
                    .collect();
                Self::AdamW(AdamW::new(cfg, &kept, device))
            }
            OptimizerName::GaloreAdamw => {
                let matrices: Vec<Option<(usize, usize)>> = shapes
                    .iter()
                    .zip(low_rank)
                    .map(|(s, &low)| (low && s.len() == 2).then(|| (s[0], s[1])))
                    .collect();
                Self::GaLore(GaLoreAdamW::new(
                    cfg, &sizes, &matrices, shard_dims, tp, device, owns,
                ))
            }
        }
    }

    /// Whether parameter `i` has its GaLore projection yet (computed at its first update).
    pub fn has_projection(&self, i: usize) -> bool {
        matches!(self, Self::GaLore(o) if o.proj[i].is_some())
    }

    /// Sets the update count of parameter `i`.
    pub fn set_param_step(&mut self, i: usize, n: u64) {
        match self {
            Self::AdamW(o) => o.param_steps[i] = n,
            Self::GaLore(o) => o.param_steps[i] = n,
        }
    }

    /// Optimizer steps applied so far.
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

    /// The state tensors of parameter `i`: key, shape of the whole tensor (what a one-process run
    /// holds and a checkpoint stores) and the dimension along which this rank holds a block of it
    /// (`full_shape` and `shard` are the parameter's own).
    pub fn layout(
        &self,
        i: usize,
        full_shape: &[usize],
        shard: Option<usize>,
    ) -> Vec<(&'static str, Vec<usize>, Option<usize>)> {
        let mut out = match self {
            Self::GaLore(o) if o.layout[i].is_some() => {
                let l = o.layout[i].expect("checked");
                let pr = l.projected_full().to_vec();
                vec![
                    ("exp_avg", pr.clone(), l.moments_shard()),
                    ("exp_avg_sq", pr, l.moments_shard()),
                    ("galore_proj", l.proj_full().to_vec(), l.proj_shard()),
                ]
            }
            _ => vec![
                ("exp_avg", full_shape.to_vec(), shard),
                ("exp_avg_sq", full_shape.to_vec(), shard),
            ],
        };
        out.push(("step", vec![1], None));
        out
    }

    /// The update count of parameter `i` (its bias-correction step).
    pub fn param_step(&self, i: usize) -> u64 {
        match self {
            Self::AdamW(o) => o.param_steps[i],
            Self::GaLore(o) => o.param_steps[i],
        }
    }

    /// Whether a checkpoint may lack state `key` of parameter `i`: a projection never computed (a
    /// parameter not updated yet), and the update count, which checkpoints before it was stored
    /// lack (the caller then takes the optimizer's step count, as those runs did).
    pub fn optional_state(key: &str) -> bool {
        matches!(key, "galore_proj" | "step")
    }

    /// The state of parameter `i`, as [`Self::layout`] lists it, with this rank's values (a
    /// projection not computed yet, before the first step, is left out).
    pub fn state(
        &self,
        i: usize,
        full_shape: &[usize],
        shard: Option<usize>,
    ) -> Vec<StateTensor<B>> {
        let (m, v, p) = match self {
            Self::AdamW(o) => (&o.exp_avg[i], &o.exp_avg_sq[i], None),
            Self::GaLore(o) => (&o.exp_avg[i], &o.exp_avg_sq[i], o.proj[i].as_ref()),
        };
        self.layout(i, full_shape, shard)
            .into_iter()
            .filter_map(|(key, full_shape, shard)| {
                let value = match key {
                    "exp_avg" => m.clone(),
                    "exp_avg_sq" => v.clone(),
                    // Exact in f32 up to 2^24 updates.
                    "step" => Tensor::from_floats([self.param_step(i) as f32], &m.device()),
                    _ => {
                        let p = p?;
                        let n = p.shape().num_elements();
                        p.clone().reshape([n])
                    }
                };
                Some(StateTensor {
                    key,
                    full_shape,
                    shard,
                    value,
                })
            })
            .collect()
    }

    /// Sets one state tensor of parameter `i` (shape checked by the caller).
    pub fn set_state(&mut self, i: usize, key: &str, value: Tensor<B, 1>) {
        if key == "step" {
            let n: f32 = value.into_scalar().elem();
            self.set_param_step(i, n as u64);
            return;
        }
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
}

impl<B: tern_kernels::Kernels> Optimizer<B> {
    /// One update from `grads` times `grad_scale` (the clipping factor, `None`: 1).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        params: Vec<Tensor<B, 1>>,
        mut grads: Vec<Tensor<B, 1>>,
        grad_scale: Option<f64>,
        lr: f64,
        weight_decay: f64,
        decay: &[bool],
        trainable: &[bool],
    ) -> Vec<Tensor<B, 1>> {
        match self {
            Self::AdamW(o) => o.step_scaled(
                params,
                &grads,
                grad_scale,
                lr,
                weight_decay,
                decay,
                trainable,
            ),
            Self::GaLore(o) => {
                crate::scale_grads(&mut grads, grad_scale);
                o.step(params, &grads, lr, weight_decay, decay, trainable)
            }
        }
    }
}
