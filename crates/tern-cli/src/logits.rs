//! `tern logits`: a model's logits for given token ids, for checking a loaded model against
//! another implementation (Hugging Face transformers, a training run's checkpoint).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use safetensors::{Dtype, SafeTensors};

use crate::Compute;

#[derive(Args)]
pub struct LogitsArgs {
    /// A Hugging Face Llama directory, a tern checkpoint, a run's checkpoints folder, or a packed
    /// file (run on the packed ternary kernel, without unpacking).
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with tensor `input_ids`: [batch, seq], int64 (or int32).
    #[arg(long)]
    input_ids: PathBuf,
    /// How float activations meet packed ternary matrices: exact (f32) or int8 (faster,
    /// approximate; llama.cpp's way).
    #[arg(long, default_value = "exact", value_parser = crate::load::parse_activations)]
    activations: tern_infer::input::Activations,
    /// Where to write tensor `logits`: [batch, seq, vocab], f32.
    #[arg(long)]
    out: PathBuf,
}

/// `input_ids` of a safetensors file, with its shape.
fn read_ids(path: &PathBuf) -> Result<(Vec<i64>, [usize; 2])> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("reading {p}"))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{p}: not a safetensors file: {e}"))?;
    let view = st
        .tensor("input_ids")
        .map_err(|_| anyhow!("{p}: no tensor input_ids (it holds {:?})", st.names()))?;
    let shape: [usize; 2] = view.shape().try_into().map_err(|_| {
        anyhow!(
            "{p}: input_ids has shape {:?}; expected [batch, seq]",
            view.shape()
        )
    })?;
    let d = view.data();
    let ids: Vec<i64> = match view.dtype() {
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        other => bail!("{p}: input_ids is {other:?}; expected I64 or I32"),
    };
    if shape[0] == 0 || shape[1] == 0 {
        bail!("{p}: input_ids is empty (shape {shape:?})");
    }
    Ok((ids, shape))
}

/// Ids outside `0..vocab` are an error naming the position.
fn check_ids(ids: &[i64], s: usize, vocab: usize, path: &std::path::Path) -> Result<()> {
    if let Some((k, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        bail!(
            "{}: input_ids[{}][{}] = {id} is outside the model's vocabulary 0..{vocab}",
            path.display(),
            k / s,
            k % s
        );
    }
    Ok(())
}

/// The packed model's logits, one sequence at a time through the inference kernel.
fn packed_logits(a: &LogitsArgs, ids: &[i64], b: usize, s: usize) -> Result<()> {
    let packed = tern_pack::PackedModel::read(&a.model)?;
    let mut model = tern_infer::InferModel::from_packed(packed)?;
    model.set_activations(a.activations);
    let vocab = model.vocab();
    check_ids(ids, s, vocab, &a.input_ids)?;
    let mut logits = Vec::with_capacity(b * s * vocab);
    for row in ids.chunks(s) {
        let tokens: Vec<u32> = row.iter().map(|&t| t as u32).collect();
        let mut cache = tern_infer::KvCache::new(model.config.n_layers);
        logits.extend(model.forward(&tokens, &mut cache, true)?);
    }
    let named = vec![("logits".to_string(), vec![b, s, vocab], logits)];
    tern_train::checkpoint::write_whole(&a.out, &named)
        .with_context(|| format!("writing {}", a.out.display()))?;
    crate::say(&format!(
        "logits [{b}, {s}, {vocab}] of packed {} written to {}",
        a.model.display(),
        a.out.display()
    ));
    Ok(())
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let (ids, [b, s]) = read_ids(&a.input_ids)?;
    if tern_pack::PackedModel::is_packed_file(&a.model) {
        return packed_logits(&a, &ids, b, s);
    }
    crate::device::check_driver()?;
    let pre = tern_train::pretrained::load(&a.model)?;
    let vocab = pre.config.vocab();
    check_ids(&ids, s, vocab, &a.input_ids)?;
    let source = pre.source.clone();
    let device = Default::default();
    let model = pre.build::<Compute>(&device)?;
    let x = Tensor::<Compute, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let logits: Vec<f32> = model
        .forward(x)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow!("reading logits: {e:?}"))?;
    let named = vec![("logits".to_string(), vec![b, s, vocab], logits)];
    tern_train::checkpoint::write_whole(&a.out, &named)
        .with_context(|| format!("writing {}", a.out.display()))?;
    crate::say(&format!(
        "logits [{b}, {s}, {vocab}] of {} written to {}",
        source.display(),
        a.out.display()
    ));
    Ok(())
}
