//! A GGUF (version 3) writer: header, key-value metadata, tensor infos, aligned tensor data.
//! Dimensions are written in ggml's order (`ne[0]` is the number of columns, the fastest axis), the
//! reverse of a row-major shape.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::codes::TernaryMatrix;
use crate::ggml;

pub const ALIGNMENT: usize = 32;

/// ggml tensor types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    Q3K = 11,
    Q6K = 14,
    Tq1_0 = 34,
    Tq2_0 = 35,
}

impl GgmlType {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q8_0 => "Q8_0",
            Self::Q3K => "Q3_K",
            Self::Q6K => "Q6_K",
            Self::Tq1_0 => "TQ1_0",
            Self::Tq2_0 => "TQ2_0",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl MetaValue {
    /// GGUF's value type number.
    fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Strs(_) | Self::I32s(_) => 9,
        }
    }

    /// Type, then value (an array: element type, count, elements).
    fn write(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn array_head(out: &mut Vec<u8>, elem: u32, n: usize) {
            out.extend(elem.to_le_bytes());
            out.extend((n as u64).to_le_bytes());
        }
        out.extend(self.type_id().to_le_bytes());
        match self {
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(*v as u8),
            Self::Str(s) => string(out, s),
            Self::Strs(v) => {
                array_head(out, 8, v.len());
                v.iter().for_each(|s| string(out, s));
            }
            Self::I32s(v) => {
                array_head(out, 5, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
}

pub struct GgufTensor {
    pub name: String,
    /// Row-major shape (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

impl GgufTensor {
    pub fn f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            name: name.into(),
            shape,
            ty: GgmlType::F32,
            data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn f16(name: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            name: name.into(),
            shape,
            ty: GgmlType::F16,
            data: values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }

    /// An integer-quantized matrix in Q8_0, Q6_K, Q4_0 or Q3_K (see
    /// [`crate::QuantMatrix::ggml_blocks`]).
    pub fn quantized(name: &str, m: &crate::QuantMatrix) -> Result<Self> {
        let (ty, data) = m.ggml_blocks(name)?;
        Ok(Self {
            name: name.into(),
            shape: vec![m.rows, m.cols],
            ty,
            data,
        })
    }

    /// A ternary matrix in TQ2_0 or TQ1_0: rows of 256-weight blocks, each with the scale of its
    /// weights. A row length that is not a multiple of 256, or a scale group that does not hold
    /// whole blocks, is an error naming `name`.
    pub fn ternary(name: &str, m: &TernaryMatrix, ty: GgmlType) -> Result<Self> {
        let (rows, cols) = (m.rows, m.cols);
        if cols % ggml::QK != 0 {
            bail!(
                "{name}: rows of {cols} weights do not fit {}'s blocks of {}: a GGUF export \
                 needs ternary matrices with a multiple of 256 columns",
                ty.name(),
                ggml::QK
            );
        }
        if !(cols / m.col_groups).is_multiple_of(ggml::QK) {
            bail!(
                "{name}: its {} column scale groups of {} weights do not hold whole blocks of {}",
                m.col_groups,
                cols / m.col_groups,
                ggml::QK
            );
        }
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..cols / ggml::QK {
                let codes = &m.codes[r * cols + b * ggml::QK..][..ggml::QK];
                let d = m.scale(r, b * ggml::QK);
                match ty {
                    GgmlType::Tq2_0 => data.extend(ggml::tq2_0_block(codes, d)),
                    GgmlType::Tq1_0 => data.extend(ggml::tq1_0_block(codes, d)),
                    _ => bail!("{name}: {} is not a ternary type", ty.name()),
                }
            }
        }
        Ok(Self {
            name: name.into(),
            shape: vec![rows, cols],
            ty,
            data,
        })
    }
}

#[derive(Default)]
pub struct GgufFile {
    pub meta: Vec<(String, MetaValue)>,
    pub tensors: Vec<GgufTensor>,
}

fn pad_to(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
}

impl GgufFile {
    pub fn set(&mut self, key: &str, v: MetaValue) {
        self.meta.push((key.to_string(), v));
    }

    /// The header (everything before the tensor data) and the data offsets.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(b"GGUF");
        h.extend(3u32.to_le_bytes());
        h.extend((self.tensors.len() as u64).to_le_bytes());
        h.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            h.extend((k.len() as u64).to_le_bytes());
            h.extend(k.as_bytes());
            v.write(&mut h);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            h.extend((t.name.len() as u64).to_le_bytes());
            h.extend(t.name.as_bytes());
            h.extend((t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                h.extend((d as u64).to_le_bytes());
            }
            h.extend((t.ty as u32).to_le_bytes());
            h.extend((offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad_to(&mut h, ALIGNMENT);
        h
    }

    /// Writes the file through a temporary name; returns its size.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        let h = self.header();
        let mut n = h.len();
        f.write_all(&h)?;
        for t in &self.tensors {
            f.write_all(&t.data)?;
            n += t.data.len();
            let pad = n.div_ceil(ALIGNMENT) * ALIGNMENT - n;
            f.write_all(&vec![0u8; pad])?;
            n += pad;
        }
        f.into_inner()
            .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?
            .sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(n as u64)
    }
}

/// Tokenizer metadata for a Hugging Face byte-level BPE `tokenizer.json` (llama.cpp's "gpt2"
/// tokenizer model): tokens by id, their types (3 = control for special added tokens, 1 = normal,
/// 5 = unused for padding ids past the tokenizer's vocabulary up to the model's), merges.
/// `ids` gives the begin / end of sequence ids (the model's own, when known); the unknown token is
/// looked up by name.
pub fn tokenizer_meta(
    tokenizer_json: &str,
    vocab: usize,
    ids: SpecialTokens,
) -> Result<Vec<(String, MetaValue)>> {
    let t: Value = serde_json::from_str(tokenizer_json).context("tokenizer.json")?;
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "tokenizer.json: model type {} is not BPE; only byte-level BPE tokenizers are exported \
             to GGUF",
            model["type"]
        );
    }
    let vmap = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("tokenizer.json: model.vocab is not an object"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![1i32; vocab];
    let mut put = |tok: &str, id: u64| -> Result<()> {
        let id = id as usize;
        if id >= vocab {
            bail!("tokenizer.json: token {tok:?} has id {id}, outside the model's {vocab}");
        }
        tokens[id] = Some(tok.to_string());
        Ok(())
    };
    for (tok, id) in vmap {
        put(tok, id.as_u64().unwrap_or(u64::MAX))?;
    }
    let mut special = Vec::new();
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(tok), Some(id)) = (a["content"].as_str(), a["id"].as_u64()) else {
            continue;
        };
        put(tok, id)?;
        // llama.cpp matches added tokens whole: control (3) for special ones, user-defined (4)
        // for the others, as convert_hf_to_gguf.py writes them.
        if a["special"].as_bool().unwrap_or(false) {
            types[id as usize] = 3;
            special.push((tok.to_string(), id as u32));
        } else {
            types[id as usize] = 4;
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    // Merges are "a b" strings, or [a, b] pairs in newer tokenizers.json files.
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => bail!("tokenizer.json: merge {other} is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<Vec<_>>>()?;
    let unk = find_special(&special).unk;
    let mut kv = vec![
        ("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            MetaValue::Str(pre_tokenizer(&t).into()),
        ),
        ("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)),
        ("tokenizer.ggml.merges".into(), MetaValue::Strs(merges)),
    ];
    if let Some(b) = ids.bos {
        kv.push(("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(b)));
    }
    if let Some(e) = ids.eos {
        kv.push(("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(e)));
    }
    if let Some(u) = unk {
        kv.push(("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(u)));
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(false),
    ));
    Ok(kv)
}

/// llama.cpp's name for the tokenizer's pre-tokenizer: "gpt-2" is exactly Hugging Face's plain
/// ByteLevel split (GPT-2's regex); anything else gets "default", which llama.cpp loads with a
/// warning (its "default" regexes differ from Hugging Face's, so text may split differently; an
/// unknown name would not load at all).
fn pre_tokenizer(t: &Value) -> &'static str {
    let p = &t["pre_tokenizer"];
    if p["type"] == "ByteLevel" && p["use_regex"].as_bool().unwrap_or(true) {
        "gpt-2"
    } else {
        "default"
    }
}

/// Begin / end of sequence and unknown token ids of a tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
}

fn find_special(special: &[(String, u32)]) -> SpecialTokens {
    let find = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| special.iter().find(|(t, _)| t == n).map(|(_, id)| *id))
    };
    SpecialTokens {
        bos: find(&["<s>", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>"]),
        eos: find(&["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"]),
        unk: find(&["<unk>"]),
    }
}

/// The special token ids of a tokenizer.json's added tokens, by their usual names.
pub fn special_tokens(tokenizer_json: &str) -> Result<SpecialTokens> {
    let t: Value = serde_json::from_str(tokenizer_json).context("tokenizer.json")?;
    let special: Vec<(String, u32)> = t["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["special"].as_bool().unwrap_or(false))
        .filter_map(|a| Some((a["content"].as_str()?.to_string(), a["id"].as_u64()? as u32)))
        .collect();
    Ok(find_special(&special))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_by_hand() {
        let mut f = GgufFile::default();
        f.set("general.architecture", MetaValue::Str("llama".into()));
        f.tensors.push(GgufTensor::f32("a", vec![2, 3], &[0.0; 6]));
        f.tensors.push(GgufTensor::f16("b", vec![5], &[1.0; 5]));
        let h = f.header();
        let mut want = Vec::new();
        want.extend(b"GGUF");
        want.extend(3u32.to_le_bytes());
        want.extend(2u64.to_le_bytes());
        want.extend(1u64.to_le_bytes());
        want.extend(20u64.to_le_bytes());
        want.extend(b"general.architecture");
        want.extend(8u32.to_le_bytes());
        want.extend(5u64.to_le_bytes());
        want.extend(b"llama");
        // tensor a: name, 2 dims reversed (3, 2), F32, offset 0
        want.extend(1u64.to_le_bytes());
        want.extend(b"a");
        want.extend(2u32.to_le_bytes());
        want.extend(3u64.to_le_bytes());
        want.extend(2u64.to_le_bytes());
        want.extend(0u32.to_le_bytes());
        want.extend(0u64.to_le_bytes());
        // tensor b: 24 bytes of a, padded to 32
        want.extend(1u64.to_le_bytes());
        want.extend(b"b");
        want.extend(1u32.to_le_bytes());
        want.extend(5u64.to_le_bytes());
        want.extend(1u32.to_le_bytes());
        want.extend(32u64.to_le_bytes());
        while want.len() % 32 != 0 {
            want.push(0);
        }
        assert_eq!(h, want);
    }

    #[test]
    fn ragged_rows_are_refused_by_name() {
        let m = TernaryMatrix {
            rows: 2,
            cols: 128,
            row_groups: 1,
            col_groups: 1,
            codes: vec![0; 256],
            scales: vec![1.0],
        };
        let e = GgufTensor::ternary("blk.0.attn_q.weight", &m, GgmlType::Tq2_0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("128"),
            "{e}"
        );
    }
}
