//! The quantization grid and round-to-nearest.

use anyhow::{bail, Result};
use tern_pack::QuantMatrix;

/// Bits and group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    /// Consecutive input columns sharing a scale.
    pub group: usize,
}

/// `x` rounded to the nearest f16 value (ties to even), as f32.
pub fn to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

impl Grid {
    /// The quantized matrix of these codes and scales.
    pub fn matrix(
        &self,
        rows: usize,
        cols: usize,
        codes: Vec<i8>,
        scales: Vec<f32>,
    ) -> QuantMatrix {
        QuantMatrix {
            rows,
            cols,
            bits: self.bits,
            group: self.group,
            codes,
            scales,
        }
    }

    pub fn new(bits: u32, group: usize) -> Result<Self> {
        if !matches!(bits, 3 | 4 | 6 | 8) {
            bail!("--bits {bits}: the widths are 3, 4, 6 and 8");
        }
        if group == 0 {
            bail!("--group-size must be at least 1");
        }
        Ok(Self { bits, group })
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

    /// The scale of a group of values (f16-exact; 0 for an all-zero group).
    pub fn scale(&self, w: &[f32]) -> f32 {
        if self.bits == 8 {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            return to_f16(amax / 127.0);
        }
        // The value of largest magnitude (the first, on ties) maps to the most negative code.
        let m = w
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        to_f16(m / -((1i32 << (self.bits - 1)) as f32))
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

/// Round-to-nearest: each group's scale from its values, each value to its nearest code.
pub fn rtn(w: &[f32], rows: usize, cols: usize, grid: Grid) -> QuantMatrix {
    let groups = cols.div_ceil(grid.group);
    let mut codes = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            let (c0, c1) = (g * grid.group, ((g + 1) * grid.group).min(cols));
            let vals = &w[r * cols + c0..r * cols + c1];
            let d = grid.scale(vals);
            scales[r * groups + g] = d;
            for (c, v) in (c0..c1).zip(vals) {
                codes[r * cols + c] = grid.code(*v, d);
            }
        }
    }
    grid.matrix(rows, cols, codes, scales)
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
}
