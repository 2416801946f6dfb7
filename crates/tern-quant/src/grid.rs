//! The quantization grid, its group scales, and round-to-nearest.

use anyhow::{bail, Result};
use tern_pack::quant::{k_scale_range, KScales, K_GROUP, SUPER_BLOCK};
use tern_pack::QuantMatrix;

/// Bits, group size and the form of the group scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    /// Consecutive input columns sharing a scale.
    pub group: usize,
    /// llama.cpp's K-quant scales (Q6_K, Q3_K): groups of 16 whose scales are integers times one
    /// f16 scale per 256 columns. Otherwise each group's scale is an f16.
    pub kquant: bool,
}

/// `x` rounded to the nearest f16 value (ties to even), as f32.
pub fn to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The value of largest magnitude (the first, on ties), sign kept.
fn signed_max(w: impl Iterator<Item = f32>) -> f32 {
    w.fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

impl Grid {
    pub fn new(bits: u32, group: usize) -> Result<Self> {
        if !matches!(bits, 3 | 4 | 6 | 8) {
            bail!("--bits {bits}: the widths are 3, 4, 6 and 8");
        }
        if group == 0 {
            bail!("--group-size must be at least 1");
        }
        Ok(Self {
            bits,
            group,
            kquant: false,
        })
    }

    /// The K-quant grid of `bits` (6: Q6_K, 3: Q3_K), for rows of a multiple of 256 columns.
    pub fn k_quant(bits: u32) -> Result<Self> {
        if k_scale_range(bits).is_none() {
            bail!("--k-quants: llama.cpp's symmetric K-quant types hold 6 bits (Q6_K) and 3 (Q3_K), not {bits}");
        }
        Ok(Self {
            bits,
            group: K_GROUP,
            kquant: true,
        })
    }

    /// Whether rows of `cols` columns take this grid (K-quant scales need whole super-blocks).
    pub fn fits(&self, cols: usize) -> bool {
        !self.kquant || cols.is_multiple_of(SUPER_BLOCK)
    }

    /// Smallest and largest code.
    pub fn range(&self) -> (i32, i32) {
        if self.bits == 8 {
            (-127, 127)
        } else {
            let h = 1i32 << (self.bits - 1);
            (-h, h - 1)
        }
    }

    /// A group's scale before any rounding: the value of largest magnitude maps to the most
    /// negative code (8 bits: `max|w| / 127`, as Q8_0); 0 for an all-zero group.
    fn raw_scale(&self, w: &[f32]) -> f32 {
        if self.bits == 8 {
            return w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        }
        signed_max(w.iter().copied()) / self.range().0 as f32
    }

    /// The f16 scale of a group of values (0 for an all-zero group).
    pub fn scale(&self, w: &[f32]) -> f32 {
        to_f16(self.raw_scale(w))
    }

    /// The nearest code of `w` under scale `d`.
    pub fn code(&self, w: f32, d: f32) -> i8 {
        if d == 0.0 {
            return 0;
        }
        let (lo, hi) = self.range();
        ((w / d).round_ties_even() as i32).clamp(lo, hi) as i8
    }
}

/// The group scales of one `[rows, cols]` matrix, set group by group as quantization reaches
/// them.
pub struct Scales {
    grid: Grid,
    cols: usize,
    groups: usize,
    /// `[rows, groups]`: the scale each code multiplies.
    values: Vec<f32>,
    /// K-quant form: `[rows, cols / 256]` f16 scales and `[rows, groups]` integers.
    d: Vec<f32>,
    sc: Vec<i8>,
}

impl Scales {
    pub fn new(grid: Grid, rows: usize, cols: usize) -> Self {
        assert!(grid.fits(cols), "K-quant rows of {cols} columns");
        let groups = cols.div_ceil(grid.group);
        let supers = if grid.kquant { cols / SUPER_BLOCK } else { 0 };
        Self {
            grid,
            cols,
            groups,
            values: vec![0.0; rows * groups],
            d: vec![0.0; rows * supers],
            sc: vec![0; if grid.kquant { rows * groups } else { 0 }],
        }
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn get(&self, r: usize, g: usize) -> f32 {
        self.values[r * self.groups + g]
    }

    /// Sets row `r`'s scale of group `g` from the row's current values. With K-quant scales the
    /// first group of a super-block also sets the super-block's f16 scale, from all of its groups
    /// as they are now (as llama.cpp: the largest group scale in magnitude maps to the most
    /// negative integer); each group's integer is then its own scale over that, rounded.
    pub fn set<T: Copy + Into<f64>>(&mut self, r: usize, g: usize, row: &[T]) {
        let grid = self.grid;
        let vals = |c0: usize, c1: usize| -> Vec<f32> {
            row[c0..c1.min(self.cols)]
                .iter()
                .map(|&v| v.into() as f32)
                .collect()
        };
        let i = r * self.groups + g;
        if !grid.kquant {
            self.values[i] = grid.scale(&vals(g * grid.group, (g + 1) * grid.group));
            return;
        }
        let per = SUPER_BLOCK / K_GROUP;
        let (lo, hi) = k_scale_range(grid.bits).expect("a K-quant width");
        let s = r * (self.cols / SUPER_BLOCK) + g / per;
        if g.is_multiple_of(per) {
            let raw = (g..g + per).map(|h| grid.raw_scale(&vals(h * K_GROUP, (h + 1) * K_GROUP)));
            self.d[s] = to_f16(signed_max(raw) / lo as f32);
        }
        let d = self.d[s];
        let raw = grid.raw_scale(&vals(g * K_GROUP, (g + 1) * K_GROUP));
        let sc = if d == 0.0 {
            0
        } else {
            ((raw / d).round_ties_even() as i32).clamp(lo, hi) as i8
        };
        self.sc[i] = sc;
        self.values[i] = d * sc as f32;
    }

    /// The quantized matrix of these scales and `codes`.
    pub fn matrix(self, rows: usize, codes: Vec<i8>) -> QuantMatrix {
        QuantMatrix {
            rows,
            cols: self.cols,
            bits: self.grid.bits,
            group: self.grid.group,
            codes,
            scales: self.values,
            kscales: self.grid.kquant.then_some(KScales {
                d: self.d,
                sc: self.sc,
            }),
        }
    }
}

/// Round-to-nearest: each group's scale from its values, each value to its nearest code.
pub fn rtn(w: &[f32], rows: usize, cols: usize, grid: Grid) -> QuantMatrix {
    let mut scales = Scales::new(grid, rows, cols);
    let mut codes = vec![0i8; rows * cols];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for g in 0..scales.groups() {
            scales.set(r, g, row);
            let d = scales.get(r, g);
            for c in g * grid.group..((g + 1) * grid.group).min(cols) {
                codes[r * cols + c] = grid.code(row[c], d);
            }
        }
    }
    scales.matrix(rows, codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounding_is_ieee() {
        let bits = |x: f32| half::f16::from_f32(to_f16(x)).to_bits();
        for (x, want) in [
            (1.0f32, 0x3c00u16),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (1e-8, 0x0000),
            (6.1e-5, 0x0400 - 1), // just below the smallest normal: subnormal 0x3ff
            (0.1, 0x2e66),
            (1.0 + 1.0 / 2048.0, 0x3c00), // a tie: to even
            (1.0 + 3.0 / 2048.0, 0x3c02),
        ] {
            assert_eq!(bits(x), want, "{x}");
        }
    }

    #[test]
    fn grids_hold_their_extremes_and_round_to_nearest() {
        let g4 = Grid::new(4, 4).unwrap();
        let w = [0.5f32, -1.0, 0.26, 0.0];
        let d = g4.scale(&w);
        assert_eq!(d, 0.125);
        assert_eq!(w.map(|v| g4.code(v, d)), [4, -8, 2, 0]);
        let g8 = Grid::new(8, 4).unwrap();
        let d = g8.scale(&w);
        assert_eq!(d, to_f16(1.0 / 127.0));
        assert_eq!(g8.code(-1.0, d), -127);
        let q = rtn(&[0.5, -1.0, 0.26, 0.0, 3.0, 0.0, 0.0, 0.0], 2, 4, g4);
        assert_eq!(q.codes, vec![4, -8, 2, 0, -8, 0, 0, 0]);
        assert_eq!(q.dequantize()[4], 3.0);
        assert!(Grid::new(5, 32).is_err() && Grid::new(4, 0).is_err());
    }

    /// K-quant scales by hand: 3 bits, one row of 256. Group 0's largest value -0.8 gives the raw
    /// scale -0.8 / -4 = 0.2, group 1's 0.4 gives -0.1, the rest are zero; the super-block scale
    /// is 0.2 / -32 in f16 and the integers -32 and 16, so both extremes land on code -4.
    #[test]
    fn k_quant_scales_by_hand() {
        let mut w = vec![0f32; 256];
        w[3] = -0.8;
        w[5] = 0.3;
        w[16] = 0.4;
        w[17] = 0.1;
        let g = Grid::k_quant(3).unwrap();
        let q = rtn(&w, 1, 256, g);
        q.check("q").unwrap();
        let k = q.kscales.as_ref().unwrap();
        let big_d = to_f16(0.2 / -32.0);
        assert_eq!(k.d, vec![big_d]);
        assert_eq!(&k.sc[..3], &[-32, 16, 0]);
        assert_eq!(q.scales[0], big_d * -32.0);
        assert_eq!(
            (q.codes[3], q.codes[5], q.codes[16], q.codes[17]),
            (-4, 2, -4, -1)
        );
        assert!(Grid::k_quant(4).is_err() && !g.fits(576) && g.fits(512));
    }
}
