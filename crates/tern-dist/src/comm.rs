//! The collective operations tern needs, over host memory.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Collectives over one group of processes. Every member must call the same operations in the
/// same order with the same sizes (as MPI and NCCL require).
pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// `recv` = the `send` buffers of ranks 0..size, concatenated.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]);
    /// Sum over the group, then rank r keeps block r (`recv.len() = send.len() / size`).
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]);
    fn broadcast(&self, buf: &mut [f32], root: usize);
    fn barrier(&self);
    /// Sum of one f64 per rank (losses, norms, checksums).
    fn all_reduce_sum_f64(&self, v: f64) -> f64;
    /// One f64 from every rank.
    fn all_gather_f64(&self, v: f64) -> Vec<f64>;
}

/// A group of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoloComm;

impl Comm for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        recv.copy_from_slice(send);
    }
    fn broadcast(&self, _: &mut [f32], _: usize) {}
    fn barrier(&self) {}
    fn all_reduce_sum_f64(&self, v: f64) -> f64 {
        v
    }
    fn all_gather_f64(&self, v: f64) -> Vec<f64> {
        vec![v]
    }
}

/// Gradient buckets hold at most this many f32 (100 MB): a few large calls, not one per tensor.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024;

/// Averages a list of flat tensors over the group, packing them into buckets of at most
/// `bucket_elems` elements (a tensor larger than a bucket travels alone). Order is kept.
pub fn all_reduce_mean_tensors<B: Backend>(
    comm: &dyn Comm,
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
) -> Vec<Tensor<B, 1>> {
    if comm.size() == 1 || tensors.is_empty() {
        return tensors;
    }
    let device = tensors[0].device();
    let scale = 1.0 / comm.size() as f32;
    let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
    let mut out = Vec::with_capacity(tensors.len());
    let mut pending: Vec<Tensor<B, 1>> = Vec::new();
    let mut pending_len = 0;
    // One host buffer per bucket, filled tensor by tensor (no device-side concatenation), reduced,
    // scaled in place, and cut back into tensors.
    let flush = |pending: &mut Vec<Tensor<B, 1>>, out: &mut Vec<Tensor<B, 1>>| {
        if pending.is_empty() {
            return;
        }
        let lens: Vec<usize> = pending.iter().map(|t| t.dims()[0]).collect();
        let mut buf: Vec<f32> = Vec::with_capacity(lens.iter().sum());
        for t in pending.drain(..) {
            let data = t.into_data().convert::<f32>();
            buf.extend_from_slice(data.as_slice::<f32>().expect("f32 data"));
        }
        comm.all_reduce_sum(&mut buf);
        buf.iter_mut().for_each(|x| *x *= scale);
        let mut off = 0;
        for len in lens {
            let part = TensorData::new(buf[off..off + len].to_vec(), [len]);
            out.push(Tensor::from_data(part, &device));
            off += len;
        }
    };
    for (t, len) in tensors.into_iter().zip(sizes) {
        if pending_len + len > bucket_elems && !pending.is_empty() {
            flush(&mut pending, &mut out);
            pending_len = 0;
        }
        pending.push(t);
        pending_len += len;
    }
    flush(&mut pending, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use std::cell::RefCell;

    /// Two ranks where the other rank holds 10 in every element; records the size of each call.
    struct TwoRanks {
        calls: RefCell<Vec<usize>>,
    }
    impl Comm for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            self.calls.borrow_mut().push(buf.len());
            buf.iter_mut().for_each(|x| *x += 10.0);
        }
        fn all_gather(&self, _: &[f32], _: &mut [f32]) {}
        fn reduce_scatter_sum(&self, _: &[f32], _: &mut [f32]) {}
        fn broadcast(&self, _: &mut [f32], _: usize) {}
        fn barrier(&self) {}
        fn all_reduce_sum_f64(&self, v: f64) -> f64 {
            v
        }
        fn all_gather_f64(&self, v: f64) -> Vec<f64> {
            vec![v]
        }
    }

    #[test]
    fn buckets_keep_order_and_average() {
        let dev = Default::default();
        let sizes = [2usize, 3, 1, 7, 2];
        let tensors: Vec<Tensor<Flex, 1>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| Tensor::from_data(TensorData::new(vec![k as f32; n], [n]), &dev))
            .collect();
        let comm = TwoRanks {
            calls: RefCell::new(vec![]),
        };
        let out = all_reduce_mean_tensors(&comm, tensors, 5);
        // Buckets of at most 5 elements: [2, 3], [1], [7] alone, [2].
        assert_eq!(*comm.calls.borrow(), vec![5, 1, 7, 2]);
        for (k, t) in out.into_iter().enumerate() {
            let v: Vec<f32> = t.into_data().to_vec().unwrap();
            assert_eq!(v.len(), sizes[k]);
            // mean of k (this rank) and 10 (the other) = (k + 10) / 2
            assert!(
                v.iter().all(|&x| x == (k as f32 + 10.0) / 2.0),
                "{k}: {v:?}"
            );
        }
    }
}
