//! Integer-quantized matrices (post-training quantization, `tern quantize`): codes of 3 to 8 bits
//! and one scale per row and group of `group` consecutive columns (`w = d * q`), stored `bits` a
//! code (LSB first, as `q + 2^(bits-1)`, rows padded to whole bytes) with f16 scales; and their
//! llama.cpp blocks (Q8_0, Q4_0: blocks of 32 with an f16 scale).

use anyhow::{anyhow, bail, Result};
use half::f16;

#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group: usize,
    /// `[rows, cols]`, each in `[-2^(bits-1), 2^(bits-1) - 1]`.
    pub codes: Vec<i8>,
    /// `[rows, ceil(cols / group)]`, f16 values.
    pub scales: Vec<f32>,
}

impl QuantMatrix {
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    pub fn row_bytes(&self) -> usize {
        (self.cols * self.bits as usize).div_ceil(8)
    }

    pub fn check(&self, name: &str) -> Result<()> {
        if !(3..=8).contains(&self.bits) || self.group == 0 {
            bail!("{name}: {} bits in groups of {}", self.bits, self.group);
        }
        if self.codes.len() != self.rows * self.cols
            || self.scales.len() != self.rows * self.groups()
        {
            bail!(
                "{name}: codes or scales do not match [{}, {}]",
                self.rows,
                self.cols
            );
        }
        let h = 1i32 << (self.bits - 1);
        if let Some(i) = self
            .codes
            .iter()
            .position(|&q| (q as i32) < -h || (q as i32) >= h)
        {
            bail!(
                "{name}: code {} at {i} is outside {} bits",
                self.codes[i],
                self.bits
            );
        }
        Ok(())
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.groups();
        (0..self.rows * self.cols)
            .map(|i| {
                let (r, c) = (i / self.cols, i % self.cols);
                self.scales[r * g + c / self.group] * self.codes[i] as f32
            })
            .collect()
    }

    /// The codes as a bit stream per row.
    pub fn pack(&self) -> Vec<u8> {
        let (bits, stride) = (self.bits as usize, self.row_bytes());
        let bias = 1i32 << (bits - 1);
        let mut out = vec![0u8; self.rows * stride];
        for (row, dst) in self
            .codes
            .chunks(self.cols.max(1))
            .zip(out.chunks_mut(stride.max(1)))
        {
            for (c, &q) in row.iter().enumerate() {
                let v = (q as i32 + bias) as u32;
                for k in 0..bits {
                    if v >> k & 1 == 1 {
                        let bit = c * bits + k;
                        dst[bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
        }
        out
    }

    /// Codes from [`QuantMatrix::pack`]'s bit stream.
    pub fn unpack(data: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i8> {
        let bits = bits as usize;
        let stride = (cols * bits).div_ceil(8);
        let bias = 1i32 << (bits - 1);
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let src = &data[r * stride..(r + 1) * stride];
            for c in 0..cols {
                let v: i32 = (0..bits)
                    .map(|k| {
                        let bit = c * bits + k;
                        (((src[bit / 8] >> (bit % 8)) & 1) as i32) << k
                    })
                    .sum();
                out.push((v - bias) as i8);
            }
        }
        out
    }

    /// The llama.cpp type holding this matrix exactly (see [`ggml_type`]) and its blocks.
    pub fn ggml_blocks(&self, name: &str) -> Result<(u32, Vec<u8>)> {
        let ty = ggml_type(self.bits, self.group).map_err(|e| anyhow!("{name}: {e}"))?;
        if !self.cols.is_multiple_of(32) {
            bail!(
                "{name}: rows of {} columns do not fill Q8_0 / Q4_0 blocks of 32",
                self.cols
            );
        }
        let mut out =
            Vec::with_capacity(self.rows * self.cols / 32 * if ty == 8 { 34 } else { 18 });
        if self.bits == 8 && self.codes.contains(&-128) {
            bail!("{name}: code -128 does not fit Q8_0");
        }
        let g = self.groups();
        for r in 0..self.rows {
            for b in 0..g {
                let q = &self.codes[r * self.cols + b * 32..][..32];
                out.extend(f16::from_f32(self.scales[r * g + b]).to_le_bytes());
                if self.bits == 8 {
                    out.extend(q.iter().map(|&v| v as u8));
                } else {
                    out.extend(
                        (0..16).map(|j| ((q[j] + 8) as u8) | (((q[j + 16] + 8) as u8) << 4)),
                    );
                }
            }
        }
        Ok((ty, out))
    }
}

/// The llama.cpp type id that holds `bits`-bit symmetric codes in groups of `group` with f16
/// scales exactly: Q8_0 (8) at 8 bits, Q4_0 (2) at 4, both in blocks of 32; or why none does.
pub fn ggml_type(bits: u32, group: usize) -> Result<u32> {
    let ty = match bits {
        8 => 8,
        4 => 2,
        b => bail!(
            "{b}-bit codes: llama.cpp's {b}-bit types ({}) store each group's scale as an integer \
             times a per-256 scale, which GPTQ's f16 group scales do not fit; GGUF export takes 8 \
             (Q8_0) and 4 (Q4_0) bits; use --format packed or hf",
            if b == 6 { "Q6_K" } else { "Q3_K" }
        ),
    };
    if group != 32 {
        bail!(
            "GGUF's Q8_0 / Q4_0 blocks hold 32 weights with one scale; quantize with --group-size 32 \
             for a GGUF export"
        );
    }
    Ok(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_streams_round_trip_at_every_width() {
        for bits in [3u32, 4, 6, 8] {
            let h = 1i32 << (bits - 1);
            let (rows, cols) = (3, 11);
            let codes: Vec<i8> = (0..rows * cols)
                .map(|i| ((i as i32 * 7) % (2 * h) - h) as i8)
                .collect();
            let m = QuantMatrix {
                rows,
                cols,
                bits,
                group: 4,
                codes: codes.clone(),
                scales: vec![0.5; rows * 3],
            };
            m.check("m").unwrap();
            let packed = m.pack();
            assert_eq!(packed.len(), rows * (cols * bits as usize).div_ceil(8));
            assert_eq!(
                QuantMatrix::unpack(&packed, rows, cols, bits),
                codes,
                "{bits} bits"
            );
        }
    }

    #[test]
    fn q4_0_block_by_hand() {
        let mut codes = vec![0i8; 32];
        codes[0] = -8;
        codes[16] = 7;
        codes[1] = 3;
        let m = QuantMatrix {
            rows: 1,
            cols: 32,
            bits: 4,
            group: 32,
            codes,
            scales: vec![0.25],
        };
        let (ty, b) = m.ggml_blocks("t").unwrap();
        assert_eq!(ty, 2);
        assert_eq!(b.len(), 18);
        assert_eq!(&b[..2], &f16::from_f32(0.25).to_le_bytes());
        assert_eq!(b[2], 15 << 4); // q[0] + 8 = 0 low, q[16] + 8 = 15 high
        assert_eq!(b[3], 11 | (8 << 4));
        let m6 = QuantMatrix {
            bits: 6,
            ..m.clone()
        };
        assert!(m6
            .ggml_blocks("t")
            .unwrap_err()
            .to_string()
            .contains("Q6_K"));
    }
}
