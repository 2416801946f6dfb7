//! The LLaMA forward pass for inference, on the packed model: plain f32 arrays, the matrices of
//! [`crate::kernel`], and a KV cache so that generating a token costs one position, not the
//! whole prefix. Computes what `tern_model::Llama::forward` computes (RMSNorm, RoPE in
//! `rotate_half` layout, grouped-query attention, SwiGLU, tied or untied head), and for a
//! distillation student its encoders in front of the distilled blocks' projections
//! ([`crate::encoder`]).

use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use tern_model::sparsity::LayerType;
use tern_model::{LinearKind, MlpKind, ModelConfig};
use tern_pack::{PackedModel, PackedTensor};

use crate::convert::packed_config;
use crate::encoder::{BitEncoder, Proj};
use crate::input::{Activations, InputRule};
use crate::kernel::{Dense, Matrix, PackedTernary};
use crate::simd::{self, Isa};

pub struct Layer {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
}

/// A block's projections, in the order [`Layer::projection`] and its kin list them (the
/// training model's module order).
pub use tern_model::model::PROJECTION_NAMES as PROJECTIONS;

impl Layer {
    /// The projection called `name` (one of [`PROJECTIONS`]).
    pub fn projection(&self, name: &str) -> Option<&Proj> {
        let i = PROJECTIONS.iter().position(|n| *n == name)?;
        Some(self.projections()[i])
    }

    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Proj> {
        let i = PROJECTIONS.iter().position(|n| *n == name)?;
        self.projections_mut().into_iter().nth(i)
    }

    fn projections(&self) -> [&Proj; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    fn projections_mut(&mut self) -> [&mut Proj; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

pub struct InferModel {
    pub config: ModelConfig,
    /// `None` when tied to the head (then the head's matrix is the embedding).
    pub embed_tokens: Option<Dense>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Matrix,
}

/// Keys and values of the positions seen so far, per layer (`[positions, kv_heads * head_dim]`).
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
    }
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The packed file's tensors, taken one by one (what is left over is an error).
struct Tensors {
    map: std::collections::HashMap<String, PackedTensor>,
    student: Option<tern_pack::StudentSpec>,
}

impl Tensors {
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<Matrix> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| anyhow!("the packed file has no tensor {name}"))?;
        Ok(match t {
            // Held as its f32 values (`d * q` exactly), multiplied by the dense kernel.
            PackedTensor::Quant(m) => {
                if [m.rows, m.cols] != shape {
                    bail!(
                        "{name} is [{}, {}]; the config needs {shape:?}",
                        m.rows,
                        m.cols
                    );
                }
                Matrix::Dense(Dense {
                    rows: m.rows,
                    cols: m.cols,
                    values: m.dequantize(),
                })
            }
            PackedTensor::Ternary(m) => {
                if [m.rows, m.cols] != shape {
                    bail!(
                        "{name} is [{}, {}]; the config needs {shape:?}",
                        m.rows,
                        m.cols
                    );
                }
                Matrix::Ternary(PackedTernary::new(&m))
            }
            PackedTensor::Float { shape: s, values } => {
                if s != shape {
                    bail!("{name} is {s:?}; the config needs {shape:?}");
                }
                let cols = if s.len() == 2 { s[1] } else { s[0] };
                Matrix::Dense(Dense {
                    rows: values.len() / cols.max(1),
                    cols,
                    values,
                })
            }
        })
    }

    /// A tensor that must be float (an embedding, a norm, an encoder's).
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Dense> {
        match self.matrix(name, shape)? {
            Matrix::Dense(d) => Ok(d),
            Matrix::Ternary(_) => bail!("{name} cannot be ternary"),
        }
    }

    /// Block `l`'s projection `name` (`self_attn.q_proj`, ...), with its encoder when the block is
    /// one a student distilled.
    fn proj(&mut self, l: usize, name: &str, shape: [usize; 2], input: InputRule) -> Result<Proj> {
        let full = format!("layers.{l}.{name}");
        let weight = self.matrix(&format!("{full}.weight"), &shape)?;
        let Some(residual) = self
            .student
            .as_ref()
            .filter(|s| s.layers.contains(&l))
            .map(|s| s.residual)
        else {
            // A student's other blocks are float copies of the teacher's, with plain inputs (as
            // `tern_model::studentize` builds them).
            let input = match self.student {
                Some(_) => InputRule::default(),
                None => input,
            };
            return Ok(Proj::new(weight, None, input));
        };
        let (d, hid) = (shape[1], (shape[1] / 2).max(1));
        let e = |part: &str| format!("{full}.encoder.{part}");
        let fc1 = self.dense(&e("fc1"), &[hid, d])?;
        let fc2 = self.dense(&e("fc2"), &[d, hid])?;
        let alpha = self.dense(&e("alpha"), &[d])?.values;
        let beta = self.dense(&e("beta"), &[d])?.values;
        let offset = match residual {
            true => Some(self.dense(&e("offset"), &[d])?.values),
            false => None,
        };
        let encoder = BitEncoder::new(fc1, fc2, alpha, beta, offset, &full)?;
        Ok(Proj::new(weight, Some(encoder), input))
    }
}

impl InferModel {
    /// The model of a packed file (ternary matrices stay packed).
    pub fn from_packed(p: PackedModel) -> Result<Self> {
        let config = packed_config(&p)?;
        let rule = |layer| InputRule {
            bitnet_eps: (config.linear == LinearKind::Bitnet).then_some(config.rms_eps),
            top_k: config.sparsity.as_ref().and_then(|s| s.top_k(layer)),
        };
        let mut t = Tensors {
            map: p.tensors.into_iter().collect(),
            student: p.student,
        };
        let (h, i, v) = (config.hidden, config.intermediate, config.vocab());
        let kv = config.kv_heads() * config.head_dim();
        let embed_tokens = t.dense("embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::new();
        for l in 0..config.n_layers {
            let n = |s: &str| format!("layers.{l}.{s}");
            layers.push(Layer {
                input_layernorm: t.dense(&n("input_layernorm.weight"), &[h])?.values,
                q_proj: t.proj(l, "self_attn.q_proj", [h, h], rule(LayerType::Attention))?,
                k_proj: t.proj(l, "self_attn.k_proj", [kv, h], rule(LayerType::Attention))?,
                v_proj: t.proj(l, "self_attn.v_proj", [kv, h], rule(LayerType::Attention))?,
                o_proj: t.proj(l, "self_attn.o_proj", [h, h], rule(LayerType::Attention))?,
                post_attention_layernorm: t
                    .dense(&n("post_attention_layernorm.weight"), &[h])?
                    .values,
                gate_proj: t.proj(l, "mlp.gate_proj", [i, h], rule(LayerType::Mlp))?,
                up_proj: t.proj(l, "mlp.up_proj", [i, h], rule(LayerType::Mlp))?,
                down_proj: t.proj(l, "mlp.down_proj", [h, i], rule(LayerType::Mlp))?,
            });
        }
        let norm = t.dense("norm.weight", &[h])?.values;
        let (embed_tokens, lm_head) = if config.tie_embeddings {
            (None, Matrix::Dense(embed_tokens))
        } else {
            (Some(embed_tokens), t.matrix("lm_head.weight", &[v, h])?)
        };
        if let Some(extra) = t.map.keys().next() {
            bail!("the packed file has a tensor the config does not explain: {extra}");
        }
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// How float activations meet packed ternary matrices (exact f32 by default).
    pub fn set_activations(&mut self, a: Activations) {
        for l in &mut self.layers {
            for p in l.projections_mut() {
                p.activations = a;
            }
        }
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let mats = self.layers.iter().flat_map(Layer::projections);
        mats.map(|m| m.bytes()).sum::<usize>()
            + self.embed_tokens.as_ref().map_or(0, |e| 4 * e.values.len())
            + self.lm_head.bytes()
    }

    fn embedding(&self) -> &Dense {
        match (&self.embed_tokens, &self.lm_head) {
            (Some(e), _) => e,
            (None, Matrix::Dense(d)) => d,
            (None, Matrix::Ternary(_)) => unreachable!("a tied head is the dense embedding"),
        }
    }

    pub fn vocab(&self) -> usize {
        self.config.vocab()
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model, appending to the cache.
    /// Returns the logits of every position (`[tokens, vocab]`) when `all` is set, else of the last.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all: bool) -> Result<Vec<f32>> {
        let t = tokens.len();
        let mut x = self.embed(tokens)?;
        let pos0 = cache.len;
        let rope = self.rope(pos0, t);
        for l in 0..self.layers.len() {
            let (k, v) = (&mut cache.k[l], &mut cache.v[l]);
            self.block(l, &mut x, t, pos0, &rope, k, v, &mut |_, _| {});
        }
        let (c, h) = (&self.config, self.config.hidden);
        cache.len += t;
        let rows = if all { t } else { 1 };
        let last = &x[(t - rows) * h..];
        let xn = rms_norm(last, &self.norm, c.rms_eps);
        Ok(self.lm_head.matmul(&xn, rows))
    }

    /// The embeddings of `tokens`, `[t, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (h, vocab) = (self.config.hidden, self.config.vocab());
        if tokens.is_empty() {
            bail!("no tokens to run");
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary 0..{vocab}");
        }
        Ok(tokens
            .iter()
            .flat_map(|&id| {
                self.embedding().values[id as usize * h..][..h]
                    .iter()
                    .copied()
            })
            .collect())
    }

    fn rope(&self, pos0: usize, t: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        (pos0..pos0 + t)
            .map(|p| rope_row(p, c.head_dim(), c.rope_theta))
            .collect()
    }

    /// Block `l` on a whole sequence `x: [t, hidden]` from position 0 (no cache), in place;
    /// `observe(projections, input)` sees each projection input (`["self_attn.q_proj",
    /// "self_attn.k_proj", "self_attn.v_proj"]` share one), as calibration for post-training
    /// quantization needs.
    pub fn block_forward(
        &self,
        l: usize,
        x: &mut [f32],
        observe: &mut dyn FnMut(&[&'static str], &[f32]),
    ) {
        let t = x.len() / self.config.hidden;
        let rope = self.rope(0, t);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        self.block(l, x, t, 0, &rope, &mut k, &mut v, observe);
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: usize,
        x: &mut [f32],
        t: usize,
        pos0: usize,
        rope: &[(Vec<f32>, Vec<f32>)],
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        observe: &mut dyn FnMut(&[&'static str], &[f32]),
    ) {
        let (c, layer) = (&self.config, &self.layers[l]);
        let a = rms_norm(x, &layer.input_layernorm, c.rms_eps);
        observe(
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            &a,
        );
        let attn = self.attention(layer, &a, t, pos0, rope, k_cache, v_cache);
        observe(&["self_attn.o_proj"], &attn);
        add(x, &layer.o_proj.matmul(&attn, t));
        let m = rms_norm(x, &layer.post_attention_layernorm, c.rms_eps);
        observe(&["mlp.gate_proj", "mlp.up_proj"], &m);
        let mut g = layer.gate_proj.matmul(&m, t);
        let u = layer.up_proj.matmul(&m, t);
        match c.mlp {
            MlpKind::Swiglu => {
                for (gi, ui) in g.iter_mut().zip(&u) {
                    *gi = *gi / (1.0 + (-*gi).exp()) * ui;
                }
            }
            MlpKind::Relu2glu => {
                for (gi, ui) in g.iter_mut().zip(&u) {
                    let r = gi.max(0.0);
                    *gi = r * r * ui;
                }
            }
        }
        observe(&["mlp.down_proj"], &g);
        add(x, &layer.down_proj.matmul(&g, t));
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        a: &[f32],
        t: usize,
        pos0: usize,
        rope: &[(Vec<f32>, Vec<f32>)],
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_heads, c.kv_heads(), c.head_dim());
        let mut q = layer.q_proj.matmul(a, t);
        let mut k = layer.k_proj.matmul(a, t);
        let v = layer.v_proj.matmul(a, t);
        for (i, (cos, sin)) in rope.iter().enumerate() {
            for head in q[i * nh * hd..][..nh * hd].chunks_mut(hd) {
                rotate(head, cos, sin);
            }
            for head in k[i * nkv * hd..][..nkv * hd].chunks_mut(hd) {
                rotate(head, cos, sin);
            }
        }
        k_cache.extend_from_slice(&k);
        v_cache.extend_from_slice(&v);
        let (k_all, v_all) = (&*k_cache, &*v_cache);
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let isa = Isa::detect();
        let mut out = vec![0f32; t * nh * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
            let (i, head) = (idx / nh, idx % nh);
            let kvh = head / group;
            let qv = &q[(i * nh + head) * hd..][..hd];
            let n = pos0 + i + 1; // causal: positions 0..=pos0+i
            let mut scores: Vec<f32> = (0..n)
                .map(|s| simd::dot(qv, &k_all[(s * nkv + kvh) * hd..][..hd], isa) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (s, p) in scores.iter().enumerate() {
                simd::axpy(p / sum, &v_all[(s * nkv + kvh) * hd..][..hd], o, isa);
            }
        });
        out
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` for each row of `x`.
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let h = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let rms = (ms + eps as f32).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v / rms * g));
    }
    out
}

/// RoPE tables of one position, as `tern_model::rope::rope_tables` computes them.
fn rope_row(pos: usize, hd: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    (0..hd)
        .map(|j| {
            let inv_freq = theta.powf(-(2.0 * (j % half) as f64) / hd as f64);
            let angle = pos as f64 * inv_freq;
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip()
}

/// `x * cos + rotate_half(x) * sin`.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let orig = x.to_vec();
    for j in 0..x.len() {
        let rot = if j < half {
            -orig[j + half]
        } else {
            orig[j - half]
        };
        x[j] = orig[j] * cos[j] + rot * sin[j];
    }
}
