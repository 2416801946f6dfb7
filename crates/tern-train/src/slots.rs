//! One list of parameter slots: every parameter of the model in module order, with what the
//! optimizer, the update, the distillation phases and checkpoints need to know of it. Module order
//! is deterministic (unlike parameter ids, which are random per process), so it is the order of
//! optimizer state, gradient buckets and checkpoints.

use tern_parallel::{is_block_matrix, TpLayout};

use crate::params::ParamInfo;
use crate::step::{StateSplit, UpdateRules};

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlot {
    /// Dotted module path, e.g. `layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The whole tensor's shape (what one process holds and a checkpoint stores).
    pub shape: Vec<usize>,
    /// The dimension the tensor-parallel group splits (`None`: every rank holds it whole).
    pub shard: Option<usize>,
    /// This rank's shape.
    pub local: Vec<usize>,
    /// A rank's gradient covers its own positions only (a whole parameter under sequence
    /// parallelism): the tensor-parallel group sums it.
    pub partial: bool,
}

impl ParamSlot {
    /// Matrices take weight decay; vectors (norm weights, encoder alpha and beta) do not, nor
    /// Mamba's `A_log` (as in Mamba, whose decays would otherwise drift towards -1).
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2 && !self.name.ends_with(".a_log")
    }

    /// What GaLore projects at `rank`: a block matrix ([`is_block_matrix`]) whose smaller side
    /// reaches the rank (a smaller one, such as Mamba's `x_proj`, gains nothing: AdamW takes it).
    pub fn low_rank(&self, rank: Option<usize>) -> bool {
        is_block_matrix(&self.name)
            && rank.is_none_or(|r| self.shape.len() == 2 && self.shape[0].min(self.shape[1]) >= r)
    }

    pub fn info(&self) -> ParamInfo {
        ParamInfo {
            name: self.name.clone(),
            shape: self.shape.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlots(pub Vec<ParamSlot>);

impl ParamSlots {
    /// The slots of a model whose whole parameters are `whole` and whose shards on a `tp`-way
    /// group split as `layout` says are `local` (the same names, in the same order).
    pub fn new(whole: &[ParamInfo], local: &[ParamInfo], tp: usize, layout: TpLayout) -> Self {
        assert_eq!(whole.len(), local.len(), "one shard per parameter");
        Self(
            whole
                .iter()
                .zip(local)
                .map(|(w, l)| {
                    assert_eq!(w.name, l.name, "the same parameters in the same order");
                    ParamSlot {
                        name: w.name.clone(),
                        shape: w.shape.clone(),
                        shard: layout.shard_dim(&w.name).filter(|_| tp > 1),
                        local: l.shape.clone(),
                        partial: tp > 1 && layout.partial_gradient(&w.name),
                    }
                })
                .collect(),
        )
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ParamSlot> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn rules(&self) -> UpdateRules {
        UpdateRules {
            decay: self.iter().map(ParamSlot::decays).collect(),
            sharded: self.iter().map(|s| s.shard.is_some()).collect(),
        }
    }

    /// The recipe's optimizer over these slots' local shards.
    pub fn optimizer<B: burn::tensor::backend::Backend>(
        &self,
        cfg: &tern_optim::OptimConfig,
        tp: &tern_dist::TpGroup,
        device: &B::Device,
    ) -> tern_optim::Optimizer<B> {
        self.optimizer_owning(cfg, tp, device, &vec![true; self.len()])
    }

    /// [`Self::optimizer`] keeping the state of the parameters this rank `owns` only.
    fn optimizer_owning<B: burn::tensor::backend::Backend>(
        &self,
        cfg: &tern_optim::OptimConfig,
        tp: &tern_dist::TpGroup,
        device: &B::Device,
        owns: &[bool],
    ) -> tern_optim::Optimizer<B> {
        tern_optim::Optimizer::new(
            cfg,
            &self.local_shapes(),
            &self.low_rank(cfg.rank),
            &self.shard_dims(),
            tp,
            device,
            owns,
        )
    }

    /// Which parameters this data-parallel rank owns when they are kept whole on one rank each
    /// ([`StateSplit::Owners`]), balanced by the optimizer state `cfg` keeps of each.
    pub fn owned(&self, cfg: &tern_optim::OptimConfig, dist: &tern_dist::Dist) -> Vec<bool> {
        let tp = dist.topo.tp;
        let states: Vec<usize> = self
            .iter()
            .map(|s| crate::plan::state_elems(cfg, &s.name, &s.shape, s.local.iter().product(), tp))
            .collect();
        let me = dist.topo.dp_rank();
        tern_dist::owners(&states, dist.topo.dp)
            .into_iter()
            .map(|r| r == me)
            .collect()
    }

    /// How the optimizer's state is split over `dist`'s data-parallel group: whole, or with
    /// ZeRO-1 (`zero`) in chunks (AdamW) or by owners (GaLore).
    pub fn state_split<'a>(
        &self,
        zero: bool,
        cfg: &tern_optim::OptimConfig,
        dist: &'a tern_dist::Dist,
    ) -> StateSplit<'a> {
        match (zero, cfg.name) {
            (false, _) => StateSplit::Whole,
            (true, tern_optim::OptimizerName::Adamw) => StateSplit::Chunks(dist.dp.as_ref()),
            (true, _) => StateSplit::Owners(dist.dp.as_ref(), self.owned(cfg, dist)),
        }
    }

    /// This rank's optimizer: [`Self::optimizer`], or with ZeRO-1 (`zero`) AdamW over this
    /// data-parallel rank's chunk of every parameter (none may be smaller than the group), or
    /// GaLore holding the state of the parameters this rank owns.
    pub fn optimizer_for_rank<B: burn::tensor::backend::Backend>(
        &self,
        cfg: &tern_optim::OptimConfig,
        zero: bool,
        dist: &tern_dist::Dist,
        device: &B::Device,
    ) -> anyhow::Result<tern_optim::Optimizer<B>> {
        if !zero {
            return Ok(self.optimizer(cfg, &dist.tp, device));
        }
        if let StateSplit::Owners(_, owns) = self.state_split(zero, cfg, dist) {
            return Ok(self.optimizer_owning(cfg, &dist.tp, device, &owns));
        }
        let (dp_rank, dp) = (dist.topo.dp_rank(), dist.topo.dp);
        let mut sizes = Vec::with_capacity(self.len());
        for s in self.iter() {
            let n: usize = s.local.iter().product();
            if n < dp {
                anyhow::bail!(
                    "parallel.zero = 1: parameter {} has {n} elements on this rank, fewer than \
                     the {dp} data-parallel ranks that would split it",
                    s.name
                );
            }
            sizes.push(tern_dist::dp_chunk(n, dp_rank, dp).1);
        }
        Ok(tern_optim::Optimizer::AdamW(tern_optim::AdamW::new(
            cfg, &sizes, device,
        )))
    }

    /// Which gradients the tensor-parallel group sums ([`ParamSlot::partial`]).
    pub fn partial(&self) -> Vec<bool> {
        self.iter().map(|s| s.partial).collect()
    }

    pub fn local_shapes(&self) -> Vec<Vec<usize>> {
        self.iter().map(|s| s.local.clone()).collect()
    }

    pub fn low_rank(&self, rank: Option<usize>) -> Vec<bool> {
        self.iter().map(|s| s.low_rank(rank)).collect()
    }

    pub fn shard_dims(&self) -> Vec<Option<usize>> {
        self.iter().map(|s| s.shard).collect()
    }

    /// Parameters in millions.
    pub fn millions(&self) -> f64 {
        self.iter().map(|s| s.info().numel()).sum::<usize>() as f64 / 1e6
    }
}
