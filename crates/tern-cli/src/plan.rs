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
        recipe.model.vocab_size = Some(t.vocab_size);
    }
    let p = &recipe.parallel;
    let world = a.world.unwrap_or(p.tp * p.dp.unwrap_or(1));
    let plan = tern_train::plan::plan(&recipe, world).map_err(|e| anyhow!(e))?;
    println!("{plan}");
    Ok(())
}
