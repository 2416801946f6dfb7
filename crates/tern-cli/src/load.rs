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
    /// Positions the model is meant for: config.json's max_position_embeddings, else seq_len.
    pub max_positions: Option<usize>,
    pub source: PathBuf,
}

impl Loaded {
    /// Begin / end of sequence ids: those the source names (a Hugging Face config.json, kept in
    /// packed files), else the tokenizer's usual special tokens.
    pub fn special(&self) -> Result<tern_pack::gguf::SpecialTokens> {
        let mut s = self
            .tokenizer
            .as_deref()
            .map(tern_pack::gguf::special_tokens)
            .transpose()?
            .unwrap_or_default();
        s.bos = self.packed.bos_token_id.or(s.bos);
        s.eos = self.packed.eos_token_id.or(s.eos);
        Ok(s)
    }

    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        parse_tokenizer(self.tokenizer.as_deref(), &self.source)
    }
}

/// The tokenizer of the model from `source`, from tokenizer.json's text when one was found.
fn parse_tokenizer(text: Option<&str>, source: &Path) -> Result<tokenizers::Tokenizer> {
    let Some(text) = text else {
        bail!(
            "{}: no tokenizer found with the model; pass --tokenizer tokenizer.json",
            source.display()
        );
    };
    tokenizers::Tokenizer::from_bytes(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: tokenizer: {e}", source.display()))
}

/// `--activations`: `exact` (f32 products, the trained model's arithmetic) or `int8` (float
/// activations quantized to 8 bits per 256 values for the packed ternary kernel, as llama.cpp
/// does: faster, approximate). BitNet's activations are 8-bit integers in either mode.
pub fn parse_activations(s: &str) -> Result<tern_infer::input::Activations, String> {
    match s {
        "exact" => Ok(tern_infer::input::Activations::Exact),
        "int8" => Ok(tern_infer::input::Activations::Int8),
        _ => Err(format!("{s:?}: the choices are exact and int8")),
    }
}

/// A model to run (ternary matrices as 2-bit codes for the kernel, other tensors in f32).
pub fn for_inference(path: &Path, tokenizer: Option<&Path>) -> Result<Loaded> {
    load(path, Encoding::Bits2, FloatDtype::F32, tokenizer)
}

/// An unpacked TriLM in a Hugging Face directory, as a ternary model: its shards' scales
/// recovered (`tern_infer::trilm`), codes exact.
pub fn load_trilm(
    dir: &Path,
    encoding: Encoding,
    float_dtype: FloatDtype,
    tokenizer: Option<&Path>,
) -> Result<Loaded> {
    if !tern_hf::is_hf_dir(dir) {
        bail!(
            "{}: --from-hf takes a Hugging Face Llama directory (config.json and safetensors)",
            dir.display()
        );
    }
    let mut l = load(dir, Encoding::Bits2, FloatDtype::F32, tokenizer)?;
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(tern_hf::CONFIG)).unwrap_or_default(),
    )
    .unwrap_or_default();
    let given = cfg["pretraining_model_parallel"]
        .as_u64()
        .map(|n| n as usize);
    let tensors = tern_infer::effective_tensors(&l.packed);
    let groups = tern_infer::trilm::find_shards(&tensors, given)
        .with_context(|| format!("{}: not an unpacked TriLM", dir.display()))?;
    let (config, packed) = tern_infer::trilm::to_ternary(&l.config, tensors, groups)
        .with_context(|| dir.display().to_string())?;
    crate::say(&format!(
        "{}: a TriLM with {groups} scale group(s) per projection ({})",
        dir.display(),
        match given {
            Some(_) => "config.json's pretraining_model_parallel, checked on every projection",
            None => "found from the values",
        }
    ));
    l.packed.config = serde_json::to_value(&config)?;
    l.packed.tensors = packed;
    l.packed.encoding = encoding;
    l.packed.float_dtype = float_dtype;
    l.config = config;
    Ok(l)
}

fn read_tokenizer(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading tokenizer {}", path.display()))
}

/// A checkpoint of a model whose blocks the packed runtime does not hold (Mamba mixers, experts,
/// Mixture-of-Depths), as a burn model on the CPU backend.
pub struct BurnLoaded {
    pub model: tern_model::Llama<burn::backend::Flex>,
    pub tokenizer: Option<String>,
    pub source: PathBuf,
}

impl BurnLoaded {
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        parse_tokenizer(self.tokenizer.as_deref(), &self.source)
    }

    pub fn special(&self) -> Result<tern_pack::gguf::SpecialTokens> {
        Ok(self
            .tokenizer
            .as_deref()
            .map(tern_pack::gguf::special_tokens)
            .transpose()?
            .unwrap_or_default())
    }
}

/// `path` as a burn model when it is a checkpoint of a model that is not all LLaMA blocks;
/// `None` for anything the packed runtime runs.
pub fn for_burn(path: &Path, tokenizer: Option<&Path>) -> Result<Option<BurnLoaded>> {
    if path.is_file() {
        return Ok(None);
    }
    match tern_train::pretrained::config_of(path)? {
        Some(c) if !c.is_llama() => {}
        _ => return Ok(None),
    }
    let pre = tern_train::pretrained::load(path)?;
    let source = pre.source.clone();
    let recipe = checkpoint_recipe(&source)?;
    let found = PathBuf::from(&recipe.data.tokenizer);
    let tokenizer = match tokenizer {
        Some(t) => Some(read_tokenizer(t)?),
        None => found
            .is_file()
            .then(|| read_tokenizer(&found))
            .transpose()?,
    };
    let model = pre.build::<burn::backend::Flex>(&Default::default())?;
    Ok(Some(BurnLoaded {
        model,
        tokenizer,
        source,
    }))
}

fn checkpoint_recipe(dir: &Path) -> Result<tern_train::Recipe> {
    toml::from_str(
        &std::fs::read_to_string(dir.join("recipe.toml"))
            .with_context(|| format!("{}/recipe.toml", dir.display()))?,
    )
    .with_context(|| format!("{}/recipe.toml", dir.display()))
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
        let mut packed = PackedModel::read(path)?;
        let config =
            tern_infer::packed_config(&packed).with_context(|| path.display().to_string())?;
        // Re-exported as asked: the codes and float types only change how the file stores them.
        packed.encoding = encoding;
        packed.float_dtype = float_dtype;
        if given.is_some() {
            packed.tokenizer = given;
        }
        return Ok(Loaded {
            tokenizer: packed.tokenizer.clone(),
            packed,
            config,
            seq_len: None,
            max_positions: None,
            source: path.to_path_buf(),
        });
    }
    let pre = tern_train::pretrained::load(path)?;
    // A student keeps its encoders beside its projections (tern-infer runs them); only the
    // distilled blocks are ternary.
    let student = pre.student.as_ref().map(tern_infer::convert::student_spec);
    let source = pre.source.clone();
    let config = pre.config.clone();
    let mut map = pre.tensors;
    let mut tensors = Vec::new();
    for (name, shape) in tern_infer::packed_shapes(&config, student.as_ref()) {
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
    if let Some(extra) = map.keys().min() {
        bail!(
            "{}: tensor {extra} is not part of the model its recipe describes (a student's \
             encoders must match its distill.blocks and distill.init)",
            source.display()
        );
    }
    let mut packed = tern_infer::pack_model(&config, student, tensors, encoding, float_dtype)?;
    let mut max_positions = None;
    let (found, seq_len) = if tern_hf::is_hf_dir(&source) {
        let special = tern_hf::read_config(&source)?.1;
        packed.bos_token_id = special.bos_token_id;
        packed.eos_token_id = special.eos_token_id;
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(source.join(tern_hf::CONFIG)).unwrap_or_default(),
        )
        .unwrap_or_default();
        max_positions = cfg["max_position_embeddings"].as_u64().map(|n| n as usize);
        let t = source.join("tokenizer.json");
        (t.is_file().then(|| read_tokenizer(&t)).transpose()?, None)
    } else {
        let recipe = checkpoint_recipe(&source)?;
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
        max_positions: max_positions.or(seq_len),
        source,
    })
}
