//! The fused kernels on f32 slices, for the CPU backend: plain loops that the compiler
//! vectorizes, compiled a second time for AVX-512 and chosen at run time ([`simd_fn!`]), split
//! over rows with rayon. Sums run over 16 independent lanes combined in a fixed order, and every
//! split is fixed by the shape (never by the thread count), so results are bitwise reproducible.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Rows per rayon task where rows are short: enough work to amortize the task.
const MIN_ROWS: usize = 16;
/// Lanes of the partial sums: one AVX-512 register of f32.
const LANES: usize = 16;

/// Defines `fn $name(args) -> ret` that runs its body compiled for AVX-512 (x86-64-v4) when the
/// CPU has it, for AVX2 + FMA when it has that, and as baseline code otherwise.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                let level = $crate::cpu::simd_level();
                if level >= 4 {
                    // SAFETY: the CPU has every feature v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if level == 3 {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// 4: AVX-512 (with AVX2 and FMA), 3: AVX2 + FMA, 0: neither. Detected once.
pub fn simd_level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("bmi1")
                && std::is_x86_feature_detected!("bmi2")
                && std::is_x86_feature_detected!("lzcnt")
                && std::is_x86_feature_detected!("popcnt");
            let v4 = v3
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq");
            if v4 {
                return 4;
            }
            if v3 {
                return 3;
            }
        }
        0
    })
}

/// `exp(x)` in f32 from elementary operations, so that loops over it vectorize: `2^n * p(r)` with
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, `p` a degree-6 Taylor polynomial (relative error below
/// 2e-7 over the range). Inputs below -87.3 give 0, above 88.3 as 88.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((bits.wrapping_add(127) << 23) as u32);
    let y = p * scale;
    if x <= -87.3 {
        0.0
    } else {
        y
    }
}

/// `1 / (1 + exp(-x))`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn sum_lanes(acc: [f32; LANES]) -> f32 {
    // A fixed tree: the same order whatever the machine.
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            a[l] += a[l + w];
        }
        w /= 2;
    }
    a[0]
}

/// `sum(a * b)` over 16 lanes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    sum_lanes(acc)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

simd_fn! {
    fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), r) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(rstd.iter_mut()) {
            let inv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
            *r = inv;
            for ((y, x), w) in yr.iter_mut().zip(xr).zip(w) {
                *y = x * inv * w;
            }
        }
    }
}

/// `y = x / sqrt(mean(x^2) + eps) * w` over rows of `w.len()`; returns `y` and `1 / rms` per row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let n = x.len() / d;
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; n];
    y.par_chunks_mut(d * MIN_ROWS)
        .zip(rstd.par_chunks_mut(MIN_ROWS))
        .zip(x.par_chunks(d * MIN_ROWS))
        .for_each(|((y, r), x)| rms_norm_rows(x, w, eps, y, r));
    (y, rstd)
}

simd_fn! {
    fn rms_norm_back_rows(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
        let d = w.len();
        let mut g = vec![0f32; d];
        for (((xr, dyr), dxr), &r) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
            .zip(rstd)
        {
            for ((g, dy), w) in g.iter_mut().zip(dyr).zip(w) {
                *g = dy * w;
            }
            // dL/dx = r (g - xhat mean(g xhat)), xhat = x r.
            let c = dot(&g, xr) * r * r / d as f32;
            for ((dx, g), x) in dxr.iter_mut().zip(&g).zip(xr) {
                *dx = r * (g - x * c);
            }
            for ((dw, dy), x) in dw.iter_mut().zip(dyr).zip(xr) {
                *dw += dy * x * r;
            }
        }
    }
}

/// Gradients of [`rms_norm`]: `(dx, dw)`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let block = 64;
    let mut dx = vec![0f32; x.len()];
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * block)
        .zip(x.par_chunks(d * block))
        .zip(dy.par_chunks(d * block))
        .zip(rstd.par_chunks(block))
        .map(|(((dx, x), dy), r)| {
            let mut dw = vec![0f32; d];
            rms_norm_back_rows(x, w, r, dy, dx, &mut dw);
            dw
        })
        .collect();
    let mut dw = vec![0f32; d];
    for p in partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

// ---------------------------------------------------------------------------------------------
// Gated activations

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `silu(g) * u` (SwiGLU).
    Silu,
    /// `relu(g)^2 * u` (ReLU² GLU).
    Relu2,
}

simd_fn! {
    fn glu_chunk(g: &[f32], u: &[f32], y: &mut [MaybeUninit<f32>], silu: bool) {
        if silu {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                y.write(g * sigmoid(*g) * u);
            }
        } else {
            for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                let r = g.max(0.0);
                y.write(r * r * u);
            }
        }
    }
}

simd_fn! {
    fn glu_back_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>], silu: bool) {
        if silu {
            for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                let s = sigmoid(*g);
                du.write(dy * g * s);
                dg.write(dy * u * s * (1.0 + g * (1.0 - s)));
            }
        } else {
            for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
                let r = g.max(0.0);
                du.write(dy * r * r);
                dg.write(dy * u * 2.0 * r);
            }
        }
    }
}

const CHUNK: usize = 1 << 14;

/// `act(gate) * up`, element-wise.
pub fn glu(gate: &[f32], up: &[f32], kind: Gate) -> Vec<f32> {
    assert_eq!(gate.len(), up.len());
    written(gate.len(), |y| {
        y.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK))
            .for_each(|((y, g), u)| glu_chunk(g, u, y, kind == Gate::Silu))
    })
}

/// Gradients of [`glu`]: `(d gate, d up)`.
pub fn glu_backward(gate: &[f32], up: &[f32], dy: &[f32], kind: Gate) -> (Vec<f32>, Vec<f32>) {
    let n = gate.len();
    assert!(up.len() == n && dy.len() == n);
    let mut du = Vec::new();
    let dg = written(n, |dg| {
        du = written(n, |du| {
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), dy)| {
                    glu_back_chunk(g, u, dy, dg, du, kind == Gate::Silu)
                })
        })
    });
    (dg, du)
}

// ---------------------------------------------------------------------------------------------
// RoPE

simd_fn! {
    fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32], row0: usize, heads: usize, seq: usize, inverse: bool) {
        let hd = cos.len().checked_div(seq).unwrap_or(0);
        let half = hd / 2;
        for (r, (xr, yr)) in x.chunks_exact(hd).zip(y.chunks_exact_mut(hd)).enumerate() {
            let t = ((row0 + r) / heads) % seq;
            let (c, s) = (&cos[t * hd..][..hd], &sin[t * hd..][..hd]);
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = s.split_at(half);
            if !inverse {
                // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2.
                for i in 0..half {
                    y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                    y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                }
            } else {
                // The transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
                for i in 0..half {
                    y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                    y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                }
            }
        }
    }
}

/// RoPE (`rotate_half` pairs) of `x: [batch, seq, heads, head_dim]` with `cos`/`sin: [seq,
/// head_dim]`; `inverse` applies the transpose (the backward pass).
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    seq: usize,
    heads: usize,
    inverse: bool,
) -> Vec<f32> {
    let hd = cos.len() / seq.max(1);
    let mut y = vec![0f32; x.len()];
    let rows = (CHUNK / hd.max(1)).max(1);
    y.par_chunks_mut(rows * hd)
        .zip(x.par_chunks(rows * hd))
        .enumerate()
        .for_each(|(i, (y, x))| rope_rows(x, cos, sin, y, i * rows, heads, seq, inverse));
    y
}

// ---------------------------------------------------------------------------------------------
// Causal attention

/// Shape of a causal grouped-query attention: q `[batch, seq, heads, head_dim]`, k and v
/// `[batch, seq, kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn q_row(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.seq + i) * self.heads + h) * self.head_dim
    }
    fn kv_row(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.seq + j) * self.kv_heads + g) * self.head_dim
    }
}

/// A strided matrix view into a slice: element (r, c) at `offset + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], offset: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            offset,
            rs,
            cs,
        }
    }
    /// The transpose (a view, no copy).
    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `c[m, n] = (acc ? c : 0) + a[m, k] b[k, n]`, `c` row-major with row stride `n`, on one thread
/// (the callers split the work).
fn matmul(c: &mut [f32], m: usize, n: usize, k: usize, a: View, b: View, acc: bool) {
    // SAFETY: the product only writes finished values through this view.
    let c = unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) };
    matmul_with(c, m, n, k, a, b, acc, gemm::Parallelism::None)
}

/// A vector of `len` values that `fill` writes, every one of them, without zeroing it first
/// (the outputs of the products are the largest buffers of a step).
fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialized all `len` elements (the callers' contract).
    unsafe { v.set_len(len) };
    v
}

/// [`matmul`] on the rayon pool when the product is large enough to split. A long reduction into a large output goes in slices of `KSLICE` accumulated in place:
/// measured here, the LM head's weight gradient (4096 x 128 over 1024 tokens) runs at 293
/// GFLOP/s sliced, 165 whole. Writes every element of `c` (reads none of it first).
fn matmul_par(c: &mut [MaybeUninit<f32>], m: usize, n: usize, k: usize, a: View, b: View) {
    const KSLICE: usize = 256;
    let par = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    if k <= KSLICE {
        return matmul_with(c, m, n, k, a, b, false, par);
    }
    for k0 in (0..k).step_by(KSLICE) {
        let kk = KSLICE.min(k - k0);
        let a = View {
            offset: a.offset + k0 * a.cs,
            ..a
        };
        let b = View {
            offset: b.offset + k0 * b.rs,
            ..b
        };
        matmul_with(c, m, n, kk, a, b, k0 > 0, par);
    }
}

/// `acc`: `c` holds values to add to (it must be initialized); otherwise `c` is only written.
fn matmul_with(
    c: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    acc: bool,
    par: gemm::Parallelism,
) {
    assert!(c.len() >= m * n);
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(MaybeUninit::new(0.0));
        }
        return;
    }
    // SAFETY: every index the product reads or writes was bounds-checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr() as *mut f32,
            1,
            n as isize,
            acc,
            a.data.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y = x w^T` of `x: [n, d_in]` and `w: [d_out, d_in]` (a bias-free linear layer), `w` read
/// through its strides, never transposed in memory.
pub fn linear(x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let (x, w) = (View::new(x, 0, d_in, 1), View::new(w, 0, d_in, 1).t());
    written(n * d_out, |y| matmul_par(y, n, d_out, d_in, x, w))
}

/// `(dx, dw) = (dy w, dy^T x)` of [`linear`], each when asked for. (Run side by side on one
/// thread each instead, the two took as long: measured on the tiny recipe's step.)
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    (n, d_in, d_out): (usize, usize, usize),
    want: [bool; 2],
) -> [Option<Vec<f32>>; 2] {
    let dx = || {
        let (dy, w) = (View::new(dy, 0, d_out, 1), View::new(w, 0, d_in, 1));
        written(n * d_in, |dx| matmul_par(dx, n, d_in, d_out, dy, w))
    };
    let dw = || {
        let (dyt, x) = (View::new(dy, 0, d_out, 1).t(), View::new(x, 0, d_in, 1));
        written(d_out * d_in, |dw| matmul_par(dw, d_out, d_in, n, dyt, x))
    };
    [want[0].then(dx), want[1].then(dw)]
}

/// Query rows per block: a block's keys stop at its last row, which skips most of the masked
/// upper triangle.
const QBLOCK: usize = 64;

simd_fn! {
    /// Row-wise causal softmax of `s: [rows, n]` for query rows `i0..i0 + rows` (key j visible
    /// to row i when j <= i), scaled by `scale` first. Writes `exp(s - max)` into `s`, each row's
    /// log-sum-exp into `lse` and `1 / sum` into `inv` (the caller normalizes the product with
    /// v, which is narrower than the scores).
    fn causal_softmax(s: &mut [f32], n: usize, i0: usize, scale: f32, lse: &mut [f32], inv: &mut [f32]) {
        for (r, row) in s.chunks_exact_mut(n).enumerate() {
            let vis = (i0 + r + 1).min(n);
            let (row, masked) = row.split_at_mut(vis);
            masked.fill(0.0);
            let mut mx = [f32::NEG_INFINITY; LANES];
            let mut c = row.chunks_exact(LANES);
            for ch in &mut c {
                for l in 0..LANES {
                    mx[l] = mx[l].max(ch[l]);
                }
            }
            let m = c.remainder().iter().fold(mx.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)), |a, b| a.max(*b));
            let mut acc = [0f32; LANES];
            let mut c = row.chunks_exact_mut(LANES);
            for ch in &mut c {
                for l in 0..LANES {
                    ch[l] = exp((ch[l] - m) * scale);
                    acc[l] += ch[l];
                }
            }
            for (l, x) in c.into_remainder().iter_mut().enumerate() {
                *x = exp((*x - m) * scale);
                acc[l] += *x;
            }
            let total = sum_lanes(acc);
            inv[r] = 1.0 / total;
            lse[r] = m * scale + total.ln();
        }
    }
}

simd_fn! {
    /// The probabilities `exp(scale s - lse)` of the scores `s: [rows, n]` from the forward pass's
    /// log-sum-exps, masked as [`causal_softmax`] masks them (the backward pass's recomputation).
    fn causal_probs(s: &mut [f32], n: usize, i0: usize, scale: f32, lse: &[f32]) {
        for ((r, row), l) in s.chunks_exact_mut(n).enumerate().zip(lse) {
            let vis = (i0 + r + 1).min(n);
            let (row, masked) = row.split_at_mut(vis);
            masked.fill(0.0);
            for x in row.iter_mut() {
                *x = exp(*x * scale - l);
            }
        }
    }
}

/// One (batch, head): its output rows `[seq, head_dim]` and log-sum-exps `[seq]`.
fn attention_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    b: usize,
    h: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (t, hd) = (s.seq, s.head_dim);
    let g = h / (s.heads / s.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let (qrs, kvrs) = (s.heads * hd, s.kv_heads * hd);
    let mut p = vec![0f32; QBLOCK * t];
    let mut inv = [0f32; QBLOCK];
    for i0 in (0..t).step_by(QBLOCK) {
        let rows = QBLOCK.min(t - i0);
        let n = i0 + rows;
        let qv = View::new(q, s.q_row(b, i0, h), qrs, 1);
        let kt = View::new(k, s.kv_row(b, 0, g), kvrs, 1).t();
        let p = &mut p[..rows * n];
        matmul(p, rows, n, hd, qv, kt, false);
        let inv = &mut inv[..rows];
        causal_softmax(p, n, i0, scale, &mut lse[i0..i0 + rows], inv);
        let vv = View::new(v, s.kv_row(b, 0, g), kvrs, 1);
        let o = &mut out[i0 * hd..(i0 + rows) * hd];
        matmul(o, rows, hd, n, View::new(p, 0, n, 1), vv, false);
        for (row, f) in o.chunks_exact_mut(hd).zip(inv.iter()) {
            for x in row {
                *x *= f;
            }
        }
    }
}

/// `softmax(q k^T / sqrt(head_dim) + causal mask) v` per head, query head `h` reading key/value
/// head `h / (heads / kv_heads)`. Returns the output `[batch, seq, heads, head_dim]` and the
/// log-sum-exp of each row `[batch, heads, seq]` (what the backward pass needs besides q, k, v).
/// Scores exist one block of query rows at a time, never for the whole sequence.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, hd) = (s.seq, s.head_dim);
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let mut out = vec![0f32; t * hd];
            let mut lse = vec![0f32; t];
            attention_head(q, k, v, s, b, h, &mut out, &mut lse);
            (out, lse)
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    let mut lse = Vec::with_capacity(s.batch * s.heads * t);
    for (bh, (o, l)) in per_head.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for i in 0..t {
            out[s.q_row(b, i, h)..][..hd].copy_from_slice(&o[i * hd..][..hd]);
        }
        lse.extend(l);
    }
    (out, lse)
}

simd_fn! {
    /// `ds = p * (dp - d_i) * scale` row by row.
    fn softmax_grad(p: &[f32], ds: &mut [f32], n: usize, d: &[f32], scale: f32) {
        for ((pr, dr), di) in p.chunks_exact(n).zip(ds.chunks_exact_mut(n)).zip(d) {
            for (x, pj) in dr.iter_mut().zip(pr) {
                *x = pj * (*x - di) * scale;
            }
        }
    }
}

/// One (batch, kv head): dq of its query heads `[group, seq, head_dim]`, its dk and dv
/// `[seq, head_dim]`. Probabilities are recomputed from q, k and the saved log-sum-exps.
fn attention_back_group(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: AttnShape,
    b: usize,
    g: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (t, hd) = (s.seq, s.head_dim);
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qrs, kvrs) = (s.heads * hd, s.kv_heads * hd);
    let mut p = vec![0f32; QBLOCK * t];
    let mut ds = vec![0f32; QBLOCK * t];
    let mut di = vec![0f32; QBLOCK];
    let kv = View::new(k, s.kv_row(b, 0, g), kvrs, 1);
    let vv = View::new(v, s.kv_row(b, 0, g), kvrs, 1);
    for hg in 0..group {
        let h = g * group + hg;
        let l = &lse[(b * s.heads + h) * t..][..t];
        for i0 in (0..t).step_by(QBLOCK) {
            let rows = QBLOCK.min(t - i0);
            let n = i0 + rows;
            let qv = View::new(q, s.q_row(b, i0, h), qrs, 1);
            let dov = View::new(dout, s.q_row(b, i0, h), qrs, 1);
            for (r, d) in di[..rows].iter_mut().enumerate() {
                let row = s.q_row(b, i0 + r, h);
                *d = dot(&dout[row..][..hd], &o[row..][..hd]);
            }
            let (p, ds) = (&mut p[..rows * n], &mut ds[..rows * n]);
            matmul(p, rows, n, hd, qv, kv.t(), false);
            causal_probs(p, n, i0, scale, &l[i0..i0 + rows]);
            matmul(ds, rows, n, hd, dov, vv.t(), false);
            softmax_grad(p, ds, n, &di[..rows], scale);
            let dsv = View::new(ds, 0, n, 1);
            let pv = View::new(p, 0, n, 1);
            matmul(
                &mut dq[(hg * t + i0) * hd..(hg * t + n) * hd],
                rows,
                hd,
                n,
                dsv,
                kv,
                false,
            );
            matmul(&mut dk[..n * hd], n, hd, rows, dsv.t(), qv, true);
            matmul(&mut dv[..n * hd], n, hd, rows, pv.t(), dov, true);
        }
    }
}

/// Gradients of [`attention`] from q, k, v, its output and log-sum-exps: `(dq, dk, dv)` in the
/// layouts of q, k, v. The probabilities are recomputed row by row, never stored.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, hd) = (s.seq, s.head_dim);
    let group = s.heads / s.kv_heads;
    let per_group: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|bg| {
            let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
            let mut dq = vec![0f32; group * t * hd];
            let mut dk = vec![0f32; t * hd];
            let mut dv = vec![0f32; t * hd];
            attention_back_group(q, k, v, out, lse, dout, s, b, g, &mut dq, &mut dk, &mut dv);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (bg, (gq, gk, gv)) in per_group.into_iter().enumerate() {
        let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
        for i in 0..t {
            for hg in 0..group {
                let h = g * group + hg;
                dq[s.q_row(b, i, h)..][..hd].copy_from_slice(&gq[(hg * t + i) * hd..][..hd]);
            }
            let kv = s.kv_row(b, i, g);
            dk[kv..][..hd].copy_from_slice(&gk[i * hd..][..hd]);
            dv[kv..][..hd].copy_from_slice(&gv[i * hd..][..hd]);
        }
    }
    (dq, dk, dv)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

simd_fn! {
    fn ce_rows(x: &[f32], targets: &[i64], v: usize, loss: &mut [f32], probs: &mut [MaybeUninit<f32>]) {
        for (((xr, &t), l), pr) in x.chunks_exact(v).zip(targets).zip(loss.iter_mut()).zip(probs.chunks_exact_mut(v)) {
            let mut m = [f32::NEG_INFINITY; LANES];
            let mut c = xr.chunks_exact(LANES);
            for ch in &mut c {
                for i in 0..LANES {
                    m[i] = m[i].max(ch[i]);
                }
            }
            let mut mx = m.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            for r in c.remainder() {
                mx = mx.max(*r);
            }
            let mut acc = [0f32; LANES];
            let mut pc = pr.chunks_exact_mut(LANES);
            let mut xc = xr.chunks_exact(LANES);
            for (p, x) in (&mut pc).zip(&mut xc) {
                for i in 0..LANES {
                    let e = exp(x[i] - mx);
                    p[i].write(e);
                    acc[i] += e;
                }
            }
            for (i, (p, x)) in pc.into_remainder().iter_mut().zip(xc.remainder()).enumerate() {
                let e = exp(x - mx);
                p.write(e);
                acc[i] += e;
            }
            // SAFETY: the loop above wrote every element of the row.
            let pr = unsafe { &mut *(pr as *mut [MaybeUninit<f32>] as *mut [f32]) };
            let total = sum_lanes(acc);
            let inv = 1.0 / total;
            for p in pr.iter_mut() {
                *p *= inv;
            }
            *l = mx + total.ln() - xr[t as usize];
        }
    }
}

/// Per-row `logsumexp(x) - x[target]` of `x: [rows, v]`: the losses and the probabilities
/// `softmax(x)` (what the backward pass needs: it then computes no exponential). Targets must
/// lie in `0..v` (checked by the caller).
pub fn cross_entropy(x: &[f32], targets: &[i64], v: usize) -> (Vec<f32>, Vec<f32>) {
    let n = targets.len();
    assert_eq!(x.len(), n * v);
    let mut loss = vec![0f32; n];
    let rows = (CHUNK / v.max(1)).max(1);
    let probs = written(x.len(), |probs| {
        loss.par_chunks_mut(rows)
            .zip(probs.par_chunks_mut(rows * v))
            .zip(x.par_chunks(rows * v).zip(targets.par_chunks(rows)))
            .for_each(|((l, p), (x, t))| ce_rows(x, t, v, l, p))
    });
    (loss, probs)
}

simd_fn! {
    fn ce_back_rows(probs: &[f32], targets: &[i64], dl: &[f32], v: usize, dx: &mut [MaybeUninit<f32>]) {
        for (((pr, &t), g), dr) in probs.chunks_exact(v).zip(targets).zip(dl).zip(dx.chunks_exact_mut(v)) {
            let t = t as usize;
            for (j, (d, p)) in dr.iter_mut().zip(pr).enumerate() {
                let p = p * g;
                d.write(if j == t { p - g } else { p });
            }
        }
    }
}

/// Gradient of [`cross_entropy`]'s losses weighted by `dl`: `(softmax(x) - onehot) * dl`.
pub fn cross_entropy_backward(probs: &[f32], targets: &[i64], dl: &[f32], v: usize) -> Vec<f32> {
    assert_eq!(probs.len(), targets.len() * v);
    let rows = (CHUNK / v.max(1)).max(1);
    written(probs.len(), |dx| {
        dx.par_chunks_mut(rows * v)
            .zip(probs.par_chunks(rows * v))
            .zip(targets.par_chunks(rows).zip(dl.par_chunks(rows)))
            .for_each(|((dx, p), (t, g))| ce_back_rows(p, t, g, v, dx))
    })
}

// ---------------------------------------------------------------------------------------------
// Ternary weights

/// `sum(f(w))`: f32 lanes over blocks of 4096, f64 across blocks (exact enough for any size).
#[inline(always)]
fn block_sum(w: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut total = 0f64;
    for block in w.chunks(4096) {
        acc.fill(0.0);
        let mut c = block.chunks_exact(LANES);
        for ch in &mut c {
            for i in 0..LANES {
                acc[i] += f(ch[i]);
            }
        }
        for (i, r) in c.remainder().iter().enumerate() {
            acc[i] += f(*r);
        }
        total += sum_lanes(acc) as f64;
    }
    total
}

simd_fn! {
    fn abs_sum(w: &[f32]) -> f64 {
        block_sum(w, f32::abs)
    }
}

simd_fn! {
    fn square_sum(w: &[f32]) -> f64 {
        block_sum(w, |x| x * x)
    }
}

/// `sum(w^2)`: f32 lanes over blocks of 4096, f64 across blocks, blocks summed in order.
pub fn sum_squares(w: &[f32]) -> f64 {
    w.par_chunks(1 << 16)
        .map(square_sum)
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

simd_fn! {
    fn ternary_apply(w: &[f32], gamma: f32, q: &mut [f32]) {
        let inv = 1.0 / gamma;
        for (q, w) in q.iter_mut().zip(w) {
            // Ties to even, as burn's round.
            *q = (w * inv).round_ties_even().clamp(-1.0, 1.0) * gamma;
        }
    }
}

/// TriLM's `gamma_g * clamp(round(W / gamma_g), -1, 1)`, `gamma_g = eps + mean|W_g|`, of
/// `w: [out, in]` with `groups` scale groups along rows (`by_rows`) or columns.
pub fn ternary(
    w: &[f32],
    out: usize,
    inp: usize,
    groups: usize,
    by_rows: bool,
    eps: f32,
) -> Vec<f32> {
    let mut q = vec![0f32; w.len()];
    let per_group = (out * inp / groups) as f64;
    if by_rows {
        let len = out / groups * inp;
        let gammas: Vec<f32> = w
            .par_chunks(len)
            .map(|g| (abs_sum(g) / per_group) as f32 + eps)
            .collect();
        q.par_chunks_mut(len)
            .zip(w.par_chunks(len))
            .zip(gammas)
            .for_each(|((q, w), gamma)| ternary_apply(w, gamma, q));
    } else {
        let width = inp / groups;
        let mut sums = vec![0f64; groups];
        for row in w.chunks_exact(inp) {
            for (s, g) in sums.iter_mut().zip(row.chunks_exact(width)) {
                *s += abs_sum(g);
            }
        }
        let gammas: Vec<f32> = sums.iter().map(|s| (s / per_group) as f32 + eps).collect();
        q.par_chunks_mut(inp)
            .zip(w.par_chunks(inp))
            .for_each(|(q, w)| {
                for ((q, w), &gamma) in q
                    .chunks_exact_mut(width)
                    .zip(w.chunks_exact(width))
                    .zip(&gammas)
                {
                    ternary_apply(w, gamma, q);
                }
            });
    }
    q
}

// ---------------------------------------------------------------------------------------------
// AdamW

simd_fn! {
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: [f32; 9]) {
        let [scale, decay, b1, one_b1, b2, one_b2, bc2, eps, step] = k;
        for (((p, m), v), g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            // The reference's operations in its order, so both give the same bits.
            let g = g * scale;
            let pd = *p * decay;
            *m = *m * b1 + g * one_b1;
            *v = *v * b2 + (g * g) * one_b2;
            let denom = v.sqrt() / bc2 + eps;
            *p = pd - (*m / denom) * step;
        }
    }
}

/// One AdamW update in place (see `AdamwScalars`): `k` = gradient scale and decay (1 for none),
/// beta1, 1 - beta1, beta2, 1 - beta2, bc2_sqrt, eps, step_size, each already rounded to f32.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: [f32; 9]) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, k));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(100.0).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn dot_and_lane_sums() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let want: f32 = a.iter().map(|x| x * x).sum();
        assert_eq!(dot(&a, &a), want);
    }
}
