use serde::{Deserialize, Serialize};

/// `optim.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    #[default]
    Adamw,
    /// GaLore (arXiv 2403.03507): Adam in a low-rank projection of the gradient of every block
    /// matrix (attention and MLP); embedding, head and norms take the same Adam unprojected.
    GaloreAdamw,
}

/// `optim.proj_type`: which side of a block matrix GaLore projects (the reference's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjType {
    /// Right (rows of Vh) when the matrix has at least as many rows as columns, else left.
    #[default]
    Std,
    /// The other side of `std`.
    ReverseStd,
    Left,
    Right,
}

/// `optim.subspace_change`: what happens to the Adam moments when GaLore's projection changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubspaceChange {
    /// Kept as they are, coordinates of the old subspace read in the new one (the reference).
    #[default]
    Keep,
    /// Zeroed.
    Reset,
    /// Rotated into the new subspace: first moment exactly, second moment with the squared
    /// change-of-basis matrix (exact when the rotation only permutes or flips directions).
    Reproject,
}

/// `optim.schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `lr * min_lr_ratio` at the last step.
    #[default]
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// `[optim]` section of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default)]
    pub name: OptimizerName,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Final learning rate as a fraction of the peak.
    #[serde(default = "d_min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    /// Length of the schedule in steps (Megatron's `--lr-decay-iters`); defaults to `train.steps`.
    /// Setting it makes the schedule independent of where a run stops, so a run stopped early and
    /// continued with a larger `train.steps` matches the uninterrupted run.
    #[serde(default)]
    pub decay_steps: Option<u64>,
    #[serde(default)]
    pub schedule: ScheduleKind,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Decoupled weight decay (AdamW), applied to matrices only (not to norm weights).
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// TriLM intervention 1: at this fraction of training the peak LR is multiplied by
    /// `lr_drop_factor` (the cosine curve continues from the lower peak).
    #[serde(default)]
    pub lr_drop_at: Option<f64>,
    #[serde(default = "d_drop_factor")]
    pub lr_drop_factor: f64,
    /// TriLM intervention 2: weight decay is zero from this fraction of training on.
    #[serde(default)]
    pub wd_off_at: Option<f64>,
    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    /// GaLore: rank of the projection (required with `name = "galore_adamw"`).
    #[serde(default)]
    pub rank: Option<usize>,
    /// GaLore: steps between two projections (the SVD runs at steps 0, T, 2T, ...).
    #[serde(default = "d_gap")]
    pub update_proj_gap: u64,
    /// GaLore: factor on the projected-back update (the reference's `scale`, 0.25 in its runs).
    #[serde(default = "d_scale")]
    pub scale: f64,
    #[serde(default)]
    pub proj_type: ProjType,
    #[serde(default)]
    pub subspace_change: SubspaceChange,
    /// GaLore: how the projection's singular vectors are found.
    #[serde(default)]
    pub svd: SvdMethod,
    /// GaLore, `svd = "randomized"`: extra sampled directions beyond the rank.
    #[serde(default = "d_oversample")]
    pub svd_oversample: usize,
    /// GaLore, `svd = "randomized"`: subspace (power) iterations.
    #[serde(default = "d_svd_iters")]
    pub svd_iters: usize,
}

/// `optim.svd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SvdMethod {
    /// Thin SVD of the whole gradient, f64, on the host (the reference's `torch.linalg.svd`).
    #[default]
    Exact,
    /// Randomized subspace iteration (Halko, Martinsson and Tropp), its matrix products on the
    /// training device; only (rank + oversample)-sized factorizations run on the host.
    Randomized,
}

fn d_lr() -> f64 {
    1e-3
}
fn d_min_lr_ratio() -> f64 {
    0.1
}
fn d_warmup() -> u64 {
    0
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.95
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    0.1
}
fn d_drop_factor() -> f64 {
    0.5
}
fn d_clip() -> f64 {
    1.0
}
fn d_gap() -> u64 {
    200
}
fn d_scale() -> f64 {
    0.25
}
fn d_oversample() -> usize {
    8
}
fn d_svd_iters() -> usize {
    2
}

impl Default for OptimConfig {
    fn default() -> Self {
        toml_defaults()
    }
}

fn toml_defaults() -> OptimConfig {
    OptimConfig {
        name: OptimizerName::default(),
        lr: d_lr(),
        min_lr_ratio: d_min_lr_ratio(),
        warmup_steps: d_warmup(),
        decay_steps: None,
        schedule: ScheduleKind::default(),
        beta1: d_beta1(),
        beta2: d_beta2(),
        eps: d_eps(),
        weight_decay: d_wd(),
        lr_drop_at: None,
        lr_drop_factor: d_drop_factor(),
        wd_off_at: None,
        grad_clip: d_clip(),
        rank: None,
        update_proj_gap: d_gap(),
        scale: d_scale(),
        proj_type: ProjType::default(),
        subspace_change: SubspaceChange::default(),
        svd: SvdMethod::default(),
        svd_oversample: d_oversample(),
        svd_iters: d_svd_iters(),
    }
}

impl OptimConfig {
    /// Range checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool, &str); 8] = [
            (
                "optim.lr",
                self.lr > 0.0 && self.lr.is_finite(),
                "must be a positive number",
            ),
            (
                "optim.min_lr_ratio",
                (0.0..=1.0).contains(&self.min_lr_ratio),
                "must be in [0, 1]",
            ),
            (
                "optim.beta1",
                (0.0..1.0).contains(&self.beta1),
                "must be in [0, 1)",
            ),
            (
                "optim.beta2",
                (0.0..1.0).contains(&self.beta2),
                "must be in [0, 1)",
            ),
            ("optim.eps", self.eps > 0.0, "must be positive"),
            (
                "optim.weight_decay",
                self.weight_decay >= 0.0,
                "must not be negative",
            ),
            (
                "optim.lr_drop_factor",
                self.lr_drop_factor > 0.0 && self.lr_drop_factor <= 1.0,
                "must be in (0, 1]",
            ),
            (
                "optim.grad_clip",
                self.grad_clip >= 0.0,
                "must not be negative (0 turns clipping off)",
            ),
        ];
        for (key, ok, what) in checks {
            if !ok {
                return Err(format!("{key}: {what}"));
            }
        }
        match (self.name, self.rank) {
            (OptimizerName::GaloreAdamw, None) => {
                return Err("optim.rank: required with optim.name = \"galore_adamw\" (the reference uses 128 to 1024; hidden / 4 is a common choice)".into())
            }
            (OptimizerName::GaloreAdamw, Some(0)) => {
                return Err("optim.rank: must be at least 1".into())
            }
            (OptimizerName::Adamw, Some(_)) => {
                return Err("optim.rank: only galore_adamw uses a rank (set optim.name = \"galore_adamw\")".into())
            }
            _ => {}
        }
        if self.update_proj_gap == 0 {
            return Err("optim.update_proj_gap: must be at least 1 step".into());
        }
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            return Err("optim.scale: must be a positive number".into());
        }
        for (key, v) in [
            ("optim.lr_drop_at", self.lr_drop_at),
            ("optim.wd_off_at", self.wd_off_at),
        ] {
            if let Some(f) = v {
                if !(0.0..=1.0).contains(&f) {
                    return Err(format!(
                        "{key}: {f} is not a fraction of training in [0, 1]"
                    ));
                }
            }
        }
        Ok(())
    }
}
