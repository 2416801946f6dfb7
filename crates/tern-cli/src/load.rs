//! A model for inference or export, from any of the places tern keeps one: a packed file, a tern
//! checkpoint (or a run / checkpoints folder: the newest complete one), a Hugging Face directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tern_model::ModelConfig;
use tern_pack::file::FloatDtype;
use tern_pack::{Encoding, PackedModel};

pub struct Loaded {
    pub packed: PackedModel,
    pub config: ModelConfig,
    /// tokenizer.json's text, when one was found (or given).
    pub tokenizer: Option<String>,
    /// The training sequence length, when the source says it.
    pub seq_len: Option<usize>,
    /// The end-of-sequence id a Hugging Face config.json names (it wins over the tokenizer's).
    pub config_eos: Option<u32>,
    pub source: PathBuf,
}

impl Loaded {
    /// Where generation stops: config.json's eos_token_id, else the tokenizer's end token.
    pub fn eos(&self) -> Result<Option<u32>> {
        if self.config_eos.is_some() {
            return Ok(self.config_eos);
        }
        Ok(self
            .tokenizer
            .as_deref()
            .map(tern_pack::gguf::special_tokens)
            .transpose()?
            .and_then(|s| s.eos))
    }

    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let Some(text) = &self.tokenizer else {
            bail!(
                "{}: no tokenizer found with the model; pass --tokenizer tokenizer.json",
                self.source.display()
            );
        };
        tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: tokenizer: {e}", self.source.display()))
    }
}

/// A model to run (ternary matrices as 2-bit codes for the kernel, other tensors in f32).
pub fn for_inference(path: &Path, tokenizer: Option<&Path>) -> Result<Loaded> {
    load(path, Encoding::Bits2, FloatDtype::F32, tokenizer)
}

fn read_tokenizer(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading tokenizer {}", path.display()))
}

/// Loads `path`; ternary matrices of a checkpoint are turned into codes (`encoding`), other
/// tensors kept in `float_dtype`.
pub fn load(
    path: &Path,
    encoding: Encoding,
    float_dtype: FloatDtype,
    tokenizer: Option<&Path>,
) -> Result<Loaded> {
    let given = tokenizer.map(read_tokenizer).transpose()?;
    if path.is_file() {
        if !PackedModel::is_packed_file(path) {
            bail!(
                "{}: a file, but not a tern packed model (tern export --format packed writes one)",
                path.display()
            );
        }
        let packed = PackedModel::read(path)?;
        let config =
            tern_infer::packed_config(&packed).with_context(|| path.display().to_string())?;
        let tokenizer = given.or_else(|| packed.tokenizer.clone());
        return Ok(Loaded {
            packed,
            config,
            tokenizer,
            seq_len: None,
            config_eos: None,
            source: path.to_path_buf(),
        });
    }
    let pre = tern_train::pretrained::load(path)?;
    if pre.student.is_some() {
        bail!(
            "{}: a distillation student; its 1-bit input encoders have no packed, Hugging Face or \
             GGUF form (tern logits runs it)",
            pre.source.display()
        );
    }
    let source = pre.source.clone();
    let config = pre.config.clone();
    let mut map = pre.tensors;
    let mut tensors = Vec::new();
    for (name, shape) in config.param_shapes() {
        let (s, v) = map
            .remove(&name)
            .with_context(|| format!("{}: no tensor {name}", source.display()))?;
        if s != shape {
            bail!(
                "{}: {name} is {s:?}; the config needs {shape:?}",
                source.display()
            );
        }
        tensors.push((name, shape, v));
    }
    let mut packed = tern_infer::pack_model(&config, tensors, encoding, float_dtype)?;
    let mut config_eos = None;
    let (found, seq_len) = if tern_hf::is_hf_dir(&source) {
        config_eos = tern_hf::read_config(&source)?.1.eos_token_id;
        let t = source.join("tokenizer.json");
        (t.is_file().then(|| read_tokenizer(&t)).transpose()?, None)
    } else {
        let recipe: tern_train::Recipe = toml::from_str(
            &std::fs::read_to_string(source.join("recipe.toml"))
                .with_context(|| format!("{}/recipe.toml", source.display()))?,
        )
        .with_context(|| format!("{}/recipe.toml", source.display()))?;
        let t = PathBuf::from(&recipe.data.tokenizer);
        (
            t.is_file().then(|| read_tokenizer(&t)).transpose()?,
            Some(recipe.data.seq_len),
        )
    };
    let tokenizer = given.or(found);
    packed.tokenizer = tokenizer.clone();
    packed.source = Some(source.display().to_string());
    Ok(Loaded {
        packed,
        config,
        tokenizer,
        seq_len,
        config_eos,
        source,
    })
}
