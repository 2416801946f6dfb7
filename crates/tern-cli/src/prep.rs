//! `tern prep`: SlimPajama-format JSONL(.zst) to token shards (TinyLlama's packed `.bin`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use tern_data::prep::{prep, PrepOptions};
use tern_data::TextTokenizer;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// TinyLlama's packed `.bin` (LITPKDS), byte for byte.
    Litpkds,
    /// HDF5 token shards (not written yet).
    Hdf5,
}

#[derive(Args)]
pub struct PrepArgs {
    /// Input files, directories (searched for *.jsonl and *.jsonl.zst) or globs.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// A Hugging Face tokenizer.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "litpkds")]
    pub format: Format,
    /// First part of the shard names (`train`, `validation`).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Dataset name in the shard names (TinyLlama: slimpajama, starcoder).
    #[arg(long, default_value = "slimpajama")]
    pub name: String,
    /// Tokens per shard (TinyLlama: 2049 x 1024).
    #[arg(long, default_value_t = tern_data::litpkds::TINYLLAMA_CHUNK)]
    pub chunk_size: usize,
    /// Worker threads (input files are split between them); default: the machine's cores.
    #[arg(long)]
    pub workers: Option<usize>,
    /// JSON field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// SlimPajama sets (meta.redpajama_set_name) to leave out (repeatable).
    #[arg(long = "skip-set", default_values_t = ["RedPajamaGithub".to_string()])]
    pub skip_sets: Vec<String>,
    /// End-of-document token, looked up in the tokenizer.
    #[arg(long, default_value = "</s>")]
    pub eos: String,
    /// Write each worker's last partial shard, padded with EOS (TinyLlama drops it).
    #[arg(long)]
    pub keep_remainder: bool,
}

pub fn run(a: PrepArgs) -> Result<()> {
    if a.format == Format::Hdf5 {
        bail!("--format hdf5: HDF5 shards are not written yet; use --format litpkds");
    }
    let tok = TextTokenizer::load(&a.tokenizer, &a.eos)?;
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let o = PrepOptions {
        inputs: a.input,
        out: a.out,
        split: a.split,
        name: a.name,
        chunk_size: a.chunk_size,
        workers,
        text_field: a.text_field,
        skip_sets: a.skip_sets,
        keep_remainder: a.keep_remainder,
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "prep {bar:40} {bytes}/{total_bytes} of input, {elapsed}",
        )
        .expect("a valid template"),
    );
    let s = prep(&o, &tok, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let docs = s.total(|r| r.documents);
    let tokens = s.total(|r| r.tokens_written);
    let dropped = s.total(|r| r.tokens_dropped);
    let text = s.total(|r| r.text_bytes) as f64;
    let shards = s.workers.iter().map(|r| r.shards.len()).sum::<usize>();
    let bad = s.total(|r| r.bad_lines);
    println!(
        "prep: {} worker(s) ran, {} already done | {docs} documents ({} skipped sets), {shards} shards, \
         {tokens} tokens written, {dropped} dropped (partial last chunks) | {:.1} s, {:.2} MB text/s, {:.0} tokens/s",
        s.workers.len(),
        s.skipped_workers,
        s.total(|r| r.skipped_documents),
        s.seconds,
        text / 1e6 / s.seconds.max(1e-9),
        (tokens + dropped) as f64 / s.seconds.max(1e-9),
    );
    if bad > 0 {
        let first = s.workers.iter().find_map(|r| r.first_bad_line.clone());
        println!(
            "prep: {bad} malformed line(s) skipped; first: {}",
            first.unwrap_or_default()
        );
    }
    Ok(())
}
