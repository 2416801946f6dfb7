//! GaLore-AdamW (arXiv 2403.03507), following jiaweizzhao/GaLore's `galore_torch.AdamW`:
//! every `update_proj_gap` steps (at steps 0, T, 2T, ...) the gradient of each block matrix is
//! decomposed and its leading `rank` singular vectors become the projection P; Adam's moments
//! live in the projected `R` (m x r or r x n, the memory saving); the update `N = m / (sqrt(v) +
//! eps)` goes back through P, times `scale`, with step size `lr sqrt(1 - b2^t) / (1 - b1^t)`;
//! decoupled weight decay follows on the full weight. Parameters that are not block matrices
//! (embedding, head, norms) take the same Adam without projection, as in the reference.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use tern_kernels::guard::matmul;

use tern_dist::{to_host, TensorCollectives, TpGroup};

use crate::config::{OptimConfig, ProjType, SubspaceChange, SvdMethod};
use crate::svd::{leading_singular_vectors, randomized_singular_vectors, Side};

/// The side a matrix of `m` rows and `n` columns is projected on.
pub fn side_of(proj_type: ProjType, m: usize, n: usize) -> Side {
    match proj_type {
        ProjType::Std if m >= n => Side::Right,
        ProjType::Std => Side::Left,
        ProjType::ReverseStd if m >= n => Side::Left,
        ProjType::ReverseStd => Side::Right,
        ProjType::Left => Side::Left,
        ProjType::Right => Side::Right,
    }
}

/// A block matrix's low-rank layout. `m x n` is the full matrix; under tensor parallelism this
/// rank holds the block `tp_rank` of `tp` along dimension `shard` (0: rows, 1: columns).
///
/// Which pieces are local follows from the side: with rows split and a right projection
/// (`R = G P^T`), R's rows are local too; with rows split and a left one (`R = P^T G`), R is a
/// sum over the ranks' row blocks, all-reduced every step (r x n floats) and kept whole on every
/// rank. Columns mirror this. The SVD needs the full gradient: it is all-gathered, every
/// `update_proj_gap` steps only, and every rank decomposes the same matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowRank {
    pub m: usize,
    pub n: usize,
    pub rank: usize,
    pub side: Side,
    pub shard: Option<usize>,
    pub tp_rank: usize,
    pub tp: usize,
}

impl LowRank {
    /// A matrix held whole.
    pub fn whole(m: usize, n: usize, rank: usize, side: Side) -> Self {
        Self {
            m,
            n,
            rank,
            side,
            shard: None,
            tp_rank: 0,
            tp: 1,
        }
    }

    fn split(&self, shape: [usize; 2], dim: Option<usize>) -> [usize; 2] {
        let mut s = shape;
        if let Some(d) = dim {
            s[d] /= self.tp;
        }
        s
    }

    /// This rank's block of the gradient.
    pub fn local(&self) -> [usize; 2] {
        self.split([self.m, self.n], self.shard)
    }
    /// Shape of the full projected gradient (and of the moments of an unsplit run).
    pub fn projected_full(&self) -> [usize; 2] {
        match self.side {
            Side::Right => [self.m, self.rank],
            Side::Left => [self.rank, self.n],
        }
    }
    /// Shape of the full projection matrix.
    pub fn proj_full(&self) -> [usize; 2] {
        match self.side {
            Side::Right => [self.rank, self.n],
            Side::Left => [self.m, self.rank],
        }
    }
    /// The dimension along which this rank's moments are a block of the full ones (`None`:
    /// whole, the same on every rank).
    pub fn moments_shard(&self) -> Option<usize> {
        match (self.shard, self.side) {
            (Some(0), Side::Right) => Some(0),
            (Some(1), Side::Left) => Some(1),
            _ => None,
        }
    }
    /// The dimension along which this rank's projection is a block of the full one.
    pub fn proj_shard(&self) -> Option<usize> {
        match (self.shard, self.side) {
            (Some(0), Side::Left) => Some(0),
            (Some(1), Side::Right) => Some(1),
            _ => None,
        }
    }
    /// Whether the projected gradient is a sum over the ranks (all-reduced every step).
    pub fn reduces(&self) -> bool {
        self.shard.is_some() && self.moments_shard().is_none()
    }
    /// Local shape of the moments.
    pub fn projected(&self) -> [usize; 2] {
        self.split(self.projected_full(), self.moments_shard())
    }
    /// Local shape of the projection.
    pub fn proj(&self) -> [usize; 2] {
        self.split(self.proj_full(), self.proj_shard())
    }
}

#[derive(Debug, Clone)]
pub struct GaLoreAdamW<B: Backend> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub scale: f64,
    pub gap: u64,
    pub on_change: SubspaceChange,
    pub svd: SvdMethod,
    pub oversample: usize,
    pub svd_iters: usize,
    /// Optimizer steps applied so far.
    pub step: u64,
    /// Updates each parameter has received: its bias-correction step and the clock of its
    /// projection refreshes, as the reference keeps `state["step"]` per parameter.
    pub param_steps: Vec<u64>,
    /// `Some` for the parameters GaLore projects.
    pub layout: Vec<Option<LowRank>>,
    /// Moments, flat, in each parameter's (local) projected shape.
    pub exp_avg: Vec<Tensor<B, 1>>,
    pub exp_avg_sq: Vec<Tensor<B, 1>>,
    /// This rank's part of the projection of each projected parameter (`None` before the first
    /// step).
    pub proj: Vec<Option<Tensor<B, 2>>>,
    tp: TpGroup,
}

impl<B: Backend> GaLoreAdamW<B> {
    /// `matrices[i]` = `Some((m, n))` (the local shape) for a parameter GaLore projects;
    /// `sizes[i]` its element count; `shard_dims[i]` the dimension `tp` splits it along. The
    /// rank must fit every projected matrix (the recipe checks it first). It keeps the state of
    /// the parameters this rank `owns` (all of them but under ZeRO-1 with whole parameters, where
    /// the others keep their layout but empty moments and must not be updated here).
    pub fn new(
        cfg: &OptimConfig,
        sizes: &[usize],
        matrices: &[Option<(usize, usize)>],
        shard_dims: &[Option<usize>],
        tp: &TpGroup,
        device: &B::Device,
        owns: &[bool],
    ) -> Self {
        let rank = cfg.rank.expect("optim.rank is validated for galore_adamw");
        let layout: Vec<Option<LowRank>> = matrices
            .iter()
            .zip(shard_dims)
            .map(|(mn, &dim)| {
                mn.map(|(m, n)| {
                    let shard = dim.filter(|_| tp.size() > 1);
                    let (m, n) = match shard {
                        Some(0) => (m * tp.size(), n),
                        Some(_) => (m, n * tp.size()),
                        None => (m, n),
                    };
                    LowRank {
                        shard,
                        tp_rank: tp.rank(),
                        tp: tp.size(),
                        ..LowRank::whole(m, n, rank, side_of(cfg.proj_type, m, n))
                    }
                })
            })
            .collect();
        let state_len = |i: usize| match layout[i] {
            Some(l) => l.projected().iter().product(),
            None => sizes[i],
        };
        let zeros = || {
            (0..sizes.len())
                .map(|i| Tensor::zeros([if owns[i] { state_len(i) } else { 0 }], device))
                .collect::<Vec<_>>()
        };
        Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            scale: cfg.scale,
            gap: cfg.update_proj_gap,
            on_change: cfg.subspace_change,
            svd: cfg.svd,
            oversample: cfg.svd_oversample,
            svd_iters: cfg.svd_iters,
            step: 0,
            param_steps: vec![0; sizes.len()],
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            proj: vec![None; sizes.len()],
            layout,
            tp: tp.clone(),
        }
    }

    /// The full matrix from this rank's block along `dim` (a collective over the group).
    fn full(&self, t: Tensor<B, 2>, dim: Option<usize>) -> Tensor<B, 2> {
        match dim {
            Some(d) => self.tp.comm().all_gather_tensor(t, d),
            None => t,
        }
    }
}

impl<B: tern_kernels::Kernels> GaLoreAdamW<B> {
    /// A new projection of parameter `i` from its gradient `g` (this rank's block), and what the
    /// moments do.
    fn refresh(&mut self, i: usize, l: LowRank, g: &Tensor<B, 2>) {
        let g = self.full(g.clone(), l.shard);
        let p = match self.svd {
            SvdMethod::Exact => {
                leading_singular_vectors(&to_host(g.clone()), l.m, l.n, l.rank, l.side)
            }
            // The sketch's seed depends only on the step and the parameter: equal on every rank.
            SvdMethod::Randomized => randomized_singular_vectors(
                &g,
                l.rank,
                l.side,
                self.oversample,
                self.svd_iters,
                self.step.wrapping_mul(1_000_003).wrapping_add(i as u64),
            ),
        };
        let p = Tensor::<B, 2>::from_data(TensorData::new(p, l.proj_full()), &g.device());
        if let Some(old) = self.proj[i].take() {
            match self.on_change {
                SubspaceChange::Keep => {}
                SubspaceChange::Reset => {
                    self.exp_avg[i] = self.exp_avg[i].zeros_like();
                    self.exp_avg_sq[i] = self.exp_avg_sq[i].zeros_like();
                }
                SubspaceChange::Reproject => {
                    let old = self.full(old, l.proj_shard());
                    let [a, b] = l.projected();
                    let m = self.exp_avg[i].clone().reshape([a, b]);
                    let v = self.exp_avg_sq[i].clone().reshape([a, b]);
                    // Right: coordinates c (1 x r) of a row mean c P_old; in the new basis
                    // c P_old P_new^T. Left: P_new^T P_old c.
                    let (m, v) = match l.side {
                        Side::Right => {
                            let c = matmul(old, p.clone().transpose());
                            (matmul(m, c.clone()), matmul(v, c.powi_scalar(2)))
                        }
                        Side::Left => {
                            let c = matmul(p.clone().transpose(), old);
                            (matmul(c.clone(), m), matmul(c.powi_scalar(2), v))
                        }
                    };
                    self.exp_avg[i] = m.reshape([a * b]);
                    self.exp_avg_sq[i] = v.reshape([a * b]);
                }
            }
        }
        let p = match l.proj_shard() {
            Some(d) => {
                let len = l.proj()[d];
                p.narrow(d, l.tp_rank * len, len)
            }
            None => p,
        };
        self.proj[i] = Some(p);
    }

    /// One update of every parameter. `decay[i]` says whether parameter i takes weight decay.
    pub fn step(
        &mut self,
        params: Vec<Tensor<B, 1>>,
        grads: &[Tensor<B, 1>],
        lr: f64,
        weight_decay: f64,
        decay: &[bool],
        trainable: &[bool],
    ) -> Vec<Tensor<B, 1>> {
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.layout.len());
        self.step += 1;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let mut out = Vec::with_capacity(params.len());
        for (i, p) in params.into_iter().enumerate() {
            if !trainable[i] {
                out.push(p);
                continue;
            }
            let refresh_now = self.param_steps[i].is_multiple_of(self.gap);
            self.param_steps[i] += 1;
            let t = self.param_steps[i] as i32;
            let step_size = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
            let g = grads[i].clone();
            let low = self.layout[i];
            // The gradient as Adam sees it: projected for block matrices.
            let r = match low {
                None => g,
                Some(l) => {
                    let g2 = g.reshape(l.local());
                    if refresh_now || self.proj[i].is_none() {
                        self.refresh(i, l, &g2);
                    }
                    let pm = self.proj[i].clone().expect("projection");
                    let r = match l.side {
                        Side::Right => matmul(g2, pm.transpose()),
                        Side::Left => matmul(pm.transpose(), g2),
                    };
                    let r = if l.reduces() {
                        self.tp.comm().all_reduce_tensor(r)
                    } else {
                        r
                    };
                    let [a, b] = l.projected();
                    r.reshape([a * b])
                }
            };
            let m = self.exp_avg[i].clone().mul_scalar(b1) + r.clone().mul_scalar(1.0 - b1);
            let v =
                self.exp_avg_sq[i].clone().mul_scalar(b2) + r.powi_scalar(2).mul_scalar(1.0 - b2);
            let n = m.clone().div(v.clone().sqrt().add_scalar(eps));
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
            let update = match low {
                None => n,
                Some(l) => {
                    let pm = self.proj[i].clone().expect("projection");
                    let n2 = n.reshape(l.projected());
                    let back = match l.side {
                        Side::Right => matmul(n2, pm),
                        Side::Left => matmul(pm, n2),
                    };
                    let [a, b] = l.local();
                    back.reshape([a * b]).mul_scalar(self.scale)
                }
            };
            let p = p - update.mul_scalar(step_size);
            // Decoupled decay after the update, on the full weight (the reference's order).
            let p = if decay[i] && weight_decay > 0.0 {
                p.clone() - p.mul_scalar(lr * weight_decay)
            } else {
                p
            };
            out.push(p);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimizerName;
    use burn::backend::Flex;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/galore_reference.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        match v {
            serde_json::Value::Array(a) => a.iter().flat_map(floats).collect(),
            x => vec![x.as_f64().unwrap() as f32],
        }
    }

    /// The NumPy script `data-prep/galore_reference.py` (the paper's algorithm as the reference
    /// implements it, in f64) against this optimizer, step by step, across projection refreshes.
    #[test]
    fn matches_the_reference_script() {
        let fx = fixture();
        let s = &fx["settings"];
        let cfg = OptimConfig {
            name: OptimizerName::GaloreAdamw,
            rank: Some(s["rank"].as_u64().unwrap() as usize),
            update_proj_gap: s["update_proj_gap"].as_u64().unwrap(),
            scale: s["scale"].as_f64().unwrap(),
            beta1: s["beta1"].as_f64().unwrap(),
            beta2: s["beta2"].as_f64().unwrap(),
            eps: s["eps"].as_f64().unwrap(),
            ..OptimConfig::default()
        };
        let (lr, wd) = (
            s["lr"].as_f64().unwrap(),
            s["weight_decay"].as_f64().unwrap(),
        );
        let names = ["right", "left", "dense", "vector"];
        let shapes: Vec<Vec<usize>> = names
            .iter()
            .map(|k| {
                fx["shapes"][k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect()
            })
            .collect();
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let matrices = [Some((6, 4)), Some((3, 5)), None, None];
        let decay = [true, true, true, false];
        let dev = Default::default();
        let mut opt = GaLoreAdamW::<Flex>::new(
            &cfg,
            &sizes,
            &matrices,
            &[None; 4],
            &TpGroup::default(),
            &dev,
            &[true; 4],
        );
        assert_eq!(opt.layout[0].unwrap().side, Side::Right);
        assert_eq!(opt.layout[1].unwrap().side, Side::Left);
        let tensor = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<Flex, 1>::from_data(TensorData::new(v, [n]), &dev)
        };
        let mut params: Vec<_> = names
            .iter()
            .map(|k| tensor(floats(&fx["init"][k])))
            .collect();
        for (t, step) in fx["grads"].as_array().unwrap().iter().enumerate() {
            let grads: Vec<_> = names.iter().map(|k| tensor(floats(&step[k]))).collect();
            params = opt.step(params, &grads, lr, wd, &decay, &vec![true; decay.len()]);
            for (k, p) in names.iter().zip(&params) {
                let want = floats(&fx["after"][t][k]);
                let got: Vec<f32> = p.to_data().to_vec().unwrap();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-6, "step {} {k}: max |diff| {worst}", t + 1);
            }
        }
        // Projected moments: 6 x 2 and 2 x 5 instead of 24 and 15 elements.
        assert_eq!(opt.exp_avg[0].dims(), [12]);
        assert_eq!(opt.exp_avg[1].dims(), [10]);
    }

    #[test]
    fn reproject_rotates_the_first_moment_into_the_new_basis() {
        // A projection that only flips a direction: the reprojected moment flips with it, and
        // the update it produces is the one the moment made in the old basis.
        let dev = Default::default();
        let cfg = OptimConfig {
            name: OptimizerName::GaloreAdamw,
            rank: Some(1),
            update_proj_gap: 1,
            subspace_change: SubspaceChange::Reproject,
            ..OptimConfig::default()
        };
        let mut opt = GaLoreAdamW::<Flex>::new(
            &cfg,
            &[4],
            &[Some((2, 2))],
            &[None],
            &TpGroup::default(),
            &dev,
            &[true],
        );
        let l = opt.layout[0].unwrap();
        opt.proj[0] = Some(Tensor::from_data([[-1.0f32, 0.0]], &dev));
        opt.exp_avg[0] = Tensor::from_data([0.5f32, -2.0], &dev);
        opt.exp_avg_sq[0] = Tensor::from_data([0.25f32, 4.0], &dev);
        // Gradient whose leading right singular vector is +e1.
        let g = Tensor::<Flex, 2>::from_data([[3.0f32, 0.0], [1.0, 0.0]], &dev);
        opt.refresh(0, l, &g);
        let m: Vec<f32> = opt.exp_avg[0].to_data().to_vec().unwrap();
        let v: Vec<f32> = opt.exp_avg_sq[0].to_data().to_vec().unwrap();
        assert_eq!(m, vec![-0.5, 2.0]);
        assert_eq!(v, vec![0.25, 4.0]);
    }
}
