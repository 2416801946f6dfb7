//! Integer-quantized matrices (post-training quantization, `tern quantize`): codes of 3 to 8 bits
//! and one scale per row and group of `group` consecutive columns (`w = d * q`), stored `bits` a
//! code (LSB first, as `q + 2^(bits-1)`, rows padded to whole bytes) with f16 scales, or with
//! llama.cpp's K-quant scales ([`KScales`]); and their llama.cpp blocks (Q8_0, Q4_0: blocks of 32
//! with an f16 scale; Q6_K, Q3_K: super-blocks of 256 with integer scales per 16).

use anyhow::{anyhow, bail, Result};
use half::f16;

use crate::gguf::GgmlType;

/// Columns in a K-quant super-block, and in each of its groups.
pub const SUPER_BLOCK: usize = 256;
pub const K_GROUP: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group: usize,
    /// `[rows, cols]`, each in `[-2^(bits-1), 2^(bits-1) - 1]`.
    pub codes: Vec<i8>,
    /// `[rows, ceil(cols / group)]`: f16 values, or `d * sc` (f32 products) with K-quant scales.
    pub scales: Vec<f32>,
    /// The scales in llama.cpp's K-quant form, where they have it.
    pub kscales: Option<KScales>,
}

/// Group scales as llama.cpp's Q6_K and Q3_K store them: groups of 16 columns inside super-blocks
/// of 256, each group's scale an integer `sc` times its super-block's f16 scale `d` (the product
/// taken in f32, as llama.cpp dequantizes). `sc` has 8 bits with 6-bit codes (Q6_K) and 6 bits
/// with 3-bit codes (Q3_K).
#[derive(Debug, Clone, PartialEq)]
pub struct KScales {
    /// `[rows, cols / 256]`, f16 values.
    pub d: Vec<f32>,
    /// `[rows, cols / 16]`.
    pub sc: Vec<i8>,
}

/// The range of K-quant group scales for codes of `bits` bits, where llama.cpp has such a type.
pub fn k_scale_range(bits: u32) -> Option<(i32, i32)> {
    match bits {
        6 => Some((-128, 127)),
        3 => Some((-32, 31)),
        _ => None,
    }
}

impl KScales {
    /// The group scales `d * sc` of a `[rows, cols]` matrix.
    pub fn products(&self, rows: usize, cols: usize) -> Vec<f32> {
        let (supers, groups) = (cols / SUPER_BLOCK, cols / K_GROUP);
        (0..rows * groups)
            .map(|i| {
                let (r, g) = (i / groups, i % groups);
                self.d[r * supers + g / (SUPER_BLOCK / K_GROUP)] * self.sc[i] as f32
            })
            .collect()
    }
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
        if let Some(k) = &self.kscales {
            let Some((lo, hi)) = k_scale_range(self.bits) else {
                bail!("{name}: K-quant scales with {}-bit codes", self.bits);
            };
            if self.group != K_GROUP || !self.cols.is_multiple_of(SUPER_BLOCK) {
                bail!(
                    "{name}: K-quant scales need groups of {K_GROUP} and rows of a multiple of \
                     {SUPER_BLOCK} columns, not {} and {}",
                    self.group,
                    self.cols
                );
            }
            if k.d.len() != self.rows * self.cols / SUPER_BLOCK || k.sc.len() != self.scales.len() {
                bail!(
                    "{name}: K-quant scales do not match [{}, {}]",
                    self.rows,
                    self.cols
                );
            }
            if let Some(i) =
                k.sc.iter()
                    .position(|&v| (v as i32) < lo || (v as i32) > hi)
            {
                bail!(
                    "{name}: group scale {} at {i} is outside [{lo}, {hi}]",
                    k.sc[i]
                );
            }
            let products = k.products(self.rows, self.cols);
            if let Some(i) =
                (0..products.len()).find(|&i| products[i].to_bits() != self.scales[i].to_bits())
            {
                bail!(
                    "{name}: group scale {i} is {}, not its K-quant product {}",
                    self.scales[i],
                    products[i]
                );
            }
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

    /// The matrix with its rows in `order` (`order[new] = old`), each keeping its scales.
    pub fn with_rows(&self, order: &[usize]) -> QuantMatrix {
        fn take<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
            let n = v.len() / order.len().max(1);
            order
                .iter()
                .flat_map(|&r| &v[r * n..(r + 1) * n])
                .copied()
                .collect()
        }
        QuantMatrix {
            codes: take(&self.codes, order),
            scales: take(&self.scales, order),
            kscales: self.kscales.as_ref().map(|k| KScales {
                d: take(&k.d, order),
                sc: take(&k.sc, order),
            }),
            ..self.clone()
        }
    }

    /// The llama.cpp type holding this matrix exactly (see [`ggml_type`]) and its blocks, row
    /// after row.
    pub fn ggml_blocks(&self, name: &str) -> Result<(GgmlType, Vec<u8>)> {
        let ty = ggml_type(self.bits, self.group, self.kscales.is_some())
            .map_err(|e| anyhow!("{name}: {e}"))?;
        let block = if self.kscales.is_some() {
            SUPER_BLOCK
        } else {
            32
        };
        if !self.cols.is_multiple_of(block) {
            bail!(
                "{name}: rows of {} columns do not fill {} blocks of {block}",
                self.cols,
                ty.name()
            );
        }
        if self.bits == 8 && self.codes.contains(&-128) {
            bail!("{name}: code -128 does not fit Q8_0");
        }
        let mut out = Vec::new();
        let g = self.groups();
        for r in 0..self.rows {
            for b in 0..self.cols / block {
                let q = &self.codes[r * self.cols + b * block..][..block];
                match (ty, &self.kscales) {
                    (GgmlType::Q8_0, _) => {
                        out.extend(f16::from_f32(self.scales[r * g + b]).to_le_bytes());
                        out.extend(q.iter().map(|&v| v as u8));
                    }
                    (GgmlType::Q4_0, _) => {
                        out.extend(f16::from_f32(self.scales[r * g + b]).to_le_bytes());
                        out.extend(
                            (0..16).map(|j| ((q[j] + 8) as u8) | (((q[j + 16] + 8) as u8) << 4)),
                        );
                    }
                    (_, Some(k)) => {
                        let per = SUPER_BLOCK / K_GROUP;
                        let i = r * self.cols / SUPER_BLOCK + b;
                        let sc = &k.sc[i * per..(i + 1) * per];
                        if ty == GgmlType::Q6K {
                            q6_k_block(q, sc, k.d[i], &mut out);
                        } else {
                            q3_k_block(q, sc, k.d[i], &mut out);
                        }
                    }
                    _ => unreachable!("ggml_type gives K types only with K-quant scales"),
                }
            }
        }
        Ok((ty, out))
    }
}

/// A Q6_K block: 256 codes in `[-32, 31]` stored as `q + 32`, their low nibbles in `ql` (128
/// bytes), their top two bits in `qh` (64 bytes), then the 16 group scales (i8) and `d` (f16).
/// Within each half of 128 codes, byte `l` of `ql` holds codes `l` and `l + 64` (low, high nibble)
/// and byte `l + 32` codes `l + 32` and `l + 96`; byte `l` of `qh` holds the top bits of codes
/// `l`, `l + 32`, `l + 64`, `l + 96` from its lowest pair up.
fn q6_k_block(q: &[i8], sc: &[i8], d: f32, out: &mut Vec<u8>) {
    let u = |i: usize| (q[i] + 32) as u8;
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let (c, ql, qh) = (half * 128, &mut ql[half * 64..], &mut qh[half * 32..]);
        for l in 0..32 {
            ql[l] = (u(c + l) & 15) | ((u(c + l + 64) & 15) << 4);
            ql[l + 32] = (u(c + l + 32) & 15) | ((u(c + l + 96) & 15) << 4);
            qh[l] = (0..4).map(|k| (u(c + l + 32 * k) >> 4) << (2 * k)).sum();
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&v| v as u8));
    out.extend(f16::from_f32(d).to_le_bytes());
}

/// A Q3_K block: 256 codes in `[-4, 3]`; `hmask` (32 bytes) holds bit `c / 32` of byte `c % 32`
/// set where code `c` is not negative; `qs` (64 bytes) the low two bits of `q + 4`, byte `l` of
/// each half of 128 codes holding codes `l`, `l + 32`, `l + 64`, `l + 96` from its lowest pair up;
/// then the 16 group scales as 6-bit `sc + 32` (12 bytes: low nibbles of groups 0-7 and 8-15 in the
/// low and high halves of bytes 0-7, the top two bits of group `j` at bits `2 (j / 4)` of byte
/// `8 + j % 4`) and `d` (f16).
fn q3_k_block(q: &[i8], sc: &[i8], d: f32, out: &mut Vec<u8>) {
    let u = |i: usize| (q[i] + 4) as u8;
    let (mut hmask, mut qs, mut scales) = ([0u8; 32], [0u8; 64], [0u8; 12]);
    for (c, &v) in q.iter().enumerate() {
        if v >= 0 {
            hmask[c % 32] |= 1 << (c / 32);
        }
    }
    for half in 0..2 {
        for l in 0..32 {
            qs[half * 32 + l] = (0..4)
                .map(|k| (u(half * 128 + l + 32 * k) & 3) << (2 * k))
                .sum();
        }
    }
    for (j, &s) in sc.iter().enumerate() {
        let l = (s as i32 + 32) as u8;
        scales[j % 8] |= (l & 15) << (4 * (j / 8));
        scales[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
    out.extend(hmask);
    out.extend(qs);
    out.extend(scales);
    out.extend(f16::from_f32(d).to_le_bytes());
}

/// The llama.cpp type that holds `bits`-bit symmetric codes exactly, or why none does. With f16
/// scales in groups of 32: Q8_0 at 8 bits and Q4_0 at 4, and the narrower 6- and 3-bit codes in
/// those same blocks, exactly (for rows that do not fill K-quant super-blocks; llama.cpp's own
/// quantizer falls back to Q8_0 from Q6_K too, but to IQ4_NL from Q3_K, whose non-uniform grid
/// does not hold tern's codes exactly). With K-quant scales ([`KScales`]): Q6_K at 6 bits, Q3_K
/// at 3.
pub fn ggml_type(bits: u32, group: usize, kquant: bool) -> Result<GgmlType> {
    if kquant {
        return match bits {
            6 => Ok(GgmlType::Q6K),
            3 => Ok(GgmlType::Q3K),
            b => bail!("{b}-bit codes have no K-quant type (Q6_K holds 6 bits, Q3_K 3)"),
        };
    }
    if group != 32 {
        bail!(
            "GGUF's Q8_0 / Q4_0 blocks hold 32 weights with one f16 scale; quantize with \
             --group-size 32 for a GGUF export"
        );
    }
    match bits {
        8 | 6 => Ok(GgmlType::Q8_0),
        4 | 3 => Ok(GgmlType::Q4_0),
        b => bail!("{b}-bit codes have no GGUF type here"),
    }
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
                kscales: None,
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
            kscales: None,
        };
        let (ty, b) = m.ggml_blocks("t").unwrap();
        assert_eq!(b.len(), 18);
        assert_eq!(&b[..2], &f16::from_f32(0.25).to_le_bytes());
        assert_eq!(b[2], 15 << 4); // q[0] + 8 = 0 low, q[16] + 8 = 15 high
        assert_eq!(b[3], 11 | (8 << 4));
        assert_eq!(ty, GgmlType::Q4_0);
        // 3-bit codes go in the same block, exactly.
        let m3 = QuantMatrix {
            bits: 3,
            codes: m.codes.iter().map(|&q| q.clamp(-4, 3)).collect(),
            ..m.clone()
        };
        assert_eq!(m3.ggml_blocks("t").unwrap().0, GgmlType::Q4_0);
        let m16 = QuantMatrix {
            group: 16,
            scales: vec![0.25, 0.25],
            ..m.clone()
        };
        assert!(m16
            .ggml_blocks("t")
            .unwrap_err()
            .to_string()
            .contains("--group-size 32"));
    }

    fn kmatrix(bits: u32, seed: u64) -> QuantMatrix {
        let (rows, cols) = (2, 512);
        let (lo, hi) = k_scale_range(bits).unwrap();
        let h = 1i64 << (bits - 1);
        let mut s = seed;
        let mut next = move |n: i64| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as i64).rem_euclid(n)
        };
        let codes = (0..rows * cols).map(|_| (next(2 * h) - h) as i8).collect();
        let k = KScales {
            d: (0..rows * cols / SUPER_BLOCK)
                .map(|i| {
                    f16::from_f32(0.01 * (i as f32 + 1.0) * if i % 2 == 0 { 1.0 } else { -1.0 })
                        .to_f32()
                })
                .collect(),
            sc: (0..rows * cols / K_GROUP)
                .map(|i| match i {
                    0 => lo as i8,
                    1 => hi as i8,
                    _ => (next((hi - lo + 1) as i64) + lo as i64) as i8,
                })
                .collect(),
        };
        QuantMatrix {
            rows,
            cols,
            bits,
            group: K_GROUP,
            codes,
            scales: k.products(rows, cols),
            kscales: Some(k),
        }
    }

    /// Q6_K and Q3_K blocks read back with llama.cpp's dequantization as its source states it
    /// (`dequantize_row_q6_K`, `dequantize_row_q3_K`: the Q3_K scales unpacked through 32-bit
    /// masks), value for value.
    #[test]
    fn k_quant_blocks_dequantize_to_the_matrix() {
        for bits in [6u32, 3] {
            let m = kmatrix(bits, bits as u64);
            m.check("m").unwrap();
            let (ty, b) = m.ggml_blocks("m").unwrap();
            let size = if bits == 6 { 210 } else { 110 };
            assert_eq!(b.len(), m.rows * m.cols / 256 * size);
            let mut y = Vec::new();
            for x in b.chunks(size) {
                let d = f16::from_le_bytes([x[size - 2], x[size - 1]]).to_f32();
                if ty == GgmlType::Q6K {
                    let (ql, qh, sc) = (&x[..128], &x[128..192], &x[192..208]);
                    let mut blk = [0f32; 256];
                    for n in 0..2 {
                        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                            let s = |k: usize| d * sc[is + k] as i8 as f32;
                            blk[128 * n + l] = s(0) * q1 as f32;
                            blk[128 * n + l + 32] = s(2) * q2 as f32;
                            blk[128 * n + l + 64] = s(4) * q3 as f32;
                            blk[128 * n + l + 96] = s(6) * q4 as f32;
                        }
                    }
                    y.extend(blk);
                } else {
                    let (hm, qs, raw) = (&x[..32], &x[32..96], &x[96..108]);
                    let mut aux = [0u32; 4];
                    for i in 0..3 {
                        aux[i] = u32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().unwrap());
                    }
                    let (k1, k2, tmp) = (0x0303_0303u32, 0x0f0f_0f0fu32, aux[2]);
                    aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
                    aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
                    aux[0] = (aux[0] & k2) | ((tmp & k1) << 4);
                    aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
                    let scales: Vec<i8> = aux
                        .iter()
                        .flat_map(|a| a.to_le_bytes())
                        .map(|v| v as i8)
                        .collect();
                    let (mut is, mut m_bit) = (0, 1u8);
                    for n in 0..2 {
                        let q = &qs[32 * n..];
                        for j in 0..4 {
                            for half in 0..2 {
                                let dl = d * (scales[is] as i32 - 32) as f32;
                                is += 1;
                                for l in 16 * half..16 * half + 16 {
                                    let v = ((q[l] >> (2 * j)) & 3) as i32
                                        - if hm[l] & m_bit != 0 { 0 } else { 4 };
                                    y.push(dl * v as f32);
                                }
                            }
                            m_bit <<= 1;
                        }
                    }
                }
            }
            let want = m.dequantize();
            assert_eq!(y.len(), want.len());
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{bits} bits, weight {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn k_scales_are_checked() {
        let mut m = kmatrix(3, 1);
        m.check("m").unwrap();
        m.scales[5] *= 1.5;
        assert!(m
            .check("m")
            .unwrap_err()
            .to_string()
            .contains("K-quant product"));
        let mut m = kmatrix(3, 1);
        m.kscales.as_mut().unwrap().sc[3] = 40;
        assert!(m
            .check("m")
            .unwrap_err()
            .to_string()
            .contains("outside [-32, 31]"));
        let m = QuantMatrix {
            bits: 4,
            ..kmatrix(3, 1)
        };
        assert!(m.check("m").is_err());
        // Rows reordered keep their own scales.
        let m = kmatrix(6, 2);
        let r = m.with_rows(&[1, 0]);
        r.check("r").unwrap();
        assert_eq!(&r.dequantize()[..512], &m.dequantize()[512..]);
    }
}
