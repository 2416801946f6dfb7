use serde::{Deserialize, Serialize};

/// `[data]` section of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training text: files, directories (searched for `*.jsonl` and `*.jsonl.zst`) or globs.
    pub train: Vec<String>,
    /// Held-out text, same forms; read in order for the validation loss.
    pub validation: Vec<String>,
    /// A Hugging Face `tokenizer.json`.
    pub tokenizer: String,
    /// Tokens per training sequence; blocks hold `seq_len + 1` tokens (inputs and shifted targets).
    pub seq_len: usize,
    /// JSON field that holds the document text.
    #[serde(default = "d_text_field")]
    pub text_field: String,
    /// SlimPajama sets (`meta.redpajama_set_name`) to leave out, as TinyLlama does with code.
    #[serde(default = "d_skip_sets")]
    pub skip_sets: Vec<String>,
    /// End-of-document token appended after every document; looked up in the tokenizer.
    #[serde(default = "d_eos")]
    pub eos_token: String,
}

fn d_text_field() -> String {
    "text".into()
}
fn d_skip_sets() -> Vec<String> {
    vec!["RedPajamaGithub".into()]
}
fn d_eos() -> String {
    "</s>".into()
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.seq_len < 2 {
            return Err("data.seq_len: must be at least 2".into());
        }
        if self.train.is_empty() {
            return Err("data.train: lists no input".into());
        }
        if self.validation.is_empty() {
            return Err("data.validation: lists no input".into());
        }
        Ok(())
    }
}
