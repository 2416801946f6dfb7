use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use tern_train::{Recipe, RecipeSource, Resume, TrainOptions};

use crate::TrainBackend;

/// The tiny recipe compiled into the binary: `tern train` with no recipe runs it.
const TINY: &str = include_str!("../../../recipes/tiny.toml");

#[derive(Args)]
pub struct RecipeArgs {
    /// Recipe file (TOML); the embedded `tiny` recipe when omitted.
    pub recipe: Option<PathBuf>,
    /// Override any recipe key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl RecipeArgs {
    pub fn load(&self) -> Result<Recipe> {
        let source = match &self.recipe {
            Some(p) => RecipeSource::File(p.clone()),
            None => RecipeSource::Embedded {
                name: "tiny".into(),
                text: TINY.into(),
                base: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes")),
            },
        };
        Recipe::load(&source, &self.overrides)
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Run directory (default: `run.dir`, else `runs/<recipe name>`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// `auto` continues from the newest complete checkpoint of the run directory (a fresh start
    /// when there is none); a path resumes from that checkpoint directory.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let recipe = a.recipe.load()?;
    let dist = crate::start_job(&recipe)?;
    let main = dist.topo.is_main();
    let run_dir = recipe.run_dir(a.run_dir.as_deref());
    let resume = a.resume.map(|r| {
        if r == "auto" {
            Resume::Auto
        } else {
            Resume::Path(PathBuf::from(r))
        }
    });
    // SIGTERM (what Slurm sends before a time limit, and `kill`'s default) ends the run at the
    // next step with a checkpoint; the process then exits 0.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .map_err(|e| anyhow::anyhow!("installing the SIGTERM handler: {e}"))?;
    let precision =
        tern_train::recipe::PrecisionName::resolve(recipe.train.precision, cfg!(feature = "cuda"));
    let (device_name, peak_tflops) = crate::device_and_peak(&dist.topo, &recipe, precision);
    let opts = TrainOptions {
        precision,
        run_dir: run_dir.clone(),
        resume,
        stop: Some(stop),
        device_name,
        peak_tflops,
    };
    if main {
        println!(
            "tern {} | backend {} | device {}{} | products in {}",
            env!("CARGO_PKG_VERSION"),
            crate::backend_name(),
            opts.device_name,
            opts.peak_tflops
                .map_or(String::new(), |p| format!(" (peak {p} TFLOP/s)")),
            format!("{:?}", opts.precision).to_lowercase()
        );
    }
    let device = crate::compute_device(&dist.topo)?;
    let s = tern_train::train::<TrainBackend>(&recipe, &opts, &device, &dist)?;
    if !main {
        return Ok(());
    }
    println!(
        "done: steps {}..{} | last loss {:.4} | val loss {} | {} tokens | run dir {}",
        s.start_step,
        s.steps,
        s.last_loss,
        s.last_val_loss
            .map_or("-".to_string(), |v| format!("{v:.4}")),
        s.tokens,
        run_dir.display()
    );
    Ok(())
}
