//! `tern prep tokenizer`: a byte-level BPE tokenizer trained on a corpus that has none.
//!
//! The same tokenizer as GPT-2's family and as `data-prep/make_sample.py` makes with Python's
//! `tokenizers`: byte-level pre-tokenizer without a prefix space (lossless: decoding gives the
//! text back byte for byte), special tokens `<unk>`, `<s>`, `</s>` at ids 0, 1, 2 as in LLaMA and
//! TinyLlama, so `</s>` is the EOS that `tern prep` appends.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::source;

pub const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];

pub struct TokenizerOptions {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub vocab_size: usize,
    pub text_field: String,
    pub skip_sets: Vec<String>,
    /// Text read at most (documents are whole): tokenizers need a sample, not the corpus.
    pub max_bytes: u64,
}

/// What the training read.
#[derive(Debug)]
pub struct TokenizerReport {
    pub documents: usize,
    pub text_bytes: u64,
    pub bad_lines: usize,
    pub vocab_size: usize,
}

/// Reads documents (in file order, up to `max_bytes`) and trains; writes `out` atomically.
pub fn train(o: &TokenizerOptions) -> Result<TokenizerReport> {
    if o.vocab_size < 256 + SPECIAL_TOKENS.len() {
        bail!(
            "--vocab-size {}: a byte-level vocabulary needs at least {} entries (256 bytes and {} special tokens)",
            o.vocab_size,
            256 + SPECIAL_TOKENS.len(),
            SPECIAL_TOKENS.len()
        );
    }
    let files = source::expand(&o.inputs, "--input")?;
    let mut docs: Vec<String> = Vec::new();
    let (mut bytes, mut bad) = (0u64, 0usize);
    'files: for f in files.iter().filter(|f| crate::shard::Kind::of(f).is_none()) {
        let mut full = false;
        source::for_each_line(f, |_, line| {
            if full {
                return Ok(());
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                bad += 1;
                return Ok(());
            };
            let set = v
                .pointer("/meta/redpajama_set_name")
                .and_then(|s| s.as_str());
            if set.is_some_and(|s| o.skip_sets.iter().any(|k| k == s)) {
                return Ok(());
            }
            let Some(text) = v.get(&o.text_field).and_then(|t| t.as_str()) else {
                bad += 1;
                return Ok(());
            };
            bytes += text.len() as u64;
            docs.push(text.to_string());
            full = bytes >= o.max_bytes;
            Ok(())
        })?;
        if full {
            break 'files;
        }
    }
    if docs.is_empty() {
        bail!(
            "--input: no document with a string field {:?}",
            o.text_field
        );
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(o.vocab_size)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(true, false, true).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let n = docs.len();
    tok.train(&mut trainer, docs.into_iter())
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let vocab_size = tok.get_vocab_size(true);
    save(&tok, &o.out)?;
    Ok(TokenizerReport {
        documents: n,
        text_bytes: bytes,
        bad_lines: bad,
        vocab_size,
    })
}

fn save<M, N, PT, PP, D>(tok: &tokenizers::TokenizerImpl<M, N, PT, PP, D>, out: &Path) -> Result<()>
where
    M: serde::Serialize + tokenizers::Model,
    N: serde::Serialize + tokenizers::Normalizer,
    PT: serde::Serialize + tokenizers::PreTokenizer,
    PP: serde::Serialize + tokenizers::PostProcessor,
    D: serde::Serialize + tokenizers::Decoder,
{
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    tok.save(&tmp, false)
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::TextTokenizer;

    fn sample() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample")
    }

    /// `data/sample/tokenizer.json` was trained by Python's `tokenizers` on the sample's train
    /// split (data-prep/make_sample.py) with the same settings: the same vocabulary and merges.
    #[test]
    fn matches_the_python_trained_sample_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tok/tokenizer.json");
        let r = train(&TokenizerOptions {
            inputs: vec![sample().join("train").display().to_string()],
            out: out.clone(),
            vocab_size: 4096,
            text_field: "text".into(),
            skip_sets: vec![],
            max_bytes: u64::MAX,
        })
        .unwrap();
        assert_eq!(r.vocab_size, 4096);
        let model = |p: &Path| -> serde_json::Value {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            v["model"].clone()
        };
        let (ours, theirs) = (model(&out), model(&sample().join("tokenizer.json")));
        assert_eq!(ours["vocab"], theirs["vocab"]);
        assert_eq!(ours["merges"], theirs["merges"]);
        // Lossless, and `</s>` is id 2.
        let tok = TextTokenizer::load(&out, "</s>").unwrap();
        assert_eq!(tok.eos_id, 2);
        let text = "Ternary weights: {-1, 0, 1} × α — naïve café 🙂\n\ttabs";
        let ids = tok.encode_batch(vec![text.to_string()]).unwrap();
        assert_eq!(tok.decode(&ids[0]).unwrap(), text);
    }

    #[test]
    fn refuses_what_it_cannot_train_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"body\": \"x\"}\nnot json\n").unwrap();
        let o = |vocab| TokenizerOptions {
            inputs: vec![dir.path().display().to_string()],
            out: dir.path().join("t.json"),
            vocab_size: vocab,
            text_field: "text".into(),
            skip_sets: vec![],
            max_bytes: u64::MAX,
        };
        let e = format!("{:#}", train(&o(100)).unwrap_err());
        assert!(e.contains("--vocab-size 100"), "{e}");
        let e = format!("{:#}", train(&o(1000)).unwrap_err());
        assert!(
            e.contains("no document with a string field \"text\""),
            "{e}"
        );
        assert!(!dir.path().join("t.json").exists());
    }
}
