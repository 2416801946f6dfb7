//! The matrix products of one training step of a recipe, as one rank of its tensor-parallel group
//! runs them: what `tern plan` audits against burn 0.21's CUDA matmul rule (an inner dimension of
//! 32 mod 64 gives wrong results; `tern_kernels::guard` pads such products).

use tern_kernels::guard;
use tern_parallel::TpLayout;

use tern_model::ModelConfig;

use crate::recipe::Recipe;

/// `[m, k] @ [k, n]`, `calls` times in a forward pass (each over `batch` matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    /// The layer's name without its index (`self_attn.q_proj`, `attention scores`, `lm_head`).
    pub what: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub batch: usize,
    pub calls: usize,
}

impl Product {
    /// The inner dimensions of the forward product and of the two backward ones (`dA = dC B^T`
    /// sums over `n`, `dB = A^T dC` over `m`).
    pub fn inner_dims(&self) -> [usize; 3] {
        [self.k, self.n, self.m]
    }

    /// Some inner dimension, forward or backward, is 32 mod 64.
    pub fn hits_the_rule(&self) -> bool {
        self.inner_dims().into_iter().any(guard::is_unsafe)
    }

    /// The dimensions the guard computes it with.
    pub fn guarded(&self) -> Self {
        Self {
            m: guard::safe_dim(self.m),
            k: guard::safe_dim(self.k),
            n: guard::safe_dim(self.n),
            ..self.clone()
        }
    }
}

/// Every product of a forward pass of one micro-batch of `recipe` (the backward ones follow
/// from them).
pub fn step_products(recipe: &Recipe) -> Vec<Product> {
    let encoders = match &recipe.distill {
        Some(d) => d.encoder_shapes(&recipe.model),
        None => vec![],
    };
    products(
        &recipe.model,
        recipe.parallel.tp,
        recipe.parallel.layout(),
        recipe.train.micro_batch,
        recipe.data.seq_len,
        encoders,
    )
}

/// The products of one forward pass of `batch` sequences of `seq` tokens through model `m` on one
/// rank of `tp` split as `layout` says: each layer's seven projections on this rank's shard, attention's scores and
/// weighted values per local head, the LM head (or the tied embedding), and the `encoders` of a
/// distillation student (their parameter shapes).
pub fn products(
    m: &ModelConfig,
    tp: usize,
    layout: TpLayout,
    batch: usize,
    seq: usize,
    encoders: Vec<(String, Vec<usize>)>,
) -> Vec<Product> {
    let rows = batch * seq;
    // Under sequence parallelism alone the head sees this rank's positions only.
    let head_rows = match layout.sequence && !layout.vocab && tp > 1 {
        true => rows / tp,
        false => rows,
    };
    let mut out: Vec<Product> = Vec::new();
    let mut add = |what: String, [m, k, n]: [usize; 3], batch: usize, calls: usize| {
        let same = |p: &&mut Product| (&p.what, p.m, p.k, p.n, p.batch) == (&what, m, k, n, batch);
        match out.iter_mut().find(same) {
            Some(p) => p.calls += calls,
            None => out.push(Product {
                what,
                m,
                k,
                n,
                batch,
                calls,
            }),
        }
    };
    for (name, shape) in m.param_shapes().iter().chain(&encoders) {
        // Projections, experts' numbered ones (`moa.q_proj.2.weight`) included.
        let is_weight = name.ends_with("_proj.weight")
            || (name.contains("_proj.") && name.ends_with(".weight"))
            || name.ends_with(".encoder.fc1")
            || name.ends_with(".encoder.fc2")
            || name == "lm_head.weight";
        if shape.len() != 2 || !is_weight {
            continue;
        }
        let (mut d_out, mut d_in) = (shape[0], shape[1]);
        match layout.shard_dim(name).filter(|_| tp > 1) {
            Some(0) => d_out /= tp,
            Some(_) => d_in /= tp,
            None => {}
        }
        let r = if name == "lm_head.weight" {
            head_rows
        } else {
            rows
        };
        add(layer_free(name), [r, d_in, d_out], 1, 1);
    }
    if m.tie_embeddings {
        let v = if layout.vocab && tp > 1 {
            m.vocab() / tp
        } else {
            m.vocab()
        };
        add("lm_head (tied)".into(), [head_rows, m.hidden, v], 1, 1);
    }
    let hd = m.head_dim();
    let heads = batch * m.n_heads / tp;
    add("attention scores".into(), [seq, hd, seq], heads, m.n_layers);
    add("attention values".into(), [seq, seq, hd], heads, m.n_layers);
    out
}

/// `layers.3.mlp.up_proj.weight` -> `mlp.up_proj`.
fn layer_free(name: &str) -> String {
    let name = name.strip_suffix(".weight").unwrap_or(name);
    match name.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
        Some((_, within)) => within.to_string(),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::RecipeSource;

    fn recipe(path: &std::path::Path, sets: &[String]) -> Option<Recipe> {
        Recipe::load(&RecipeSource::File(path.to_path_buf()), sets).ok()
    }

    /// Every Spectra recipe (TriLM and FloatLM) at every tensor-parallel size 1..8 that it
    /// accepts: the products that hit the rule are found, and the guard's dimensions never do.
    #[test]
    fn no_spectra_product_reaches_the_matmul_with_an_unsafe_inner_dimension() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes"));
        let mut seen = 0;
        let mut hits = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("trilm-") || name.starts_with("floatlm-")) {
                continue;
            }
            for tp in 1..=8 {
                let Some(r) = recipe(&path, &[format!("parallel.tp={tp}")]) else {
                    continue;
                };
                seen += 1;
                for p in step_products(&r) {
                    assert!(!p.guarded().hits_the_rule(), "{name} tp {tp}: {p:?}");
                    if p.hits_the_rule() {
                        hits.push(format!("{name} tp={tp} {} {}x{}x{}", p.what, p.m, p.k, p.n));
                    }
                }
            }
        }
        eprintln!("{seen} cases; products that hit the rule: {hits:#?}");
        // 18 recipes, each at tp 1 and 2 at least (head counts rule out some of the others).
        assert!(seen >= 18 * 2, "{seen} recipe x tp cases");
        // floatlm-99m's 1280-wide GLU over 8 ranks: 160-wide shards.
        let glu = [
            "gate_proj 32768x512x160",
            "up_proj 32768x512x160",
            "down_proj 32768x160x512",
        ];
        for g in glu {
            assert!(
                hits.contains(&format!("floatlm-99m tp=8 mlp.{g}")),
                "{hits:?}"
            );
        }
    }
}
