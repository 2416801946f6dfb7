//! The kernels' inner loops, each in a portable form and in the vector forms the CPU has (chosen
//! at run time): AVX2 + FMA, and AVX-512 (F, BW, VNNI). The portable forms define the results;
//! the tests check each vector form against them.

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best the CPU has. `TERN_NO_SIMD` forces the portable forms, `TERN_NO_AVX512` stops at
    /// AVX2.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TERN_NO_SIMD").is_some()
                || !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
            {
                return Isa::Portable;
            }
            if std::env::var_os("TERN_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            Isa::Avx2
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Portable
    }

    /// Every form this CPU can run (for tests).
    pub fn all_available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| match (i, best) {
                (Isa::Portable, _) => true,
                (Isa::Avx2, b) => b != Isa::Portable,
                (Isa::Avx512, b) => b == Isa::Avx512,
            })
            .collect()
    }
}

/// Inputs per run that the AVX-512 f32 kernel reads in lane order (four blocks: 64 bytes of codes).
pub const LANE_RUN: usize = 256;

/// One padded segment of f32 inputs (a whole number of 64-weight blocks) put, in place, in the
/// order the f32 kernels of `isa` read it. AVX-512 loads 64 bytes of codes (four blocks, 256 weights) at once;
/// each 32-bit lane `i` holds 16 two-bit fields, and field `t` (bits `2t..2t + 2`, reached by the
/// kernel's shift `t / 2` and table `t % 2`) is weight `64 (i / 4) + 16 (t % 4) + 4 (i % 4) + t / 4`
/// of the run: each whole run of 256 inputs is stored as `x'[16 t + i]` = that weight's input; a
/// last partial run stays in order. The other forms read inputs in order.
pub fn order_f32(x: &mut [f32], isa: Isa) {
    if isa != Isa::Avx512 {
        return;
    }
    for run in x.chunks_exact_mut(LANE_RUN) {
        let src: [f32; LANE_RUN] = (&*run).try_into().expect("a whole run");
        for t in 0..16 {
            for i in 0..16 {
                run[16 * t + i] = src[64 * (i / 4) + 16 * (t % 4) + 4 * (i % 4) + t / 4];
            }
        }
    }
}

/// `sum_i w_i x_i` over 16-byte blocks of 64 ternary codes (`w = code - 1`; see `ternary.rs`),
/// `x` in [`order_f32`]'s order.
pub fn ternary_dot_f32(codes: &[u8], x: &[f32], isa: Isa) -> f32 {
    debug_assert_eq!(codes.len() * 4, x.len());
    match isa {
        // SAFETY: `Isa::detect` chose these forms only where the CPU has their features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => ternary_dot_f32_x4([codes; 4], x, isa)[0],
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::ternary_dot_f32(codes, x) },
        _ => {
            let mut acc = 0f32;
            for (blk, xs) in codes.chunks(16).zip(x.chunks(64)) {
                for (i, v) in xs.iter().enumerate() {
                    match crate::ternary::code(blk, i) {
                        0 => acc -= v,
                        2 => acc += v,
                        _ => {}
                    }
                }
            }
            acc
        }
    }
}

/// [`ternary_dot_f32`] for four rows of codes against the same input (in [`order_f32`]'s order).
pub fn ternary_dot_f32_x4(codes: [&[u8]; 4], x: &[f32], isa: Isa) -> [f32; 4] {
    // The vector forms read every row and the input as long as the first row says.
    assert!(
        codes.iter().all(|c| c.len() == codes[0].len()) && x.len() == 4 * codes[0].len(),
        "rows of codes and inputs of unequal length"
    );
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::ternary_dot_f32_x4(codes, x) },
        _ => codes.map(|c| ternary_dot_f32(c, x, isa)),
    }
}

/// `sum_chunks d_c * sum_{i in chunk} code_i q_i` (codes `w + 1`, so the caller subtracts
/// `sum d_c sum q_i`), for chunks of `chunk_blocks` blocks.
pub fn ternary_dot_q8(codes: &[u8], q: &[i8], d: &[f32], chunk_blocks: usize, isa: Isa) -> f32 {
    debug_assert_eq!(codes.len() * 4, q.len());
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::ternary_dot_q8(codes, q, d, chunk_blocks) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::ternary_dot_q8(codes, q, d, chunk_blocks) },
        _ => codes
            .chunks(16 * chunk_blocks)
            .zip(q.chunks(64 * chunk_blocks))
            .zip(d)
            .map(|((cs, qs), dc)| {
                let mut s = 0i32;
                for (blk, qb) in cs.chunks(16).zip(qs.chunks(64)) {
                    for (i, &v) in qb.iter().enumerate() {
                        s += crate::ternary::code(blk, i) as i32 * v as i32;
                    }
                }
                dc * s as f32
            })
            .sum(),
    }
}

/// `out[i] = s * w_i` for the 64 codes of each 16-byte block (`out.len() = 4 * codes.len()`).
pub fn expand_f32(codes: &[u8], s: f32, out: &mut [f32], isa: Isa) {
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::expand_f32(codes, s, out) },
        _ => {
            for (blk, o) in codes.chunks(16).zip(out.chunks_mut(64)) {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = (crate::ternary::code(blk, i) as f32 - 1.0) * s;
                }
            }
        }
    }
}

/// [`ternary_dot_q8`] for four rows of codes against the same activations.
pub fn ternary_dot_q8_x4(
    codes: [&[u8]; 4],
    q: &[i8],
    d: &[f32],
    chunk_blocks: usize,
    isa: Isa,
) -> [f32; 4] {
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::ternary_dot_q8_x4(codes, q, d, chunk_blocks) },
        _ => codes.map(|c| ternary_dot_q8(c, q, d, chunk_blocks, isa)),
    }
}

/// The codes of 16-byte blocks, one a byte in order (`out.len() = 4 * codes.len()`).
pub fn expand_codes(codes: &[u8], out: &mut [u8], isa: Isa) {
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::expand_codes(codes, out) },
        _ => {
            for (blk, o) in codes.chunks(16).zip(out.chunks_mut(64)) {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = crate::ternary::code(blk, i);
                }
            }
        }
    }
}

/// [`ternary_dot_q8_x4`] on codes already expanded to bytes ([`expand_codes`]).
pub fn bytes_dot_q8_x4(
    w: [&[u8]; 4],
    q: &[i8],
    d: &[f32],
    chunk_blocks: usize,
    isa: Isa,
) -> [f32; 4] {
    match isa {
        // SAFETY: as in `ternary_dot_f32`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::bytes_dot_q8_x4(w, q, d, chunk_blocks) },
        _ => w.map(|wr| {
            wr.chunks(64 * chunk_blocks)
                .zip(q.chunks(64 * chunk_blocks))
                .zip(d)
                .map(|((ws, qs), dc)| {
                    let s: i32 = ws.iter().zip(qs).map(|(&a, &b)| a as i32 * b as i32).sum();
                    dc * s as f32
                })
                .sum()
        }),
    }
}

/// `sum_i a_i b_i`.
pub fn dot(a: &[f32], b: &[f32], isa: Isa) -> f32 {
    match isa {
        // SAFETY: as in `ternary_dot_f32` (AVX-512 CPUs have AVX2 and FMA).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::dot(a, b) },
        _ => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// `max_i |x_i|`.
pub fn absmax(x: &[f32], isa: Isa) -> f32 {
    match isa {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::absmax(x) },
        _ => x.iter().fold(0f32, |m, v| m.max(v.abs())),
    }
}

/// `q_i = clamp(round(x_i s), -128, 127)`, rounding half to even (as training's `round`); returns
/// `sum_i q_i`.
pub fn quantize_i8(x: &[f32], s: f32, q: &mut [i8], isa: Isa) -> i32 {
    let n = x.len().min(q.len());
    let done = match isa {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::quantize_i8(&x[..n], s, &mut q[..n]) },
        _ => 0,
    };
    let mut sum = q[..done].iter().map(|&v| v as i32).sum::<i32>();
    for (v, o) in x[done..n].iter().zip(&mut q[done..n]) {
        *o = (v * s).round_ties_even().clamp(-128.0, 127.0) as i8;
        sum += *o as i32;
    }
    sum
}

/// `y += alpha x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32], isa: Isa) {
    match isa {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::axpy(alpha, x, y) },
        _ => {
            for (a, b) in y.iter_mut().zip(x) {
                *a += alpha * b;
            }
        }
    }
}

/// Four weight rows against two input rows.
pub fn tile_4x2(w: [&[f32]; 4], x: [&[f32]; 2], isa: Isa) -> [[f32; 2]; 4] {
    match isa {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::tile_4x2(w, x) },
        _ => w.map(|wr| [dot(wr, x[0], isa), dot(wr, x[1], isa)]),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Per-16-bit-lane shifts 0, 2, 4, 6 for the four 128-bit lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn lane_shifts() -> __m512i {
        let s = |k: i64| k * 0x0001_0001_0001_0001;
        _mm512_set_epi64(s(6), s(6), s(4), s(4), s(2), s(2), s(0), s(0))
    }

    /// The 64 codes of the block at `p`, one a byte, in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn expand(p: *const u8, shifts: __m512i, mask: __m512i) -> __m512i {
        let v = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
        _mm512_and_si512(_mm512_srlv_epi16(v, shifts), mask)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn ternary_dot_q8(codes: &[u8], q: &[i8], d: &[f32], chunk_blocks: usize) -> f32 {
        let (shifts, mask) = (lane_shifts(), _mm512_set1_epi8(3));
        let blocks = codes.len() / 16;
        let (cp, qp) = (codes.as_ptr(), q.as_ptr());
        let mut accf = _mm512_setzero_ps();
        let mut b = 0;
        for &dc in d {
            let end = (b + chunk_blocks).min(blocks);
            let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            while b + 2 <= end {
                let w0 = expand(cp.add(16 * b), shifts, mask);
                let w1 = expand(cp.add(16 * b + 16), shifts, mask);
                a0 = _mm512_dpbusd_epi32(a0, w0, _mm512_loadu_si512(qp.add(64 * b) as *const _));
                a1 = _mm512_dpbusd_epi32(
                    a1,
                    w1,
                    _mm512_loadu_si512(qp.add(64 * b + 64) as *const _),
                );
                b += 2;
            }
            if b < end {
                let w0 = expand(cp.add(16 * b), shifts, mask);
                a0 = _mm512_dpbusd_epi32(a0, w0, _mm512_loadu_si512(qp.add(64 * b) as *const _));
                b += 1;
            }
            let s = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
            accf = _mm512_fmadd_ps(s, _mm512_set1_ps(dc), accf);
        }
        _mm512_reduce_add_ps(accf)
    }

    /// Four rows at once: each block of activations is loaded once for the four.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn ternary_dot_q8_x4(
        codes: [&[u8]; 4],
        q: &[i8],
        d: &[f32],
        chunk_blocks: usize,
    ) -> [f32; 4] {
        let (shifts, mask) = (lane_shifts(), _mm512_set1_epi8(3));
        let blocks = codes[0].len() / 16;
        let cp = codes.map(|c| c.as_ptr());
        let qp = q.as_ptr();
        let mut accf = [_mm512_setzero_ps(); 4];
        let mut b = 0;
        for &dc in d {
            let end = (b + chunk_blocks).min(blocks);
            let mut acc = [_mm512_setzero_si512(); 4];
            while b < end {
                let x = _mm512_loadu_si512(qp.add(64 * b) as *const _);
                for j in 0..4 {
                    let w = expand(cp[j].add(16 * b), shifts, mask);
                    acc[j] = _mm512_dpbusd_epi32(acc[j], w, x);
                }
                b += 1;
            }
            let dv = _mm512_set1_ps(dc);
            for j in 0..4 {
                accf[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), dv, accf[j]);
            }
        }
        accf.map(|a| _mm512_reduce_add_ps(a))
    }

    /// The 64 codes of the block at `p`, each as `table[code]`, in four vectors of 16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn lookup(p: *const u8, table: __m512) -> [__m512; 4] {
        let mask = _mm_set1_epi8(3);
        let v = _mm_loadu_si128(p as *const __m128i);
        let pick = |part: __m128i| {
            _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(part, mask)), table)
        };
        [
            pick(v),
            pick(_mm_srli_epi16::<2>(v)),
            pick(_mm_srli_epi16::<4>(v)),
            pick(_mm_srli_epi16::<6>(v)),
        ]
    }

    /// `[-s, 0, s, 0]` repeated: `table[code] = s * (code - 1)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn signs(s: f32) -> __m512 {
        _mm512_setr_ps(
            -s, 0.0, s, 0.0, -s, 0.0, s, 0.0, -s, 0.0, s, 0.0, -s, 0.0, s, 0.0,
        )
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn expand_f32(codes: &[u8], s: f32, out: &mut [f32]) {
        let table = signs(s);
        let op = out.as_mut_ptr();
        for b in 0..codes.len() / 16 {
            let w = lookup(codes.as_ptr().add(16 * b), table);
            for (k, wk) in w.into_iter().enumerate() {
                _mm512_storeu_ps(op.add(64 * b + 16 * k), wk);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn expand_codes(codes: &[u8], out: &mut [u8]) {
        let (shifts, mask) = (lane_shifts(), _mm512_set1_epi8(3));
        for b in 0..codes.len() / 16 {
            let w = expand(codes.as_ptr().add(16 * b), shifts, mask);
            _mm512_storeu_si512(out.as_mut_ptr().add(64 * b) as *mut _, w);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn bytes_dot_q8_x4(
        w: [&[u8]; 4],
        q: &[i8],
        d: &[f32],
        chunk_blocks: usize,
    ) -> [f32; 4] {
        let blocks = w[0].len() / 64;
        let wp = w.map(|r| r.as_ptr());
        let qp = q.as_ptr();
        let mut accf = [_mm512_setzero_ps(); 4];
        let mut b = 0;
        for &dc in d {
            let end = (b + chunk_blocks).min(blocks);
            let mut acc = [_mm512_setzero_si512(); 4];
            while b < end {
                let x = _mm512_loadu_si512(qp.add(64 * b) as *const _);
                for j in 0..4 {
                    let wv = _mm512_loadu_si512(wp[j].add(64 * b) as *const _);
                    acc[j] = _mm512_dpbusd_epi32(acc[j], wv, x);
                }
                b += 1;
            }
            let dv = _mm512_set1_ps(dc);
            for j in 0..4 {
                accf[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), dv, accf[j]);
            }
        }
        accf.map(|a| _mm512_reduce_add_ps(a))
    }

    /// Four rows at once, each load of inputs serving the four. Whole runs of four blocks: one
    /// 64-byte load of a row's codes, then eight 4-bit shifts of its 32-bit lanes; the low four
    /// bits of each lane hold two codes, and two 16-entry tables (`vpermps`, which reads only
    /// those bits) turn them into the weights of two input vectors (in [`super::order_f32`]'s
    /// order). One table lookup per 16 weights, against a widening and a lookup a block by block.
    /// A last partial run goes block by block with the inputs in order.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn ternary_dot_f32_x4(codes: [&[u8]; 4], x: &[f32]) -> [f32; 4] {
        // (code - 1) of the low two bits and of the next two.
        let lo = _mm512_setr_ps(
            -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0,
        );
        let hi = _mm512_setr_ps(
            -1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
        );
        let xp = x.as_ptr();
        let blocks = codes[0].len() / 16;
        let runs = blocks / 4;
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        for run in 0..runs {
            let mut v = codes.map(|c| _mm512_loadu_si512(c.as_ptr().add(64 * run) as *const _));
            let xr = xp.add(super::LANE_RUN * run);
            for u in 0..8 {
                let x0 = _mm512_loadu_ps(xr.add(32 * u));
                let x1 = _mm512_loadu_ps(xr.add(32 * u + 16));
                for j in 0..4 {
                    let w0 = _mm512_permutexvar_ps(v[j], lo);
                    let w1 = _mm512_permutexvar_ps(v[j], hi);
                    acc[j][0] = _mm512_fmadd_ps(w0, x0, acc[j][0]);
                    acc[j][1] = _mm512_fmadd_ps(w1, x1, acc[j][1]);
                    v[j] = _mm512_srli_epi32::<4>(v[j]);
                }
            }
        }
        let table = signs(1.0);
        for b in 4 * runs..blocks {
            let xs = [0, 1, 2, 3].map(|k| _mm512_loadu_ps(xp.add(64 * b + 16 * k)));
            for j in 0..4 {
                let w = lookup(codes[j].as_ptr().add(16 * b), table);
                for k in 0..2 {
                    acc[j][k] = _mm512_fmadd_ps(w[k], xs[k], acc[j][k]);
                    acc[j][k] = _mm512_fmadd_ps(w[k + 2], xs[k + 2], acc[j][k]);
                }
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ternary_dot_q8(codes: &[u8], q: &[i8], d: &[f32], chunk_blocks: usize) -> f32 {
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let blocks = codes.len() / 16;
        let (cp, qp) = (codes.as_ptr(), q.as_ptr());
        let mut accf = _mm256_setzero_ps();
        let mut b = 0;
        for &dc in d {
            let end = (b + chunk_blocks).min(blocks);
            let mut acc = _mm256_setzero_si256();
            while b < end {
                let v = _mm_loadu_si128(cp.add(16 * b) as *const __m128i);
                let lo = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<2>(v), v), mask);
                let hi = _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16::<6>(v), _mm_srli_epi16::<4>(v)),
                    mask,
                );
                // Codes <= 2 and |q| <= 127: each pair sum fits in i16 without saturating.
                let p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(qp.add(64 * b) as *const _));
                let p1 =
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256(qp.add(64 * b + 32) as *const _));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones));
                b += 1;
            }
            accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(dc), accf);
        }
        hsum(accf)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ternary_dot_f32(codes: &[u8], x: &[f32]) -> f32 {
        let table = _mm256_setr_ps(-1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0);
        let mask = _mm_set1_epi8(3);
        let xp = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, blk) in codes.chunks_exact(16).enumerate() {
            let v = _mm_loadu_si128(blk.as_ptr() as *const __m128i);
            let parts = [
                v,
                _mm_srli_epi16::<2>(v),
                _mm_srli_epi16::<4>(v),
                _mm_srli_epi16::<6>(v),
            ];
            for (k, part) in parts.into_iter().enumerate() {
                let t = _mm_and_si128(part, mask);
                let lo = _mm256_permutevar_ps(table, _mm256_cvtepu8_epi32(t));
                let hi = _mm256_permutevar_ps(table, _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(t)));
                let o = 64 * b + 16 * k;
                acc[k] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp.add(o)), acc[k]);
                acc[k] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp.add(o + 8)), acc[k]);
            }
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c + 32 <= n {
            for (k, a_) in acc.iter_mut().enumerate() {
                let o = c + 8 * k;
                *a_ = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(o)), _mm256_loadu_ps(bp.add(o)), *a_);
            }
            c += 32;
        }
        while c + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(ap.add(c)),
                _mm256_loadu_ps(bp.add(c)),
                acc[0],
            );
            c += 8;
        }
        let mut tail = 0f32;
        while c < n {
            tail += a[c] * b[c];
            c += 1;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + tail
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn absmax(x: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        let mut c = 0;
        while c + 8 <= x.len() {
            m = _mm256_max_ps(
                m,
                _mm256_andnot_ps(sign, _mm256_loadu_ps(x.as_ptr().add(c))),
            );
            c += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(&x[c..])
            .fold(0f32, |a, v| a.max(v.abs()))
    }

    /// The first multiple of 32 of `x` (the caller does the rest); returns how many it did.
    /// `cvtps_epi32` rounds half to even (the default MXCSR mode), and the packs saturate, which
    /// is the clamp.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_i8(x: &[f32], s: f32, q: &mut [i8]) -> usize {
        let sv = _mm256_set1_ps(s);
        // Clamped before the conversion, which would turn anything out of i32 range into
        // i32::MIN (-128 after packing) where the portable form saturates to 127.
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let n = x.len() / 32 * 32;
        let xp = x.as_ptr();
        let mut c = 0;
        while c < n {
            let i = |k: usize| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(xp.add(c + 8 * k)), sv);
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi))
            };
            let ab = _mm256_packs_epi32(i(0), i(1));
            let cd = _mm256_packs_epi32(i(2), i(3));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            _mm256_storeu_si256(q.as_mut_ptr().add(c) as *mut __m256i, bytes);
            c += 32;
        }
        n
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let a = _mm256_set1_ps(alpha);
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        while c + 8 <= n {
            let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(yp.add(c)));
            _mm256_storeu_ps(yp.add(c), v);
            c += 8;
        }
        while c < n {
            y[c] += alpha * x[c];
            c += 1;
        }
    }

    /// Four weight rows against two input rows: eight accumulators, six loads per eight FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_4x2(w: [&[f32]; 4], x: [&[f32]; 2]) -> [[f32; 2]; 4] {
        let n = w[0].len();
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut c = 0;
        while c + 8 <= n {
            let x0 = _mm256_loadu_ps(x[0].as_ptr().add(c));
            let x1 = _mm256_loadu_ps(x[1].as_ptr().add(c));
            for j in 0..4 {
                let wv = _mm256_loadu_ps(w[j].as_ptr().add(c));
                acc[j][0] = _mm256_fmadd_ps(wv, x0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(wv, x1, acc[j][1]);
            }
            c += 8;
        }
        let mut out = [[0f32; 2]; 4];
        for j in 0..4 {
            for k in 0..2 {
                let mut t = hsum(acc[j][k]);
                for cc in c..n {
                    t += w[j][cc] * x[k][cc];
                }
                out[j][k] = t;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounding half to even, saturation and the sums agree on every instruction set, ties
    /// included (BitNet's inputs must be training's integers exactly).
    #[test]
    fn quantization_is_the_same_on_every_instruction_set() {
        let mut x: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.5).collect(); // halves: ties
        x[10] = f32::INFINITY; // out of i32 range: saturates like the portable form
        x[11] = 3e9;
        x.extend((0..37).map(|i| ((i * 7919) % 613) as f32 / 613.0 * 300.0 - 150.0)); // saturates
        let want: Vec<i8> = x
            .iter()
            .map(|v| v.round_ties_even().clamp(-128.0, 127.0) as i8)
            .collect();
        assert_eq!(want[49], 0, "-0.5 rounds to 0");
        assert_eq!(want[47], -2, "-1.5 rounds to -2");
        for isa in Isa::all_available() {
            let mut q = vec![0i8; x.len()];
            let sum = quantize_i8(&x, 1.0, &mut q, isa);
            assert_eq!(q, want, "{isa:?}");
            assert_eq!(sum, want.iter().map(|&v| v as i32).sum::<i32>(), "{isa:?}");
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(absmax(&x, isa), amax, "{isa:?}");
        }
    }
}
