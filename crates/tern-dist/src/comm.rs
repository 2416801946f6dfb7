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
    let flush = |pending: &mut Vec<Tensor<B, 1>>, out: &mut Vec<Tensor<B, 1>>| {
        if pending.is_empty() {
            return;
        }
        let n: Vec<usize> = pending.iter().map(|t| t.dims()[0]).collect();
        let mut buf: Vec<f32> = Tensor::cat(std::mem::take(pending), 0)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 data");
        comm.all_reduce_sum(&mut buf);
        let mut off = 0;
        for len in n {
            let part: Vec<f32> = buf[off..off + len].iter().map(|x| x * scale).collect();
            out.push(Tensor::from_data(TensorData::new(part, [len]), &device));
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
