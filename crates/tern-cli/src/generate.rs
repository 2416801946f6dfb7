//! `tern generate`: text from a prompt with a KV cache, streamed as it is sampled; or a chat-like
//! loop (`--interactive`) where each line continues the same context.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tern_infer::{generate, BurnDecoder, Conversation, Decode, InferModel, Sampler, SamplerConfig};

#[derive(Args)]
pub struct GenerateArgs {
    /// A packed file, a tern checkpoint (or run folder), or a Hugging Face directory.
    #[arg(long)]
    model: PathBuf,
    /// The text to continue (not needed with --interactive).
    #[arg(long)]
    prompt: Option<String>,
    /// tokenizer.json (default: the one packed with the model or named by its recipe).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability (1 = all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Penalty on tokens already in the context (1 = none).
    #[arg(long, default_value_t = 1.1)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read prompts from stdin, one a line; each continues the conversation so far.
    #[arg(long)]
    interactive: bool,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// How float activations meet packed ternary matrices: exact (f32) or int8 (faster,
    /// approximate; llama.cpp's way).
    #[arg(long, default_value = "exact", value_parser = crate::load::parse_activations)]
    activations: tern_infer::input::Activations,
    /// Print the generated token ids (one line, after the text).
    #[arg(long)]
    print_ids: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let cfg = SamplerConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    cfg.check()?;
    if a.prompt.is_none() && !a.interactive {
        bail!("give --prompt TEXT, or --interactive");
    }
    // Models of LLaMA blocks run packed; the other block kinds on the burn path.
    if let Some(b) = crate::load::for_burn(&a.model, a.tokenizer.as_deref())? {
        let tok = b.tokenizer()?;
        let eos = if a.ignore_eos { None } else { b.special()?.eos };
        return chat(&a, &BurnDecoder { model: b.model }, &tok, eos, cfg);
    }
    let loaded = crate::load::for_inference(&a.model, a.tokenizer.as_deref())?;
    let tok = loaded.tokenizer()?;
    let eos = if a.ignore_eos {
        None
    } else {
        loaded.special()?.eos
    };
    let mut model = InferModel::from_packed(loaded.packed)?;
    model.set_activations(a.activations);
    chat(&a, &model, &tok, eos, cfg)
}

/// The prompt's turn, then (`--interactive`) one turn per line of stdin.
fn chat<M: Decode>(
    a: &GenerateArgs,
    model: &M,
    tok: &tokenizers::Tokenizer,
    eos: Option<u32>,
    cfg: SamplerConfig,
) -> Result<()> {
    let mut sampler = Sampler::new(cfg);
    let mut conv = Conversation::new(model);
    let mut turn = |text: &str, conv: &mut Conversation<M::Cache>| -> Result<()> {
        let ids: Vec<u32> = tok
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            bail!("the prompt is empty after tokenization");
        }
        let mut out = std::io::stdout().lock();
        let mut shown = String::new();
        let mut generated = Vec::new();
        if !a.interactive {
            write!(out, "{text}")?;
        }
        let g = generate(model, conv, &ids, a.max_tokens, &mut sampler, eos, |t| {
            // Decode the whole continuation and print what is new: a token can be part of a
            // multi-byte character that only the next token completes.
            generated.push(t);
            if let Ok(s) = tok.decode(&generated, false) {
                if s.len() > shown.len() && s.starts_with(&shown) && !s.ends_with('\u{FFFD}') {
                    let _ = write!(out, "{}", &s[shown.len()..]);
                    let _ = out.flush();
                    shown = s;
                }
            }
        })?;
        if let Ok(s) = tok.decode(&g.tokens, false) {
            if s.len() > shown.len() && s.starts_with(&shown) {
                write!(out, "{}", &s[shown.len()..])?;
            }
        }
        writeln!(out)?;
        if a.print_ids {
            writeln!(out, "ids: {:?}", g.tokens)?;
        }
        eprintln!(
            "[{} prompt tokens in {:.2} s ({:.1} tokens/s); {} generated in {:.2} s ({:.1} tokens/s){}]",
            g.prompt_tokens,
            g.prompt_seconds,
            g.prompt_tokens as f64 / g.prompt_seconds.max(1e-9),
            g.tokens.len(),
            g.decode_seconds,
            g.tokens.len() as f64 / g.decode_seconds.max(1e-9),
            if g.stopped_at_eos { ", stopped at end of sequence" } else { "" }
        );
        Ok(())
    };
    if let Some(p) = &a.prompt {
        turn(p, &mut conv)?;
    }
    if a.interactive {
        eprintln!(
            "interactive: each line continues the context; an empty line or end of input quits"
        );
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
                break;
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                break;
            }
            turn(line, &mut conv)?;
        }
    }
    Ok(())
}
