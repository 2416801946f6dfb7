//! A distillation student's projection for inference: a 1-bit input encoder in front of the
//! matrix, as `tern_model::Encoder` computes it. Per channel the encoder's output is
//! `offset + alpha * sign(z - beta)` with `z = fc2(relu(fc1 x))` (plus `x` in the residual form),
//! so the matrix (packed ternary codes, or f32) multiplies a vector whose every channel takes one
//! of two values (three where `z = beta` exactly: `sign(0) = 0`, as in training).

use anyhow::{bail, Result};

use crate::input::{Activations, InputRule, Prepared};
use crate::kernel::{Dense, Matrix};

/// The encoder's tensors, `d` inputs.
#[derive(Debug, Clone)]
pub struct BitEncoder {
    /// `[d/2, d]`.
    pub fc1: Matrix,
    /// `[d, d/2]`.
    pub fc2: Matrix,
    pub alpha: Vec<f32>,
    pub beta: Vec<f32>,
    /// The residual form's output offset (its `z` also adds the input).
    pub offset: Option<Vec<f32>>,
}

impl BitEncoder {
    /// Checks the shapes against `d` inputs.
    pub fn new(
        fc1: Dense,
        fc2: Dense,
        alpha: Vec<f32>,
        beta: Vec<f32>,
        offset: Option<Vec<f32>>,
        name: &str,
    ) -> Result<Self> {
        let d = fc1.cols;
        let ok = fc2.rows == d
            && fc2.cols == fc1.rows
            && fc1.values.len() == fc1.rows * d
            && fc2.values.len() == d * fc1.rows
            && alpha.len() == d
            && beta.len() == d
            && offset.as_ref().is_none_or(|o| o.len() == d);
        if !ok {
            bail!(
                "{name}: encoder shapes disagree (fc1 [{}, {}], fc2 [{}, {}], alpha {}, beta {})",
                fc1.rows,
                fc1.cols,
                fc2.rows,
                fc2.cols,
                alpha.len(),
                beta.len()
            );
        }
        Ok(Self {
            fc1: Matrix::Dense(fc1),
            fc2: Matrix::Dense(fc2),
            alpha,
            beta,
            offset,
        })
    }

    pub fn bytes(&self) -> usize {
        self.fc1.bytes()
            + self.fc2.bytes()
            + 4 * (self.alpha.len() + self.beta.len() + self.offset.as_ref().map_or(0, Vec::len))
    }

    /// `x: [batch, d]` -> the one-bit code of each channel, `[batch, d]`.
    pub fn encode(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let mut h = self.fc1.matmul(x, batch);
        for v in &mut h {
            *v = v.max(0.0);
        }
        let mut z = self.fc2.matmul(&h, batch);
        let d = self.alpha.len();
        for (row, xr) in z.chunks_mut(d).zip(x.chunks(d)) {
            for c in 0..d {
                let zc = match self.offset {
                    Some(_) => row[c] + xr[c],
                    None => row[c],
                };
                let y = zc - self.beta[c];
                let sign = if y == 0.0 { 0.0 } else { y.signum() };
                row[c] = self.alpha[c] * sign + self.offset.as_ref().map_or(0.0, |o| o[c]);
            }
        }
        z
    }
}

/// A block's projection: its matrix, behind an encoder in a student's distilled blocks, with its
/// input rule (BitNet, Q-Sparse) and how float activations meet a packed ternary matrix.
#[derive(Debug, Clone)]
pub struct Proj {
    pub weight: Matrix,
    pub encoder: Option<BitEncoder>,
    pub input: InputRule,
    pub activations: Activations,
}

impl Proj {
    pub fn new(weight: Matrix, encoder: Option<BitEncoder>, input: InputRule) -> Self {
        Self {
            weight,
            encoder,
            input,
            activations: Activations::Exact,
        }
    }

    /// `x: [batch, cols]` -> `[batch, rows]`.
    pub fn matmul(&self, x: &[f32], batch: usize) -> Vec<f32> {
        let x = match &self.encoder {
            Some(e) => std::borrow::Cow::Owned(e.encode(x, batch)),
            None => std::borrow::Cow::Borrowed(x),
        };
        if self.input.is_plain() {
            return match (&self.weight, self.activations) {
                (Matrix::Ternary(t), Activations::Int8) => {
                    self.weight.matmul_q8(&t.quantize(&x, batch))
                }
                _ => self.weight.matmul(&x, batch),
            };
        }
        match (self.input.prepare(x.into_owned(), batch), &self.weight) {
            (Prepared::Ints { q, scale }, Matrix::Ternary(t)) => {
                self.weight.matmul_q8(&t.from_ints(&q, &scale))
            }
            (Prepared::F32(v), Matrix::Ternary(t)) if self.activations == Activations::Int8 => {
                self.weight.matmul_q8(&t.quantize(&v, batch))
            }
            (p, _) => self.weight.matmul(&p.into_f32(), batch),
        }
    }

    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.encoder.as_ref().map_or(0, BitEncoder::bytes)
    }
}
