//! Rotary position embedding in Hugging Face's `rotate_half` layout: dimension i pairs with i + d/2.
//! The tables are made here; the rotation is [`tern_kernels::Kernels::rope`].

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `cos` and `sin` tables of shape `[seq, head_dim]` for positions `0..seq`.
pub fn rope_tables<B: Backend>(
    seq: usize,
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for t in 0..seq {
        for j in 0..head_dim {
            let i = j % half;
            let inv_freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
            let angle = t as f64 * inv_freq;
            // f64 data: converted to the backend's precision, so an f64 model gets f64 tables.
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [seq, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [seq, head_dim]), device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use tern_kernels::Kernels;

    #[test]
    fn rotates_pairs_i_and_i_plus_half() {
        // head_dim 4, theta 100: pair (0, 2) turns by t, pair (1, 3) by t / 10.
        let dev = Default::default();
        let (cos, sin) = rope_tables::<Flex>(3, 4, 100.0, &dev);
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new([1f32, 2., 3., 4.].repeat(3), [1, 3, 1, 4]),
            &dev,
        );
        // [batch, seq, heads, head_dim], as the attention lays out its heads.
        let y: Vec<f32> = Flex::rope(x, cos, sin).into_data().to_vec().unwrap();
        for t in 0..3 {
            let (a, b) = (t as f64, t as f64 / 10.0);
            let expect = [
                1.0 * a.cos() - 3.0 * a.sin(),
                2.0 * b.cos() - 4.0 * b.sin(),
                3.0 * a.cos() + 1.0 * a.sin(),
                4.0 * b.cos() + 2.0 * b.sin(),
            ];
            for j in 0..4 {
                assert!(
                    (y[t * 4 + j] as f64 - expect[j]).abs() < 1e-5,
                    "t={t} j={j}"
                );
            }
        }
    }
}
