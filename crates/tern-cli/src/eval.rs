//! `tern eval`: loss and perplexity of a model on held-out data, read in order in blocks of
//! `seq_len + 1` tokens exactly as training reads its validation data (so on the same blocks it
//! reproduces a run's `val_loss`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use tern_data::{DataConfig, TextTokenizer, ValData};
use tern_infer::{InferModel, KvCache};

#[derive(Args)]
pub struct EvalArgs {
    /// A packed file, a tern checkpoint (or run folder), or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// Held-out data: token shards (.bin, .h5), text (.jsonl, .jsonl.zst), directories or globs.
    #[arg(long, num_args = 1..)]
    data: Vec<String>,
    /// Use this recipe's validation data, tokenizer and sequence length instead of --data.
    #[arg(long, conflicts_with = "data")]
    recipe: Option<PathBuf>,
    /// Tokens per evaluated sequence (default: the recipe's, or the checkpoint's).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Evaluate only the first N blocks.
    #[arg(long)]
    max_blocks: Option<usize>,
    /// tokenizer.json (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// How float activations meet packed ternary matrices: exact (f32) or int8 (faster,
    /// approximate; llama.cpp's way).
    #[arg(long, default_value = "exact", value_parser = crate::load::parse_activations)]
    activations: tern_infer::input::Activations,
    /// End-of-document token (for text data).
    #[arg(long, default_value = "</s>")]
    eos_token: String,
}

/// Token data at `paths` (shards or text, read in order as validation data is), tokenized with
/// the model's tokenizer, in blocks of the given sequence length or the model's training one.
pub fn data_at(
    loaded: &crate::load::Loaded,
    paths: &[String],
    seq_len: Option<usize>,
    eos_token: &str,
    flag: &str,
) -> Result<(DataConfig, TextTokenizer)> {
    let Some(seq_len) = seq_len.or(loaded.seq_len) else {
        bail!(
            "{}: no training sequence length known; pass --seq-len (for {flag})",
            loaded.source.display()
        );
    };
    let Some(text) = &loaded.tokenizer else {
        bail!(
            "{}: no tokenizer with the model; pass --tokenizer (for {flag})",
            loaded.source.display()
        );
    };
    let tok = TextTokenizer::from_bytes(text.as_bytes(), "the model's tokenizer", eos_token)?;
    let dc: DataConfig = serde_json::from_value(serde_json::json!({
        "validation": paths,
        "tokenizer": "",
        "seq_len": seq_len,
        "eos_token": eos_token,
    }))?;
    Ok((dc, tok))
}

pub fn run(a: EvalArgs) -> Result<()> {
    let loaded = crate::load::for_inference(&a.model, a.tokenizer.as_deref())?;
    let (dc, tok) = match &a.recipe {
        Some(r) => {
            let recipe =
                tern_train::Recipe::load(&tern_train::recipe::RecipeSource::File(r.clone()), &[])?;
            let mut dc = recipe.data;
            if let Some(s) = a.seq_len {
                dc.seq_len = s;
            }
            let tok = TextTokenizer::load(std::path::Path::new(&dc.tokenizer), &dc.eos_token)?;
            (dc, tok)
        }
        None => {
            if a.data.is_empty() {
                bail!("give --data SHARDS (or --recipe RECIPE for its validation data)");
            }
            data_at(&loaded, &a.data, a.seq_len, &a.eos_token, "--data")?
        }
    };
    if dc.seq_len < 1 {
        bail!("--seq-len must be at least 1");
    }
    if a.max_blocks == Some(0) {
        bail!("--max-blocks must be at least 1");
    }
    let mut model = InferModel::from_packed(loaded.packed)?;
    model.set_activations(a.activations);
    if tok.vocab_size > model.vocab() {
        bail!(
            "the tokenizer has {} tokens; the model's vocabulary is {}",
            tok.vocab_size,
            model.vocab()
        );
    }
    let mut val = ValData::open(&dc, &tok)?;
    let blocks = val.source.blocks() as usize;
    let n = a.max_blocks.map_or(blocks, |m| m.min(blocks));
    let len = dc.seq_len + 1;
    let vocab = model.vocab();
    let start = Instant::now();
    let (mut nll, mut count) = (0f64, 0usize);
    for b in 0..n {
        let block = val.read(b as u64, 1)?;
        let mut cache = KvCache::new(model.config.n_layers);
        let logits = model.forward(&block[..len - 1], &mut cache, true)?;
        for (row, &target) in logits.chunks(vocab).zip(&block[1..]) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[target as usize] as f64;
            count += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let loss = nll / count.max(1) as f64;
    crate::say(&format!(
        "eval {} | {n} blocks of {} tokens ({count} predictions) | loss {loss:.6} | perplexity {:.4} | {:.0} tokens/s",
        loaded.source.display(),
        dc.seq_len,
        loss.exp(),
        count as f64 / secs
    ));
    Ok(())
}
