//! `tern prep`: SlimPajama-format JSONL(.zst) to token shards (TinyLlama's packed `.bin` or
//! tern's HDF5); `tern prep tokenizer`: a BPE tokenizer for a corpus that has none.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use tern_data::prep::{prep, PrepOptions};
use tern_data::shard::Kind;
use tern_data::train_tokenizer::{self, TokenizerOptions};
use tern_data::TextTokenizer;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// TinyLlama's packed `.bin` (LITPKDS), byte for byte.
    Litpkds,
    /// tern's HDF5 shards: whole documents, boundaries and tokenizer hash kept (h5py reads them).
    Hdf5,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PrepArgs {
    #[command(subcommand)]
    pub command: Option<PrepCommand>,
    /// Input files, directories (searched for *.jsonl and *.jsonl.zst) or globs.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// A Hugging Face tokenizer.json.
    #[arg(long, required = true)]
    pub tokenizer: Option<PathBuf>,
    /// Output directory.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "litpkds")]
    pub format: Format,
    /// First part of the shard names (`train`, `validation`).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Dataset name in the shard names (TinyLlama: slimpajama, starcoder).
    #[arg(long, default_value = "slimpajama")]
    pub name: String,
    /// Tokens per shard (TinyLlama: 2049 x 1024; HDF5 shards end at the next document end).
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

#[derive(Subcommand)]
pub enum PrepCommand {
    /// Train a byte-level BPE tokenizer (special tokens <unk> <s> </s> = 0 1 2) on a corpus.
    Tokenizer(TokenizerArgs),
}

#[derive(Args)]
pub struct TokenizerArgs {
    /// Input files, directories (searched for *.jsonl and *.jsonl.zst) or globs.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// Where to write the tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 32000)]
    pub vocab_size: usize,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    #[arg(long = "skip-set", default_values_t = ["RedPajamaGithub".to_string()])]
    pub skip_sets: Vec<String>,
    /// Text to train on, at most (MB; whole documents, in file order).
    #[arg(long, default_value_t = 1000)]
    pub max_mb: u64,
}

fn run_tokenizer(a: TokenizerArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let r = train_tokenizer::train(&TokenizerOptions {
        inputs: a.input,
        out: a.out.clone(),
        vocab_size: a.vocab_size,
        text_field: a.text_field,
        skip_sets: a.skip_sets,
        max_bytes: a.max_mb.saturating_mul(1_000_000),
    })?;
    println!(
        "prep tokenizer: {} documents ({:.1} MB of text, {} malformed lines skipped) -> {} ({} tokens) in {:.1} s",
        r.documents,
        r.text_bytes as f64 / 1e6,
        r.bad_lines,
        a.out.display(),
        r.vocab_size,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(a: PrepArgs) -> Result<()> {
    if let Some(PrepCommand::Tokenizer(t)) = a.command {
        return run_tokenizer(t);
    }
    // clap requires both unless a subcommand is given.
    let (Some(tokenizer), Some(out)) = (a.tokenizer, a.out) else {
        anyhow::bail!("--tokenizer and --out are required");
    };
    let tok = TextTokenizer::load(&tokenizer, &a.eos)?;
    let workers = a
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let o = PrepOptions {
        inputs: a.input,
        out,
        split: a.split,
        name: a.name,
        chunk_size: a.chunk_size,
        format: match a.format {
            Format::Litpkds => Kind::Litpkds,
            Format::Hdf5 => Kind::Hdf5,
        },
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
