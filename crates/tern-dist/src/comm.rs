//! The collective operations tern needs, over host memory.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// Collectives over one group of processes. Every member must call the same operations in the
/// same order with the same sizes (as MPI and NCCL require).
/// `Send + Sync` because tensor-parallel layers keep a handle to their group inside the model,
/// and burn modules must be `Send`; every call still comes from the training thread.
pub trait Comm: Send + Sync {
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

/// Ranks as threads of one process (tests of the tensor-parallel layers without `mpirun`).
/// Reductions add the ranks' buffers in rank order, so every member gets the same bits.
pub struct ThreadComm {
    rank: usize,
    shared: std::sync::Arc<ThreadShared>,
}

struct ThreadShared {
    size: usize,
    barrier: std::sync::Barrier,
    slots: std::sync::Mutex<Vec<Vec<f64>>>,
}

impl ThreadComm {
    /// The `size` members of one group; hand one to each thread.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let shared = std::sync::Arc::new(ThreadShared {
            size,
            barrier: std::sync::Barrier::new(size),
            slots: std::sync::Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes this rank's values and returns every rank's, in rank order.
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.slots.lock().expect("slots")[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().expect("slots").clone();
        // Nobody publishes the next call's values before everyone has read these.
        self.shared.barrier.wait();
        all
    }

    fn summed(&self, buf: &[f32]) -> Vec<f32> {
        let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
        (0..buf.len())
            .map(|i| all.iter().fold(0f32, |acc, r| acc + r[i] as f32))
            .collect()
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let s = self.summed(buf);
        buf.copy_from_slice(&s);
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        let all = self.exchange(send.iter().map(|&x| x as f64).collect());
        for (dst, x) in recv.iter_mut().zip(all.iter().flatten()) {
            *dst = *x as f32;
        }
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        let s = self.summed(send);
        let n = recv.len();
        recv.copy_from_slice(&s[self.rank * n..(self.rank + 1) * n]);
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) {
        let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
        for (dst, x) in buf.iter_mut().zip(&all[root]) {
            *dst = *x as f32;
        }
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
    fn all_reduce_sum_f64(&self, v: f64) -> f64 {
        self.exchange(vec![v]).iter().map(|r| r[0]).sum()
    }
    fn all_gather_f64(&self, v: f64) -> Vec<f64> {
        self.exchange(vec![v]).iter().map(|r| r[0]).collect()
    }
}

/// The collectives on tensors of any backend and rank, for every [`Comm`]: each stages the tensor
/// through host memory in f32 and hands it to the slice collective.
pub trait TensorCollectives {
    /// Element-wise sum over the group.
    fn all_reduce_tensor<B: Backend, const D: usize>(&self, t: Tensor<B, D>) -> Tensor<B, D>;
    /// The members' tensors concatenated along `dim`, in rank order.
    fn all_gather_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Tensor<B, D>;
    /// The sum over the group, of which this member keeps block `rank` along `dim`.
    fn reduce_scatter_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Tensor<B, D>;
    /// Member `root`'s tensor on every member.
    fn broadcast_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        root: usize,
    ) -> Tensor<B, D>;
}

/// A tensor's values on the host, as f32, in row-major order.
pub fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 data")
}

/// Applies a host collective that keeps the shape (`op` works on the values in place).
fn whole<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    op: impl FnOnce(&mut Vec<f32>),
) -> Tensor<B, D> {
    let (shape, device) = (t.dims(), t.device());
    let mut v = to_host(t);
    op(&mut v);
    device_tensor(v, shape, &device)
}

fn device_tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Applies a host collective to `t` viewed with `dim` first (where the members' blocks lie end to
/// end): `op(values, size of dim)` returns the new values and the new size of `dim`.
fn along<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dim: usize,
    op: impl FnOnce(Vec<f32>, usize) -> (Vec<f32>, usize),
) -> Tensor<B, D> {
    let t = t.swap_dims(0, dim);
    let (mut shape, device) = (t.dims(), t.device());
    let (v, rows) = op(to_host(t), shape[0]);
    shape[0] = rows;
    device_tensor::<B, D>(v, shape, &device).swap_dims(0, dim)
}

impl<C: Comm + ?Sized> TensorCollectives for C {
    fn all_reduce_tensor<B: Backend, const D: usize>(&self, t: Tensor<B, D>) -> Tensor<B, D> {
        whole(t, |v| self.all_reduce_sum(v))
    }

    fn all_gather_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Tensor<B, D> {
        let n = self.size();
        along(t, dim, |v, rows| {
            let mut all = vec![0f32; v.len() * n];
            Comm::all_gather(self, &v, &mut all);
            (all, rows * n)
        })
    }

    fn reduce_scatter_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Tensor<B, D> {
        let n = self.size();
        along(t, dim, |v, rows| {
            assert!(
                rows.is_multiple_of(n),
                "reduce_scatter: dimension {dim} of size {rows} does not split over {n} members"
            );
            let mut mine = vec![0f32; v.len() / n];
            self.reduce_scatter_sum(&v, &mut mine);
            (mine, rows / n)
        })
    }

    fn broadcast_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
        root: usize,
    ) -> Tensor<B, D> {
        whole(t, |v| Comm::broadcast(self, v, root))
    }
}

/// An f64 as two f32 (high part and remainder): 48 bits of mantissa, enough for losses and
/// checksums compared across ranks (the same input gives the same bits on every rank), for
/// communicators that move f32 only (NCCL through tern's f32 staging buffer).
pub fn f64_to_parts(v: f64) -> [f32; 2] {
    let hi = v as f32;
    [hi, (v - hi as f64) as f32]
}

pub fn f64_from_parts(p: &[f32]) -> f64 {
    p[0] as f64 + p[1] as f64
}

/// Gradient buckets hold at most this many f32 (100 MB): a few large calls, not one per tensor.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024;

/// Averages a list of flat tensors (module order) over the group, packing them into buckets of
/// at most `bucket_elems` elements (a tensor larger than a bucket travels alone). Buckets are
/// filled and reduced from the end of the list, the order in which the backward pass finishes
/// gradients (the head first, the embedding last), as PyTorch DDP's buckets are: a bucket is
/// then ready as soon as the blocks above it are done. The result is in the given order.
pub fn all_reduce_mean_tensors<B: Backend>(
    comm: &dyn Comm,
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
) -> Vec<Tensor<B, 1>> {
    all_reduce_scaled(comm, tensors, bucket_elems, 1.0 / comm.size() as f32)
}

/// [`all_reduce_mean_tensors`], the sum instead of the mean.
pub fn all_reduce_sum_tensors<B: Backend>(
    comm: &dyn Comm,
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
) -> Vec<Tensor<B, 1>> {
    all_reduce_scaled(comm, tensors, bucket_elems, 1.0)
}

fn all_reduce_scaled<B: Backend>(
    comm: &dyn Comm,
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
    scale: f32,
) -> Vec<Tensor<B, 1>> {
    if comm.size() == 1 || tensors.is_empty() {
        return tensors;
    }
    let device = tensors[0].device();
    let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).rev().collect();
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
        if scale != 1.0 {
            buf.iter_mut().for_each(|x| *x *= scale);
        }
        let mut off = 0;
        for len in lens {
            let part = TensorData::new(buf[off..off + len].to_vec(), [len]);
            out.push(Tensor::from_data(part, &device));
            off += len;
        }
    };
    for (t, len) in tensors.into_iter().rev().zip(sizes) {
        if pending_len + len > bucket_elems && !pending.is_empty() {
            flush(&mut pending, &mut out);
            pending_len = 0;
        }
        pending.push(t);
        pending_len += len;
    }
    flush(&mut pending, &mut out);
    out.reverse();
    out
}

/// The mean of each gradient over the data-parallel group `comm`, in buckets of
/// [`BUCKET_ELEMS`]: whole, or with ZeRO-1 (`chunked`) only this rank's chunk of each.
pub fn mean_gradients<B: Backend>(
    comm: &dyn Comm,
    grads: Vec<Tensor<B, 1>>,
    chunked: bool,
) -> Vec<Tensor<B, 1>> {
    if chunked {
        reduce_scatter_mean_tensors(comm, grads, BUCKET_ELEMS)
    } else {
        all_reduce_mean_tensors(comm, grads, BUCKET_ELEMS)
    }
}

/// Rank `rank`'s chunk `(start, len)` of a flat tensor of `n` elements split over `size` ranks
/// (ZeRO-1's ownership): chunks of `ceil(n / size)`, the last ones shorter or empty.
pub fn dp_chunk(n: usize, rank: usize, size: usize) -> (usize, usize) {
    let c = n.div_ceil(size);
    let start = (rank * c).min(n);
    (start, c.min(n - start))
}

/// The data-parallel rank that owns each of the parameters weighing `sizes` (their optimizer
/// state's elements) when they are kept whole, each on one of `size` ranks (GaLore's ZeRO-1,
/// whose projection needs the whole gradient of a matrix): the heaviest first, each to the rank
/// holding the least so far (the lowest rank on a tie). The same on every rank.
pub fn owners(sizes: &[usize], size: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let (mut load, mut out) = (vec![0usize; size.max(1)], vec![0; sizes.len()]);
    for i in order {
        let r = (0..load.len())
            .min_by_key(|&r| (load[r], r))
            .expect("a rank");
        load[r] += sizes[i];
        out[i] = r;
    }
    out
}

/// Buckets of consecutive tensors (by element counts `sizes`) of at most `bucket_elems` each,
/// a larger tensor alone: index ranges.
fn buckets(sizes: &[usize], bucket_elems: usize) -> Vec<std::ops::Range<usize>> {
    let (mut out, mut start, mut len) = (Vec::new(), 0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if len + n > bucket_elems && i > start {
            out.push(start..i);
            (start, len) = (i, 0);
        }
        len += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// The mean over the group of each flat tensor, of which this rank gets its [`dp_chunk`] only
/// (ZeRO-1's gradient reduce-scatter), in buckets of at most `bucket_elems` elements.
pub fn reduce_scatter_mean_tensors<B: Backend>(
    comm: &dyn Comm,
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
) -> Vec<Tensor<B, 1>> {
    let (rank, size) = (comm.rank(), comm.size());
    if size == 1 || tensors.is_empty() {
        return tensors;
    }
    let device = tensors[0].device();
    let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
    let mut tensors = tensors.into_iter();
    let mut out = Vec::with_capacity(sizes.len());
    for b in buckets(&sizes, bucket_elems) {
        // Read back bucket by bucket: one bucket's gradients on the host at a time.
        let host: Vec<Vec<f32>> = (&mut tensors).take(b.len()).map(to_host).collect();
        let host = |i: usize| &host[i - b.start];
        // Rank-major: every tensor's chunk for rank 0, then for rank 1, each padded to its
        // chunk length, so that rank r receives its chunks contiguously.
        let widths: Vec<usize> = sizes[b.clone()].iter().map(|n| n.div_ceil(size)).collect();
        let per_rank: usize = widths.iter().sum();
        let mut send = vec![0f32; per_rank * size];
        for r in 0..size {
            let mut off = r * per_rank;
            for (i, w) in b.clone().zip(&widths) {
                let (start, len) = dp_chunk(sizes[i], r, size);
                send[off..off + len].copy_from_slice(&host(i)[start..start + len]);
                off += w;
            }
        }
        let mut recv = vec![0f32; per_rank];
        comm.reduce_scatter_sum(&send, &mut recv);
        let scale = 1.0 / size as f32;
        let mut off = 0;
        for (i, w) in b.zip(&widths) {
            let (_, len) = dp_chunk(sizes[i], rank, size);
            let part: Vec<f32> = recv[off..off + len].iter().map(|x| x * scale).collect();
            out.push(Tensor::from_data(TensorData::new(part, [len]), &device));
            off += w;
        }
    }
    out
}

/// Whole tensors of `sizes` elements from every rank's [`dp_chunk`] of each (ZeRO-1's
/// all-gather of the updated weights), in buckets of at most `bucket_elems` elements.
pub fn all_gather_chunks<B: Backend>(
    comm: &dyn Comm,
    chunks: Vec<Tensor<B, 1>>,
    sizes: &[usize],
    bucket_elems: usize,
) -> Vec<Tensor<B, 1>> {
    let mut out: Vec<Option<Tensor<B, 1>>> = vec![None; sizes.len()];
    all_gather_chunks_each(comm, chunks, sizes, bucket_elems, |range, whole| {
        for (i, t) in range.zip(whole) {
            out[i] = Some(t);
        }
    });
    out.into_iter()
        .map(|t| t.expect("every tensor gathered"))
        .collect()
}

/// [`all_gather_chunks`] handing each bucket's whole tensors (indices `range`) to `f` as soon as
/// they are gathered, so that a caller can put them in place of the old ones bucket by bucket
/// instead of holding two copies of every tensor at once.
pub fn all_gather_chunks_each<B: Backend>(
    comm: &dyn Comm,
    chunks: Vec<Tensor<B, 1>>,
    sizes: &[usize],
    bucket_elems: usize,
    mut f: impl FnMut(std::ops::Range<usize>, Vec<Tensor<B, 1>>),
) {
    let size = comm.size();
    if size == 1 || chunks.is_empty() {
        if !chunks.is_empty() {
            f(0..chunks.len(), chunks);
        }
        return;
    }
    let device = chunks[0].device();
    let mut chunks = chunks.into_iter();
    for b in buckets(sizes, bucket_elems) {
        let host: Vec<Vec<f32>> = (&mut chunks).take(b.len()).map(to_host).collect();
        let host = |i: usize| &host[i - b.start];
        let widths: Vec<usize> = sizes[b.clone()].iter().map(|n| n.div_ceil(size)).collect();
        let per_rank: usize = widths.iter().sum();
        let mut send = vec![0f32; per_rank];
        let mut off = 0;
        for (i, w) in b.clone().zip(&widths) {
            send[off..off + host(i).len()].copy_from_slice(host(i));
            off += w;
        }
        let mut recv = vec![0f32; per_rank * size];
        comm.all_gather(&send, &mut recv);
        let mut col = 0;
        let mut whole_tensors = Vec::with_capacity(b.len());
        for (i, w) in b.clone().zip(&widths) {
            let mut whole = Vec::with_capacity(sizes[i]);
            for r in 0..size {
                let (_, len) = dp_chunk(sizes[i], r, size);
                let at = r * per_rank + col;
                whole.extend_from_slice(&recv[at..at + len]);
            }
            whole_tensors.push(Tensor::from_data(
                TensorData::new(whole, [sizes[i]]),
                &device,
            ));
            col += w;
        }
        drop(recv);
        f(b, whole_tensors);
    }
}

/// Rank 0 of a two-rank group whose other rank holds `other` in every element of every buffer;
/// records the length of each all-reduce (unit tests of what is built on the collectives).
#[cfg(test)]
pub(crate) struct FakePeer {
    pub other: f32,
    pub calls: std::sync::Mutex<Vec<usize>>,
}

#[cfg(test)]
impl FakePeer {
    pub fn new(other: f32) -> Self {
        Self {
            other,
            calls: std::sync::Mutex::new(vec![]),
        }
    }
    pub fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap().clone()
    }
}

#[cfg(test)]
impl Comm for FakePeer {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.calls.lock().unwrap().push(buf.len());
        buf.iter_mut().for_each(|x| *x += self.other);
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn thread_group_collectives() {
        let results: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> = ThreadComm::group(3)
                .into_iter()
                .map(|c| {
                    sc.spawn(move || {
                        let r = c.rank() as f32;
                        let mut sum = vec![r, 1.0];
                        c.all_reduce_sum(&mut sum);
                        let mut gathered = vec![0.0; 6];
                        c.all_gather(&[r, -r], &mut gathered);
                        let mut part = vec![0.0; 1];
                        c.reduce_scatter_sum(&[r, 2.0 * r, 1.0], &mut part);
                        let mut b = vec![r; 2];
                        c.broadcast(&mut b, 2);
                        let f = c.all_gather_f64(r as f64 * 0.5);
                        (sum, gathered, part, b, f, c.all_reduce_sum_f64(1.5))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (sum, gathered, part, b, f, s)) in results.into_iter().enumerate() {
            assert_eq!(sum, vec![3.0, 3.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, -1.0, 2.0, -2.0]);
            assert_eq!(part[0], [3.0, 6.0, 3.0][rank]);
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(f, vec![0.0, 0.5, 1.0]);
            assert_eq!(s, 4.5);
        }
    }

    #[test]
    fn tensor_collectives_over_three_thread_ranks() {
        type T2 = Tensor<Flex, 2>;
        let vals = |t: T2| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let out: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = ThreadComm::group(3)
                .into_iter()
                .map(|c| {
                    sc.spawn(move || {
                        let dev = Default::default();
                        let r = c.rank() as f32;
                        // [[r, r+1], [r+2, r+3]] on rank r
                        let t = T2::from_data([[r, r + 1.0], [r + 2.0, r + 3.0]], &dev);
                        let sum = c.all_reduce_tensor(t.clone());
                        let rows = c.all_gather_tensor(t.clone(), 0);
                        let cols = c.all_gather_tensor(t.clone(), 1);
                        let t6 = T2::from_data([[r; 6], [1.0; 6]], &dev);
                        let part = c.reduce_scatter_tensor(t6, 1);
                        let b = c.broadcast_tensor(t, 1);
                        (
                            rows.dims(),
                            cols.dims(),
                            vals(sum),
                            vals(rows),
                            vals(cols),
                            vals(part),
                            vals(b),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (rdims, cdims, sum, rows, cols, part, b)) in out.into_iter().enumerate() {
            assert_eq!((rdims, cdims), ([6, 2], [2, 6]));
            assert_eq!(sum, vec![3.0, 6.0, 9.0, 12.0]);
            assert_eq!(rows, vec![0., 1., 2., 3., 1., 2., 3., 4., 2., 3., 4., 5.]);
            assert_eq!(cols, vec![0., 1., 1., 2., 2., 3., 2., 3., 3., 4., 4., 5.]);
            // Column sums of [[r; 6], [1; 6]] are [3; 6] and [3; 6]; member r keeps columns 2r, 2r+1.
            assert_eq!(part, vec![3.0; 4], "rank {rank}");
            assert_eq!(b, vec![1.0, 2.0, 3.0, 4.0]);
        }
    }

    #[test]
    fn f64_travels_as_two_f32() {
        for v in [0.0, 1.0 / 3.0, -5.815727e2, 1e10 + 0.25, 7.3762] {
            let back = f64_from_parts(&f64_to_parts(v));
            assert!((back - v).abs() <= v.abs() * 1e-13, "{v} -> {back}");
        }
    }

    /// Three thread ranks: each gets the mean of its chunks, and gathering the chunks back gives
    /// every rank the whole means (sizes that split evenly, unevenly, smaller than the group).
    #[test]
    fn reduce_scatter_then_all_gather_is_the_all_reduce_mean() {
        let sizes = [7usize, 3, 1, 12, 2];
        let comms = ThreadComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let dev = Default::default();
                    let r = c.rank() as f32;
                    let tensors: Vec<Tensor<Flex, 1>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(k, &n)| {
                            let v = (0..n).map(|j| r * 100.0 + (k * 10 + j) as f32).collect();
                            Tensor::from_data(TensorData::new(v, [n]), &dev)
                        })
                        .collect();
                    let chunks = reduce_scatter_mean_tensors(&c, tensors, 6);
                    for (k, t) in chunks.iter().enumerate() {
                        assert_eq!(t.dims()[0], dp_chunk(sizes[k], c.rank(), 3).1);
                    }
                    let whole = all_gather_chunks(&c, chunks, &sizes, 6);
                    whole.into_iter().map(to_host).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let whole = h.join().unwrap();
            for (k, v) in whole.iter().enumerate() {
                // mean over ranks 0, 1, 2 of r * 100 + (10 k + j) = 100 + 10 k + j
                let want: Vec<f32> = (0..sizes[k]).map(|j| 100.0 + (k * 10 + j) as f32).collect();
                assert_eq!(v, &want, "tensor {k}");
            }
        }
    }

    #[test]
    fn buckets_go_from_the_last_tensor_keep_order_and_average() {
        let dev = Default::default();
        let sizes = [2usize, 3, 1, 7, 2];
        let tensors: Vec<Tensor<Flex, 1>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| Tensor::from_data(TensorData::new(vec![k as f32; n], [n]), &dev))
            .collect();
        let comm = FakePeer::new(10.0);
        let out = all_reduce_mean_tensors(&comm, tensors, 5);
        // Buckets of at most 5 elements from the last tensor: [2], [7] alone, [1, 3], [2].
        assert_eq!(comm.calls(), vec![2, 7, 4, 2]);
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

    #[test]
    fn owners_balance_whole_parameters_largest_first() {
        // 9 -> 0; 7 -> 1; 5 -> 2; 4 -> 2 (loads 9, 7, 5); 3 -> 1 (9, 7, 9); 1 -> 0 (loads
        // 9, 10, 9: the lowest of the two least loaded).
        assert_eq!(owners(&[4, 9, 1, 7, 5, 3], 3), vec![2, 0, 0, 1, 2, 1]);
        assert_eq!(owners(&[4, 9, 1], 1), vec![0, 0, 0]);
        // Equal sizes go round the ranks in order.
        assert_eq!(owners(&[2, 2, 2, 2], 2), vec![0, 1, 0, 1]);
        let sums = all_reduce_sum_tensors::<Flex>(
            &FakePeer::new(1.5),
            vec![Tensor::from_data([1.0, 2.0], &Default::default())],
            8,
        );
        let v: Vec<f32> = sums[0].clone().into_data().to_vec().unwrap();
        assert_eq!(v, vec![2.5, 3.5]);
    }
}
