//! `tern`: pretraining of ternary LLaMA models.

mod alloc;
mod bench;
mod bench_matmul;
mod ckpt;
mod data;
mod device;
mod eval;
mod export;
mod generate;
mod load;
mod logits;
mod plan;
mod prep;
mod quantize;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub use device::{compute_device, device_and_peak};

/// The compute backend: CUDA with `--features cuda`; otherwise the CPU backend flex (measured
/// fastest for a training step here, docs/backends.md), or ndarray with `--features ndarray`.
#[cfg(feature = "cuda")]
pub type Compute = burn::backend::Cuda;
#[cfg(all(not(feature = "cuda"), feature = "ndarray"))]
pub type Compute = burn::backend::NdArray;
#[cfg(all(not(feature = "cuda"), not(feature = "ndarray")))]
pub type Compute = burn::backend::Flex;
pub type TrainBackend = burn::backend::Autodiff<Compute>;

pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "ndarray-blas") {
        "ndarray+openblas"
    } else if cfg!(feature = "ndarray") {
        "ndarray"
    } else {
        "flex"
    }
}

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Distributed pretraining of ternary (1.58-bit) LLaMA models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML recipe (the embedded tiny recipe when none is given).
    Train(train::TrainArgs),
    /// Time training steps of a recipe's model on random tokens and print the figures.
    Bench(bench::BenchArgs),
    /// Validate a recipe and print its parameters, per-rank memory and FLOPs, building nothing.
    Plan(plan::PlanArgs),
    /// Inspect token shards (.bin, .h5) and time the training sampler's reads.
    Data(data::DataArgs),
    /// Tokenise SlimPajama-format JSONL(.zst) into token shards (TinyLlama's .bin or HDF5), or
    /// train a tokenizer (`tern prep tokenizer`).
    Prep(Box<prep::PrepArgs>),
    /// Inspect a checkpoint, or consolidate its parts into one safetensors file.
    Ckpt(ckpt::CkptArgs),
    /// Write a model's logits for given token ids (Hugging Face directory, tern checkpoint, or
    /// packed file: then on the packed-code kernel).
    Logits(logits::LogitsArgs),
    /// Export a trained model: packed ternary file, Hugging Face directory, or GGUF.
    Export(export::ExportArgs),
    /// Post-training quantization of a float model to 3-8 bits (GPTQ or round-to-nearest).
    Quantize(quantize::QuantizeArgs),
    /// Generate text from a prompt (packed file, checkpoint or Hugging Face directory).
    Generate(generate::GenerateArgs),
    /// Loss and perplexity of a model on held-out data (shards, text, or a recipe's validation).
    Eval(eval::EvalArgs),
}

/// Starts this process's part of the job: the device check, MPI (under a launcher), and with the
/// `cuda` feature NCCL for the tensor- and data-parallel groups.
pub fn start_job(recipe: &tern_train::Recipe) -> anyhow::Result<tern_dist::Dist> {
    device::check_driver()?;
    device::persist_kernel_caches();
    let dist = tern_dist::Dist::init(
        recipe.parallel.tp,
        recipe.parallel.dp,
        cfg!(feature = "cuda"),
    )?;
    set_rank(dist.topo.rank, dist.topo.world);
    Ok(dist)
}

/// Prints a line; a reader that went away (`| head`) is not an error.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

static RANK: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

/// Records this process's place in the job, for error messages.
pub fn set_rank(rank: usize, world: usize) {
    let _ = RANK.set((rank, world));
}

/// `rank R: ` inside a multi-process job, nothing otherwise.
fn rank_prefix() -> String {
    match RANK.get() {
        Some(&(r, w)) if w > 1 => format!("rank {r}: "),
        _ => String::new(),
    }
}

/// One `error: ...` line written with a single call, so that the launcher forwards it whole even
/// when MPI_Abort follows at once (MPICH's hydra dropped the tail of a line written piecewise).
fn say_error(msg: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let one_line = msg.replace('\n', " ");
    let _ = err.write_all(format!("error: {one_line}\n").as_bytes());
    let _ = err.flush();
}

fn main() -> ExitCode {
    // A panic is a bug, not a user error: one line that says so, not a backtrace. Inside an MPI
    // job it ends every rank at once (a panicking rank would otherwise leave the others waiting).
    std::panic::set_hook(Box::new(|info| {
        say_error(&format!(
            "{}internal error (please report it): {info}",
            rank_prefix()
        ));
        tern_dist::launch::abort_job(101);
    }));
    alloc::keep_freed_pages();
    let cli = Cli::parse();
    // This thread joins the kernels' thread pool: parallel work started here runs on it at
    // once, without handing the job to a sleeping worker and waiting on a futex (measured: the
    // wake-ups were 9 % of a tiny training step). The pool keeps one thread per core
    // (RAYON_NUM_THREADS overrides).
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Data(a) => data::run(a),
        Command::Prep(a) => prep::run(*a),
        Command::Ckpt(a) => ckpt::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say_error(&format!("{}{e:#}", rank_prefix()));
            // One rank's error ends the whole job instead of leaving the others in a collective.
            tern_dist::launch::abort_job(1);
            ExitCode::FAILURE
        }
    }
}
