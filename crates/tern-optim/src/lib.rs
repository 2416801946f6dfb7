//! Optimizers over flattened parameter lists, the learning-rate / weight-decay schedule with
//! TriLM's two interventions, and gradient-norm clipping.
//!
//! Parameters and gradients arrive as one flat 1-D tensor per model parameter, in module order:
//! the same layout the data-parallel gradient buckets and the checkpoints use.

pub mod adamw;
pub mod clip;
pub mod config;
pub mod galore;
pub mod optimizer;
pub mod schedule;
pub mod svd;

pub use adamw::AdamW;
pub use clip::{clip_global_norm, clip_scale, global_norm, scale_grads, squared_norms};
pub use config::{OptimConfig, OptimizerName, ProjType, ScheduleKind, SubspaceChange, SvdMethod};
pub use galore::{GaLoreAdamW, LowRank};
pub use optimizer::{Optimizer, StateTensor};
pub use schedule::Schedule;
pub use svd::Side;
