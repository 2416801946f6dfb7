//! Hugging Face Llama directories (`LlamaForCausalLM`: `config.json` and `model.safetensors`, or
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`), read into tern's
//! [`ModelConfig`] and parameter names, and written from them. HF names are tern's with a `model.`
//! prefix (`lm_head.weight` has none); shapes are `[out, in]` in both.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use tern_model::{LinearKind, ModelConfig};

pub const CONFIG: &str = "config.json";
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

/// A parameter by tern name, with its shape and values (f32, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// What a directory holds besides the shapes: token ids the tokenizer files may not carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Special {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct HfModel {
    pub config: ModelConfig,
    pub special: Special,
    /// Every parameter of `config`'s model, in module order (`ModelConfig::param_shapes`).
    pub tensors: Vec<NamedTensor>,
}

/// Whether `dir` looks like a Hugging Face model directory.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.join(CONFIG).is_file()
}

/// The HF name of tern parameter `name`.
pub fn hf_name(name: &str) -> String {
    if name.starts_with("lm_head.") {
        name.to_string()
    } else {
        format!("model.{name}")
    }
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            anyhow!(
                "{}: {key} = {x} is not a non-negative integer",
                path.display()
            )
        }),
    }
}

fn get_f64(v: &Value, key: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("{}: {key} = {x} is not a number", path.display())),
    }
}

/// A token id that may be written as a list (the first is taken).
fn token_id(v: &Value, key: &str) -> Option<u32> {
    match v.get(key)? {
        Value::Array(a) => a.first()?.as_u64().map(|n| n as u32),
        x => x.as_u64().map(|n| n as u32),
    }
}

/// Reads `config.json` into a float [`ModelConfig`]. Anything tern's Llama does not compute the
/// same way (another architecture, biases, rope scaling, an activation other than SiLU, a head
/// dimension other than hidden / heads) is an error naming the key.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, Special)> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a Hugging Face model directory?)",
            path.display(),
            dir.display()
        )
    })?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let p = path.display();
    let unsupported =
        |what: String| anyhow!("{p}: {what}: tern reads Llama models (LlamaForCausalLM) only");
    if let Some(arch) = v.get("architectures").and_then(Value::as_array) {
        let names: Vec<&str> = arch.iter().filter_map(Value::as_str).collect();
        if !names.contains(&"LlamaForCausalLM") {
            return Err(unsupported(format!("architectures = {names:?}")));
        }
    }
    if let Some(t) = v.get("model_type").and_then(Value::as_str) {
        if t != "llama" {
            return Err(unsupported(format!("model_type = {t:?}")));
        }
    }
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(unsupported(format!(
                "hidden_act = {act:?} (Llama uses \"silu\")"
            )));
        }
    }
    for key in ["attention_bias", "mlp_bias"] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(unsupported(format!(
                "{key} = true (Llama's projections have no bias)"
            )));
        }
    }
    // transformers 5 writes rope_parameters {rope_theta, rope_type}; older files a top-level
    // rope_theta and an optional rope_scaling.
    let mut rope_theta = get_f64(&v, "rope_theta", &path)?;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(r) = v.get(key).filter(|r| !r.is_null()) {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str);
            if !matches!(kind, None | Some("default")) {
                return Err(unsupported(format!(
                    "{key}.rope_type = {:?} (only the default RoPE is implemented)",
                    kind.unwrap_or_default()
                )));
            }
            if let Some(t) = get_f64(r, "rope_theta", &path)? {
                rope_theta = Some(t);
            }
        }
    }
    let need = |key: &str| -> Result<usize> {
        get_usize(&v, key, &path)?.ok_or_else(|| anyhow!("{p}: {key} is missing"))
    };
    let hidden = need("hidden_size")?;
    let n_heads = need("num_attention_heads")?;
    let config = ModelConfig {
        vocab_size: Some(need("vocab_size")?),
        hidden,
        intermediate: need("intermediate_size")?,
        n_layers: need("num_hidden_layers")?,
        n_heads,
        n_kv_heads: Some(get_usize(&v, "num_key_value_heads", &path)?.unwrap_or(n_heads)),
        rope_theta: rope_theta.unwrap_or(10_000.0),
        // transformers' LlamaConfig defaults.
        rms_eps: get_f64(&v, "rms_norm_eps", &path)?.unwrap_or(1e-6),
        tie_embeddings: v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        linear: LinearKind::Float,
        scale_groups: 1,
        ternary_eps: 1e-5,
        init_std: get_f64(&v, "initializer_range", &path)?.unwrap_or(0.02),
        mlp: tern_model::MlpKind::Swiglu,
        ..ModelConfig::tiny(1, LinearKind::Float)
    };
    if let Some(hd) = get_usize(&v, "head_dim", &path)? {
        if n_heads > 0 && hd * n_heads != hidden {
            return Err(unsupported(format!(
                "head_dim = {hd} differs from hidden_size / num_attention_heads = {}",
                hidden / n_heads.max(1)
            )));
        }
    }
    config.validate().map_err(|e| anyhow!("{p}: {e}"))?;
    let special = Special {
        bos_token_id: token_id(&v, "bos_token_id"),
        eos_token_id: token_id(&v, "eos_token_id"),
    };
    Ok((config, special))
}

/// Which file each HF tensor is in, as `model.safetensors.index.json` says.
type WeightMap = HashMap<String, PathBuf>;

/// The weight files of `dir` and, for a sharded model, its index.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    let index = dir.join(INDEX);
    if index.is_file() {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("{}: not JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut by_name = HashMap::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                anyhow!("{}: weight_map.{name} is not a file name", index.display())
            })?;
            let path = dir.join(f);
            if !files.contains(&path) {
                files.push(path.clone());
            }
            by_name.insert(name.clone(), path);
        }
        files.sort();
        return Ok((files, Some(by_name)));
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    bail!("{}: neither {SINGLE} nor {INDEX} is there", dir.display())
}

fn to_f32(view: &TensorView<'_>, name: &str, path: &Path) -> Result<Vec<f32>> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: tensor {name} is {other:?}; tern reads F32, F16 and BF16",
            path.display()
        ),
    })
}

/// Loads a Hugging Face Llama directory: its config and every parameter, converted to f32.
pub fn load(dir: &Path) -> Result<HfModel> {
    let (config, special) = read_config(dir)?;
    let (files, index) = weight_files(dir)?;
    let mut maps = Vec::new();
    for f in &files {
        let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        // Safety: the file is only read, and not expected to change while it is loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", f.display()))?;
        maps.push((f.clone(), map));
    }
    let mut parsed = Vec::new();
    for (f, map) in &maps {
        let st = SafeTensors::deserialize(map)
            .map_err(|e| anyhow!("{}: not a safetensors file: {e}", f.display()))?;
        parsed.push((f.clone(), st));
    }
    // Where each HF tensor is.
    let mut location: BTreeMap<String, usize> = BTreeMap::new();
    for (k, (_, st)) in parsed.iter().enumerate() {
        for name in st.names() {
            location.insert(name.to_string(), k);
        }
    }
    if let Some(index) = &index {
        for (name, path) in index {
            if !location.contains_key(name) {
                bail!(
                    "{}: lists {name} in {}, which does not hold it",
                    dir.join(INDEX).display(),
                    path.display()
                );
            }
        }
    }
    let wanted = config.param_shapes();
    let wanted_names: Vec<String> = wanted.iter().map(|(n, _)| hf_name(n)).collect();
    let unknown: Vec<&String> = location
        .keys()
        .filter(|n| !wanted_names.contains(n))
        // Older exports store RoPE's inverse frequencies; a tied model may still store its head.
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(config.tie_embeddings && n.as_str() == "lm_head.weight"))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{}: tensors that a Llama of this config.json does not have: {} (a different architecture?)",
            dir.display(),
            unknown.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let mut tensors = Vec::with_capacity(wanted.len());
    for ((name, shape), hf) in wanted.into_iter().zip(wanted_names) {
        let k = *location.get(&hf).ok_or_else(|| {
            anyhow!(
                "{}: tensor {hf} is missing ({} layers, {} the config says)",
                dir.display(),
                config.n_layers,
                if config.tie_embeddings {
                    "tied head"
                } else {
                    "untied head"
                }
            )
        })?;
        let (path, st) = &parsed[k];
        let view = st
            .tensor(&hf)
            .map_err(|e| anyhow!("{}: {hf}: {e}", path.display()))?;
        if view.shape() != shape.as_slice() {
            bail!(
                "{}: tensor {hf} has shape {:?}; config.json implies {shape:?}",
                path.display(),
                view.shape()
            );
        }
        let values = to_f32(&view, &hf, path)?;
        tensors.push(NamedTensor {
            name,
            shape,
            values,
        });
    }
    Ok(HfModel {
        config,
        special,
        tensors,
    })
}

/// `config.json` for `c` (transformers 4 spelling, which transformers 5 also reads).
pub fn config_json(c: &ModelConfig, special: &Special, max_positions: usize) -> Value {
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab(),
        "hidden_size": c.hidden,
        "intermediate_size": c.intermediate,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if let Some(b) = special.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    if let Some(e) = special.eos_token_id {
        v["eos_token_id"] = json!(e);
    }
    v
}

fn serialize(tensors: &[&NamedTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            Ok((
                hf_name(&t.name),
                TensorView::new(Dtype::F32, t.shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}

/// Writes a Hugging Face Llama directory (f32). With `shard_bytes`, tensors go to
/// `model-0000N-of-0000M.safetensors` files of about that size plus the index, as
/// `save_pretrained(max_shard_size=...)` does.
/// `tokenizer_config.json` for a tokenizer.json: transformers' `AutoTokenizer` reads the special
/// tokens from it (without it a fast tokenizer has no bos / eos, and lm-evaluation-harness finds
/// no prefix token). The tokens are the added tokens with the ids `special` names.
pub fn tokenizer_config(
    tokenizer_json: &str,
    special: &Special,
    unk_token_id: Option<u32>,
    max_positions: usize,
) -> Result<serde_json::Value> {
    let t: serde_json::Value = serde_json::from_str(tokenizer_json).context("tokenizer.json")?;
    let content = |id: Option<u32>| -> Option<String> {
        let id = id?;
        t["added_tokens"]
            .as_array()?
            .iter()
            .find(|a| a["id"].as_u64() == Some(id as u64))?["content"]
            .as_str()
            .map(str::to_string)
    };
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": false,
    });
    for (key, id) in [
        ("bos_token", special.bos_token_id),
        ("eos_token", special.eos_token_id),
        ("unk_token", unk_token_id),
    ] {
        if let Some(tok) = content(id) {
            c[key] = json!(tok);
        }
    }
    Ok(c)
}

pub fn save(
    dir: &Path,
    config: &ModelConfig,
    special: &Special,
    tensors: &[NamedTensor],
    max_positions: usize,
    shard_bytes: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = serde_json::to_string_pretty(&config_json(config, special, max_positions))?;
    std::fs::write(dir.join(CONFIG), cfg + "\n")
        .with_context(|| format!("writing {}", dir.join(CONFIG).display()))?;
    let groups: Vec<Vec<&NamedTensor>> = match shard_bytes {
        None => vec![tensors.iter().collect()],
        Some(limit) => {
            let mut groups: Vec<Vec<&NamedTensor>> = vec![vec![]];
            let mut size = 0;
            for t in tensors {
                let b = t.values.len() * 4;
                if size > 0 && size + b > limit {
                    groups.push(vec![]);
                    size = 0;
                }
                groups.last_mut().unwrap().push(t);
                size += b;
            }
            groups
        }
    };
    if groups.len() == 1 && shard_bytes.is_none() {
        let path = dir.join(SINGLE);
        return std::fs::write(&path, serialize(&groups[0])?)
            .with_context(|| format!("writing {}", path.display()));
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    let total: usize = tensors.iter().map(|t| t.values.len() * 4).sum();
    for (i, g) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        std::fs::write(dir.join(&file), serialize(g)?)
            .with_context(|| format!("writing {}", dir.join(&file).display()))?;
        for t in g {
            weight_map.insert(hf_name(&t.name), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join(INDEX),
        serde_json::to_string_pretty(&index)? + "\n",
    )
    .with_context(|| format!("writing {}", dir.join(INDEX).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
