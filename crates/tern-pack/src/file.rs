//! tern's packed model file: one safetensors file.
//!
//! - a ternary matrix `NAME` is stored as `NAME.codes` (U8, `[rows, row_bytes]`, see
//!   [`crate::codes`]) and `NAME.scales` (F32, `[row_groups, col_groups]`);
//! - every other tensor as `NAME`, in F32 (as trained) or, on request, F16 / BF16;
//! - metadata: `format = "tern-packed"`, `version = "1"`, `encoding` (`2bit` | `base3`), `config`
//!   (the model's `[model]` section as JSON), `ternary` (JSON: name -> shape and scale groups),
//!   `order` (JSON list: every tensor in module order), optionally `tokenizer` (the tokenizer.json
//!   text, so the file alone can generate text), `source`, and `student` (JSON [`StudentSpec`]:
//!   a distillation student, whose encoders are among the float tensors).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codes::{unpack, Encoding, TernaryMatrix};
use crate::quant::QuantMatrix;

pub const FORMAT: &str = "tern-packed";
pub const VERSION: &str = "1";

/// How the tensors that are not ternary are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}

impl FloatDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => bail!("unknown float type {s:?}; expected f32, f16 or bf16"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            Self::Bf16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PackedTensor {
    Ternary(TernaryMatrix),
    /// Post-training quantized to 3-8 bits (`tern quantize`).
    Quant(QuantMatrix),
    Float {
        shape: Vec<usize>,
        values: Vec<f32>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct QuantMeta {
    shape: [usize; 2],
    bits: u32,
    group: usize,
    /// K-quant scales: `NAME.qscales` holds the integer group scales (I8) and `NAME.qsuper` the
    /// f16 scale of each 256 columns.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    kquant: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TernaryMeta {
    shape: [usize; 2],
    row_groups: usize,
    col_groups: usize,
}

/// A distillation student: the blocks whose projections take their input through a 1-bit
/// encoder, stored as float tensors `layers.{i}.{projection}.encoder.{fc1,fc2,alpha,beta}` (and
/// `offset` in the residual form) beside the projection's weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    pub layers: Vec<usize>,
    /// The encoder adds its input to its net's output and an offset to its code (a calibrated
    /// start's form).
    pub residual: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PackedModel {
    /// The `[model]` section (tern's `ModelConfig`) as JSON.
    pub config: Value,
    pub encoding: Encoding,
    pub float_dtype: FloatDtype,
    /// Every tensor by tern name, in module order.
    pub tensors: Vec<(String, PackedTensor)>,
    /// tokenizer.json's text.
    pub tokenizer: Option<String>,
    /// Where the weights came from (a checkpoint directory).
    pub source: Option<String>,
    /// Begin / end of sequence ids, when the source says them (a Hugging Face config.json).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Set for a distillation student.
    pub student: Option<StudentSpec>,
}

/// Sizes of a model's tensors as stored (headers and tokenizer not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizeReport {
    pub ternary_params: u64,
    /// Codes and scales of the ternary matrices.
    pub ternary_bytes: u64,
    pub other_params: u64,
    pub other_bytes: u64,
    /// Codes and f16 scales of integer-quantized matrices.
    pub quant_params: u64,
    pub quant_bytes: u64,
}

impl SizeReport {
    pub fn add_ternary(&mut self, rows: usize, cols: usize, groups: usize, enc: Encoding) {
        self.ternary_params += (rows * cols) as u64;
        self.ternary_bytes += (rows * enc.row_bytes(cols) + 4 * groups) as u64;
    }
    pub fn add_float(&mut self, n: usize, dtype: FloatDtype) {
        self.other_params += n as u64;
        self.other_bytes += (n * dtype.bytes()) as u64;
    }
    pub fn params(&self) -> u64 {
        self.ternary_params + self.other_params + self.quant_params
    }
    pub fn bytes(&self) -> u64 {
        self.ternary_bytes + self.other_bytes + self.quant_bytes
    }
    pub fn ternary_bits(&self) -> f64 {
        8.0 * self.ternary_bytes as f64 / self.ternary_params.max(1) as f64
    }
    pub fn bits(&self) -> f64 {
        8.0 * self.bytes() as f64 / self.params().max(1) as f64
    }
    /// How many times smaller than the same parameters in fp32 / fp16.
    pub fn vs_fp32(&self) -> f64 {
        4.0 * self.params() as f64 / self.bytes() as f64
    }
    pub fn vs_fp16(&self) -> f64 {
        2.0 * self.params() as f64 / self.bytes() as f64
    }
    /// A few lines for people.
    pub fn describe(&self) -> String {
        let quant = if self.quant_params > 0 {
            format!(
                "quantized matrices: {} params in {} bytes = {:.3} bits/param\n",
                self.quant_params,
                self.quant_bytes,
                8.0 * self.quant_bytes as f64 / self.quant_params as f64
            )
        } else {
            String::new()
        };
        quant
            + &format!(
                "ternary matrices: {} params in {} bytes = {:.3} bits/param\n\
             other tensors:    {} params in {} bytes\n\
             whole model:      {} params in {} bytes = {:.3} bits/param, {:.2}x smaller than fp32, \
             {:.2}x smaller than fp16",
                self.ternary_params,
                self.ternary_bytes,
                self.ternary_bits(),
                self.other_params,
                self.other_bytes,
                self.params(),
                self.bytes(),
                self.bits(),
                self.vs_fp32(),
                self.vs_fp16()
            )
    }
}

impl PackedModel {
    pub fn size(&self) -> SizeReport {
        let mut s = SizeReport::default();
        for (_, t) in &self.tensors {
            match t {
                PackedTensor::Ternary(m) => {
                    s.add_ternary(m.rows, m.cols, m.row_groups * m.col_groups, self.encoding)
                }
                PackedTensor::Float { values, .. } => s.add_float(values.len(), self.float_dtype),
                PackedTensor::Quant(m) => {
                    s.quant_params += (m.rows * m.cols) as u64;
                    let scale_bytes = match &m.kscales {
                        Some(k) => k.sc.len() + 2 * k.d.len(),
                        None => 2 * m.scales.len(),
                    };
                    s.quant_bytes += (m.rows * m.row_bytes() + scale_bytes) as u64;
                }
            }
        }
        s
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut ternary = BTreeMap::new();
        let mut quantized = BTreeMap::new();
        for (name, t) in &self.tensors {
            match t {
                PackedTensor::Quant(m) => {
                    m.check(name)?;
                    blobs.push((
                        format!("{name}.qcodes"),
                        Dtype::U8,
                        vec![m.rows, m.row_bytes()],
                        m.pack(),
                    ));
                    match &m.kscales {
                        None => blobs.push((
                            format!("{name}.qscales"),
                            Dtype::F16,
                            vec![m.rows, m.groups()],
                            FloatDtype::F16.encode(&m.scales),
                        )),
                        Some(k) => {
                            blobs.push((
                                format!("{name}.qscales"),
                                Dtype::I8,
                                vec![m.rows, m.groups()],
                                k.sc.iter().map(|&v| v as u8).collect(),
                            ));
                            blobs.push((
                                format!("{name}.qsuper"),
                                Dtype::F16,
                                vec![m.rows, m.cols / crate::quant::SUPER_BLOCK],
                                FloatDtype::F16.encode(&k.d),
                            ));
                        }
                    }
                    quantized.insert(
                        name.clone(),
                        QuantMeta {
                            shape: [m.rows, m.cols],
                            bits: m.bits,
                            group: m.group,
                            kquant: m.kscales.is_some(),
                        },
                    );
                }
                PackedTensor::Ternary(m) => {
                    m.check(name)?;
                    let stride = self.encoding.row_bytes(m.cols);
                    blobs.push((
                        format!("{name}.codes"),
                        Dtype::U8,
                        vec![m.rows, stride],
                        m.pack(self.encoding),
                    ));
                    blobs.push((
                        format!("{name}.scales"),
                        Dtype::F32,
                        vec![m.row_groups, m.col_groups],
                        m.scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ));
                    ternary.insert(
                        name.clone(),
                        TernaryMeta {
                            shape: [m.rows, m.cols],
                            row_groups: m.row_groups,
                            col_groups: m.col_groups,
                        },
                    );
                }
                PackedTensor::Float { shape, values } => {
                    if shape.iter().product::<usize>() != values.len() {
                        bail!("{name}: {} values for shape {shape:?}", values.len());
                    }
                    blobs.push((
                        name.clone(),
                        self.float_dtype.dtype(),
                        shape.clone(),
                        self.float_dtype.encode(values),
                    ));
                }
            }
        }
        let order: Vec<&String> = self.tensors.iter().map(|(n, _)| n).collect();
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("encoding".to_string(), self.encoding.name().to_string()),
            ("config".to_string(), self.config.to_string()),
            ("ternary".to_string(), serde_json::to_string(&ternary)?),
            ("order".to_string(), serde_json::to_string(&order)?),
        ]);
        if let Some(t) = &self.tokenizer {
            meta.insert("tokenizer".into(), t.clone());
        }
        if let Some(s) = &self.source {
            meta.insert("source".into(), s.clone());
        }
        if let Some(s) = &self.student {
            meta.insert("student".into(), serde_json::to_string(s)?);
        }
        if !quantized.is_empty() {
            meta.insert("quantized".into(), serde_json::to_string(&quantized)?);
        }
        for (k, v) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(v) = v {
                meta.insert(k.into(), v.to_string());
            }
        }
        let views = blobs
            .iter()
            .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        Ok(safetensors::tensor::serialize(views, Some(meta))?)
    }

    /// Writes the file atomically (a temporary file renamed into place); returns its size.
    pub fn write(&self, path: &Path) -> Result<u64> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(bytes.len() as u64)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| anyhow!("metadata has no {k:?}: not a tern packed file"))
        };
        if get("format")? != FORMAT {
            bail!("metadata format = {:?}, not {FORMAT:?}", get("format")?);
        }
        if get("version")? != VERSION {
            bail!(
                "packed format version {} (this tern reads {VERSION})",
                get("version")?
            );
        }
        let encoding = Encoding::parse(get("encoding")?)?;
        let config: Value = serde_json::from_str(get("config")?).context("metadata config")?;
        let ternary: BTreeMap<String, TernaryMeta> =
            serde_json::from_str(get("ternary")?).context("metadata ternary")?;
        let order: Vec<String> = serde_json::from_str(get("order")?).context("metadata order")?;
        let quantized: BTreeMap<String, QuantMeta> = match meta.get("quantized") {
            Some(q) => serde_json::from_str(q).context("metadata quantized")?,
            None => BTreeMap::new(),
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{e}"))?;
        let tensor = |n: &str| st.tensor(n).map_err(|_| anyhow!("tensor {n} is missing"));
        let mut float_dtype = FloatDtype::F32;
        let mut tensors = Vec::new();
        for name in order {
            if let Some(q) = quantized.get(&name) {
                let codes = tensor(&format!("{name}.qcodes"))?;
                let scales = tensor(&format!("{name}.qscales"))?;
                let [rows, cols] = q.shape;
                if !(3..=8).contains(&q.bits) || q.group == 0 {
                    bail!(
                        "{name}: metadata says {} bits in groups of {}",
                        q.bits,
                        q.group
                    );
                }
                let row_bytes = (cols * q.bits as usize).div_ceil(8);
                let groups = cols.div_ceil(q.group);
                if codes.dtype() != Dtype::U8 || codes.shape() != [rows, row_bytes] {
                    bail!("{name}.qcodes must be U8 [{rows}, {row_bytes}]");
                }
                let (scales, kscales) = if q.kquant {
                    if q.group != crate::quant::K_GROUP
                        || !cols.is_multiple_of(crate::quant::SUPER_BLOCK)
                    {
                        bail!("{name}: metadata says K-quant scales for groups of {} in rows of {cols}", q.group);
                    }
                    let supers = cols / crate::quant::SUPER_BLOCK;
                    let d = tensor(&format!("{name}.qsuper"))?;
                    if scales.dtype() != Dtype::I8 || scales.shape() != [rows, groups] {
                        bail!("{name}.qscales must be I8 [{rows}, {groups}] (K-quant scales)");
                    }
                    if d.dtype() != Dtype::F16 || d.shape() != [rows, supers] {
                        bail!("{name}.qsuper must be F16 [{rows}, {supers}]");
                    }
                    let k = crate::quant::KScales {
                        d: float_values(&d, &name)?.0,
                        sc: scales.data().iter().map(|&v| v as i8).collect(),
                    };
                    (k.products(rows, cols), Some(k))
                } else {
                    if scales.dtype() != Dtype::F16 || scales.shape() != [rows, groups] {
                        bail!("{name}.qscales must be F16 [{rows}, {groups}]");
                    }
                    (float_values(&scales, &name)?.0, None)
                };
                let m = QuantMatrix {
                    rows,
                    cols,
                    bits: q.bits,
                    group: q.group,
                    codes: QuantMatrix::unpack(codes.data(), rows, cols, q.bits),
                    scales,
                    kscales,
                };
                m.check(&name)?;
                tensors.push((name, PackedTensor::Quant(m)));
                continue;
            }
            if let Some(m) = ternary.get(&name) {
                let codes = tensor(&format!("{name}.codes"))?;
                let scales = tensor(&format!("{name}.scales"))?;
                let [rows, cols] = m.shape;
                if codes.dtype() != Dtype::U8 || scales.dtype() != Dtype::F32 {
                    bail!("{name}: codes must be U8 and scales F32");
                }
                let row_bytes = encoding.row_bytes(cols);
                if codes.shape() != [rows, row_bytes] {
                    bail!(
                        "{name}.codes has shape {:?}; [{rows}, {cols}] in {} codes needs [{rows}, {row_bytes}]",
                        codes.shape(),
                        encoding.name()
                    );
                }
                if scales.shape() != [m.row_groups, m.col_groups] {
                    bail!(
                        "{name}.scales has shape {:?}; metadata says {} x {} groups",
                        scales.shape(),
                        m.row_groups,
                        m.col_groups
                    );
                }
                let matrix = TernaryMatrix {
                    rows,
                    cols,
                    row_groups: m.row_groups,
                    col_groups: m.col_groups,
                    codes: unpack(codes.data(), rows, cols, encoding, &name)?,
                    scales: scales
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                };
                matrix.check(&name)?;
                tensors.push((name, PackedTensor::Ternary(matrix)));
            } else {
                let t = tensor(&name)?;
                let (values, dtype) = float_values(&t, &name)?;
                if dtype != FloatDtype::F32 {
                    float_dtype = dtype;
                }
                tensors.push((
                    name,
                    PackedTensor::Float {
                        shape: t.shape().to_vec(),
                        values,
                    },
                ));
            }
        }
        Ok(Self {
            config,
            encoding,
            float_dtype,
            tensors,
            tokenizer: meta.get("tokenizer").cloned(),
            source: meta.get("source").cloned(),
            bos_token_id: token_id(&meta, "bos_token_id")?,
            eos_token_id: token_id(&meta, "eos_token_id")?,
            student: meta
                .get("student")
                .map(|s| serde_json::from_str(s).context("metadata student"))
                .transpose()?,
        })
    }

    /// Whether `path` starts like a tern packed file (cheap: reads the header only).
    pub fn is_packed_file(path: &Path) -> bool {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(path) else {
            return false;
        };
        let mut n = [0u8; 8];
        if f.read_exact(&mut n).is_err() {
            return false;
        }
        let len = u64::from_le_bytes(n);
        if len > 200 << 20 {
            return false;
        }
        let mut h = vec![0u8; len as usize];
        f.read_exact(&mut h).is_ok()
            && serde_json::from_slice::<Value>(&h)
                .ok()
                .and_then(|v| {
                    v.get("__metadata__")?
                        .get("format")?
                        .as_str()
                        .map(|s| s == FORMAT)
                })
                .unwrap_or(false)
    }
}

fn token_id(meta: &HashMap<String, String>, key: &str) -> Result<Option<u32>> {
    meta.get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| anyhow!("metadata {key} = {v:?} is not a token id"))
        })
        .transpose()
}

/// A float tensor's values as f32, and the type it was stored in.
fn float_values(t: &safetensors::tensor::TensorView, name: &str) -> Result<(Vec<f32>, FloatDtype)> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => (
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            FloatDtype::F32,
        ),
        Dtype::F16 => (
            d.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            FloatDtype::F16,
        ),
        Dtype::BF16 => (
            d.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            FloatDtype::Bf16,
        ),
        other => bail!("{name} is {other:?}; expected F32, F16 or BF16"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(enc: Encoding, dtype: FloatDtype) -> PackedModel {
        let codes: Vec<i8> = (0..6 * 10).map(|i| ((i * 7 + 3) % 3) as i8 - 1).collect();
        PackedModel {
            config: serde_json::json!({"hidden": 10}),
            encoding: enc,
            float_dtype: dtype,
            tensors: vec![
                (
                    "embed_tokens.weight".into(),
                    PackedTensor::Float {
                        shape: vec![3, 10],
                        values: (0..30).map(|i| i as f32 * 0.25 - 3.0).collect(),
                    },
                ),
                (
                    "layers.0.mlp.down_proj.weight".into(),
                    PackedTensor::Ternary(TernaryMatrix {
                        rows: 6,
                        cols: 10,
                        row_groups: 1,
                        col_groups: 2,
                        codes,
                        scales: vec![0.1, 0.37],
                    }),
                ),
            ],
            tokenizer: Some("{\"model\": {}}".into()),
            source: Some("run/checkpoints/step_9".into()),
            bos_token_id: None,
            eos_token_id: Some(2),
            student: Some(StudentSpec {
                layers: vec![0],
                residual: true,
            }),
        }
    }

    #[test]
    fn round_trip_is_exact() {
        for enc in [Encoding::Bits2, Encoding::Base3] {
            for dt in [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16] {
                let m = model(enc, dt);
                let back = PackedModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
                // Values that are exact in f16 / bf16 (multiples of 1/4 below 8) survive all three.
                assert_eq!(back, m, "{enc:?} {dt:?}");
            }
        }
    }

    /// Integer-quantized tensors with f16 and with K-quant scales come back as they went.
    #[test]
    fn quantized_tensors_round_trip() {
        use crate::quant::KScales;
        let mut m = model(Encoding::Bits2, FloatDtype::F32);
        let codes = |n: usize, h: i32| {
            (0..n)
                .map(|i| ((i as i32 * 5) % (2 * h) - h) as i8)
                .collect()
        };
        m.tensors.push((
            "layers.0.mlp.up_proj.weight".into(),
            PackedTensor::Quant(QuantMatrix {
                rows: 2,
                cols: 40,
                bits: 4,
                group: 32,
                codes: codes(80, 8),
                scales: vec![0.25, -0.5, 0.125, 1.0],
                kscales: None,
            }),
        ));
        let k = KScales {
            d: vec![0.5, -0.25],
            sc: (0..32).map(|i| (i * 3 - 40) as i8).collect(),
        };
        m.tensors.push((
            "layers.0.mlp.gate_proj.weight".into(),
            PackedTensor::Quant(QuantMatrix {
                rows: 2,
                cols: 256,
                bits: 6,
                group: 16,
                codes: codes(512, 32),
                scales: k.products(2, 256),
                kscales: Some(k),
            }),
        ));
        // An empty one too.
        m.tensors.push((
            "layers.1.mlp.down_proj.weight".into(),
            PackedTensor::Quant(QuantMatrix {
                rows: 0,
                cols: 256,
                bits: 3,
                group: 16,
                codes: vec![],
                scales: vec![],
                kscales: Some(KScales {
                    d: vec![],
                    sc: vec![],
                }),
            }),
        ));
        let back = PackedModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
        assert_eq!(back, m);
        // 6-bit codes, one i8 a group of 16 and one f16 a row of 256: 6.5625 bits a weight.
        let s = PackedModel {
            tensors: m.tensors[3..].to_vec(),
            ..m.clone()
        }
        .size();
        assert_eq!(s.quant_bytes, 2 * 192 + 32 + 4);
    }

    #[test]
    fn sizes_count_codes_scales_and_floats() {
        let s = model(Encoding::Base3, FloatDtype::F16).size();
        assert_eq!(s.ternary_params, 60);
        assert_eq!(s.ternary_bytes, 6 * 2 + 8);
        assert_eq!(s.other_bytes, 60);
        let s2 = model(Encoding::Bits2, FloatDtype::F32).size();
        assert_eq!(s2.ternary_bytes, 6 * 3 + 8);
        assert!((s2.bits() - 8.0 * (26.0 + 120.0) / 90.0).abs() < 1e-12);
    }

    #[test]
    fn other_files_are_refused() {
        let v = TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap();
        let plain = safetensors::tensor::serialize(vec![("x", v)], None).unwrap();
        let e = PackedModel::from_bytes(&plain).unwrap_err().to_string();
        assert!(e.contains("not a tern packed file"), "{e}");
    }
}
