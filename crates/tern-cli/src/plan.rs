//! `tern plan RECIPE`: a dry run that validates the recipe and prints what it costs.

use std::path::Path;

use anyhow::{anyhow, Result};
use clap::Args;
use tern_data::TextTokenizer;

use crate::train::RecipeArgs;

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Processes of the planned job (default: parallel.tp x parallel.dp, or parallel.tp).
    #[arg(long)]
    pub world: Option<usize>,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let mut recipe = a.recipe.load()?;
    if recipe.model.vocab_size.is_none() {
        // Only the tokenizer's vocabulary size is read: nothing is tokenised or built.
        let tok = &recipe.data.tokenizer;
        let t = TextTokenizer::load(Path::new(tok), &recipe.data.eos_token).map_err(|e| {
            anyhow!("model.vocab_size is not set and the tokenizer could not be read: {e:#}")
        })?;
        recipe.resolve_vocab(t.vocab_size).map_err(|e| anyhow!(e))?;
    }
    let p = &recipe.parallel;
    let world = a.world.unwrap_or(p.tp * p.dp.unwrap_or(1));
    let plan = tern_train::plan::plan(&recipe, world).map_err(|e| anyhow!(e))?;
    println!("{plan}");
    println!("{}", matmul_audit(&recipe));
    if recipe.model.linear == tern_model::LinearKind::Ternary {
        let student = recipe.distill.as_ref().map(|d| {
            tern_infer::convert::student_spec(&d.student(recipe.model.n_layers, recipe.train.seed))
        });
        println!("{}", packed_sizes(&recipe.model, student.as_ref()));
    }
    Ok(())
}

/// The products whose forward or backward inner dimension is 32 mod 64, which the cuda build
/// computes on zero-padded operands (burn 0.21's CUDA matmul is wrong there).
fn matmul_audit(recipe: &tern_train::Recipe) -> String {
    let all = tern_train::products::step_products(recipe);
    let hits: Vec<String> = all
        .iter()
        .filter(|p| p.hits_the_rule())
        .map(|p| format!("{} {}x{}x{}", p.what, p.m, p.k, p.n))
        .collect();
    if hits.is_empty() {
        format!(
            "matmuls          {} shapes a step, none with an inner dimension of 32 mod 64",
            all.len()
        )
    } else {
        format!(
            "matmuls          {} shapes a step; padded on CUDA (inner dimension 32 mod 64): {}",
            all.len(),
            hits.join(", ")
        )
    }
}

/// What `tern export --format packed` would write for this model (tensor bytes; the header and
/// tokenizer add a few hundred KB), for the two code encodings; a student's encoders are float.
fn packed_sizes(m: &tern_model::ModelConfig, student: Option<&tern_pack::StudentSpec>) -> String {
    use tern_pack::file::FloatDtype;
    use tern_pack::{Encoding, SizeReport};
    let mut parts = Vec::new();
    for (enc, dtype, label) in [
        (Encoding::Bits2, FloatDtype::F32, "2bit + f32"),
        (Encoding::Base3, FloatDtype::F16, "base3 + f16"),
    ] {
        let mut r = SizeReport::default();
        for (name, shape) in tern_infer::packed_shapes(m, student) {
            match tern_infer::convert::ternary_axis(m, student, &name) {
                Some(_) => r.add_ternary(shape[0], shape[1], m.scale_groups, enc),
                None => r.add_float(shape.iter().product(), dtype),
            }
        }
        parts.push(format!(
            "{label}: {:.1} MB, {:.3} bits/param ({:.3} in the ternary matrices), {:.2}x smaller than fp32",
            r.bytes() as f64 / 1e6,
            r.bits(),
            r.ternary_bits(),
            r.vs_fp32()
        ));
    }
    format!("packed export    {}", parts.join(" | "))
}
