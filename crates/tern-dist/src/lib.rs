//! Processes and collectives: the topology, the [`Comm`] trait (MPI, threads, NCCL), tensor
//! collectives, and Megatron's f and g as autodiff operators ([`CollectiveBackend`]), which the
//! tensor-parallel forms of crate tern-parallel apply; the trainer hands the rest flat gradient
//! lists.

pub mod comm;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
pub mod topology;

pub use comm::{
    all_gather_chunks, all_reduce_mean_tensors, all_reduce_sum_tensors, dp_chunk, owners,
    reduce_scatter_mean_tensors, to_host, Comm, SoloComm, TensorCollectives, ThreadComm,
};
pub use launch::{Dist, MpiRuntime};
pub use ops::{CollectiveBackend, CommStats, TpGroup};
pub use topology::Topology;
