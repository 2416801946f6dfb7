//! Processes and collectives. The model's layers see only [`TpGroup`] and the
//! [`CollectiveBackend`] operators; the trainer hands the rest flat gradient lists.

pub mod comm;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
pub mod topology;

pub use comm::{all_reduce_mean_tensors, to_host, Comm, SoloComm, TensorCollectives, ThreadComm};
pub use launch::{Dist, MpiRuntime};
pub use ops::{CollectiveBackend, CommStats, TpGroup};
pub use topology::Topology;
