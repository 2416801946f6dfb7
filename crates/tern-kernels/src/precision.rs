//! Mixed precision, in the manner of PyTorch's autocast: the dtype the matrix products of this
//! thread run in. In bf16 a product casts its operands to bf16 and its result back to f32, so
//! weights, gradients as stored, optimizer state and every reduction (norms, softmax statistics,
//! the loss) stay f32; ternary layers multiply by their exact codes and apply the per-shard scale
//! to the f32 output (the model's linear layer does that). f32 is the default.

use std::cell::Cell;

use burn::tensor::{FloatDType, Tensor};

use crate::guard::matmul;
use crate::Kernels;

/// The dtype of the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

thread_local! {
    static PRODUCTS: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Sets the precision of this thread's products (the trainer does, from `train.precision`).
pub fn set_matmul_precision(p: Precision) {
    PRODUCTS.with(|c| c.set(p));
}

pub fn matmul_precision() -> Precision {
    PRODUCTS.with(|c| c.get())
}

/// `a @ b` in this thread's precision, the result in f32.
pub fn product<B: Kernels, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    product_in(matmul_precision(), a, b)
}

/// `a @ b` in precision `p` (a backward pass recomputing what its forward pass did uses the
/// forward's), the result in f32.
pub fn product_in<B: Kernels, const D: usize>(
    p: Precision,
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Tensor<B, D> {
    match p {
        Precision::F32 => matmul(a, b),
        Precision::Bf16 => {
            let (a, b) = (a.cast(FloatDType::BF16), b.cast(FloatDType::BF16));
            matmul(a, b).cast(FloatDType::F32)
        }
    }
}
