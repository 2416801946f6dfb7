//! `tern data stats|head|bench`: what token shards hold, and how fast training reads them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use tern_data::shard::{Kind, ShardInfo, ShardReader};
use tern_data::{DataConfig, TextTokenizer, TrainData};

use crate::say;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Files, tokens, documents, token type, vocabulary and tokenizer hash of shards (.bin, .h5;
    /// files, directories or globs).
    Stats {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// End-of-document token that separates documents in TinyLlama's shards, which do not
        /// record boundaries (TinyLlama's is 2).
        #[arg(long, default_value_t = 2)]
        eos: u32,
    },
    /// The first N token ids of a shard, as a JSON array.
    Head {
        path: PathBuf,
        #[arg(long, default_value_t = 16)]
        tokens: usize,
    },
    /// Random-window read throughput of the training sampler over shards (warm page cache).
    Bench {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The tokenizer the shards were made with (ids are checked against it, as in training).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Samples read (in batches of --batch).
        #[arg(long, default_value_t = 200_000)]
        samples: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
}

/// Shard files under `paths` (files, directories searched recursively, globs), sorted.
fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let inputs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let files: Vec<PathBuf> = tern_data::source::expand(&inputs, "PATH")?
        .into_iter()
        .filter(|p| Kind::of(p).is_some())
        .collect();
    if files.is_empty() {
        bail!("no shard (*.bin, *.h5) under {paths:?}");
    }
    Ok(files)
}

/// Adds `v` to `list` unless it is there.
fn note(list: &mut Vec<String>, v: String) {
    if !list.contains(&v) {
        list.push(v);
    }
}

/// All tokens of a shard (no vocabulary check: stats reports the largest id instead).
fn all_tokens(r: &mut ShardReader, s: &ShardInfo) -> Result<Vec<u32>> {
    let mut t = vec![0; s.tokens as usize];
    r.read(s, 0, &mut t, usize::MAX)?;
    Ok(t)
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Stats { paths, eos } => {
            let files = shard_files(&paths)?;
            let mut r = ShardReader::default();
            let (mut tokens, mut docs, mut max_id) = (0u64, 0u64, 0u32);
            let (mut formats, mut dtypes, mut vocabs, mut hashes) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for f in &files {
                let s = ShardInfo::open(f)?;
                let t = all_tokens(&mut r, &s)?;
                tokens += s.tokens;
                docs += s
                    .documents
                    .unwrap_or_else(|| t.iter().filter(|&&x| x == eos).count() as u64);
                max_id = max_id.max(t.iter().copied().max().unwrap_or(0));
                note(&mut formats, s.kind.name().into());
                note(&mut dtypes, format!("{:?}", s.dtype).to_lowercase());
                if let Some(m) = &s.meta {
                    note(&mut vocabs, m.vocab_size.to_string());
                    note(&mut hashes, m.tokenizer_sha256.clone());
                }
            }
            // One value as itself; several (mixed shards) joined; none as null.
            let joined = |v: Vec<String>| match v.len() {
                0 => serde_json::Value::Null,
                1 => serde_json::from_str(&v[0]).unwrap_or_else(|_| v[0].clone().into()),
                _ => v.join(",").into(),
            };
            let stats = serde_json::json!({
                "format": formats.join(","),
                "files": files.len(),
                "tokens": tokens,
                "documents": docs,
                "dtype": dtypes.join(","),
                "vocab_size": joined(vocabs),
                "max_token_id": max_id,
                "tokenizer_sha256": joined(hashes),
            });
            say(&serde_json::to_string_pretty(&stats)?);
        }
        DataCommand::Head { path, tokens } => {
            let s = ShardInfo::open(&path)?;
            let mut t = vec![0; tokens.min(s.tokens as usize)];
            ShardReader::default().read(&s, 0, &mut t, usize::MAX)?;
            say(&serde_json::to_string(&t)?);
        }
        DataCommand::Bench {
            paths,
            tokenizer,
            seq_len,
            samples,
            batch,
        } => bench(paths, tokenizer, seq_len, samples, batch)?,
    }
    Ok(())
}

/// The trainer's read path: blend and shuffle, then one `pread` per block, ids checked.
fn bench(
    paths: Vec<PathBuf>,
    tokenizer: PathBuf,
    seq_len: usize,
    samples: usize,
    batch: usize,
) -> Result<()> {
    let inputs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let cfg = DataConfig {
        train: inputs.clone(),
        sources: vec![],
        validation: inputs,
        tokenizer: tokenizer.display().to_string(),
        seq_len,
        text_field: "text".into(),
        skip_sets: vec![],
        eos_token: "</s>".into(),
    };
    let tok = TextTokenizer::load(&tokenizer, &cfg.eos_token)?;
    let t0 = Instant::now();
    let mut data = TrainData::open(&cfg, &tok, 1)?;
    let open_s = t0.elapsed().as_secs_f64();
    let s = &data.sources[0];
    say(&format!(
        "data bench: {} shard(s), {} tokens, {} blocks of {} tokens; opened in {open_s:.2} s",
        s.shards.len(),
        s.tokens(),
        s.blocks(),
        seq_len + 1
    ));
    let batch = batch.max(1);
    let mut checksum = 0u64;
    let mut pass = |label: &str, start: u64| -> Result<()> {
        let t = Instant::now();
        let mut done = 0usize;
        while done < samples {
            let n = batch.min(samples - done);
            let blocks = data.samples(start + done as u64, n);
            let tokens = data.read(&blocks)?;
            checksum = checksum.wrapping_add(tokens[0] as u64);
            done += n;
        }
        let secs = t.elapsed().as_secs_f64();
        let toks = (samples * (seq_len + 1)) as f64;
        say(&format!(
            "{label}: {samples} random windows in {secs:.3} s: {:.1}M tokens/s, {:.0} windows/s",
            toks / secs / 1e6,
            samples as f64 / secs
        ));
        Ok(())
    };
    // The first pass reads the files into the page cache; the second is the warm figure.
    pass("cold or partly cached", 0)?;
    pass("warm page cache", samples as u64)?;
    say(&format!("(checksum {checksum})"));
    Ok(())
}
