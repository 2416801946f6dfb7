//! Megatron's tensor-parallel plan for tern's LLaMA: which parameters split, along which dimension,
//! whether a model fits a split, and the host-side slicing of whole tensors into shards (for
//! checkpoints and initial values).

use tern_model::{LinearKind, ModelConfig, ModelConfigError};

/// Parameters of a block that tensor parallelism splits, and the dimension of `W[out, in]` it
/// splits (0: output rows, column-parallel; 1: input columns, row-parallel).
pub const TP_PLAN: [(&str, usize); 7] = [
    ("self_attn.q_proj.weight", 0),
    ("self_attn.k_proj.weight", 0),
    ("self_attn.v_proj.weight", 0),
    ("self_attn.o_proj.weight", 1),
    ("mlp.gate_proj.weight", 0),
    ("mlp.up_proj.weight", 0),
    ("mlp.down_proj.weight", 1),
];

/// The dimension along which parameter `name` (e.g. `layers.3.mlp.up_proj.weight`) is split by
/// the blocks' plan, or `None` for a parameter held whole ([`TpLayout::shard_dim`] adds the
/// vocabulary's).
pub fn shard_dim(name: &str) -> Option<usize> {
    block_matrix_dim(name).or_else(|| encoder_shard_dim(name))
}

/// What tensor parallelism splits beyond the blocks' matrices: the vocabulary
/// (`parallel.vocab`: the embedding's and the LM head's rows) and the sequence
/// (`parallel.sequence`: Megatron-SP's norm and residual regions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TpLayout {
    pub vocab: bool,
    pub sequence: bool,
}

impl TpLayout {
    /// [`shard_dim`] under this layout: with the vocabulary split, the embedding and the head
    /// split by rows too.
    pub fn shard_dim(&self, name: &str) -> Option<usize> {
        match name {
            "embed_tokens.weight" | "lm_head.weight" if self.vocab => Some(0),
            _ => shard_dim(name),
        }
    }

    /// Whether a rank's gradient of parameter `name` covers only its own positions, so that the
    /// group sums it: under sequence parallelism every parameter held whole (norms, and the
    /// embedding and head when the vocabulary is not split) is applied to this rank's positions
    /// only, as Megatron-SP's layer norms are.
    pub fn partial_gradient(&self, name: &str) -> bool {
        self.sequence && self.shard_dim(name).is_none()
    }
}

/// [`shard_dim`] of the block matrices: LLaMA's seven, and the experts' matrices split as the
/// LLaMA matrix each plays (an MoE expert's as the MLP's, an MoA expert's query and output and
/// the shared key and value as attention's). Mamba's matrices are held whole.
pub fn block_matrix_dim(name: &str) -> Option<usize> {
    let (_, within) = name.strip_prefix("layers.")?.split_once('.')?;
    let within = plan_name(within)?;
    TP_PLAN.iter().find(|(p, _)| *p == within).map(|&(_, d)| d)
}

/// The [`TP_PLAN`] name of a block parameter (`moe.experts.3.up_proj.weight` ->
/// `mlp.up_proj.weight`, `moa.q_proj.1.weight` -> `self_attn.q_proj.weight`).
fn plan_name(within: &str) -> Option<String> {
    if let Some(rest) = within.strip_prefix("moe.experts.") {
        return Some(format!("mlp.{}", rest.split_once('.')?.1));
    }
    if let Some(rest) = within.strip_prefix("moa.") {
        let (proj, rest) = rest.split_once('.')?;
        let param = rest.rsplit('.').next()?;
        return Some(format!("self_attn.{proj}.{param}"));
    }
    Some(within.to_string())
}

/// A projection weight of any block kind (what GaLore projects): LLaMA's seven, the experts',
/// and Mamba's three large ones.
pub fn is_block_matrix(name: &str) -> bool {
    block_matrix_dim(name).is_some()
        || ["in_proj", "x_proj", "out_proj"]
            .iter()
            .any(|p| name.ends_with(&format!(".mamba.{p}.weight")))
}

/// A distillation student's encoder in front of a row-parallel projection sees only this rank's
/// input channels: its `fc1 [d/2, d]` is split by input columns (row-parallel), `fc2 [d, d/2]`
/// by output rows (column-parallel) and `alpha`, `beta`, `offset` `[d]` by channel. Encoders in front of
/// column-parallel projections are replicated.
fn encoder_shard_dim(name: &str) -> Option<usize> {
    let (_, within) = name.strip_prefix("layers.")?.split_once('.')?;
    let (proj, param) = within.split_once(".encoder.")?;
    let rowwise = TP_PLAN
        .iter()
        .any(|&(p, d)| d == 1 && p.strip_suffix(".weight") == Some(proj));
    match (rowwise, param) {
        (false, _) => None,
        (true, "fc1") => Some(1),
        (true, "fc2" | "alpha" | "beta" | "offset") => Some(0),
        _ => None,
    }
}

/// Whether a model can be split `tp` ways under `layout`; the error names the key and the numbers.
pub fn check_tp(c: &ModelConfig, tp: usize, layout: TpLayout) -> Result<(), ModelConfigError> {
    let fail = |key: &str, message: String| {
        Err(ModelConfigError {
            key: key.into(),
            message,
        })
    };
    if tp <= 1 {
        return Ok(());
    }
    // Checked again once the vocabulary is known (from the tokenizer or a teacher).
    match c.vocab_size {
        Some(v) if layout.vocab && !v.is_multiple_of(tp) => {
            return fail(
                "parallel.vocab",
                format!(
                    "a vocabulary of {v} tokens cannot be split across parallel.tp = {tp} ranks \
                     (set model.vocab_size to a multiple of {tp})"
                ),
            );
        }
        _ => {}
    }
    for (key, n, what) in [
        ("model.n_heads", c.n_heads, "attention heads "),
        ("model.n_kv_heads", c.kv_heads(), "key/value heads "),
        ("model.intermediate", c.intermediate, ""),
    ] {
        if !n.is_multiple_of(tp) {
            return fail(
                key,
                format!("{n} {what}cannot be split across parallel.tp = {tp} ranks"),
            );
        }
    }
    if let Some(m) = &c.moe {
        let inner = m.intermediate.unwrap_or(c.intermediate);
        if !inner.is_multiple_of(tp) {
            return fail(
                "model.moe.intermediate",
                format!("an expert's inner size {inner} cannot be split across parallel.tp = {tp} ranks"),
            );
        }
    }
    if layout.sequence && !c.is_llama() {
        return fail(
            "parallel.sequence",
            "sequence parallelism splits LLaMA blocks only: Mamba mixers, experts and routed \
             blocks read whole sequences (set parallel.sequence = false)"
                .into(),
        );
    }
    if c.linear != LinearKind::Float && !c.scale_groups.is_multiple_of(tp) {
        return fail(
            "model.scale_groups",
            format!(
                "{} scale groups cannot be split across parallel.tp = {tp} ranks: each rank computes \
                 the scales of its own shard, so model.scale_groups must be a multiple of parallel.tp \
                 (the scale groups are a property of the model; a run with another tp keeps them)",
                c.scale_groups
            ),
        );
    }
    Ok(())
}

/// Shard `rank` of `tp` of a row-major matrix `full` of `shape`, split along `dim`.
pub fn shard_values(full: &[f32], shape: &[usize], dim: usize, rank: usize, tp: usize) -> Vec<f32> {
    // A vector is a one-column matrix.
    let [rows, cols] = [shape[0], shape.get(1).copied().unwrap_or(1)];
    assert_eq!(full.len(), rows * cols, "shape {shape:?}");
    match dim {
        0 => {
            let r = rows / tp;
            full[rank * r * cols..(rank + 1) * r * cols].to_vec()
        }
        _ => {
            let c = cols / tp;
            full.chunks(cols)
                .flat_map(|row| &row[rank * c..(rank + 1) * c])
                .copied()
                .collect()
        }
    }
}

/// The full matrix from its `tp` shards laid end to end (what an all-gather returns);
/// `local_shape` is one shard's shape. Inverse of [`shard_values`].
pub fn unshard_values(gathered: &[f32], local_shape: &[usize], dim: usize, tp: usize) -> Vec<f32> {
    let [rows, cols] = [local_shape[0], local_shape.get(1).copied().unwrap_or(1)];
    let per = rows * cols;
    assert_eq!(gathered.len(), per * tp, "local shape {local_shape:?}");
    match dim {
        0 => gathered.to_vec(),
        _ => (0..rows)
            .flat_map(|i| (0..tp).flat_map(move |r| &gathered[r * per + i * cols..][..cols]))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_by_name() {
        assert_eq!(shard_dim("layers.0.self_attn.q_proj.weight"), Some(0));
        assert_eq!(shard_dim("layers.11.self_attn.o_proj.weight"), Some(1));
        assert_eq!(shard_dim("layers.2.mlp.down_proj.weight"), Some(1));
        assert_eq!(shard_dim("layers.2.moe.experts.11.up_proj.weight"), Some(0));
        assert_eq!(
            shard_dim("layers.2.moe.experts.0.down_proj.weight"),
            Some(1)
        );
        assert_eq!(shard_dim("layers.2.moe.router"), None);
        assert_eq!(shard_dim("layers.0.moa.q_proj.3.weight"), Some(0));
        assert_eq!(shard_dim("layers.0.moa.v_proj.weight"), Some(0));
        assert_eq!(shard_dim("layers.0.moa.o_proj.0.weight"), Some(1));
        assert_eq!(shard_dim("layers.0.mamba.in_proj.weight"), None);
        assert!(is_block_matrix("layers.0.mamba.in_proj.weight"));
        assert!(!is_block_matrix("layers.0.mamba.a_log"));
        assert!(!is_block_matrix("layers.0.moa.router"));
        assert_eq!(shard_dim("layers.2.input_layernorm.weight"), None);
        assert_eq!(shard_dim("embed_tokens.weight"), None);
        assert_eq!(shard_dim("lm_head.weight"), None);
        assert_eq!(shard_dim("layers.1.mlp.down_proj.encoder.fc1"), Some(1));
        assert_eq!(
            shard_dim("layers.1.self_attn.o_proj.encoder.alpha"),
            Some(0)
        );
        assert_eq!(shard_dim("layers.1.mlp.up_proj.encoder.fc1"), None);
        assert_eq!(block_matrix_dim("layers.1.mlp.down_proj.encoder.fc1"), None);
        let both = TpLayout {
            vocab: true,
            sequence: true,
        };
        assert_eq!(both.shard_dim("embed_tokens.weight"), Some(0));
        assert_eq!(both.shard_dim("lm_head.weight"), Some(0));
        assert!(both.partial_gradient("layers.0.input_layernorm.weight"));
        assert!(both.partial_gradient("norm.weight"));
        assert!(!both.partial_gradient("embed_tokens.weight"));
        assert!(!both.partial_gradient("layers.0.mlp.up_proj.weight"));
        let sequence = TpLayout {
            vocab: false,
            sequence: true,
        };
        assert!(sequence.partial_gradient("embed_tokens.weight"));
        assert!(!TpLayout::default().partial_gradient("norm.weight"));
    }

    #[test]
    fn shard_and_unshard_are_inverse() {
        let shape = [4usize, 6];
        let full: Vec<f32> = (0..24).map(|x| x as f32).collect();
        for dim in [0, 1] {
            for tp in [1, 2, 3] {
                if !shape[dim].is_multiple_of(tp) {
                    continue;
                }
                let shards: Vec<Vec<f32>> = (0..tp)
                    .map(|r| shard_values(&full, &shape, dim, r, tp))
                    .collect();
                let mut local = shape;
                local[dim] /= tp;
                assert_eq!(unshard_values(&shards.concat(), &local, dim, tp), full);
            }
        }
        // Columns 3..6 of each row.
        assert_eq!(
            shard_values(&full, &shape, 1, 1, 2),
            vec![3., 4., 5., 9., 10., 11., 15., 16., 17., 21., 22., 23.]
        );
    }

    #[test]
    fn tp_must_fit_heads_and_scale_groups() {
        let c = ModelConfig::tiny(64, LinearKind::Ternary); // 4 heads, 2 kv heads, 1 scale group
        assert_eq!(
            check_tp(&c, 2, TpLayout::default()).unwrap_err().key,
            "model.scale_groups"
        );
        let c2 = ModelConfig {
            scale_groups: 2,
            ..c.clone()
        };
        assert!(check_tp(&c2, 2, TpLayout::default()).is_ok());
        assert_eq!(
            check_tp(&c2, 4, TpLayout::default()).unwrap_err().key,
            "model.n_kv_heads"
        );
        let f = ModelConfig::tiny(64, LinearKind::Float);
        assert!(
            check_tp(&f, 2, TpLayout::default()).is_ok(),
            "float layers have no scales to split"
        );
        let e = check_tp(
            &ModelConfig {
                n_heads: 6,
                n_kv_heads: None,
                hidden: 36,
                ..f
            },
            4,
            TpLayout::default(),
        );
        assert_eq!(e.unwrap_err().key, "model.n_heads");
        let vocab = TpLayout {
            vocab: true,
            sequence: false,
        };
        let odd = ModelConfig {
            vocab_size: Some(51),
            ..ModelConfig::tiny(64, LinearKind::Float)
        };
        assert_eq!(check_tp(&odd, 2, vocab).unwrap_err().key, "parallel.vocab");
        assert!(check_tp(&odd, 2, TpLayout::default()).is_ok());
    }
}
