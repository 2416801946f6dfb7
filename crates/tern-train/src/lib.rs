//! Recipes, the training loop and its outputs (metrics, TensorBoard, checkpoints).

pub mod build;
pub mod checkpoint;
pub mod distill;
pub mod evaluator;
pub mod faults;
pub mod init;
pub mod metrics;
pub mod mfu;
pub mod objective;
pub mod params;
pub mod plan;
pub mod pretrained;
pub mod products;
pub mod recipe;
pub mod recompute;
pub mod slots;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use recipe::{Recipe, RecipeSource};
pub use trainer::{train, Resume, TrainOptions, TrainSummary};
