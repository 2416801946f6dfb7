//! `tern plan`: what a recipe costs before anything is built. Parameter counts; per rank the bytes
//! of weights, gradients and optimizer state for the recipe's optimizer and parallel layout
//! (and AdamW's, to compare); FLOPs per token.

use std::fmt;

use tern_optim::galore::side_of;
use tern_optim::{LowRank, OptimizerName};
use tern_parallel::{block_matrix_dim, is_block_matrix};

use crate::recipe::Recipe;

/// Sizes are counted in f32 (4 bytes), as tern trains.
const F32: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub optimizer: OptimizerName,
    pub rank: Option<usize>,
    pub tp: usize,
    pub dp: usize,
    /// The distributed optimizer: the moments split over the data-parallel ranks.
    pub zero: bool,
    pub params: usize,
    /// Embedding and LM head (replicated under tensor parallelism).
    pub embedding_params: usize,
    /// Attention and MLP matrices of the blocks.
    pub block_params: usize,
    /// A distillation student's encoders.
    pub encoder_params: usize,
    /// A distillation teacher's (weights only; in `weight_bytes`).
    pub teacher_params: usize,
    /// Per rank.
    pub weight_bytes: usize,
    pub grad_bytes: usize,
    pub optim_bytes: usize,
    /// Optimizer state of the block matrices alone, with the recipe's optimizer and with AdamW.
    pub block_optim_bytes: usize,
    pub block_optim_bytes_adamw: usize,
    /// 2 x (matrix parameters but the embedding lookup) + attention scores and values.
    pub forward_flops_per_token: f64,
    /// Forward + backward: three times the forward.
    pub train_flops_per_token: f64,
    /// What a micro-batch's backward pass needs kept, per rank.
    pub activations: Activations,
}

/// Activation bytes of one micro-batch on one rank, kept from the forward pass for the backward
/// pass: without recompute and with `train.recompute = "block"`, for tern's fused CPU kernels and
/// for burn's ops (the cuda build: unfused norms, RoPE and gate). Counted from what each op keeps, in f32; a model, not a measurement
/// (docs/gpu.md compares it with measured memory).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activations {
    pub tokens: usize,
    pub fused: usize,
    pub fused_recompute: usize,
    pub reference: usize,
    pub reference_recompute: usize,
}

impl Activations {
    fn of(recipe: &Recipe, tp: usize, ternary_block_params: usize) -> Self {
        let m = &recipe.model;
        let (t, b) = (recipe.data.seq_len, recipe.train.micro_batch);
        let tokens = t * b;
        let (h, i) = (m.hidden, m.intermediate / tp);
        let (hs, kv, heads) = (h / tp, m.kv_heads() * m.head_dim() / tp, m.n_heads / tp);
        let layout = recipe.parallel.layout();
        let split = |on: bool| if on && tp > 1 { tp } else { 1 };
        let (sp, vp) = (split(layout.sequence), split(layout.vocab));
        // A token's row between the parallel projections: this rank's share of the positions
        // under sequence parallelism.
        let hr = h / sp;
        // Per token and block: the two norms' inputs and outputs (replicated, or this rank's
        // positions under sequence parallelism, where the column-parallel projections also keep
        // their gathered inputs), q and the attention output, k, v, the log-sum-exps, the GLU's
        // gate, up and output.
        let norms = 4 * hr + if sp > 1 { 2 * h } else { 0 };
        let fused_block = norms + 2 + 2 * hs + 2 * kv + heads + 3 * i;
        // burn's ops (the cuda build) add the norms' and the gate's intermediates and RoPE's
        // rotated halves; its attention runs in query chunks and keeps what the fused one keeps.
        let reference_block = fused_block + 4 * hr + 2 * i + 2 * (hs + kv);
        // The final norm and the head's input, its logits and softmax: this rank's block of the
        // vocabulary when it is split (after gathering the positions under sequence
        // parallelism), or its own positions' logits under sequence parallelism alone.
        let head = match (vp > 1, sp > 1) {
            (true, true) => hr + h + 2 * m.vocab() / tp,
            (true, false) => 2 * h + 2 * m.vocab() / tp,
            (false, true) => 2 * hr + 2 * m.vocab() / tp,
            (false, false) => 2 * h + 2 * m.vocab(),
        };
        let n = m.n_layers;
        // The weights a block multiplies by (ternary: quantized once a micro-batch, kept).
        let w_block = ternary_block_params / n.max(1) / tp;
        // The other block kinds change the mixer's and the feed-forward's share (a routed block
        // is counted whole: its share of tokens is learned, not fixed).
        let attention = 2 + 2 * hs + 2 * kv + heads;
        let kind_extra = |l: usize| -> isize {
            let k = m.block_kind(l);
            let mixer = match k.mixer {
                tern_model::Mixer::Attention => attention,
                tern_model::Mixer::Moa => {
                    let e = m.moa.as_ref().map_or(1, |a| a.experts);
                    2 + e * (2 * hs + heads + h + 1) + 2 * kv
                }
                // in_proj's x and z, the convolution and its SiLU, x_proj's output, the steps,
                // every state (d_state per channel), y and the gated y.
                tern_model::Mixer::Mamba => {
                    let c = m.mamba_config();
                    let di = c.expand * h;
                    2 * di + 2 * di + c.dt_rank(h) + 2 * c.d_state + di + di * c.d_state + 2 * di
                }
            };
            let ffn = match (&m.moe, k.moe) {
                // Each routed copy: the gathered input, gate, up, GLU and output; the router's
                // probabilities.
                (Some(e), true) => {
                    let ie = e.intermediate.unwrap_or(m.intermediate) / tp;
                    e.top_k * (2 * h + 3 * ie) + e.experts
                }
                _ => 3 * i,
            };
            mixer as isize - attention as isize + ffn as isize - (3 * i) as isize
        };
        let extra: isize = (0..n).map(kind_extra).sum();
        let worst: isize = (0..n).map(kind_extra).max().unwrap_or(0);
        let per =
            |base: usize, blocks: isize| (base as isize * n as isize + blocks).max(0) as usize;
        let all = |b: usize| F32 * (tokens * (per(b, extra) + head) + n * w_block);
        let one = |b: usize| {
            let block = (b as isize + worst).max(0) as usize;
            F32 * (tokens * ((n + 1) * hr + block + head) + w_block)
        };
        Self {
            tokens,
            fused: all(fused_block),
            fused_recompute: one(fused_block),
            reference: all(reference_block),
            reference_recompute: one(reference_block),
        }
    }
}

/// Optimizer state elements a rank keeps for parameter `name` of whole `shape`, `local_n`
/// elements of it on a rank of a `tp`-way group: GaLore's low-rank moments and projection for a
/// block matrix, else AdamW's two moments.
pub fn state_elems(
    o: &tern_optim::OptimConfig,
    name: &str,
    shape: &[usize],
    local_n: usize,
    tp: usize,
) -> usize {
    match (o.name, is_block_matrix(name), o.rank) {
        (OptimizerName::GaloreAdamw, true, Some(rank)) if shape[0].min(shape[1]) >= rank => {
            let (rows, cols) = (shape[0], shape[1]);
            let l = LowRank {
                shard: block_matrix_dim(name).filter(|_| tp > 1),
                tp,
                ..LowRank::whole(rows, cols, rank, side_of(o.proj_type, rows, cols))
            };
            2 * l.projected().iter().product::<usize>() + l.proj().iter().product::<usize>()
        }
        _ => 2 * local_n,
    }
}

/// The plan of `recipe` on `world` processes; the recipe's vocabulary must be known.
pub fn plan(recipe: &Recipe, world: usize) -> Result<Plan, String> {
    let tp = recipe.parallel.tp;
    if world == 0 || !world.is_multiple_of(tp) {
        return Err(format!(
            "parallel.tp = {tp} does not divide the {world} processes of the plan"
        ));
    }
    let dp = world / tp;
    if let Some(d) = recipe.parallel.dp {
        if d != dp {
            return Err(format!(
                "parallel.dp = {d} does not fit: {world} processes / parallel.tp = {tp} give dp = {dp}"
            ));
        }
    }
    recipe.train.validate(dp)?;
    let m = &recipe.model;
    let o = &recipe.optim;
    let (mut params, mut emb, mut block, mut enc) = (0, 0, 0, 0);
    let (mut local, mut optim, mut block_optim, mut block_adamw) = (0, 0, 0, 0);
    // A distillation student also holds its encoders (replicated, plain AdamW state) and a
    // teacher (weights only).
    let encoders = match &recipe.distill {
        Some(d) => d.encoder_shapes(m),
        None => vec![],
    };
    let mut encoder_matmul = 0;
    for (_, shape) in &encoders {
        if shape.len() == 2 {
            encoder_matmul += shape[0] * shape[1];
        }
    }
    let teacher = if recipe.distill.is_some() {
        m.num_params()
    } else {
        0
    };
    let zero = recipe.parallel.zero == 1;
    let per_rank = |x: usize| if zero { x.div_ceil(dp) } else { x };
    // GaLore's ZeRO-1 keeps each parameter's state whole on its owner: the rank with the most.
    let all: Vec<(String, Vec<usize>)> = m.param_shapes().into_iter().chain(encoders).collect();
    let layout = recipe.parallel.layout();
    let local_n = |name: &str, n: usize| {
        if layout.shard_dim(name).is_some() {
            n / tp
        } else {
            n
        }
    };
    let states: Vec<usize> = all
        .iter()
        .map(|(name, shape)| state_elems(o, name, shape, local_n(name, shape.iter().product()), tp))
        .collect();
    // GaLore's ZeRO-1: the owners as the run assigns them, and the rank that holds the most.
    let owned: Option<Vec<bool>> = (zero && o.name == OptimizerName::GaloreAdamw).then(|| {
        let owner = tern_dist::owners(&states, dp);
        let mut load = vec![0; dp];
        for (r, n) in owner.iter().zip(&states) {
            load[*r] += n;
        }
        let most = (0..dp)
            .max_by_key(|&r| (load[r], std::cmp::Reverse(r)))
            .unwrap_or(0);
        owner.into_iter().map(|r| r == most).collect()
    });
    for (k, (name, shape)) in all.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        params += n;
        let local_n = local_n(&name, n);
        local += local_n;
        let (state, adamw) = (states[k], 2 * local_n);
        // ZeRO-1: this data-parallel rank keeps its chunk of every moment, or (GaLore) the
        // state of the parameters it owns.
        let (state, adamw) = match &owned {
            Some(mine) if mine[k] => (state, adamw),
            Some(_) => (0, 0),
            None => (per_rank(state), per_rank(adamw)),
        };
        optim += state;
        if is_block_matrix(&name) {
            block += n;
            block_optim += state;
            block_adamw += adamw;
        } else if name.contains(".encoder.") {
            enc += n;
        } else if shape.len() == 2 {
            emb += n;
        }
    }
    // Matmul FLOPs: every matrix but the embedding lookup (the tied head still multiplies).
    let h = m.hidden as f64;
    let head = (m.vocab() * m.hidden) as f64;
    // Experts and routed blocks count what one token multiplies on average.
    let matmul_params = m.active_block_matmul_params() + head + encoder_matmul as f64;
    // Scores and weighted values: 2 x 2 x seq_len x hidden per attention layer (PaLM's
    // accounting, no discount for the causal mask).
    let attention = 4.0 * m.attention_layers_per_token() * recipe.data.seq_len as f64 * h;
    let forward = 2.0 * matmul_params + attention;
    Ok(Plan {
        name: recipe.name().to_string(),
        optimizer: o.name,
        rank: o.rank,
        tp,
        dp,
        zero: recipe.parallel.zero == 1,
        params,
        embedding_params: emb,
        encoder_params: enc,
        teacher_params: teacher,
        block_params: block,
        weight_bytes: (local + teacher) * F32,
        grad_bytes: local * F32,
        optim_bytes: optim * F32,
        block_optim_bytes: block_optim * F32,
        block_optim_bytes_adamw: block_adamw * F32,
        forward_flops_per_token: forward,
        train_flops_per_token: 3.0 * forward,
        activations: Activations::of(
            recipe,
            tp,
            if m.linear == tern_model::LinearKind::Float {
                0
            } else {
                block
            },
        ),
    })
}

fn gib(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = match (self.optimizer, self.rank) {
            (OptimizerName::GaloreAdamw, Some(r)) => format!("galore_adamw rank {r}"),
            _ if self.zero => "adamw, moments split over the data-parallel ranks (zero 1)".into(),
            _ => "adamw".to_string(),
        };
        writeln!(
            f,
            "plan {} | {} | tp {} x dp {} | {opt}",
            self.name,
            if self.tp * self.dp == 1 {
                "1 process".to_string()
            } else {
                format!("{} processes", self.tp * self.dp)
            },
            self.tp,
            self.dp
        )?;
        writeln!(
            f,
            "parameters       {:>10.2} M (blocks {:.2} M, embedding + head {:.2} M)",
            self.params as f64 / 1e6,
            self.block_params as f64 / 1e6,
            self.embedding_params as f64 / 1e6
        )?;
        if self.encoder_params > 0 {
            writeln!(
                f,
                "distillation     {:>10.2} M in the student's encoders; the teacher adds {:.2} M (weights only)",
                self.encoder_params as f64 / 1e6,
                self.teacher_params as f64 / 1e6
            )?;
        }
        writeln!(f, "per rank (f32):")?;
        writeln!(f, "  weights        {:>10}", gib(self.weight_bytes))?;
        writeln!(f, "  gradients      {:>10}", gib(self.grad_bytes))?;
        writeln!(f, "  optimizer      {:>10}", gib(self.optim_bytes))?;
        if self.block_optim_bytes_adamw > 0 {
            let saving = 1.0 - self.block_optim_bytes as f64 / self.block_optim_bytes_adamw as f64;
            writeln!(
                f,
                "  optimizer, block matrices {} (AdamW {}: {:.1}% less)",
                gib(self.block_optim_bytes),
                gib(self.block_optim_bytes_adamw),
                100.0 * saving
            )?;
        }
        writeln!(
            f,
            "  total          {:>10}",
            gib(self.weight_bytes + self.grad_bytes + self.optim_bytes)
        )?;
        write!(
            f,
            "FLOPs per token  forward {:.3} G, training {:.3} G",
            self.forward_flops_per_token / 1e9,
            self.train_flops_per_token / 1e9
        )?;
        let a = &self.activations;
        write!(
            f,
            "\nactivations      a micro-batch of {} tokens per rank: {} ({} with recompute = \"block\") with the CPU's fused kernels, \
             {} ({}) with the cuda build's burn ops",
            a.tokens,
            gib(a.fused),
            gib(a.fused_recompute),
            gib(a.reference),
            gib(a.reference_recompute)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::param_infos;
    use crate::recipe::RecipeSource;
    use burn::backend::Flex;
    use tern_model::{LinearKind, Llama, ModelConfig};

    fn recipe(name: &str, sets: &[&str]) -> Recipe {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes"))
            .join(format!("{name}.toml"));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::load(&RecipeSource::File(path), &sets).unwrap()
    }

    #[test]
    fn shapes_are_the_models() {
        for tie in [false, true] {
            let c = ModelConfig {
                tie_embeddings: tie,
                ..ModelConfig::tiny(50, LinearKind::Ternary)
            };
            let built = param_infos::<Flex, _>(&Llama::<Flex>::new(&c, &Default::default()));
            let planned: Vec<(String, Vec<usize>)> =
                built.into_iter().map(|i| (i.name, i.shape)).collect();
            assert_eq!(c.param_shapes(), planned);
        }
    }

    #[test]
    fn adamw_and_galore_state_of_trilm_99m() {
        let a = plan(&recipe("trilm-99m", &[]), 1).unwrap();
        assert!((a.params as f64 / 1e6 - 99.74).abs() < 0.05, "{}", a.params);
        assert_eq!(a.optim_bytes, 2 * a.weight_bytes);
        // hidden 512, GLU 1280, rank 128: q/k/v/o keep 2 x 512 x 128 moments + a 128 x 512
        // projection instead of 2 x 512 x 512; gate/up/down 2 x 1280 x 128 + 128 x 512 instead
        // of 2 x 1280 x 512.
        let g = plan(
            &recipe(
                "trilm-99m",
                &["optim.name=\"galore_adamw\"", "optim.rank=128"],
            ),
            1,
        )
        .unwrap();
        let per_layer = 4 * (2 * 512 * 128 + 128 * 512) + 3 * (2 * 1280 * 128 + 512 * 128);
        assert_eq!(g.block_optim_bytes, 16 * per_layer * 4);
        assert_eq!(g.block_optim_bytes_adamw, a.block_optim_bytes);
        let saving = 1.0 - g.block_optim_bytes as f64 / g.block_optim_bytes_adamw as f64;
        assert!(saving > 0.6, "{saving}");
    }

    #[test]
    fn tensor_parallel_halves_the_blocks_only() {
        let one = plan(&recipe("trilm-1.1b", &[]), 1).unwrap();
        let two = plan(&recipe("trilm-1.1b", &["parallel.tp=2"]), 2).unwrap();
        let block = one.block_params * F32;
        assert_eq!(two.weight_bytes, one.weight_bytes - block / 2);
        assert!(plan(&recipe("trilm-1.1b", &["parallel.tp=2"]), 3).is_err());
    }

    /// trilm-99m at 2 x 512 tokens: 16 blocks of hidden 512, GLU 1280, 8 heads of 64 (keys and
    /// values too), vocab 50304, counted by hand from what each op keeps.
    #[test]
    fn activation_counts_of_trilm_99m() {
        let r = recipe("trilm-99m", &["train.micro_batch=2", "data.seq_len=512"]);
        let a = plan(&r, 1).unwrap().activations;
        assert_eq!(a.tokens, 1024);
        let (h, i, kv, heads, v, n) = (512, 1280, 512, 8, 50304, 16);
        let block = 4 * h + 2 + 2 * h + 2 * kv + heads + 3 * i;
        let head = 2 * h + 2 * v;
        let w = plan(&r, 1).unwrap().block_params / n;
        assert_eq!(a.fused, 4 * (1024 * (n * block + head) + n * w));
        assert_eq!(
            a.fused_recompute,
            4 * (1024 * ((n + 1) * h + block + head) + w)
        );
        assert!(a.reference > a.fused && a.reference_recompute < a.reference);
        assert!(a.reference - a.reference_recompute > a.fused - a.fused_recompute);
    }

    /// The vocabulary split divides the embedding's and the head's weights, gradients and
    /// moments by tp, and the logits kept for the backward pass; the sequence split divides the
    /// norms' and residuals' activations.
    #[test]
    fn vocabulary_and_sequence_splits_shrink_what_a_rank_holds() {
        let at = |sets: &[&str]| {
            let mut all = vec![
                "parallel.tp=2",
                "model.scale_groups=2",
                "train.micro_batch=2",
                "data.seq_len=512",
            ];
            all.extend_from_slice(sets);
            plan(&recipe("trilm-99m", &all), 2).unwrap()
        };
        let (plain, vocab) = (at(&[]), at(&["parallel.vocab=true"]));
        // trilm-99m is untied: embedding and head, 50304 x 512 each.
        let ends = 2 * 50304 * 512 * F32;
        assert_eq!(plain.weight_bytes - vocab.weight_bytes, ends / 2);
        assert_eq!(plain.optim_bytes - vocab.optim_bytes, ends);
        let logits = 2 * 50304 / 2 * 1024 * F32;
        assert_eq!(plain.activations.fused - vocab.activations.fused, logits);
        let both = at(&["parallel.vocab=true", "parallel.sequence=true"]);
        assert_eq!(both.weight_bytes, vocab.weight_bytes);
        // Per token: 16 blocks' norms 4h -> 4h/2 + 2h gathered (the same), the head's norm h
        // -> h/2; with recompute also the 17 kept inputs h -> h/2.
        assert_eq!(
            vocab.activations.fused - both.activations.fused,
            1024 * 256 * F32
        );
        assert_eq!(
            vocab.activations.fused_recompute - both.activations.fused_recompute,
            1024 * (17 * 256 + 256) * F32
        );
    }

    /// ZeRO-1 divides AdamW's moments (2 x 4 bytes a parameter) by the data-parallel size, and
    /// nothing else.
    #[test]
    fn zero1_splits_the_moments_over_dp() {
        let zero = |z: u8| {
            let r = recipe("trilm-99m", &[&format!("parallel.zero={z}")]);
            plan(&r, 4).unwrap()
        };
        let (a, b) = (zero(0), zero(1));
        assert!(b.zero && !a.zero);
        assert_eq!(a.weight_bytes, b.weight_bytes);
        assert_eq!(a.grad_bytes, b.grad_bytes);
        assert!(
            b.optim_bytes.abs_diff(a.optim_bytes / 4) <= 64,
            "{} {}",
            a.optim_bytes,
            b.optim_bytes
        );
        // GaLore keeps each parameter's state on its owner: the busiest of 2 ranks holds about
        // half (the embedding and the head, 50304 x 512 each, go to different ranks).
        let galore = |z: u8| {
            let sets = [
                "optim.name=\"galore_adamw\"".to_string(),
                "optim.rank=128".into(),
                format!("parallel.zero={z}"),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            plan(&recipe("trilm-99m", &sets), 2).unwrap()
        };
        let (g0, g1) = (galore(0), galore(1));
        let share = g1.optim_bytes as f64 / g0.optim_bytes as f64;
        assert!((0.5..0.52).contains(&share), "{share}");
        // On 4 ranks the busiest owner holds the embedding's moments alone: a whole parameter
        // is not split.
        let sets = [
            "optim.name=\"galore_adamw\"",
            "optim.rank=128",
            "parallel.zero=1",
        ];
        let four = plan(&recipe("trilm-99m", &sets), 4).unwrap();
        assert_eq!(four.optim_bytes, 2 * 50304 * 512 * F32);
    }
}
