use serde::{Deserialize, Serialize};

/// `[data]` section of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data as one source: text files (`*.jsonl`, `*.jsonl.zst`), token shards (`*.bin`,
    /// `*.h5`), directories of them, or globs. Give this or `sources`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train: Vec<String>,
    /// Training data as weighted sources (TinyLlama's SlimPajama/StarCoder mix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceConfig>,
    /// Held-out data, same forms; read in order for the validation loss.
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

/// One `[[data.sources]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Files, directories or globs, as `data.train`.
    pub paths: Vec<String>,
    /// Share of the training samples; weights are normalised to sum to 1.
    #[serde(default = "d_weight")]
    pub weight: f64,
    /// Name in logs; defaults to `source<i>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
fn d_weight() -> f64 {
    1.0
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.seq_len < 2 {
            return Err("data.seq_len: must be at least 2".into());
        }
        match (self.train.is_empty(), self.sources.is_empty()) {
            (true, true) => {
                return Err(
                    "data.train: lists no input (give data.train or [[data.sources]])".into(),
                )
            }
            (false, false) => {
                return Err(
                    "data.sources: give either data.train or [[data.sources]], not both".into(),
                )
            }
            _ => {}
        }
        for (i, s) in self.sources.iter().enumerate() {
            if s.paths.is_empty() {
                return Err(format!("data.sources[{i}].paths: lists no input"));
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(format!(
                    "data.sources[{i}].weight: {} is not a positive number",
                    s.weight
                ));
            }
        }
        if self.validation.is_empty() {
            return Err("data.validation: lists no input".into());
        }
        Ok(())
    }

    /// The training sources with their recipe keys: `data.train` is one source of weight 1.
    pub fn train_sources(&self) -> Vec<(String, SourceConfig)> {
        if self.sources.is_empty() {
            return vec![(
                "data.train".into(),
                SourceConfig {
                    paths: self.train.clone(),
                    weight: 1.0,
                    name: Some("train".into()),
                },
            )];
        }
        self.sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.clone();
                s.name.get_or_insert_with(|| format!("source{i}"));
                (format!("data.sources[{i}].paths"), s)
            })
            .collect()
    }
}
