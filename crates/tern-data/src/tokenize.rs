//! Tokenising SlimPajama-format documents with a Hugging Face `tokenizer.json`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::source;

/// A `tokenizers` tokenizer with the ids tern needs.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_id: u32,
    pub vocab_size: usize,
    /// sha256 of the tokenizer file, recorded with every run.
    pub sha256: String,
}

impl TextTokenizer {
    pub fn load(path: &Path, eos_token: &str) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("data.tokenizer: reading {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string(), eos_token)
    }

    /// A tokenizer.json's bytes; `label` names it in errors.
    pub fn from_bytes(bytes: &[u8], label: &str, eos_token: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| anyhow!("data.tokenizer: {label} is not a tokenizer.json: {e}"))?;
        let eos_id = inner
            .token_to_id(eos_token)
            .ok_or_else(|| anyhow!("data.eos_token: {eos_token:?} is not in {label}"))?;
        let vocab_size = inner.get_vocab_size(true);
        let sha256 = format!("{:x}", Sha256::digest(bytes));
        Ok(Self {
            inner,
            eos_id,
            vocab_size,
            sha256,
        })
    }

    pub fn encode_batch(&self, docs: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .inner
            .encode_batch(docs, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding: {e}"))
    }
}

/// A tokenised split: documents concatenated, each followed by EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    pub documents: usize,
    pub files: Vec<PathBuf>,
}

/// Documents are tokenised in batches of this many (the tokenizer spreads a batch over the cores).
const BATCH_DOCS: usize = 64;

/// Reads and tokenises text files (`.jsonl`, `.jsonl.zst`) in order, EOS after every document.
pub fn tokenize_text(
    cfg: &DataConfig,
    tok: &TextTokenizer,
    files: &[PathBuf],
) -> Result<TokenStream> {
    let mut tokens = Vec::new();
    let mut documents = 0;
    let mut pending: Vec<String> = Vec::new();
    let flush = |pending: &mut Vec<String>, tokens: &mut Vec<u32>| -> Result<()> {
        for ids in tok.encode_batch(std::mem::take(pending))? {
            tokens.extend_from_slice(&ids);
            tokens.push(tok.eos_id);
        }
        Ok(())
    };
    for file in files {
        source::for_each_line(file, |_, line| {
            let v: serde_json::Value = serde_json::from_str(line).context("not a JSON object")?;
            let set = v
                .pointer("/meta/redpajama_set_name")
                .and_then(|s| s.as_str());
            if set.is_some_and(|s| cfg.skip_sets.iter().any(|k| k == s)) {
                return Ok(());
            }
            let Some(text) = v.get(&cfg.text_field) else {
                bail!("no field {:?} (data.text_field)", cfg.text_field);
            };
            let Some(text) = text.as_str() else {
                bail!("field {:?} is not a string", cfg.text_field);
            };
            pending.push(text.to_string());
            documents += 1;
            if pending.len() == BATCH_DOCS {
                flush(&mut pending, &mut tokens)?;
            }
            Ok(())
        })?;
    }
    flush(&mut pending, &mut tokens)?;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= tok.vocab_size) {
        bail!(
            "token id {bad} outside the tokenizer's vocabulary of {}",
            tok.vocab_size
        );
    }
    Ok(TokenStream {
        tokens,
        documents,
        files: files.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample_tokenizer() -> TextTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/tokenizer.json");
        TextTokenizer::load(&p, "</s>").unwrap()
    }

    fn cfg(dir: &Path) -> DataConfig {
        DataConfig {
            train: vec![dir.display().to_string()],
            sources: vec![],
            validation: vec![dir.display().to_string()],
            tokenizer: String::new(),
            seq_len: 8,
            text_field: "text".into(),
            skip_sets: vec!["RedPajamaGithub".into()],
            eos_token: "</s>".into(),
        }
    }

    #[test]
    fn documents_end_with_eos_and_skipped_sets_are_left_out() {
        let tok = sample_tokenizer();
        assert_eq!(tok.eos_id, 2);
        assert_eq!(tok.vocab_size, 4096);
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"text": "The cat sat on the mat.", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}"#,
            r#"{"text": "fn main() {}", "meta": {"redpajama_set_name": "RedPajamaGithub"}}"#,
            r#"{"text": "Anarchism is a political philosophy.", "meta": {"redpajama_set_name": "RedPajamaC4"}}"#,
        ];
        let raw = lines.join("\n") + "\n";
        let mut enc = zstd::stream::write::Encoder::new(
            std::fs::File::create(dir.path().join("a.jsonl.zst")).unwrap(),
            3,
        )
        .unwrap();
        enc.write_all(raw.as_bytes()).unwrap();
        enc.finish().unwrap();
        let c = cfg(dir.path());
        let s = tokenize_text(&c, &tok, &source::expand(&c.train, "t").unwrap()).unwrap();
        assert_eq!(s.documents, 2);
        let eos: Vec<usize> = s
            .tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 2)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(eos.len(), 2);
        assert_eq!(*eos.last().unwrap(), s.tokens.len() - 1);
        assert_eq!(
            tok.decode(&s.tokens[..eos[0]]).unwrap(),
            "The cat sat on the mat."
        );
        assert_eq!(
            tok.decode(&s.tokens[eos[0] + 1..eos[1]]).unwrap(),
            "Anarchism is a political philosophy."
        );
    }

    #[test]
    fn bad_input_names_file_and_line() {
        let tok = sample_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.jsonl"),
            "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n",
        )
        .unwrap();
        let c = cfg(dir.path());
        let split = |c: &DataConfig| {
            let files = source::expand(&c.train, "data.train")?;
            tokenize_text(c, &tok, &files)
        };
        let e = format!("{:#}", split(&c).unwrap_err());
        assert!(
            e.contains("b.jsonl:2") && e.contains("no field \"text\""),
            "{e}"
        );

        std::fs::write(dir.path().join("b.jsonl"), "").unwrap();
        std::fs::write(dir.path().join("c.jsonl.zst"), b"not zstd at all").unwrap();
        let e = format!("{:#}", split(&c).unwrap_err());
        assert!(e.contains("c.jsonl.zst"), "{e}");

        let missing = vec!["/nonexistent/dir".to_string()];
        let e = format!(
            "{:#}",
            source::expand(&missing, "data.validation").unwrap_err()
        );
        assert!(
            e.contains("data.validation") && e.contains("/nonexistent/dir"),
            "{e}"
        );
    }
}
