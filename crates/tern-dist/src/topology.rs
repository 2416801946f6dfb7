//! Where a process sits: its rank, its tensor-parallel group (consecutive ranks, so inside a node)
//! and its data-parallel group (the ranks holding the same tensor-parallel shard).

/// The layout of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes of this node (picks the GPU).
    pub local_rank: usize,
    pub tp: usize,
    pub dp: usize,
}

impl Topology {
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            tp: 1,
            dp: 1,
        }
    }

    /// Checks `tp` and an explicit `dp` against the world size; the error names the keys.
    pub fn new(
        rank: usize,
        world: usize,
        local_rank: usize,
        tp: usize,
        dp: Option<usize>,
    ) -> Result<Self, String> {
        if tp == 0 || !world.is_multiple_of(tp) {
            return Err(format!(
                "parallel.tp = {tp} does not divide the {world} processes of this job"
            ));
        }
        let fit = world / tp;
        if let Some(d) = dp {
            if d != fit {
                return Err(format!(
                    "parallel.dp = {d} does not fit: {world} processes / parallel.tp = {tp} give dp = {fit}"
                ));
            }
        }
        Ok(Self {
            rank,
            world,
            local_rank,
            tp,
            dp: fit,
        })
    }

    pub fn tp_rank(&self) -> usize {
        self.rank % self.tp
    }

    pub fn dp_rank(&self) -> usize {
        self.rank / self.tp
    }

    /// Only this rank writes logs, metrics, TensorBoard and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_errors() {
        let t = Topology::new(5, 8, 1, 2, None).unwrap();
        assert_eq!((t.tp_rank(), t.dp_rank(), t.dp), (1, 2, 4));
        assert!(Topology::new(0, 6, 0, 4, None)
            .unwrap_err()
            .contains("parallel.tp = 4"));
        assert!(Topology::new(0, 4, 0, 2, Some(4))
            .unwrap_err()
            .contains("parallel.dp = 4"));
        assert_eq!(Topology::new(0, 4, 0, 2, Some(2)).unwrap().dp, 2);
    }
}
