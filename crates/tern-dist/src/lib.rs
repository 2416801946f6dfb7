//! Processes and collectives. The model never sees this crate: the trainer hands it flat gradient
//! lists, and (later) the tensor-parallel layer types call it.

pub mod comm;
pub mod launch;
pub mod topology;

pub use comm::{all_reduce_mean_tensors, Comm, SoloComm};
pub use launch::{Dist, MpiRuntime};
pub use topology::Topology;
