//! NCCL collectives over device memory (feature `cuda`), through cudarc's `nccl` module: the
//! same cudarc burn-cuda links, so the job has one CUDA binding. An NCCL communicator is set up
//! over the members of an MPI group: rank 0 of the group makes the 128-byte unique id and MPI
//! broadcasts it.
//!
//! The `Comm` trait hands host slices (the trainer's buckets and the f/g operators read tensors
//! back to the host), so each call stages its buffer through one device buffer kept for reuse:
//! the collective itself runs on the GPUs' links (NVLink, InfiniBand) as NCCL arranges.
//! libnccl and libcuda are loaded at run time, so this builds on machines without either.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::result::NcclStatus;
use cudarc::nccl::{Comm as NcclHandle, Id, ReduceOp};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Root;

use crate::comm::{f64_from_parts as join, f64_to_parts as split, Comm};

/// One NCCL communicator, its stream, and a reusable device buffer.
pub struct NcclComm {
    nccl: NcclHandle,
    stream: Arc<CudaStream>,
    scratch: Mutex<Option<CudaSlice<f32>>>,
}

// SAFETY: NCCL communicators and CUDA streams may be used from any thread, one call at a time;
// tern calls them from the training thread only, and the scratch buffer sits behind a mutex.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// An NCCL communicator over the members of `group` on GPU `ordinal` (a collective over
    /// `group`: every member calls it).
    // c_char is i8 on x86-64 and u8 on aarch64: the casts are not the same type everywhere.
    #[allow(clippy::unnecessary_cast)]
    pub fn over(group: &SimpleCommunicator, ordinal: usize) -> Result<Self> {
        let rank = group.rank();
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("rank {rank}: CUDA device {ordinal}: {e:?}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("rank {rank}: creating a CUDA stream: {e:?}"))?;
        // Rank 0 makes the id; a failure there is reported after the broadcast so that no rank
        // waits for an id that never comes.
        let mut bytes = [0i8; 128];
        let mut ok = [1i8];
        if rank == 0 {
            match Id::new() {
                Ok(id) => {
                    for (b, c) in bytes.iter_mut().zip(id.internal()) {
                        *b = *c as i8;
                    }
                }
                Err(_) => ok[0] = 0,
            }
        }
        let root = group.process_at_rank(0);
        root.broadcast_into(&mut ok[..]);
        if ok[0] == 0 {
            return Err(anyhow!(
                "rank 0 could not create an NCCL id (is libnccl installed?)"
            ));
        }
        root.broadcast_into(&mut bytes[..]);
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            *c = b as std::ffi::c_char;
        }
        let nccl = NcclHandle::from_rank(
            stream.clone(),
            rank as usize,
            group.size() as usize,
            Id::uninit(internal),
        )
        .map_err(|e| anyhow!("rank {rank}: NCCL init: {e:?}"))?;
        Ok(Self {
            nccl,
            stream,
            scratch: Mutex::new(None),
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Debug) -> ! {
        // The panic hook prints the rank and aborts the whole MPI job.
        panic!("NCCL {what} failed: {e:?}")
    }

    /// A device buffer of at least `n` floats (grown, never shrunk) holding `host` at its start.
    fn upload(&self, host: &[f32], n: usize) -> std::sync::MutexGuard<'_, Option<CudaSlice<f32>>> {
        let mut guard = self.scratch.lock().expect("scratch buffer");
        if guard.as_ref().is_none_or(|b| b.len() < n) {
            let b = self
                .stream
                .alloc_zeros::<f32>(n)
                .unwrap_or_else(|e| self.fail("buffer allocation", e));
            *guard = Some(b);
        }
        let buf = guard.as_mut().expect("allocated");
        let mut view = buf.slice_mut(0..host.len());
        self.stream
            .memcpy_htod(host, &mut view)
            .unwrap_or_else(|e| self.fail("host-to-device copy", e));
        guard
    }

    /// A collective from `send` into `recv`: both staged in one device buffer, `send` first.
    fn send_recv<E: std::fmt::Debug>(
        &self,
        send: &[f32],
        recv: &mut [f32],
        what: &str,
        op: impl FnOnce(&NcclHandle, &CudaViewMut<f32>, &mut CudaViewMut<f32>) -> Result<NcclStatus, E>,
    ) {
        let n = send.len();
        let mut guard = self.upload(send, n + recv.len());
        let dev = guard.as_mut().expect("uploaded");
        {
            let (src, mut rest) = dev.split_at_mut(n);
            let mut dst = rest.slice_mut(0..recv.len());
            op(&self.nccl, &src, &mut dst).unwrap_or_else(|e| self.fail(what, e));
        }
        self.download(dev, n..n + recv.len(), recv);
    }

    fn download(&self, dev: &CudaSlice<f32>, range: std::ops::Range<usize>, host: &mut [f32]) {
        let view = dev.slice(range);
        self.stream
            .memcpy_dtoh(&view, host)
            .unwrap_or_else(|e| self.fail("device-to-host copy", e));
        self.stream
            .synchronize()
            .unwrap_or_else(|e| self.fail("stream synchronize", e));
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.nccl.rank()
    }
    fn size(&self) -> usize {
        self.nccl.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let n = buf.len();
        let mut guard = self.upload(buf, n);
        let dev = guard.as_mut().expect("uploaded");
        {
            let mut view = dev.slice_mut(0..n);
            self.nccl
                .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                .unwrap_or_else(|e| self.fail("all-reduce", e));
        }
        self.download(dev, 0..n, buf);
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) {
        self.send_recv(send, recv, "all-gather", |nccl, src, dst| {
            nccl.all_gather(src, dst)
        });
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) {
        self.send_recv(send, recv, "reduce-scatter", |nccl, src, dst| {
            nccl.reduce_scatter(src, dst, &ReduceOp::Sum)
        });
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) {
        let n = buf.len();
        let mut guard = self.upload(buf, n);
        let dev = guard.as_mut().expect("uploaded");
        {
            let mut view = dev.slice_mut(0..n);
            self.nccl
                .broadcast_in_place(&mut view, root as i32)
                .unwrap_or_else(|e| self.fail("broadcast", e));
        }
        self.download(dev, 0..n, buf);
    }
    fn barrier(&self) {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one);
    }
    fn all_reduce_sum_f64(&self, v: f64) -> f64 {
        // Scalars (losses, norms, checksums) keep f64 precision: split into two f32 parts.
        let mut parts: Vec<f32> = vec![0.0; 2 * self.size()];
        self.all_gather(&split(v), &mut parts);
        parts.chunks(2).map(join).sum()
    }
    fn all_gather_f64(&self, v: f64) -> Vec<f64> {
        let mut parts: Vec<f32> = vec![0.0; 2 * self.size()];
        self.all_gather(&split(v), &mut parts);
        parts.chunks(2).map(join).collect()
    }
}

/// The name the CUDA driver gives GPU `ordinal` (`NVIDIA H100 80GB HBM3`).
pub fn device_name(ordinal: usize) -> Result<String> {
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
    ctx.name()
        .map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))
}
