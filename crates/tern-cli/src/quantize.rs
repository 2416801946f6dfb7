//! `tern quantize`: a float model (tern checkpoint or Hugging Face Llama directory) post-training
//! quantized to 3-8 bits, Spectra's QuantLM: GPTQ, block by block on calibration sequences (each
//! block's inputs come from the blocks before it, already quantized), or round-to-nearest. The
//! result is written like `tern export` writes: a packed file (codes `bits` a weight, f16 group
//! scales or llama.cpp's K-quant scales), a Hugging Face directory (dequantized), or GGUF (Q8_0,
//! Q6_K, Q4_0, Q3_K).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tern_data::ValData;
use tern_infer::model::PROJECTIONS;
use tern_infer::{Dense, InferModel, Matrix};
use tern_pack::file::FloatDtype;
use tern_pack::gguf::GgmlType;
use tern_pack::{Encoding, PackedTensor, QuantMatrix};
use tern_quant::{GptqConfig, Grid};

use crate::export::Format;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Hessian-aware rounding with error compensation (needs --calib).
    Gptq,
    /// Round to nearest (no calibration).
    Rtn,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// A float tern checkpoint (or run / checkpoints folder) or a Hugging Face Llama directory.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, value_enum, default_value = "gptq")]
    method: Method,
    /// Bits a weight: 3, 4, 6 or 8.
    #[arg(long)]
    bits: u32,
    /// Consecutive input columns sharing a scale (32 fits GGUF's Q8_0 / Q4_0 blocks).
    #[arg(long, default_value_t = 32)]
    group_size: usize,
    /// llama.cpp's K-quant scales at 6 or 3 bits (Q6_K / Q3_K: groups of 16, each scale an integer
    /// times an f16 per 256 columns) for matrices whose rows are whole 256-column super-blocks;
    /// other matrices keep f16 scales in --group-size groups. Implied by --format gguf at 6 and 3
    /// bits.
    #[arg(long)]
    k_quants: bool,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal (static groups): on by
    /// default, `--act-order false` keeps the columns' order.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    act_order: Option<bool>,
    /// GPTQ: dampening of the Hessian, a fraction of its mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// GPTQ calibration data: token shards (.bin, .h5) or text (.jsonl, .jsonl.zst), read in order.
    #[arg(long, num_args = 1..)]
    calib: Vec<String>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 32)]
    calib_seqs: usize,
    /// Tokens per calibration sequence (default: the checkpoint's training length).
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, value_enum, default_value = "packed")]
    format: Format,
    #[arg(long)]
    out: PathBuf,
    /// Tensors that are not quantized (embeddings, norms, head): f32, f16 or bf16 (packed); f32 or
    /// f16 (gguf).
    #[arg(long, default_value = "f32")]
    float_dtype: String,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// End-of-document token (for text calibration data).
    #[arg(long, default_value = "</s>")]
    eos_token: String,
}

/// `sum_t x_t x_t^T * 2` of `x: [t, cols]` into `h` (f32 products on the dense kernel, summed in
/// f64 across sequences).
fn add_hessian(h: &mut [f64], x: &[f32], cols: usize) {
    let t = x.len() / cols;
    let mut xt = vec![0f32; cols * t];
    for (i, row) in x.chunks(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            xt[c * t + i] = *v;
        }
    }
    let m = Matrix::Dense(Dense {
        rows: cols,
        cols: t,
        values: xt.clone(),
    });
    for (hv, p) in h.iter_mut().zip(m.matmul(&xt, cols)) {
        *hv += 2.0 * p as f64;
    }
}

/// The grid each matrix is quantized on: K-quant scales where asked and its rows fill
/// super-blocks, f16 group scales otherwise.
#[derive(Clone, Copy)]
struct Grids {
    plain: Grid,
    k: Option<Grid>,
}

impl Grids {
    fn for_cols(&self, cols: usize) -> Grid {
        match self.k {
            Some(k) if k.fits(cols) => k,
            _ => self.plain,
        }
    }
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let plain = Grid::new(a.bits, a.group_size)?;
    let k_quants = a.k_quants || (a.format == Format::Gguf && matches!(a.bits, 3 | 6));
    let grids = Grids {
        plain,
        k: k_quants.then(|| Grid::k_quant(a.bits)).transpose()?,
    };
    let float_dtype = FloatDtype::parse(&a.float_dtype).context("--float-dtype")?;
    // What the output format cannot take, found before any calibration runs.
    if a.format == Format::Gguf {
        if !k_quants {
            tern_pack::quant::ggml_type(a.bits, a.group_size, false).map_err(|e| {
                anyhow::anyhow!(
                    "--bits {} --group-size {} with --format gguf: {e}",
                    a.bits,
                    a.group_size
                )
            })?;
        }
        if float_dtype == FloatDtype::Bf16 {
            bail!("--float-dtype bf16: GGUF export writes f32 or f16");
        }
    }
    if a.method == Method::Rtn && (a.act_order.is_some() || a.damp != 0.01) {
        bail!("--act-order and --damp are GPTQ's; --method rtn takes neither");
    }
    if !(a.damp >= 0.0 && a.damp.is_finite()) {
        bail!("--damp {}: must be a non-negative fraction", a.damp);
    }
    if a.seq_len == Some(0) {
        bail!("--seq-len must be at least 1");
    }
    let mut loaded = crate::load::load(
        &a.checkpoint,
        Encoding::Bits2,
        FloatDtype::F32,
        a.tokenizer.as_deref(),
    )?;
    let src = loaded.source.display().to_string();
    if loaded.config.linear != tern_model::LinearKind::Float || loaded.packed.student.is_some() {
        bail!(
            "{src}: tern quantize takes a float model (model.linear = \"float\"); this one is {:?}{}",
            loaded.config.linear,
            if loaded.packed.student.is_some() { ", a distillation student" } else { "" }
        );
    }
    tern_infer::convert::check_plain_llama(&loaded.config).context(src.clone())?;
    if a.format == Format::Gguf {
        // Matrices without K-quant scales go in Q8_0 / Q4_0 blocks of 32 columns.
        let fallback = tern_pack::quant::ggml_type(a.bits, a.group_size, false);
        for (name, t) in &loaded.packed.tensors {
            let PackedTensor::Float { shape, .. } = t else {
                continue;
            };
            if !name.ends_with("_proj.weight") || grids.for_cols(shape[1]).kquant {
                continue;
            }
            let why = match &fallback {
                Err(e) => e.to_string(),
                Ok(_) if !shape[1].is_multiple_of(32) => {
                    "its rows do not fill GGUF's blocks of 32".to_string()
                }
                Ok(_) => continue,
            };
            bail!(
                "{name} ({} columns{}) with --bits {} --group-size {} in GGUF: {why}",
                shape[1],
                if k_quants {
                    ", not a multiple of 256"
                } else {
                    ""
                },
                a.bits,
                a.group_size
            );
        }
    }
    let start = Instant::now();
    let quantized = match a.method {
        Method::Rtn => {
            if !a.calib.is_empty() {
                bail!("--calib: round-to-nearest uses no calibration data");
            }
            loaded
                .packed
                .tensors
                .iter()
                .filter(|(n, _)| n.ends_with("_proj.weight"))
                .map(|(n, t)| match t {
                    PackedTensor::Float { shape, values } => Ok((
                        n.clone(),
                        tern_quant::rtn(values, shape[0], shape[1], grids.for_cols(shape[1])),
                    )),
                    _ => bail!("{n} is not float"),
                })
                .collect::<Result<Vec<_>>>()?
        }
        Method::Gptq => gptq_model(&a, &loaded, grids)?,
    };
    let n = quantized.len();
    let k = quantized
        .iter()
        .filter(|(_, q)| q.kscales.is_some())
        .count();
    let mut map: std::collections::HashMap<_, _> = quantized.into_iter().collect();
    for (name, t) in loaded.packed.tensors.iter_mut() {
        if let Some(q) = map.remove(name) {
            *t = PackedTensor::Quant(q);
        }
    }
    loaded.packed.float_dtype = float_dtype;
    let form = match (k, n - k) {
        (0, _) => format!("f16 scales in groups of {}", a.group_size),
        (k, 0) => format!("{k} with K-quant scales"),
        (k, p) => format!(
            "{k} with K-quant scales, {p} (rows not a multiple of 256) with f16 scales in groups of {}",
            a.group_size
        ),
    };
    crate::say(&format!(
        "{} {n} projections of {src} to {} bits ({form}) in {:.1} s",
        match (a.method, a.act_order.unwrap_or(true)) {
            (Method::Gptq, true) => "GPTQ (act-order)",
            (Method::Gptq, false) => "GPTQ (columns in order)",
            (Method::Rtn, _) => "round-to-nearest",
        },
        a.bits,
        start.elapsed().as_secs_f64()
    ));
    crate::export::write(&loaded, a.format, &a.out, float_dtype, GgmlType::Tq2_0)
}

/// GPTQ of every block projection, block by block.
fn gptq_model(
    a: &QuantizeArgs,
    loaded: &crate::load::Loaded,
    grids: Grids,
) -> Result<Vec<(String, QuantMatrix)>> {
    if a.calib.is_empty() {
        bail!("--method gptq needs --calib DATA (token shards or text) for its Hessians");
    }
    if a.calib_seqs == 0 {
        bail!("--calib-seqs must be at least 1");
    }
    let (dc, tok) = crate::eval::data_at(loaded, &a.calib, a.seq_len, &a.eos_token, "--calib")?;
    let mut model = InferModel::from_packed(loaded.packed.clone())?;
    if tok.vocab_size > model.vocab() {
        bail!(
            "the tokenizer has {} tokens; the model's vocabulary is {}",
            tok.vocab_size,
            model.vocab()
        );
    }
    let mut data = ValData::open(&dc, &tok)?;
    let blocks = data.source.blocks() as usize;
    if blocks == 0 {
        bail!("--calib holds no sequence of {} tokens", dc.seq_len);
    }
    let seqs = a.calib_seqs.min(blocks);
    let mut xs = Vec::with_capacity(seqs);
    for b in 0..seqs {
        let block = data.read(b as u64, 1)?;
        xs.push(model.embed(&block[..dc.seq_len])?);
    }
    crate::say(&format!(
        "GPTQ calibration: {seqs} sequences of {} tokens",
        dc.seq_len
    ));
    let cfg = |cols: usize| GptqConfig {
        grid: grids.for_cols(cols),
        damp: a.damp,
        act_order: a.act_order.unwrap_or(true),
    };
    let mut out = Vec::new();
    let layers = model.layers.len();
    for l in 0..layers {
        let t0 = Instant::now();
        // Hessians of the block's four distinct inputs, on the quantized blocks' outputs.
        let mut hs: std::collections::HashMap<&'static str, (Vec<f64>, usize, usize)> =
            Default::default();
        for x in &xs {
            let mut x = x.clone();
            model.block_forward(l, &mut x, &mut |names, input| {
                let t = x_len(input, names, &model, l);
                let cols = input.len() / t;
                let e = hs
                    .entry(names[0])
                    .or_insert_with(|| (vec![0f64; cols * cols], 0, cols));
                add_hessian(&mut e.0, input, cols);
                e.1 += t;
            });
        }
        let t1 = Instant::now();
        for name in PROJECTIONS {
            let key = match name {
                "self_attn.k_proj" | "self_attn.v_proj" => "self_attn.q_proj",
                "mlp.up_proj" => "mlp.gate_proj",
                n => n,
            };
            let (h, count, cols) = &hs[key];
            let h: Vec<f64> = h.iter().map(|v| v / *count as f64).collect();
            let full = format!("layers.{l}.{name}.weight");
            let proj = model.layers[l]
                .projection_mut(name)
                .expect("a block projection");
            let Matrix::Dense(d) = &proj.weight else {
                bail!("{full} is not float");
            };
            let q = tern_quant::gptq(&d.values, d.rows, *cols, &h, cfg(*cols))
                .with_context(|| full.clone())?;
            proj.weight = Matrix::Dense(Dense {
                rows: q.rows,
                cols: q.cols,
                values: q.dequantize(),
            });
            out.push((full, q));
        }
        let t2 = Instant::now();
        // The next block sees this one quantized.
        for x in &mut xs {
            model.block_forward(l, x, &mut |_, _| {});
        }
        eprintln!(
            "block {}/{layers}: Hessians {:.1} s, GPTQ {:.1} s, quantized forward {:.1} s",
            l + 1,
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            t2.elapsed().as_secs_f64()
        );
    }
    Ok(out)
}

/// Positions in a block input (`[t, width]`, the width set by which projections read it).
fn x_len(input: &[f32], names: &[&str], model: &InferModel, l: usize) -> usize {
    let cols = model.layers[l]
        .projection(names[0])
        .map_or(1, |p| p.weight.cols());
    input.len() / cols
}
