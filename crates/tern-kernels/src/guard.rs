//! Matrix products kept away from inner dimensions that burn 0.21's CUDA matmul gets wrong.
//!
//! burn 0.21's cubek matmul reads past its operands when the inner dimension `k` satisfies
//! `k % 64 == 32` (seen on an H100 as a wrong `dA = dY W^T` for `k = 352`; fixed upstream after
//! burn 0.21). A product `a [.., m, k] @ b [.., k, n]` is computed here, on a backend that asks
//! for it ([`crate::Kernels::PADS_K32`]), on operands padded with zeros so that none of `m`, `k`,
//! `n` is 32 mod 64, then sliced back: the result is exact (the padded terms are zero), and since
//! autodiff differentiates the padded product, both backward products (`dA = dC B^T`, inner `n`;
//! `dB = A^T dC`, inner `m`) see padded inner dimensions too. Every matmul of the model (linear
//! layers, attention, encoders) and of GaLore goes through [`matmul`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn::tensor::Tensor;

use crate::Kernels;

static FORCED: AtomicBool = AtomicBool::new(false);
static PADDED: AtomicUsize = AtomicUsize::new(0);

/// An inner dimension the CUDA matmul of burn 0.21 must not see.
pub const fn is_unsafe(d: usize) -> bool {
    d % 64 == 32
}

/// `d`, or `d + 32` when it is unsafe (then a multiple of 64).
pub const fn safe_dim(d: usize) -> usize {
    if is_unsafe(d) {
        d + 32
    } else {
        d
    }
}

/// Pads on every backend from now on (the CPU tests of the padded path use it).
pub fn force(on: bool) {
    FORCED.store(on, Ordering::SeqCst);
}

/// How many products have been padded in this process (for tests and start-up logs).
pub fn padded_count() -> usize {
    PADDED.load(Ordering::SeqCst)
}

/// `a @ b` over the last two axes; padded where the backend needs it.
pub fn matmul<B: Kernels, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    if B::PADS_K32 || FORCED.load(Ordering::Relaxed) {
        padded_matmul(a, b)
    } else {
        a.matmul(b)
    }
}

/// `a @ b` on zero-padded operands whenever `m`, `k` or `n` is unsafe.
pub fn padded_matmul<B: burn::tensor::backend::Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Tensor<B, D> {
    let (da, db) = (a.dims(), b.dims());
    let (m, k, n) = (da[D - 2], da[D - 1], db[D - 1]);
    let (pm, pk, pn) = (safe_dim(m), safe_dim(k), safe_dim(n));
    if (pm, pk, pn) == (m, k, n) {
        return a.matmul(b);
    }
    PADDED.fetch_add(1, Ordering::Relaxed);
    let a = pad_axis(pad_axis(a, D - 2, pm), D - 1, pk);
    let b = pad_axis(pad_axis(b, D - 2, pk), D - 1, pn);
    a.matmul(b).narrow(D - 2, 0, m).narrow(D - 1, 0, n)
}

/// `t` with zeros appended along `axis` up to `len`.
pub(crate) fn pad_axis<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
    axis: usize,
    len: usize,
) -> Tensor<B, D> {
    let mut dims = t.dims();
    if dims[axis] == len {
        return t;
    }
    dims[axis] = len - dims[axis];
    let options = burn::tensor::TensorCreationOptions::new(t.device()).with_dtype(t.dtype());
    let zeros = Tensor::zeros(dims, options);
    Tensor::cat(vec![t, zeros], axis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type AB = Autodiff<Flex>;

    fn close(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> f32 {
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data());
        let b = b.to_vec::<f32>().unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn safe_dims_are_multiples_of_64_or_untouched() {
        assert_eq!(safe_dim(352), 384);
        assert_eq!(safe_dim(224), 256);
        assert_eq!(safe_dim(32), 64);
        for d in [1, 31, 33, 64, 96 + 1, 128, 4096, 5632] {
            assert_eq!(safe_dim(d), d);
        }
    }

    /// Forward and both gradients of the padded product equal the plain one's, with every one of
    /// m, k, n unsafe, and batch axes in front (attention's layout).
    #[test]
    fn padded_product_and_its_gradients_equal_the_plain_ones() {
        let dev = Default::default();
        let a0 = Tensor::<Flex, 3>::random([2, 96, 160], Distribution::Normal(0.0, 1.0), &dev);
        let b0 = Tensor::<Flex, 3>::random([2, 160, 32], Distribution::Normal(0.0, 1.0), &dev);
        let dy = Tensor::<Flex, 3>::random([2, 96, 32], Distribution::Normal(0.0, 1.0), &dev);
        let run = |pad: bool| {
            let a = Tensor::<AB, 3>::from_inner(a0.clone()).require_grad();
            let b = Tensor::<AB, 3>::from_inner(b0.clone()).require_grad();
            let before = padded_count();
            let y = if pad {
                padded_matmul(a.clone(), b.clone())
            } else {
                a.clone().matmul(b.clone())
            };
            assert_eq!(padded_count() > before, pad);
            assert_eq!(y.dims(), [2, 96, 32]);
            let g = (y.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            (y.inner(), a.grad(&g).unwrap(), b.grad(&g).unwrap())
        };
        let (y1, da1, db1) = run(false);
        let (y2, da2, db2) = run(true);
        assert!(close(y1, y2) < 1e-4);
        assert!(close(da1, da2) < 1e-4);
        assert!(close(db1, db2) < 1e-4);
    }
}
