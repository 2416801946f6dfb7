//! Megatron's conjugate collective operators as autodiff ops, and the group handle that the
//! tensor-parallel forms carry.
//!
//! - `copy_to_group` (Megatron's *f*): identity forward, sum of the gradient over the group
//!   backward. It sits on the replicated input of a column-parallel linear: every rank's shard
//!   sends back only its part of dL/dx.
//! - `reduce_from_group` (*g*): sum over the group forward, identity backward. It sits on the
//!   partial output of a row-parallel linear.
//! - `gather_from_group` (Megatron-SP's *g-bar*): the members' blocks along a dimension gathered
//!   forward, the gradient reduce-scattered backward. It sits where a sequence-parallel region
//!   (each rank a block of the positions) enters column-parallel linears.
//! - `scatter_to_group` (*g-bar*'s conjugate): sum over the group forward, of which each member
//!   keeps its block along the dimension; the gradient all-gathered backward. It sits on the
//!   partial output of a row-parallel linear that leaves into a sequence-parallel region.
//!
//! burn has no hook to run code on a gradient, so the ops are a backend extension (as burn's own
//! custom-kernel examples do): plain backends implement the forward only; `Autodiff<B, C>` adds a
//! `Backward` step that calls the communicator on the gradient. Every rank builds the same graph,
//! so the backward collectives come in the same order on every rank.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::comm::{Comm, SoloComm, TensorCollectives};

/// Time and volume of the collectives a group ran (for `tern bench` and the step-time split).
#[derive(Debug, Default)]
pub struct CommStats {
    nanos: AtomicU64,
    bytes: AtomicU64,
    calls: AtomicU64,
}

impl CommStats {
    /// (seconds, bytes, calls) so far.
    pub fn read(&self) -> (f64, u64, u64) {
        (
            self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            self.bytes.load(Ordering::Relaxed),
            self.calls.load(Ordering::Relaxed),
        )
    }
    pub fn reset(&self) {
        self.nanos.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
    }
    fn add(&self, since: Instant, bytes: usize) {
        self.nanos
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// The tensor-parallel group a shard belongs to: a shared communicator and its statistics.
/// Cheap to clone; lives in the parallel forms of the projections (so it is `Send + Sync` and
/// backend-independent).
#[derive(Clone)]
pub struct TpGroup {
    comm: Arc<dyn Comm>,
    stats: Arc<CommStats>,
}

impl fmt::Debug for TpGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TpGroup(rank {} of {})", self.rank(), self.size())
    }
}

impl Default for TpGroup {
    fn default() -> Self {
        Self::new(Arc::new(SoloComm))
    }
}

impl TpGroup {
    pub fn new(comm: Arc<dyn Comm>) -> Self {
        Self {
            comm,
            stats: Arc::new(CommStats::default()),
        }
    }
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    pub fn comm(&self) -> &dyn Comm {
        self.comm.as_ref()
    }
    pub fn stats(&self) -> &CommStats {
        &self.stats
    }

    /// Sum of a tensor primitive over the group, through host memory.
    fn all_reduce<B: Backend>(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        if self.size() == 1 {
            return x;
        }
        let t0 = Instant::now();
        let shape = x.shape();
        let n = shape.num_elements();
        // Any rank, viewed flat: the collective is element-wise.
        let flat =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(x, [n].into())));
        let out = self.comm.all_reduce_tensor(flat).into_primitive().tensor();
        self.stats.add(t0, n * 4);
        B::float_reshape(out, shape)
    }

    /// The members' blocks of a `D`-dimensional primitive along `dim`, in rank order.
    fn gather_along<B: Backend, const D: usize>(
        &self,
        x: FloatTensor<B>,
        dim: usize,
    ) -> FloatTensor<B> {
        self.along::<B, D>(x, |t| self.comm.all_gather_tensor(t, dim))
    }

    /// The sum over the group of a `D`-dimensional primitive, of which this member keeps block
    /// `rank` along `dim`.
    fn reduce_scatter_along<B: Backend, const D: usize>(
        &self,
        x: FloatTensor<B>,
        dim: usize,
    ) -> FloatTensor<B> {
        self.along::<B, D>(x, |t| self.comm.reduce_scatter_tensor(t, dim))
    }

    /// `op` on a primitive viewed as a `D`-dimensional tensor, timed and counted by the larger of
    /// its input and output.
    fn along<B: Backend, const D: usize>(
        &self,
        x: FloatTensor<B>,
        op: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
    ) -> FloatTensor<B> {
        if self.size() == 1 {
            return x;
        }
        let t0 = Instant::now();
        let t = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(x));
        let n = t.shape().num_elements();
        let out = op(t);
        self.stats.add(t0, n.max(out.shape().num_elements()) * 4);
        out.into_primitive().tensor()
    }
}

/// A backend on which tensor-parallel layers run. The defaults are the forward-only operators of
/// a backend without autodiff; `Autodiff` overrides both to add their backward.
pub trait CollectiveBackend: Backend {
    /// Megatron's f: identity forward, all-reduce of the gradient backward.
    fn copy_to_group<const D: usize>(x: Tensor<Self, D>, _group: &TpGroup) -> Tensor<Self, D> {
        x
    }
    /// Megatron's g: all-reduce forward, identity backward.
    fn reduce_from_group<const D: usize>(x: Tensor<Self, D>, group: &TpGroup) -> Tensor<Self, D> {
        let p = group.all_reduce::<Self>(x.into_primitive().tensor());
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }
    /// Megatron-SP's all-gather along `dim`: gathered forward, reduce-scattered backward.
    fn gather_from_group<const D: usize>(
        x: Tensor<Self, D>,
        group: &TpGroup,
        dim: usize,
    ) -> Tensor<Self, D> {
        let p = group.gather_along::<Self, D>(x.into_primitive().tensor(), dim);
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }
    /// Megatron-SP's reduce-scatter along `dim`: reduce-scattered forward, gathered backward.
    fn scatter_to_group<const D: usize>(
        x: Tensor<Self, D>,
        group: &TpGroup,
        dim: usize,
    ) -> Tensor<Self, D> {
        let p = group.reduce_scatter_along::<Self, D>(x.into_primitive().tensor(), dim);
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }
}

impl<E, I> CollectiveBackend for burn::backend::Flex<E, I> where Self: Backend {}

#[cfg(feature = "ndarray")]
impl<E, I, Q> CollectiveBackend for burn::backend::NdArray<E, I, Q>
where
    Self: Backend,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
}

// The f32 burn-cuda backend tern trains with (its element traits are not re-exported by burn).
#[cfg(feature = "cuda")]
impl CollectiveBackend for burn::backend::Cuda {}

/// Backward of f: the gradient summed over the group.
#[derive(Debug)]
struct CopyToGroup(TpGroup);

impl<B: Backend> Backward<B, 1> for CopyToGroup {
    type State = ();
    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let group = self.0;
        unary::<B, _>(ops.parents, ops.node, grads, |g| group.all_reduce::<B>(g));
    }
}

/// Backward of g: the gradient as it is.
#[derive(Debug)]
struct ReduceFromGroup;

impl<B: Backend> Backward<B, 1> for ReduceFromGroup {
    type State = ();
    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<B, _>(ops.parents, ops.node, grads, |g| g);
    }
}

/// Backward of the sequence all-gather: the gradient reduce-scattered.
#[derive(Debug)]
struct GatherFromGroup<const D: usize>(TpGroup, usize);

impl<B: Backend, const D: usize> Backward<B, 1> for GatherFromGroup<D> {
    type State = ();
    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Self(group, dim) = self;
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            group.reduce_scatter_along::<B, D>(g, dim)
        });
    }
}

/// Backward of the sequence reduce-scatter: the gradient all-gathered.
#[derive(Debug)]
struct ScatterToGroup<const D: usize>(TpGroup, usize);

impl<B: Backend, const D: usize> Backward<B, 1> for ScatterToGroup<D> {
    type State = ();
    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Self(group, dim) = self;
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            group.gather_along::<B, D>(g, dim)
        });
    }
}

// All are marked compute-bound: a checkpointing strategy must never re-run a collective in
// backward (only some ranks might, and the group would hang).
/// `forward` of `x`'s values, recorded in the graph with `op` as its backward.
fn record<B, C, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
    op: impl Backward<B, 1, State = ()>,
    forward: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> Tensor<Autodiff<B, C>, D>
where
    B: Backend,
    C: CheckpointStrategy,
{
    let t = x.into_primitive().tensor();
    let y = forward(t.primitive);
    let out = op
        .prepare::<C>([t.node.clone()])
        .compute_bound()
        .stateless(y);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl<B: Backend, C: CheckpointStrategy> CollectiveBackend for Autodiff<B, C> {
    fn copy_to_group<const D: usize>(x: Tensor<Self, D>, group: &TpGroup) -> Tensor<Self, D> {
        match group.size() {
            1 => x,
            _ => record(x, CopyToGroup(group.clone()), |p| p),
        }
    }

    fn reduce_from_group<const D: usize>(x: Tensor<Self, D>, group: &TpGroup) -> Tensor<Self, D> {
        match group.size() {
            1 => x,
            _ => record(x, ReduceFromGroup, |p| group.all_reduce::<B>(p)),
        }
    }

    fn gather_from_group<const D: usize>(
        x: Tensor<Self, D>,
        group: &TpGroup,
        dim: usize,
    ) -> Tensor<Self, D> {
        match group.size() {
            1 => x,
            _ => record(x, GatherFromGroup::<D>(group.clone(), dim), |p| {
                group.gather_along::<B, D>(p, dim)
            }),
        }
    }

    fn scatter_to_group<const D: usize>(
        x: Tensor<Self, D>,
        group: &TpGroup,
        dim: usize,
    ) -> Tensor<Self, D> {
        match group.size() {
            1 => x,
            _ => record(x, ScatterToGroup::<D>(group.clone(), dim), |p| {
                group.reduce_scatter_along::<B, D>(p, dim)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::FakePeer;
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    fn group(other: f32) -> (TpGroup, Arc<FakePeer>) {
        let fake = Arc::new(FakePeer::new(other));
        (TpGroup::new(fake.clone()), fake)
    }

    fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn f_is_identity_forward_and_sums_gradients_backward() {
        let dev = Default::default();
        let (g, fake) = group(10.0);
        let x = Tensor::<Ad, 2>::from_data([[1.0, 2.0], [3.0, 4.0]], &dev).require_grad();
        let y = Ad::copy_to_group(x.clone(), &g);
        assert_eq!(vals(y.clone()), vec![1.0, 2.0, 3.0, 4.0]);
        assert!(fake.calls().is_empty(), "f communicates only backward");
        // L = sum(3 y): this rank's dL/dy = 3, the other rank's 10: dL/dx = 13.
        let grads = y.mul_scalar(3.0).sum().backward();
        assert_eq!(vals(x.grad(&grads).unwrap()), vec![13.0; 4]);
        assert_eq!(fake.calls(), vec![4]);
        assert_eq!(g.stats().read().2, 1);
    }

    #[test]
    fn g_sums_forward_and_passes_gradients_through() {
        let dev = Default::default();
        let (g, fake) = group(0.5);
        let x = Tensor::<Ad, 1>::from_data([1.0, -2.0, 4.0], &dev).require_grad();
        let y = Ad::reduce_from_group(x.clone(), &g);
        assert_eq!(vals(y.clone()), vec![1.5, -1.5, 4.5]);
        let grads = (y.clone() * y).sum().backward();
        // dL/dx = dL/dy = 2 y (the summed value), no communication backward.
        assert_eq!(vals(x.grad(&grads).unwrap()), vec![3.0, -3.0, 9.0]);
        assert_eq!(fake.calls(), vec![3]);
    }

    #[test]
    fn plain_backend_forward_matches() {
        let dev = Default::default();
        let (g, _) = group(1.0);
        let x = Tensor::<Flex, 2>::from_data([[1.0, 2.0]], &dev);
        assert_eq!(vals(Flex::copy_to_group(x.clone(), &g)), vec![1.0, 2.0]);
        assert_eq!(vals(Flex::reduce_from_group(x, &g)), vec![2.0, 3.0]);
    }

    #[test]
    fn group_of_one_is_free() {
        let dev = Default::default();
        let g = TpGroup::default();
        let x = Tensor::<Ad, 1>::from_data([1.0, 2.0], &dev).require_grad();
        let y = Ad::reduce_from_group(Ad::copy_to_group(x.clone(), &g), &g);
        let grads = y.sum().backward();
        assert_eq!(vals(x.grad(&grads).unwrap()), vec![1.0, 1.0]);
        assert_eq!(g.stats().read().2, 0);
    }
}

#[cfg(test)]
mod sequence_tests {
    use super::*;
    use crate::comm::ThreadComm;
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    /// Runs `f(rank, group)` on two ranks as threads.
    fn on_two<T: Send>(f: impl Fn(usize, TpGroup) -> T + Sync) -> Vec<T> {
        std::thread::scope(|sc| {
            let handles: Vec<_> = ThreadComm::group(2)
                .into_iter()
                .enumerate()
                .map(|(r, c)| {
                    let f = &f;
                    sc.spawn(move || f(r, TpGroup::new(Arc::new(c))))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    /// Rank r holds x_r = [r+1, r+2] (a block of a [4] vector along dim 1 of [1, 2]); the loss on
    /// rank r weighs the whole vector by w_r. Gather: y = [x_0, x_1] on both, and dL/dx_r is the
    /// sum over ranks of w's block r (reduce-scatter). Scatter: y_r = block r of x_0 + x_1, and
    /// dL/dx_r is the ranks' weights side by side (all-gather).
    #[test]
    fn sequence_gather_and_scatter_are_conjugate() {
        let w = |r: usize| [[1.0 + 10.0 * r as f32, 2.0, 3.0, 4.0 + r as f32]];
        let out = on_two(|r, g| {
            let dev = Default::default();
            let x =
                Tensor::<Ad, 2>::from_data([[r as f32 + 1.0, r as f32 + 2.0]], &dev).require_grad();
            let y = Ad::gather_from_group(x.clone(), &g, 1);
            let yv = vals(y.clone());
            let grads = (y * Tensor::from_data(w(r), &dev)).sum().backward();
            let gx = vals(x.grad(&grads).unwrap());
            // Scatter of a [1, 4] value: each keeps two of the summed columns.
            let z =
                Tensor::<Ad, 2>::from_data([[1.0, 2.0, 3.0, 4.0 + r as f32]], &dev).require_grad();
            let s = Ad::scatter_to_group(z.clone(), &g, 1);
            let sv = vals(s.clone());
            let wr = Tensor::from_data([[5.0 + r as f32, 6.0]], &dev);
            let gz = vals(z.grad(&(s * wr).sum().backward()).unwrap());
            (yv, gx, sv, gz)
        });
        for (r, (yv, gx, sv, gz)) in out.into_iter().enumerate() {
            assert_eq!(yv, vec![1.0, 2.0, 2.0, 3.0], "rank {r}");
            // w_0 + w_1 = [12, 4, 6, 9]: rank 0 gets [12, 4], rank 1 [6, 9].
            assert_eq!(gx, [[12.0, 4.0], [6.0, 9.0]][r].to_vec(), "rank {r}");
            // x_0 + x_1 = [2, 4, 6, 9].
            assert_eq!(sv, [[2.0, 4.0], [6.0, 9.0]][r].to_vec(), "rank {r}");
            assert_eq!(gz, vec![5.0, 6.0, 6.0, 6.0], "rank {r}");
        }
    }
}
