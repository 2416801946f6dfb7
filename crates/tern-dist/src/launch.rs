//! Starting up under `mpirun` (OpenMPI, MPICH, Slurm's PMI) or as a single process.

use anyhow::{anyhow, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator, SimpleCommunicator};

use std::sync::Arc;

use crate::comm::{Comm, SoloComm};
use crate::ops::TpGroup;
use crate::topology::Topology;

/// True when a launcher started this process as one rank of a job. MPI is initialised only then:
/// a plain `tern train` stays an ordinary process (OpenMPI's singleton start refuses root and
/// spawns helpers).
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// An MPI communicator with host-memory collectives.
pub struct MpiComm {
    comm: SimpleCommunicator,
}

// SAFETY: an MPI communicator is a handle that MPI lets any thread use one at a time. tern calls
// MPI from the training thread only (burn's autodiff runs backward on the calling thread), so the
// handle may live inside `Send + Sync` model types without concurrent use.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

/// The most elements a rank receives from one MPI reduce-scatter call (4 MB of f32).
const REDUCE_SCATTER_PIECE: usize = 1 << 20;

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }
    fn size(&self) -> usize {
        self.comm.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.comm
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        self.comm.all_gather_into(send, recv);
    }
    /// In pieces of at most [`REDUCE_SCATTER_PIECE`] elements a rank: Open MPI's reduce-scatter
    /// may first reduce the whole buffer on one rank (a temporary as large as `send` there
    /// only, which made ZeRO-1's ranks' peak memory differ by a whole bucket).
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        let (n, size) = (recv.len(), self.size());
        if n <= REDUCE_SCATTER_PIECE {
            self.comm
                .reduce_scatter_block_into(send, recv, SystemOperation::sum());
            return;
        }
        let mut piece = vec![0f32; REDUCE_SCATTER_PIECE * size];
        for start in (0..n).step_by(REDUCE_SCATTER_PIECE) {
            let len = REDUCE_SCATTER_PIECE.min(n - start);
            for r in 0..size {
                piece[r * len..(r + 1) * len].copy_from_slice(&send[r * n + start..][..len]);
            }
            self.comm.reduce_scatter_block_into(
                &piece[..len * size],
                &mut recv[start..start + len],
                SystemOperation::sum(),
            );
        }
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) {
        self.comm.process_at_rank(root as i32).broadcast_into(buf);
    }
    fn barrier(&self) {
        self.comm.barrier();
    }
    fn all_reduce_sum_f64(&self, v: f64) -> f64 {
        let mut out = 0.0f64;
        self.comm
            .all_reduce_into(&v, &mut out, SystemOperation::sum());
        out
    }
    fn all_gather_f64(&self, v: f64) -> Vec<f64> {
        let mut out = vec![0.0f64; self.size()];
        self.comm.all_gather_into(&v, &mut out[..]);
        out
    }
}

/// The job this process belongs to: its place and the communicators the trainer uses.
pub struct Dist {
    pub topo: Topology,
    /// The ranks that hold the same tensor-parallel shard (gradient averaging).
    pub dp: Box<dyn Comm>,
    /// The consecutive ranks that split each layer between them (the model's layers hold it).
    pub tp: TpGroup,
    /// Every rank (checks, barriers).
    pub world: Box<dyn Comm>,
    // Dropped last: MPI_Finalize after the communicators are freed.
    _mpi: Option<MpiRuntime>,
}

/// Keeps MPI initialised for the life of the job.
pub struct MpiRuntime {
    _universe: Universe,
}

impl Dist {
    pub fn single() -> Self {
        Self {
            topo: Topology::single(),
            dp: Box::new(SoloComm),
            tp: TpGroup::default(),
            world: Box::new(SoloComm),
            _mpi: None,
        }
    }

    /// Initialises MPI when launched by `mpirun` (else a single process) and splits the world into
    /// tensor-parallel groups of `tp` consecutive ranks and data-parallel groups across them.
    /// With `nccl` (GPU training, feature `cuda`), the tensor- and data-parallel groups run NCCL
    /// on GPU `local_rank`; the world group stays on MPI (checks, barriers).
    pub fn init(tp: usize, dp: Option<usize>, nccl: bool) -> Result<Self> {
        if !launched_by_mpi() {
            Topology::new(0, 1, 0, tp, dp)
                .map_err(|e| anyhow!("{e} (start the job with mpirun -np N)"))?;
            return Ok(Self::single());
        }
        let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI was already initialised"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        let topo = Topology::new(rank, size, local_rank, tp, dp).map_err(|e| anyhow!(e))?;
        let dp_comm = world
            .split_by_color(Color::with_value(topo.tp_rank() as i32))
            .ok_or_else(|| anyhow!("rank {rank}: splitting the data-parallel group failed"))?;
        let tp_comm = world
            .split_by_color(Color::with_value(topo.dp_rank() as i32))
            .ok_or_else(|| anyhow!("rank {rank}: splitting the tensor-parallel group failed"))?;
        // Members of this rank's tensor-parallel group on this rank's node.
        let on_node = tp_comm.split_shared(tp_comm.rank()).size() as usize;
        let node_ranks = world.split_shared(world.rank()).size() as usize;
        let placed = tp_group_on_one_node(rank, tp, on_node, node_ranks)
            .and_then(|()| nccl.then(|| visible_gpu(rank, local_rank)).transpose());
        // Every rank learns whether any failed, so that all of them stop (a rank left waiting in
        // a collective for one that returned would hang the job).
        let mut failed = 0i32;
        world.all_reduce_into(
            &(placed.is_err() as i32),
            &mut failed,
            SystemOperation::sum(),
        );
        let gpu = match placed {
            Err(e) => return Err(anyhow!(e)),
            Ok(_) if failed > 0 => {
                return Err(anyhow!(
                    "rank {rank}: {failed} other rank(s) of the job failed the placement checks"
                ))
            }
            Ok(gpu) => gpu,
        };
        let (dp, tp): (Box<dyn Comm>, Arc<dyn Comm>) = if let Some(gpu) = gpu {
            group_comms_nccl(dp_comm, tp_comm, gpu)?
        } else {
            (
                Box::new(MpiComm { comm: dp_comm }),
                Arc::new(MpiComm { comm: tp_comm }),
            )
        };
        Ok(Self {
            topo,
            dp,
            tp: TpGroup::new(tp),
            world: Box::new(MpiComm { comm: world }),
            _mpi: Some(MpiRuntime {
                _universe: universe,
            }),
        })
    }
}

#[cfg(feature = "cuda")]
fn group_comms_nccl(
    dp: SimpleCommunicator,
    tp: SimpleCommunicator,
    gpu: usize,
) -> Result<(Box<dyn Comm>, Arc<dyn Comm>)> {
    use crate::nccl::NcclComm;
    Ok((
        Box::new(NcclComm::over(&dp, gpu)?),
        Arc::new(NcclComm::over(&tp, gpu)?),
    ))
}

#[cfg(not(feature = "cuda"))]
fn group_comms_nccl(
    _: SimpleCommunicator,
    _: SimpleCommunicator,
    _: usize,
) -> Result<(Box<dyn Comm>, Arc<dyn Comm>)> {
    Err(anyhow!("NCCL needs tern built with the cuda feature"))
}

/// A tensor-parallel group talks at every layer, so it must live on one node (NVLink, shared
/// memory), as Megatron requires: `on_node` of its `tp` members share this rank's node, which
/// runs `node_ranks` ranks of the job.
pub fn tp_group_on_one_node(
    rank: usize,
    tp: usize,
    on_node: usize,
    node_ranks: usize,
) -> Result<(), String> {
    if on_node == tp {
        return Ok(());
    }
    Err(format!(
        "rank {rank}: parallel.tp = {tp} does not divide the {node_ranks} ranks on this node (only \
         {on_node} of its tensor-parallel group are here): a tensor-parallel group must not \
         straddle nodes; use a tp that divides the ranks per node, and place ranks by node \
         (mpirun's default --map-by slot, Slurm's block distribution)"
    ))
}

/// The GPU this rank computes on: its node-local rank among the devices it can see. When the
/// launcher gave each process a device of its own (`CUDA_VISIBLE_DEVICES` naming one device,
/// Slurm's `--gpus-per-task=1`), that device is number 0.
pub fn gpu_ordinal(topo: &Topology) -> Result<usize> {
    visible_gpu(topo.rank, topo.local_rank).map_err(|e| anyhow!(e))
}

/// [`pick_gpu`] with this process's `CUDA_VISIBLE_DEVICES`.
fn visible_gpu(rank: usize, local_rank: usize) -> Result<usize, String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    pick_gpu(rank, local_rank, visible.as_deref())
}

/// [`gpu_ordinal`] from the value of `CUDA_VISIBLE_DEVICES` (`None`: not set).
pub fn pick_gpu(rank: usize, local_rank: usize, visible: Option<&str>) -> Result<usize, String> {
    let Some(v) = visible else {
        return Ok(local_rank);
    };
    let n = v.split(',').filter(|d| !d.trim().is_empty()).count();
    match n {
        0 => Err(format!(
            "rank {rank}: CUDA_VISIBLE_DEVICES is empty: this process may use no GPU"
        )),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(format!(
            "rank {rank}: node-local rank {local_rank} but CUDA_VISIBLE_DEVICES={v} shows {n} \
             GPUs: start at most one rank per GPU on each node"
        )),
    }
}

/// Ends every rank of the job now (after an error or a panic on this one): never a hang.
pub fn abort_job(code: i32) {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        SimpleCommunicator::world().abort(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tp_group_across_nodes_is_refused_naming_the_key() {
        assert!(tp_group_on_one_node(3, 4, 4, 8).is_ok());
        let e = tp_group_on_one_node(5, 4, 2, 6).unwrap_err();
        assert!(e.contains("rank 5") && e.contains("parallel.tp = 4"), "{e}");
        assert!(e.contains("6 ranks on this node"), "{e}");
    }

    #[test]
    fn gpus_follow_cuda_visible_devices() {
        assert_eq!(pick_gpu(3, 3, None), Ok(3));
        assert_eq!(pick_gpu(9, 1, Some("5")), Ok(0));
        assert_eq!(pick_gpu(9, 1, Some("0,1,2,3")), Ok(1));
        let e = pick_gpu(9, 4, Some("0,1")).unwrap_err();
        assert!(e.contains("rank 9") && e.contains("2 GPUs"), "{e}");
        assert!(pick_gpu(0, 0, Some("")).is_err());
    }
}
