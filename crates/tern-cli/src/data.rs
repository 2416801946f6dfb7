//! `tern data stats|head`: what token shards hold.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use tern_data::litpkds;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Files, tokens, documents and token type of shards (files or directories of them).
    Stats {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// End-of-document token that separates documents (TinyLlama's is 2).
        #[arg(long, default_value_t = 2)]
        eos: u32,
    },
    /// The first N token ids of a shard, as a JSON array.
    Head {
        path: PathBuf,
        #[arg(long, default_value_t = 16)]
        tokens: usize,
    },
}

/// Shard files under `paths` (files, directories searched recursively, globs), sorted.
fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let inputs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let files: Vec<PathBuf> = tern_data::source::expand(&inputs, "PATH")?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    if files.is_empty() {
        bail!("no shard (*.bin) under {paths:?}");
    }
    Ok(files)
}

/// Prints a line; a reader that went away (`| head`) is not an error.
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Stats { paths, eos } => {
            let files = shard_files(&paths)?;
            let (mut tokens, mut docs, mut max_id) = (0usize, 0usize, 0u32);
            let mut dtypes = Vec::new();
            for f in &files {
                let (h, t) = litpkds::read_tokens(f, None)?;
                tokens += t.len();
                docs += t.iter().filter(|&&x| x == eos).count();
                max_id = max_id.max(t.iter().copied().max().unwrap_or(0));
                let d = format!("{:?}", h.dtype).to_lowercase();
                if !dtypes.contains(&d) {
                    dtypes.push(d);
                }
            }
            let stats = serde_json::json!({
                "format": "litpkds",
                "files": files.len(),
                "tokens": tokens,
                "documents": docs,
                "dtype": dtypes.join(","),
                "max_token_id": max_id,
                "eos": eos,
                "tokenizer_sha256": serde_json::Value::Null,
            });
            say(&serde_json::to_string_pretty(&stats)?);
        }
        DataCommand::Head { path, tokens } => {
            let (_, t) = litpkds::read_tokens(&path, None)?;
            let n = tokens.min(t.len());
            say(&serde_json::to_string(&t[..n])?);
        }
    }
    Ok(())
}
