//! `tern export`: a trained model as a packed ternary file, a Hugging Face directory, or GGUF.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tern_model::ModelConfig;
use tern_pack::file::FloatDtype;
use tern_pack::gguf::{GgmlType, GgufFile, GgufTensor, MetaValue};
use tern_pack::{Encoding, PackedTensor, TernaryMatrix};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// tern's packed safetensors file (ternary codes + scales).
    Packed,
    /// An unpacked `LlamaForCausalLM` directory (f32) for transformers / lm_eval.
    Hf,
    /// A llama.cpp GGUF file, ternary matrices in TQ2_0 or TQ1_0.
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A tern checkpoint (or run / checkpoints folder: the newest complete one), a packed file,
    /// or a Hugging Face directory (a float model).
    #[arg(long, required_unless_present = "from_hf")]
    checkpoint: Option<PathBuf>,
    /// A Hugging Face Llama directory holding an unpacked TriLM (every projection ternary times
    /// one scale per training shard, as Spectra releases them): packed losslessly, its shard
    /// count from config.json's `pretraining_model_parallel` or found from the values.
    #[arg(long, conflicts_with = "checkpoint")]
    from_hf: Option<PathBuf>,
    #[arg(long, value_enum)]
    format: Format,
    /// Output file (packed, gguf) or directory (hf).
    #[arg(long)]
    out: PathBuf,
    /// Ternary codes: `2bit` (default) or `base3` for packed; `tq2_0` (default) or `tq1_0` for gguf.
    #[arg(long)]
    codes: Option<String>,
    /// Tensors that are not ternary: f32 (default, as trained), f16 or bf16 (packed); f32 or f16
    /// (gguf: embedding and head; norms stay f32).
    #[arg(long, default_value = "f32")]
    float_dtype: String,
    /// tokenizer.json to include (default: the one the checkpoint's recipe names, when present).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let float_dtype = FloatDtype::parse(&a.float_dtype).context("--float-dtype")?;
    let encoding = match (a.format, a.codes.as_deref()) {
        (Format::Packed, Some(c)) => Encoding::parse(c).context("--codes")?,
        (Format::Gguf, Some(c)) if c != "tq2_0" && c != "tq1_0" => {
            bail!("--codes {c:?}: GGUF ternary types are tq2_0 and tq1_0")
        }
        (Format::Hf, Some(c)) => bail!("--codes {c:?}: a Hugging Face export is unpacked f32"),
        _ => Encoding::Bits2,
    };
    let tok = a.tokenizer.as_deref();
    let loaded = match (&a.checkpoint, &a.from_hf) {
        (_, Some(dir)) => crate::load::load_trilm(dir, encoding, float_dtype, tok)?,
        (Some(c), None) => crate::load::load(c, encoding, float_dtype, tok)?,
        (None, None) => bail!("give --checkpoint PATH or --from-hf DIR"),
    };
    let ternary = match a.codes.as_deref() {
        Some("tq1_0") => GgmlType::Tq1_0,
        _ => GgmlType::Tq2_0,
    };
    write(&loaded, a.format, &a.out, float_dtype, ternary)
}

/// Writes a loaded model in `format` (`ternary`: the GGUF type of ternary matrices; packed files
/// take their codes from `loaded.packed.encoding`).
pub fn write(
    loaded: &crate::load::Loaded,
    format: Format,
    out: &std::path::Path,
    float_dtype: FloatDtype,
    ternary: GgmlType,
) -> Result<()> {
    let src = loaded.source.display().to_string();
    let encoding = loaded.packed.encoding;
    if loaded.packed.student.is_some() && format != Format::Packed {
        bail!(
            "{src}: a distillation student; its projections take their input through 1-bit \
             encoders, which a Hugging Face LlamaForCausalLM or a llama.cpp GGUF cannot express. \
             Export it with --format packed (tern generate, eval and logits run that file)"
        );
    }
    if format != Format::Packed {
        tern_infer::convert::check_plain_llama(&loaded.config).context(src.clone())?;
    }
    match format {
        Format::Packed => {
            let bytes = loaded.packed.write(out)?;
            let size = loaded.packed.size();
            crate::say(&format!(
                "packed {src} -> {} ({} codes, other tensors {}): {bytes} bytes on disk{}\n{}",
                out.display(),
                encoding.name(),
                float_dtype.name(),
                if loaded.packed.tokenizer.is_some() {
                    " (tokenizer included)"
                } else {
                    ""
                },
                size.describe()
            ));
        }
        Format::Hf => {
            let tensors: Vec<tern_hf::NamedTensor> = tern_infer::effective_tensors(&loaded.packed)
                .into_iter()
                .map(|(name, shape, values)| tern_hf::NamedTensor {
                    name,
                    shape,
                    values,
                })
                .collect();
            let mut config = loaded.config.clone();
            config.linear = tern_model::LinearKind::Float;
            let s = loaded.special()?;
            let special = tern_hf::Special {
                bos_token_id: s.bos,
                eos_token_id: s.eos,
            };
            let positions = loaded.max_positions.unwrap_or(2048);
            tern_hf::save(out, &config, &special, &tensors, positions, None)?;
            if let Some(t) = &loaded.tokenizer {
                let p = out.join("tokenizer.json");
                std::fs::write(&p, t).with_context(|| format!("writing {}", p.display()))?;
                let c = tern_hf::tokenizer_config(t, &special, s.unk, positions)?;
                let p = out.join("tokenizer_config.json");
                std::fs::write(&p, serde_json::to_string_pretty(&c)? + "\n")
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            crate::say(&format!(
                "Hugging Face LlamaForCausalLM directory {} from {src} (ternary matrices as \
                 scale x code in f32{})",
                out.display(),
                if loaded.tokenizer.is_some() {
                    ", tokenizer.json, tokenizer_config.json"
                } else {
                    "; no tokenizer found"
                }
            ));
        }
        Format::Gguf => {
            let ty = ternary;
            let float = match float_dtype {
                FloatDtype::F32 => GgmlType::F32,
                FloatDtype::F16 => GgmlType::F16,
                FloatDtype::Bf16 => bail!("--float-dtype bf16: GGUF export writes f32 or f16"),
            };
            let Some(tok) = &loaded.tokenizer else {
                bail!("{src}: GGUF needs the tokenizer; pass --tokenizer tokenizer.json");
            };
            let info = GgufInfo {
                ternary: ty,
                float,
                tokenizer: tok,
                special: loaded.special()?,
                context_length: loaded.max_positions.unwrap_or(2048),
                name: &src,
            };
            let file = gguf(&loaded.config, &loaded.packed.tensors, &info)?;
            let bytes = file.write(out)?;
            let mut types = std::collections::BTreeMap::new();
            for t in &file.tensors {
                *types.entry(t.ty.name()).or_insert(0) += 1;
            }
            let types: Vec<String> = types.iter().map(|(k, n)| format!("{n} {k}")).collect();
            crate::say(&format!(
                "GGUF {} from {src}: {} tensors ({}), {bytes} bytes",
                out.display(),
                file.tensors.len(),
                types.join(", ")
            ));
        }
    }
    Ok(())
}

/// llama.cpp's name of a tern parameter.
pub fn gguf_name(name: &str) -> String {
    let map = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    match name {
        "embed_tokens.weight" => "token_embd.weight".into(),
        "norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = name.strip_prefix("layers.").unwrap_or(name);
            let (l, part) = rest.split_once('.').unwrap_or(("?", rest));
            let part = map
                .iter()
                .find(|(t, _)| *t == part)
                .map_or(part, |(_, g)| g);
            format!("blk.{l}.{part}")
        }
    }
}

/// llama.cpp's row order for q / k (convert_hf_to_gguf.py's `permute`): within each head, the
/// two rotary halves are interleaved. `order[new] = old`.
pub fn rope_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for i in 0..hd / 2 {
            for s in 0..2 {
                order.push(h * hd + s * (hd / 2) + i);
            }
        }
    }
    order
}

fn reorder_rows<T: Clone>(v: &[T], cols: usize, order: &[usize]) -> Vec<T> {
    order
        .iter()
        .flat_map(|&r| v[r * cols..][..cols].iter().cloned())
        .collect()
}

/// What a GGUF file holds besides the tensors.
pub struct GgufInfo<'a> {
    /// TQ2_0 or TQ1_0.
    pub ternary: GgmlType,
    /// F32 or F16, for the embedding and head.
    pub float: GgmlType,
    pub tokenizer: &'a str,
    pub special: tern_pack::gguf::SpecialTokens,
    pub context_length: usize,
    pub name: &'a str,
}

/// The GGUF file of a model.
pub fn gguf(
    c: &ModelConfig,
    tensors: &[(String, PackedTensor)],
    info: &GgufInfo,
) -> Result<GgufFile> {
    let (ty, float) = (info.ternary, info.float);
    let mut f = GgufFile::default();
    let u = |v: usize| MetaValue::U32(v as u32);
    f.set("general.architecture", MetaValue::Str("llama".into()));
    f.set("general.name", MetaValue::Str(info.name.into()));
    f.set("llama.context_length", u(info.context_length));
    f.set("llama.embedding_length", u(c.hidden));
    f.set("llama.block_count", u(c.n_layers));
    f.set("llama.feed_forward_length", u(c.intermediate));
    f.set("llama.rope.dimension_count", u(c.head_dim()));
    f.set("llama.attention.head_count", u(c.n_heads));
    f.set("llama.attention.head_count_kv", u(c.kv_heads()));
    f.set(
        "llama.attention.layer_norm_rms_epsilon",
        MetaValue::F32(c.rms_eps as f32),
    );
    f.set("llama.rope.freq_base", MetaValue::F32(c.rope_theta as f32));
    f.set("llama.vocab_size", u(c.vocab()));
    // llama_ftype: MOSTLY_TQ1_0 = 36, MOSTLY_TQ2_0 = 37; a float model ALL_F32 = 0, MOSTLY_F16 = 1.
    let any_ternary = tensors
        .iter()
        .any(|(_, t)| matches!(t, PackedTensor::Ternary(_)));
    // MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7, MOSTLY_Q3_K_S = 11, MOSTLY_Q6_K = 18: the type of most
    // weights (rows that do not fill K-quant super-blocks fall back to Q4_0 / Q8_0).
    let quant_bits = tensors.iter().find_map(|(_, t)| match t {
        PackedTensor::Quant(m) => Some(m.bits),
        _ => None,
    });
    let any_k = tensors
        .iter()
        .any(|(_, t)| matches!(t, PackedTensor::Quant(m) if m.kscales.is_some()));
    let file_type = match (any_ternary, ty, float) {
        _ if quant_bits == Some(6) && any_k => 18,
        _ if quant_bits == Some(3) && any_k => 11,
        _ if matches!(quant_bits, Some(8 | 6)) => 7,
        _ if quant_bits.is_some() => 2,
        (true, GgmlType::Tq1_0, _) => 36,
        (true, _, _) => 37,
        (false, _, GgmlType::F16) => 1,
        (false, _, _) => 0,
    };
    f.set("general.file_type", u(file_type));
    for (k, v) in tern_pack::gguf::tokenizer_meta(info.tokenizer, c.vocab(), info.special)? {
        f.meta.push((k, v));
    }
    for (tname, t) in tensors {
        let g = gguf_name(tname);
        let heads = if tname.ends_with("q_proj.weight") {
            Some(c.n_heads)
        } else if tname.ends_with("k_proj.weight") {
            Some(c.kv_heads())
        } else {
            None
        };
        let tensor = match t {
            PackedTensor::Quant(m) => {
                let m = match heads {
                    Some(h) => m.with_rows(&rope_row_order(m.rows, h)),
                    None => m.clone(),
                };
                GgufTensor::quantized(&g, &m)?
            }
            PackedTensor::Ternary(m) => {
                let m = match heads {
                    Some(h) => permuted(m, &rope_row_order(m.rows, h)),
                    None => std::borrow::Cow::Borrowed(m),
                };
                GgufTensor::ternary(&g, &m, ty)?
            }
            PackedTensor::Float { shape, values } => {
                let values = match heads {
                    Some(h) => reorder_rows(values, shape[1], &rope_row_order(shape[0], h)),
                    None => values.clone(),
                };
                if shape.len() == 1 || float == GgmlType::F32 {
                    GgufTensor::f32(&g, shape.clone(), &values)
                } else {
                    GgufTensor::f16(&g, shape.clone(), &values)
                }
            }
        };
        f.tensors.push(tensor);
    }
    Ok(f)
}

/// `m` with its rows in `order`, each row keeping its own scales.
fn permuted<'a>(m: &TernaryMatrix, order: &[usize]) -> std::borrow::Cow<'a, TernaryMatrix> {
    // Scales are per row group; after the permutation a row's scale is its old row's, which a
    // row-group grid cannot express unless groups are whole heads: expand to one group per row.
    let scales: Vec<f32> = (0..m.rows)
        .flat_map(|new| {
            let old = order[new];
            (0..m.col_groups).map(move |g| m.scale(old, g * (m.cols / m.col_groups)))
        })
        .collect();
    std::borrow::Cow::Owned(TernaryMatrix {
        rows: m.rows,
        cols: m.cols,
        row_groups: m.rows,
        col_groups: m.col_groups,
        codes: reorder_rows(&m.codes, m.cols, order),
        scales,
    })
}
