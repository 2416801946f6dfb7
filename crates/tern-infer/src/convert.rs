//! A trained model's tensors (latent weights, as checkpoints hold them) -> its packed form: the
//! ternary codes and scales the training forward pass uses, computed by the same function
//! (`tern_model::linear::ternary_codes`), so the packed model is the trained one exactly.

use anyhow::{bail, Result};
use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use tern_model::linear::{bitnet_codes, ternary_codes};
use tern_model::{LinearKind, ModelConfig, ScaleAxis};
use tern_pack::file::FloatDtype;
use tern_pack::{Encoding, PackedModel, PackedTensor, StudentSpec, TernaryMatrix};

/// How a packed file describes a distillation student (`tern_model::studentize`'s settings).
pub fn student_spec(s: &tern_model::StudentConfig) -> StudentSpec {
    StudentSpec {
        layers: s.layers.clone(),
        residual: s.encoder.residual,
    }
}

/// The block index of a `layers.{i}.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// How a parameter is split into scale groups when it is a ternary block projection. In a
/// distillation student only the distilled blocks take the linear kind; the others are float
/// copies of the teacher's.
pub fn ternary_axis(
    config: &ModelConfig,
    student: Option<&StudentSpec>,
    name: &str,
) -> Option<ScaleAxis> {
    if config.linear == LinearKind::Float || !name.starts_with("layers.") {
        return None;
    }
    if let Some(s) = student {
        if !layer_of(name).is_some_and(|l| s.layers.contains(&l)) {
            return None;
        }
    }
    if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
        Some(ScaleAxis::Cols)
    } else if name.ends_with("_proj.weight") {
        Some(ScaleAxis::Rows)
    } else {
        None
    }
}

/// The codes and scales of a latent weight `[rows, cols]`, as the training forward pass of
/// `config`'s linear kind computes them (TriLM's or BitNet's).
pub fn ternary_matrix(
    config: &ModelConfig,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    axis: ScaleAxis,
) -> TernaryMatrix {
    let device = Default::default();
    let w = Tensor::<Flex, 2>::from_data(TensorData::new(values, [rows, cols]), &device);
    let groups = config.scale_groups;
    let (codes, gamma) = match config.linear {
        LinearKind::Bitnet => bitnet_codes(w, groups, axis),
        _ => ternary_codes(w, groups, axis, config.ternary_eps),
    };
    let codes: Vec<f32> = codes.into_data().convert::<f32>().to_vec().unwrap();
    let scales: Vec<f32> = gamma.into_data().convert::<f32>().to_vec().unwrap();
    let (row_groups, col_groups) = match axis {
        ScaleAxis::Rows => (groups, 1),
        ScaleAxis::Cols => (1, groups),
    };
    TernaryMatrix {
        rows,
        cols,
        row_groups,
        col_groups,
        codes: codes.iter().map(|&c| c as i8).collect(),
        scales,
    }
}

/// The packed format and its runtime hold LLaMA blocks: attention and an MLP in every block.
pub fn check_llama_blocks(config: &ModelConfig) -> Result<()> {
    if let Some(i) = (0..config.n_layers).find(|&i| !config.block_kind(i).is_llama()) {
        bail!(
            "block {i} is {:?}: the packed format, its runtime and the exports hold LLaMA blocks \
             only (attention and an MLP over every token); models with Mamba mixers, experts or \
             Mixture-of-Depths routing run from their checkpoints (tern generate, tern logits \
             --model <run or checkpoint>)",
            config.block_kind(i)
        );
    }
    Ok(())
}

/// Models a standard Llama implementation (a Hugging Face `LlamaForCausalLM`, llama.cpp's `llama`
/// architecture) computes: float or TriLM projections, SwiGLU, dense inputs. The packed runtime
/// computes every kind tern trains; the exports to other tools refuse the rest by name.
pub fn check_plain_llama(config: &ModelConfig) -> Result<()> {
    check_llama_blocks(config)?;
    if config.linear == LinearKind::Bitnet {
        bail!(
            "model.linear = \"bitnet\": BitNet b1.58 normalizes and quantizes every projection's \
             input to 8 bits, which a Llama model cannot express (llama.cpp's bitnet architecture \
             normalizes only the inputs of o_proj and down_proj, with learned weights). Export it \
             with --format packed (tern generate, eval and logits run that file)"
        );
    }
    if config.sparsity.is_some() {
        bail!(
            "model.sparsity: Q-Sparse keeps each input's top-K entries, which a Llama model cannot \
             express. Export it with --format packed (tern generate, eval and logits run that file)"
        );
    }
    if config.mlp != tern_model::MlpKind::Swiglu {
        bail!(
            "model.mlp = {:?}: a Llama model computes SwiGLU only. Export it with --format packed \
             (tern generate, eval and logits run that file)",
            config.mlp
        );
    }
    Ok(())
}

/// Names and shapes of a packed model's tensors, in their order: the model's parameters
/// (`ModelConfig::param_shapes`), and in a student each distilled projection's encoder after the
/// projection's weight (`fc1 [d/2, d]`, `fc2 [d, d/2]`, `alpha`, `beta` and, in the residual form,
/// `offset`, each `[d]`, for `d` inputs).
pub fn packed_shapes(
    config: &ModelConfig,
    student: Option<&StudentSpec>,
) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (name, shape) in config.param_shapes() {
        let encoded = student.is_some_and(|s| {
            name.ends_with("_proj.weight") && layer_of(&name).is_some_and(|l| s.layers.contains(&l))
        });
        let d = shape.get(1).copied().unwrap_or(0);
        let prefix = name.trim_end_matches(".weight").to_string();
        out.push((name, shape));
        if let (true, Some(s)) = (encoded, student) {
            let h = (d / 2).max(1);
            out.push((format!("{prefix}.encoder.fc1"), vec![h, d]));
            out.push((format!("{prefix}.encoder.fc2"), vec![d, h]));
            out.push((format!("{prefix}.encoder.alpha"), vec![d]));
            out.push((format!("{prefix}.encoder.beta"), vec![d]));
            if s.residual {
                out.push((format!("{prefix}.encoder.offset"), vec![d]));
            }
        }
    }
    out
}

/// The packed model of `config` (a student's when `student` is set) from its tensors in the
/// order of [`packed_shapes`].
pub fn pack_model(
    config: &ModelConfig,
    student: Option<StudentSpec>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    encoding: Encoding,
    float_dtype: FloatDtype,
) -> Result<PackedModel> {
    check_llama_blocks(config)?;
    let expected = packed_shapes(config, student.as_ref());
    if tensors.len() != expected.len() {
        bail!(
            "{} tensors for a model of {} tensors",
            tensors.len(),
            expected.len()
        );
    }
    let mut out = Vec::with_capacity(tensors.len());
    for ((name, shape, values), (want, want_shape)) in tensors.into_iter().zip(expected) {
        if name != want || shape != want_shape {
            bail!("tensor {name} {shape:?} where the model has {want} {want_shape:?}");
        }
        let t = match ternary_axis(config, student.as_ref(), &name) {
            Some(axis) => {
                PackedTensor::Ternary(ternary_matrix(config, values, shape[0], shape[1], axis))
            }
            None => PackedTensor::Float { shape, values },
        };
        out.push((name, t));
    }
    Ok(PackedModel {
        config: serde_json::to_value(config)?,
        encoding,
        float_dtype,
        tensors: out,
        tokenizer: None,
        source: None,
        bos_token_id: None,
        eos_token_id: None,
        student,
    })
}

/// The float tensors a standard Llama implementation computes the same function with: each
/// ternary or integer-quantized matrix as `scale * code` (what the training forward pass multiplies by).
pub fn effective_tensors(p: &PackedModel) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    p.tensors
        .iter()
        .map(|(n, t)| match t {
            PackedTensor::Ternary(m) => (n.clone(), vec![m.rows, m.cols], m.dequantize()),
            PackedTensor::Quant(m) => (n.clone(), vec![m.rows, m.cols], m.dequantize()),
            PackedTensor::Float { shape, values } => (n.clone(), shape.clone(), values.clone()),
        })
        .collect()
}

/// The model config of a packed file, checked against its tensors: the names and shapes the config
/// (and the student, when the file holds one) implies, in order, ternary where the config's linear
/// kind says so (in a student, in its distilled blocks only).
pub fn packed_config(p: &PackedModel) -> Result<ModelConfig> {
    let c: ModelConfig = serde_json::from_value(p.config.clone())
        .map_err(|e| anyhow::anyhow!("packed file's config: {e}"))?;
    c.validate()
        .map_err(|e| anyhow::anyhow!("packed file's config: {e}"))?;
    if c.vocab_size.is_none() {
        bail!("packed file's config has no vocab_size");
    }
    let student = p.student.as_ref();
    if let Some(bad) = student.and_then(|s| s.layers.iter().find(|&&l| l >= c.n_layers)) {
        bail!(
            "packed file's student names block {bad}; its config has {} blocks",
            c.n_layers
        );
    }
    let want = packed_shapes(&c, student);
    if want.len() != p.tensors.len() {
        bail!(
            "the packed file holds {} tensors; its config's model has {}",
            p.tensors.len(),
            want.len()
        );
    }
    for ((name, t), (wname, wshape)) in p.tensors.iter().zip(&want) {
        let (shape, ternary) = match t {
            PackedTensor::Ternary(m) => (vec![m.rows, m.cols], true),
            PackedTensor::Quant(m) => {
                if c.linear != LinearKind::Float || !name.ends_with("_proj.weight") {
                    bail!("{name} is integer-quantized; only a float model's block projections can be");
                }
                (vec![m.rows, m.cols], false)
            }
            PackedTensor::Float { shape, .. } => (shape.clone(), false),
        };
        if name != wname || &shape != wshape {
            bail!("tensor {name} {shape:?} where the config's model has {wname} {wshape:?}");
        }
        if ternary != ternary_axis(&c, student, name).is_some() {
            bail!(
                "{name} is {} but the config's linear kind is {:?}{}",
                if ternary { "ternary" } else { "float" },
                c.linear,
                match student {
                    Some(s) => format!(" and the student distils blocks {:?}", s.layers),
                    None => String::new(),
                }
            );
        }
    }
    Ok(c)
}
