//! llama.cpp's ternary block types (ggml-common.h, ggml-quants.c), 256 weights a block:
//! - TQ2_0, 66 bytes: `qs[64]` then the fp16 scale `d`. Within each 32-byte half, byte `m` holds
//!   weights `m + 32n` (n = 0..4) of that half's 128 at bits `2n`, as `w + 1`.
//! - TQ1_0, 54 bytes: `qs[48]`, `qh[4]`, then `d`. `qs[0..32]` hold weights `m + 32n` (n = 0..5)
//!   of the first 160, `qs[32..48]` weights `160 + m + 16n`, `qh[j]` weights `240 + j + 4n`
//!   (n = 0..4, then a zero trit); each byte is the base-3 number of its trits, first weight most
//!   significant, mapped to `ceil(q * 256 / 243)` so that the decoder reads trit n as
//!   `((q * 3^n) mod 256) * 3 >> 8`.
//!
//! A block is `d * code`: the encoders take the codes and the scale, so a ternary matrix whose
//! scale is constant over each block is stored exactly (up to the scale's rounding to fp16).

use half::f16;

pub const QK: usize = 256;
pub const TQ2_0_BYTES: usize = 66;
pub const TQ1_0_BYTES: usize = 54;

/// One TQ2_0 block of 256 codes in {-1, 0, 1}.
pub fn tq2_0_block(codes: &[i8], d: f32) -> [u8; TQ2_0_BYTES] {
    assert_eq!(codes.len(), QK);
    let mut out = [0u8; TQ2_0_BYTES];
    for half_ in 0..2 {
        for m in 0..32 {
            out[32 * half_ + m] = (0..4)
                .map(|n| ((codes[128 * half_ + m + 32 * n] + 1) as u8) << (2 * n))
                .sum();
        }
    }
    out[64..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out
}

/// The 256 values of a TQ2_0 block (ggml's `dequantize_row_tq2_0`).
pub fn tq2_0_values(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[64], block[65]]).to_f32();
    let mut out = vec![0f32; QK];
    for half_ in 0..2 {
        for n in 0..4 {
            for m in 0..32 {
                let q = (block[32 * half_ + m] >> (2 * n)) & 3;
                out[128 * half_ + 32 * n + m] = (q as f32 - 1.0) * d;
            }
        }
    }
    out
}

/// Base-3 number of `trits` (each `code + 1`), first most significant, as ggml stores it.
fn base3_byte(trits: impl Iterator<Item = i8>) -> u8 {
    let q = trits.fold(0u16, |q, c| q * 3 + (c + 1) as u16);
    ((q * 256).div_ceil(243)) as u8
}

/// One TQ1_0 block of 256 codes in {-1, 0, 1}.
pub fn tq1_0_block(codes: &[i8], d: f32) -> [u8; TQ1_0_BYTES] {
    assert_eq!(codes.len(), QK);
    let mut out = [0u8; TQ1_0_BYTES];
    for m in 0..32 {
        out[m] = base3_byte((0..5).map(|n| codes[m + 32 * n]));
    }
    for m in 0..16 {
        out[32 + m] = base3_byte((0..5).map(|n| codes[160 + m + 16 * n]));
    }
    for j in 0..4 {
        // Four trits and a zero trit (a code of -1 + 1 = 0) in the least significant place.
        out[48 + j] = base3_byte((0..4).map(|n| codes[240 + j + 4 * n]).chain([-1]));
    }
    out[52..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out
}

/// Trit `n` (0 = most significant) of a ggml base-3 byte.
fn trit(q: u8, n: u32) -> f32 {
    let shifted = q.wrapping_mul(3u8.pow(n));
    ((shifted as u16 * 3) >> 8) as f32 - 1.0
}

/// The 256 values of a TQ1_0 block (ggml's `dequantize_row_tq1_0`).
pub fn tq1_0_values(block: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([block[52], block[53]]).to_f32();
    let mut out = vec![0f32; QK];
    for n in 0..5 {
        for m in 0..32 {
            out[32 * n + m] = trit(block[m], n as u32) * d;
        }
        for m in 0..16 {
            out[160 + 16 * n + m] = trit(block[32 + m], n as u32) * d;
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            out[240 + 4 * n + j] = trit(block[48 + j], n as u32) * d;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(seed: usize) -> Vec<i8> {
        (0..QK)
            .map(|i| ((i * 7 + seed * 13 + i / 5) % 3) as i8 - 1)
            .collect()
    }

    #[test]
    fn blocks_decode_to_their_codes_times_d() {
        for seed in 0..5 {
            let c = codes(seed);
            let d = 0.375; // exact in fp16
            let want: Vec<f32> = c.iter().map(|&v| v as f32 * d).collect();
            assert_eq!(tq2_0_values(&tq2_0_block(&c, d)), want);
            assert_eq!(tq1_0_values(&tq1_0_block(&c, d)), want);
        }
    }

    #[test]
    fn tq2_0_block_by_hand() {
        // Weight i = 1 only for i = 0 (byte 0, bits 0..2 -> 2), i = 33 (byte 1, bits 2..4 -> 2),
        // i = 130 (second half, byte 2, bits 0..2 -> 2); -1 for i = 255 (second half, m = 31,
        // n = 3: byte 63, bits 6..8 -> 0). Every other weight is 0 -> code 1 in each 2-bit slot,
        // so an untouched byte is 0b01010101 = 0x55.
        let mut c = vec![0i8; QK];
        c[0] = 1;
        c[33] = 1;
        c[130] = 1;
        c[255] = -1;
        let b = tq2_0_block(&c, 1.0);
        let mut want = [0x55u8; 66];
        want[0] = 0x56; // slot 0 = 2
        want[1] = 0x59; // slot 1 = 2
        want[34] = 0x56; // second half, m = 2, slot 0 = 2
        want[63] = 0x15; // slot 3 = 0
        want[64..].copy_from_slice(&[0x00, 0x3c]); // fp16 1.0
        assert_eq!(b, want);
    }

    #[test]
    fn tq1_0_block_by_hand() {
        // All zero weights: every trit is 1. A qs byte holds 11111 in base 3 = 121, stored as
        // ceil(121 * 256 / 243) = 128. A qh byte holds 1111 then a 0 trit: 1110 * 10 in base 3 =
        // 120, ceil(120 * 256 / 243) = 127 (126.42 rounded up).
        let b = tq1_0_block(&[0i8; QK], 2.0);
        assert!(b[..48].iter().all(|&x| x == 128), "{:?}", &b[..48]);
        assert_eq!(&b[48..52], &[127; 4]);
        assert_eq!(&b[52..], &[0x00, 0x40]); // fp16 2.0
                                             // Weight 0 = 1 raises the most significant trit of qs[0]: 21111 = 202 -> ceil(212.8) = 213.
        let mut c = vec![0i8; QK];
        c[0] = 1;
        assert_eq!(tq1_0_block(&c, 1.0)[0], 213);
    }
}
