//! [`NcclCommunicator`]: the [`Communicator`] between GPU ranks of one process, over NCCL
//! through candle-core's `nccl` feature (cudarc's bindings). Compiled with the `cuda`
//! feature only.
//!
//! [`init_group`] is the one way to make communicators: the calling thread creates the
//! NCCL unique id (it acts for rank 0), hands a copy of its 128 bytes to every rank, and
//! each rank's communicator is initialised on a thread of its own (NCCL's init blocks
//! until all ranks join). The caller then moves each communicator to its rank thread:
//! one communicator per rank thread, never shared (no `Sync`).
//!
//! Collectives run on the rank's candle CUDA stream, so they are ordered with the model's
//! kernels on that stream; the buffer is a device [`Tensor`] (f32, bf16 or f16), replaced
//! by the result. NCCL calls are asynchronous: every collective then waits for its stream
//! with a deadline, polling an event, and returns [`CommError::Timeout`] instead of
//! hanging, or [`CommError::Aborted`] as soon as another rank called [`Communicator::abort`].
//! A group that timed out or aborted must be rebuilt: NCCL kernels may still be spinning
//! on its stream.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{CommError, Communicator};

/// Bytes of an NCCL unique id, as they travel from rank 0 to the others.
pub const ID_BYTES: usize = 128;

/// Copies an id into the bytes that are handed to the other ranks.
pub fn id_to_bytes(id: &Id) -> [u8; ID_BYTES] {
    id.internal().map(|c| c as u8)
}

/// Rebuilds an id from the bytes rank 0 handed over.
pub fn id_from_bytes(bytes: &[u8; ID_BYTES]) -> Id {
    Id::uninit(bytes.map(|b| b as std::ffi::c_char))
}

/// Checks the GPUs of a group: at least one, each at most once (NCCL refuses two ranks
/// on one device).
pub fn validate_ordinals(ordinals: &[usize]) -> Result<(), CommError> {
    if ordinals.is_empty() {
        return Err(CommError::Backend(
            "an NCCL group needs at least one GPU".into(),
        ));
    }
    for (i, o) in ordinals.iter().enumerate() {
        if ordinals[..i].contains(o) {
            return Err(CommError::Backend(format!(
                "GPU {o} is given to two ranks; NCCL needs one GPU per rank"
            )));
        }
    }
    Ok(())
}

/// Classifies an NCCL error code (`ncclResult_t` as an integer) for `op`.
pub fn nccl_error_message(op: &str, code: u32) -> String {
    let what = match code {
        1 => "a CUDA call failed inside NCCL (unhandled CUDA error)",
        2 => "system error (network, shared memory or a system call)",
        3 => "internal NCCL error",
        4 => "invalid argument",
        5 => "invalid usage (mismatched calls between ranks?)",
        6 => "a remote rank failed",
        _ => "unknown NCCL error",
    };
    format!("{op}: NCCL error {code}: {what}")
}

fn nccl_err(op: &'static str) -> impl Fn(NcclError) -> CommError {
    move |e| CommError::Backend(nccl_error_message(op, e.0 as u32))
}

/// Shared by the ranks of one group: the first failure reported through `abort`.
#[derive(Debug, Default)]
struct GroupState {
    failed: Mutex<Option<(usize, String)>>,
}

impl GroupState {
    fn check(&self) -> Result<(), CommError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((rank, reason)) => Err(CommError::Aborted {
                rank: *rank,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// One rank's NCCL communicator and its CUDA device.
#[derive(Debug)]
pub struct NcclCommunicator {
    comm: Comm,
    device: Device,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    group: Arc<GroupState>,
}

// SAFETY: `Comm` is not `Send` only because it holds NCCL's raw communicator pointer. NCCL
// allows a communicator to be used from any thread as long as one thread at a time uses
// it; `NcclCommunicator` is owned by exactly one rank thread (it is moved there once, and
// is not `Sync`, so it is never used from two threads), and every call binds the rank's
// CUDA context to the calling thread first.
unsafe impl Send for NcclCommunicator {}

/// Builds the communicators of a group, rank `r` on GPU `ordinals[r]`; every collective
/// waits at most `timeout`. Fails if a rank cannot open its GPU or NCCL, or if the ranks
/// do not all join within `timeout` (a rank stuck in NCCL's init is then left behind).
pub fn init_group(
    ordinals: &[usize],
    timeout: Duration,
) -> Result<Vec<NcclCommunicator>, CommError> {
    validate_ordinals(ordinals)?;
    let world = ordinals.len();
    // Rank 0's side: create the id; the others get its bytes, as they would over a wire.
    let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
    let bytes = id_to_bytes(&id);
    let group = Arc::new(GroupState::default());
    let (tx, rx) = mpsc::channel();
    for (rank, &ordinal) in ordinals.iter().enumerate() {
        let (tx, group) = (tx.clone(), group.clone());
        std::thread::Builder::new()
            .name(format!("shardline-nccl-init-{rank}"))
            .spawn(move || {
                let id = if rank == 0 { id } else { id_from_bytes(&bytes) };
                let r = open_rank(rank, world, ordinal, id, timeout, group);
                let _ = tx.send((rank, r));
            })
            .map_err(|e| CommError::Backend(format!("spawning NCCL init thread: {e}")))?;
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut out: Vec<Option<NcclCommunicator>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, r)) => out[rank] = Some(r?),
            Err(_) => {
                return Err(CommError::Timeout {
                    op: "NCCL init",
                    after: timeout,
                });
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

fn open_rank(
    rank: usize,
    world: usize,
    ordinal: usize,
    id: Id,
    timeout: Duration,
    group: Arc<GroupState>,
) -> Result<NcclCommunicator, CommError> {
    let device = Device::new_cuda(ordinal)
        .map_err(|e| CommError::Backend(format!("rank {rank}: opening GPU {ordinal}: {e}")))?;
    let stream = match &device {
        Device::Cuda(d) => d.cuda_stream(),
        _ => unreachable!("Device::new_cuda returned a non-CUDA device; this is a bug"),
    };
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| CommError::Backend(format!("rank {rank}: binding GPU {ordinal}: {e:?}")))?;
    let comm =
        Comm::from_rank(stream.clone(), rank, world, id).map_err(nccl_err("ncclCommInitRank"))?;
    Ok(NcclCommunicator {
        comm,
        device,
        stream,
        rank,
        world,
        timeout,
        group,
    })
}

impl NcclCommunicator {
    /// The rank's CUDA device: the buffers of its collectives must live there.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Waits for the stream with the deadline, watching for an abort by another rank.
    fn wait(&self, op: &'static str) -> Result<(), CommError> {
        let backend = |e| CommError::Backend(format!("{op}: CUDA: {e:?}"));
        let event = self.stream.record_event(None).map_err(backend)?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(5);
        loop {
            if event.try_is_complete().map_err(backend)? {
                return Ok(());
            }
            self.group.check()?;
            if start.elapsed() >= self.timeout {
                return Err(CommError::Timeout {
                    op,
                    after: self.timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn run(&self, op: &'static str, buf: &mut Tensor, kind: Collective) -> Result<(), CommError> {
        self.group.check()?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| CommError::Backend(format!("{op}: CUDA: {e:?}")))?;
        if !matches!(buf.device(), Device::Cuda(_)) {
            return Err(CommError::Backend(format!(
                "{op}: the buffer is not on a CUDA device"
            )));
        }
        let out = buf
            .apply_op1_no_bwd(&NcclOp {
                comm: &self.comm,
                kind,
            })
            .map_err(|e| CommError::Backend(format!("{op}: {e}")))?;
        self.wait(op)?;
        *buf = out;
        Ok(())
    }
}

impl Communicator for NcclCommunicator {
    type Buffer = Tensor;

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CommError> {
        self.run("all_reduce_sum", buf, Collective::AllReduceSum)
    }

    fn broadcast(&mut self, buf: &mut Tensor, root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::Backend(format!(
                "broadcast: root {root} outside the group of {}",
                self.world
            )));
        }
        self.run("broadcast", buf, Collective::Broadcast(root))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut one = Tensor::zeros(1, DType::F32, &self.device)
            .map_err(|e| CommError::Backend(format!("barrier: {e}")))?;
        self.run("barrier", &mut one, Collective::AllReduceSum)
    }

    fn abort(&self, reason: &str) {
        let mut failed = self.group.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            *failed = Some((self.rank, reason.to_string()));
        }
    }

    fn is_aborted(&self) -> bool {
        self.group.check().is_err()
    }
}

#[derive(Debug, Clone, Copy)]
enum Collective {
    AllReduceSum,
    Broadcast(usize),
}

/// A collective as a candle op, so it reads the tensor's device buffer in place and
/// returns a new one on the same stream.
struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Collective,
}

impl NcclOp<'_> {
    fn launch<
        T: CudaDType
            + NcclType
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    >(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives need a contiguous tensor")
        };
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<T>(end - start)?;
        let r = match self.kind {
            Collective::AllReduceSum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Collective::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        if let Err(e) = r {
            candle_core::bail!("{}", nccl_error_message(self.name(), e.0 as u32))
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, s.device.clone()))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Collective::AllReduceSum => "nccl-all-reduce",
            Collective::Broadcast(_) => "nccl-broadcast",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} needs a CUDA tensor", self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            DType::BF16 => self.launch::<half::bf16>(s, l)?,
            DType::F16 => self.launch::<half::f16>(s, l)?,
            other => candle_core::bail!("{}: dtype {other:?} is not supported", self.name()),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_survives_the_hand_off() {
        let mut raw = [0 as std::ffi::c_char; ID_BYTES];
        for (i, c) in raw.iter_mut().enumerate() {
            *c = (i as i32 * 37 - 100) as std::ffi::c_char;
        }
        let id = Id::uninit(raw);
        let bytes = id_to_bytes(&id);
        assert_eq!(id_from_bytes(&bytes).internal(), &raw);
    }

    #[test]
    fn ordinals_are_checked() {
        assert!(validate_ordinals(&[0, 1, 2]).is_ok());
        let e = validate_ordinals(&[]).unwrap_err();
        assert!(e.to_string().contains("at least one GPU"), "{e}");
        let e = validate_ordinals(&[0, 1, 0]).unwrap_err();
        assert!(e.to_string().contains("GPU 0 is given to two ranks"), "{e}");
    }

    #[test]
    fn nccl_errors_say_what_failed() {
        let m = nccl_error_message("all_reduce_sum", 6);
        assert!(
            m.contains("all_reduce_sum") && m.contains("remote rank"),
            "{m}"
        );
        assert!(nccl_error_message("x", 99).contains("unknown"));
        let e = nccl_err("ncclCommInitRank")(NcclError(
            candle_core::cuda_backend::cudarc::nccl::sys::ncclResult_t::ncclInvalidUsage,
        ));
        assert!(e.to_string().contains("invalid usage"), "{e}");
    }

    /// Needs a GPU (run on the GPU host: the test binary of `--features cuda`).
    #[test]
    fn collectives_on_one_gpu() {
        let mut comms = init_group(&[0], Duration::from_secs(30))
            .expect("opening GPU 0 and NCCL (this test needs a CUDA GPU and libnccl.so.2)");
        let mut c = comms.remove(0);
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let dev = c.device().clone();
        let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut t = Tensor::new(data.as_slice(), &dev).unwrap();
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), data);
        let mut b = Tensor::new(data.as_slice(), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        c.broadcast(&mut b, 0).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert!(c.broadcast(&mut b, 1).is_err());
        c.barrier().unwrap();
        let mut cpu = Tensor::new(data.as_slice(), &Device::Cpu).unwrap();
        assert!(c.all_reduce_sum(&mut cpu).is_err());
        c.abort("injected failure");
        let e = c.all_reduce_sum(&mut t).unwrap_err();
        assert!(matches!(e, CommError::Aborted { rank: 0, .. }), "{e}");
    }

    #[test]
    fn an_abort_reaches_every_rank() {
        let g = GroupState::default();
        assert!(g.check().is_ok());
        *g.failed.lock().unwrap() = Some((2, "injected".into()));
        assert_eq!(
            g.check().unwrap_err(),
            CommError::Aborted {
                rank: 2,
                reason: "injected".into()
            }
        );
    }
}
