//! A ternary matrix and its two packed encodings.
//!
//! - `2bit`: weight `c` of a row sits in byte `c / 4`, bits `2 (c % 4)`, as `code + 1` in {0, 1, 2}
//!   (llama.cpp's TQ2_0 uses the same values). Rows start on byte boundaries: a row is
//!   `ceil(cols / 4)` bytes. A little-endian u16 load at byte `2m` then holds weights `8m..8m+8` at
//!   bits `2j`, which is what the inference kernel reads.
//! - `base3`: five weights a byte, `sum_j (code_j + 1) 3^j` over weights `5k..5k+5` (3^5 = 243 <= 256),
//!   1.6 bits a weight; rows are `ceil(cols / 5)` bytes.
//!
//! Padding weights at the end of a row are stored as zero weights.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How the codes of a ternary matrix are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// 2 bits a weight (4 a byte).
    #[serde(rename = "2bit")]
    Bits2,
    /// 5 weights a byte in base 3 (1.6 bits a weight).
    Base3,
}

impl Encoding {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "2bit" => Ok(Self::Bits2),
            "base3" => Ok(Self::Base3),
            _ => bail!("unknown code encoding {s:?}; expected \"2bit\" or \"base3\""),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bits2 => "2bit",
            Self::Base3 => "base3",
        }
    }

    /// Bytes a packed row of `cols` weights takes.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Bits2 => cols.div_ceil(4),
            Self::Base3 => cols.div_ceil(5),
        }
    }
}

/// `W[r, c] = scales[rg(r) * col_groups + cg(c)] * codes[r * cols + c]`, where rows are split
/// into `row_groups` equal blocks and columns into `col_groups` (TriLM's scale groups: row groups
/// for column-parallel layers, column groups for row-parallel ones; one of the two is 1).
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub row_groups: usize,
    pub col_groups: usize,
    /// Row-major codes in {-1, 0, 1}.
    pub codes: Vec<i8>,
    /// `[row_groups, col_groups]`, row-major.
    pub scales: Vec<f32>,
}

impl TernaryMatrix {
    /// Checks the shape rules; `name` is put in the message.
    pub fn check(&self, name: &str) -> Result<()> {
        let (r, c, rg, cg) = (self.rows, self.cols, self.row_groups, self.col_groups);
        if rg == 0 || cg == 0 || r % rg != 0 || c % cg != 0 {
            bail!("{name}: [{r}, {c}] cannot be split into {rg} x {cg} scale groups");
        }
        if r.checked_mul(c).is_none() || rg.checked_mul(cg).is_none() {
            bail!("{name}: shape [{r}, {c}] with {rg} x {cg} groups is too large");
        }
        if self.codes.len() != r * c {
            bail!("{name}: {} codes for shape [{r}, {c}]", self.codes.len());
        }
        if self.scales.len() != rg * cg {
            bail!(
                "{name}: {} scales for {rg} x {cg} groups",
                self.scales.len()
            );
        }
        if let Some(i) = self.codes.iter().position(|&v| !(-1..=1).contains(&v)) {
            bail!(
                "{name}: code {} at index {i} is not in {{-1, 0, 1}}",
                self.codes[i]
            );
        }
        Ok(())
    }

    /// The scale of element (r, c).
    pub fn scale(&self, r: usize, c: usize) -> f32 {
        let rg = r / (self.rows / self.row_groups);
        let cg = c / (self.cols / self.col_groups);
        self.scales[rg * self.col_groups + cg]
    }

    /// The float matrix, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.scale(r, c) * self.codes[r * self.cols + c] as f32);
            }
        }
        out
    }

    /// The codes packed row by row.
    pub fn pack(&self, enc: Encoding) -> Vec<u8> {
        pack(&self.codes, self.rows, self.cols, enc)
    }
}

/// Packs row-major codes `[rows, cols]`.
pub fn pack(codes: &[i8], rows: usize, cols: usize, enc: Encoding) -> Vec<u8> {
    assert_eq!(codes.len(), rows * cols);
    let stride = enc.row_bytes(cols);
    let mut out = vec![0u8; rows * stride];
    for (row, dst) in codes.chunks(cols.max(1)).zip(out.chunks_mut(stride.max(1))) {
        match enc {
            Encoding::Bits2 => {
                for (k, byte) in dst.iter_mut().enumerate() {
                    *byte = (0..4)
                        .map(|j| (trit(row, 4 * k + j) as u8) << (2 * j))
                        .sum();
                }
            }
            Encoding::Base3 => {
                for (k, byte) in dst.iter_mut().enumerate() {
                    *byte = (0..5)
                        .rev()
                        .fold(0u8, |acc, j| acc * 3 + trit(row, 5 * k + j) as u8);
                }
            }
        }
    }
    out
}

/// `code + 1` of weight `c` of a row, 1 (a zero weight) past its end.
fn trit(row: &[i8], c: usize) -> i8 {
    row.get(c).map_or(1, |&v| v + 1)
}

/// The codes of packed rows; a byte that no codes produce (a 2-bit value 3, a base-3 byte >= 243)
/// is an error naming `name` and the byte.
pub fn unpack(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    enc: Encoding,
    name: &str,
) -> Result<Vec<i8>> {
    let stride = enc.row_bytes(cols);
    let (Some(need), Some(_)) = (rows.checked_mul(stride), rows.checked_mul(cols)) else {
        bail!("{name}: shape [{rows}, {cols}] is too large");
    };
    if bytes.len() != need {
        bail!(
            "{name}: {} bytes of {} codes; [{rows}, {cols}] needs {}",
            bytes.len(),
            enc.name(),
            rows * stride
        );
    }
    let mut out = Vec::with_capacity(rows * cols);
    for (r, row) in bytes.chunks(stride.max(1)).take(rows).enumerate() {
        let mut c = 0;
        for (k, &b) in row.iter().enumerate() {
            let digits: [u8; 5] = match enc {
                Encoding::Bits2 => [b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6, 1],
                Encoding::Base3 => {
                    if b >= 243 {
                        bail!("{name}: byte {b} at row {r}, byte {k} is not a base-3 code");
                    }
                    [b % 3, b / 3 % 3, b / 9 % 3, b / 27 % 3, b / 81]
                }
            };
            let per_byte = if enc == Encoding::Bits2 { 4 } else { 5 };
            for &d in &digits[..per_byte] {
                if d > 2 {
                    bail!("{name}: 2-bit code 3 at row {r}, byte {k}");
                }
                if c < cols {
                    out.push(d as i8 - 1);
                }
                c += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (SplitMix64) for random codes.
    fn codes(n: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn round_trips_on_ragged_shapes() {
        for enc in [Encoding::Bits2, Encoding::Base3] {
            for (rows, cols) in [
                (1, 1),
                (3, 7),
                (5, 16),
                (2, 255),
                (4, 257),
                (7, 1000),
                (0, 9),
            ] {
                let c = codes(rows * cols, (rows * 1000 + cols) as u64);
                let p = pack(&c, rows, cols, enc);
                assert_eq!(p.len(), rows * enc.row_bytes(cols));
                assert_eq!(
                    unpack(&p, rows, cols, enc, "t").unwrap(),
                    c,
                    "{enc:?} {rows}x{cols}"
                );
            }
        }
    }

    #[test]
    fn layouts_are_the_documented_ones() {
        // Weights -1, 0, 1, 1, -1 -> codes+1 = 0, 1, 2, 2, 0.
        let c = [-1i8, 0, 1, 1, -1];
        // 2bit: byte 0 = 0 | 1<<2 | 2<<4 | 2<<6; byte 1 = 0 | pad (1) << 2 | 1 << 4 | 1 << 6.
        assert_eq!(
            pack(&c, 1, 5, Encoding::Bits2),
            vec![4 + 32 + 128, 4 + 16 + 64]
        );
        // base3: 0 + 1*3 + 2*9 + 2*27 + 0*81 = 75.
        assert_eq!(pack(&c, 1, 5, Encoding::Base3), vec![75]);
    }

    #[test]
    fn bad_bytes_are_named() {
        let e = unpack(
            &[0b11],
            1,
            4,
            Encoding::Bits2,
            "layers.0.mlp.up_proj.weight",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("up_proj") && e.to_string().contains("code 3"),
            "{e}"
        );
        let e = unpack(&[250], 1, 5, Encoding::Base3, "x").unwrap_err();
        assert!(e.to_string().contains("250"), "{e}");
        let e = unpack(&[0, 0], 1, 4, Encoding::Bits2, "x").unwrap_err();
        assert!(e.to_string().contains("needs 1"), "{e}");
    }

    #[test]
    fn dequantize_uses_the_group_grid() {
        let m = TernaryMatrix {
            rows: 2,
            cols: 4,
            row_groups: 1,
            col_groups: 2,
            codes: vec![1, -1, 0, 1, -1, 1, 1, 0],
            scales: vec![0.5, 2.0],
        };
        m.check("m").unwrap();
        assert_eq!(
            m.dequantize(),
            vec![0.5, -0.5, 0.0, 2.0, -0.5, 0.5, 2.0, 0.0]
        );
        let bad = TernaryMatrix {
            col_groups: 3,
            ..m.clone()
        };
        assert!(bad.check("m").unwrap_err().to_string().contains("3 scale"));
    }
}
