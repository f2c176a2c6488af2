//! Shared-memory collectives between rank threads of one process.
//!
//! Every rank owns one slot per buffer set; an all-reduce copies the rank's data into its
//! slot, waits at a barrier, then sums all slots **in rank order** into its own buffer, so
//! every rank ends with bitwise the same result and the sum does not depend on which rank
//! arrived first. Two buffer sets alternate between calls: a rank can only overwrite a set
//! after the next call's barrier, which every rank reaches only once it has finished
//! reading that set — one barrier per chunk, and no allocation per call. Tensors larger
//! than a slot go through in slot-sized chunks.
//!
//! The barrier spins briefly (a step's collectives come microseconds apart), then sleeps
//! on a condition variable until the last rank arrives, the deadline passes, or a rank
//! aborts the group.
//!
//! [`HostTensorComm`] runs these collectives on candle tensors (through a host copy), so
//! the device backend's tensor parallelism works on candle's CPU device.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{CommError, Communicator};

/// Floats per slot (256 KiB): a hidden-size vector for hundreds of tokens in one chunk.
pub const SLOT_FLOATS: usize = 64 * 1024;

/// Spin iterations before a waiting rank sleeps.
const SPINS: u32 = 2_000;

struct Slot {
    data: RwLock<Vec<f32>>,
    len: AtomicUsize,
}

struct Shared {
    world: usize,
    /// `sets[s][rank]`.
    sets: [Vec<Slot>; 2],
    arrived: AtomicUsize,
    generation: AtomicU64,
    aborted: AtomicBool,
    abort_reason: Mutex<Option<(usize, String)>>,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Shared {
    fn aborted_error(&self) -> CommError {
        let reason = self
            .abort_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (rank, reason) = reason.unwrap_or((usize::MAX, "aborted".into()));
        CommError::Aborted { rank, reason }
    }

    fn abort(&self, rank: usize, reason: &str) {
        {
            let mut r = self.abort_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some((rank, reason.to_string()));
            }
        }
        self.aborted.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Waits until all `world` ranks have arrived (or abort / deadline).
    fn wait(&self, rank: usize, op: &'static str, timeout: Duration) -> Result<(), CommError> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(self.aborted_error());
        }
        let generation = self.generation.load(Ordering::SeqCst);
        if self.arrived.fetch_add(1, Ordering::SeqCst) + 1 == self.world {
            self.arrived.store(0, Ordering::SeqCst);
            self.generation.fetch_add(1, Ordering::SeqCst);
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
            return Ok(());
        }
        let released = || self.generation.load(Ordering::SeqCst) != generation;
        for _ in 0..SPINS {
            if released() {
                return Ok(());
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(self.aborted_error());
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if released() {
                return Ok(());
            }
            if self.aborted.load(Ordering::SeqCst) {
                drop(guard);
                return Err(self.aborted_error());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(guard);
                let err = CommError::Timeout { op, after: timeout };
                self.abort(rank, &err.to_string());
                return Err(err);
            }
            guard = self
                .cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// One rank's handle on a group's shared-memory collectives.
pub struct CpuCommunicator {
    rank: usize,
    shared: Arc<Shared>,
    /// Calls so far; selects the buffer set.
    calls: u64,
    timeout: Duration,
}

impl std::fmt::Debug for CpuCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuCommunicator")
            .field("rank", &self.rank)
            .field("world", &self.shared.world)
            .finish_non_exhaustive()
    }
}

impl CpuCommunicator {
    /// One communicator per rank, `world` in all; every collective gives up after
    /// `timeout` (and aborts the group).
    pub fn group(world: usize, timeout: Duration) -> Vec<CpuCommunicator> {
        let world = world.max(1);
        let slots = || {
            (0..world)
                .map(|_| Slot {
                    data: RwLock::new(vec![0.0; if world > 1 { SLOT_FLOATS } else { 0 }]),
                    len: AtomicUsize::new(0),
                })
                .collect::<Vec<_>>()
        };
        let shared = Arc::new(Shared {
            world,
            sets: [slots(), slots()],
            arrived: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| CpuCommunicator {
                rank,
                shared: Arc::clone(&shared),
                calls: 0,
                timeout,
            })
            .collect()
    }

    /// The buffer set of the next call.
    fn next_set(&mut self) -> usize {
        let s = (self.calls % 2) as usize;
        self.calls += 1;
        s
    }

    fn write_slot(slot: &Slot, data: &[f32]) {
        let mut d = slot.data.write().unwrap_or_else(|e| e.into_inner());
        d[..data.len()].copy_from_slice(data);
        slot.len.store(data.len(), Ordering::SeqCst);
    }

    fn check_len(&self, set: &[Slot], op: &'static str, expected: usize) -> Result<(), CommError> {
        for (rank, slot) in set.iter().enumerate() {
            let got = slot.len.load(Ordering::SeqCst);
            if got != expected {
                let err = CommError::Size {
                    op,
                    rank,
                    expected,
                    got,
                };
                self.shared.abort(self.rank, &err.to_string());
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Communicator for CpuCommunicator {
    type Buffer = [f32];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.shared.world == 1 {
            return if self.is_aborted() {
                Err(self.shared.aborted_error())
            } else {
                Ok(())
            };
        }
        let (rank, timeout) = (self.rank, self.timeout);
        for chunk in buf.chunks_mut(SLOT_FLOATS) {
            let s = self.next_set();
            let shared = &*self.shared;
            let set = &shared.sets[s];
            Self::write_slot(&set[rank], chunk);
            shared.wait(rank, "all_reduce", timeout)?;
            let n = chunk.len();
            for (r, slot) in set.iter().enumerate() {
                if slot.len.load(Ordering::SeqCst) != n {
                    let err = CommError::Size {
                        op: "all_reduce",
                        rank: r,
                        expected: n,
                        got: slot.len.load(Ordering::SeqCst),
                    };
                    shared.abort(rank, &err.to_string());
                    return Err(err);
                }
                let d = slot.data.read().unwrap_or_else(|e| e.into_inner());
                if r == 0 {
                    chunk.copy_from_slice(&d[..n]);
                } else {
                    for (a, b) in chunk.iter_mut().zip(&d[..n]) {
                        *a += b;
                    }
                }
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.shared.world {
            return Err(CommError::Backend(format!(
                "broadcast root {root} outside a group of {}",
                self.shared.world
            )));
        }
        if self.shared.world == 1 {
            return Ok(());
        }
        let (rank, timeout) = (self.rank, self.timeout);
        for chunk in buf.chunks_mut(SLOT_FLOATS) {
            let s = self.next_set();
            let shared = &*self.shared;
            let set = &shared.sets[s];
            let n = chunk.len();
            // Every rank states its length so a mismatch is caught on all of them.
            if rank == root {
                Self::write_slot(&set[rank], chunk);
            } else {
                set[rank].len.store(n, Ordering::SeqCst);
            }
            shared.wait(rank, "broadcast", timeout)?;
            self.check_len(set, "broadcast", n)?;
            if rank != root {
                let d = set[root].data.read().unwrap_or_else(|e| e.into_inner());
                chunk.copy_from_slice(&d[..n]);
            }
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        if self.shared.world == 1 {
            return Ok(());
        }
        // Counts as a call so the buffer-set alternation stays in step on every rank.
        self.calls += 1;
        self.shared.wait(self.rank, "barrier", self.timeout)
    }

    fn abort(&self, reason: &str) {
        self.shared.abort(self.rank, reason);
    }

    fn is_aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst)
    }
}

/// [`HostTensorComm`]: a `Communicator<Buffer = Tensor>` over a host communicator
/// (`Communicator<Buffer = [f32]>`, e.g. [`CpuCommunicator`]), so the device backend's
/// multi-rank path runs, and is tested, on candle's CPU device without a GPU. Each
/// collective copies the tensor to a host `Vec<f32>`, runs the host collective and builds
/// the result back in the tensor's shape, dtype and device (two copies per call: for
/// candle's CPU device; GPUs use NCCL).
pub struct HostTensorComm {
    inner: Box<dyn Communicator<Buffer = [f32]>>,
}

impl std::fmt::Debug for HostTensorComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTensorComm")
            .field("rank", &self.inner.rank())
            .field("world", &self.inner.world_size())
            .finish()
    }
}

impl HostTensorComm {
    pub fn new(inner: Box<dyn Communicator<Buffer = [f32]>>) -> Self {
        HostTensorComm { inner }
    }

    /// `f` on a host copy of `buf` (f32), then `buf` replaced by the result.
    fn through_host(
        &mut self,
        op: &'static str,
        buf: &mut Tensor,
        f: impl FnOnce(&mut dyn Communicator<Buffer = [f32]>, &mut [f32]) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let backend = |e: candle_core::Error| CommError::Backend(format!("{op}: {e}"));
        let (shape, dtype, device) = (buf.shape().clone(), buf.dtype(), buf.device().clone());
        let mut host = buf
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(backend)?;
        f(self.inner.as_mut(), &mut host)?;
        *buf = Tensor::from_vec(host, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(&device))
            .map_err(backend)?;
        Ok(())
    }
}

impl Communicator for HostTensorComm {
    type Buffer = Tensor;

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CommError> {
        self.through_host("all_reduce_sum", buf, |c, b| c.all_reduce_sum(b))
    }

    fn broadcast(&mut self, buf: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.through_host("broadcast", buf, |c, b| c.broadcast(b, root))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.inner.barrier()
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(CpuCommunicator) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = CpuCommunicator::group(world, timeout)
            .into_iter()
            .map(|c| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_for_any_size() {
        for world in [1, 2, 3, 4] {
            // Sizes around the slot boundary, and many calls to cycle the buffer sets.
            for n in [1, 576, SLOT_FLOATS - 1, SLOT_FLOATS, SLOT_FLOATS * 2 + 3] {
                let out = run_group(world, Duration::from_secs(10), move |mut c| {
                    let r = c.rank();
                    let mut results = Vec::new();
                    for call in 0..3 {
                        let mut buf: Vec<f32> = (0..n)
                            .map(|i| (r + 1) as f32 * 0.1 + (i % 7) as f32 + call as f32)
                            .collect();
                        c.all_reduce_sum(&mut buf).unwrap();
                        results.push(buf);
                    }
                    results
                });
                for call in 0..3 {
                    let expected: Vec<f32> = (0..n)
                        .map(|i| {
                            let mut s = 0f32;
                            for r in 0..world {
                                let v = (r + 1) as f32 * 0.1 + (i % 7) as f32 + call as f32;
                                s = if r == 0 { v } else { s + v };
                            }
                            s
                        })
                        .collect();
                    for (rank, res) in out.iter().enumerate() {
                        assert_eq!(res[call], expected, "world {world} n {n} rank {rank}");
                    }
                }
            }
        }
    }

    #[test]
    fn broadcast_and_barrier_interleave_with_all_reduce() {
        let out = run_group(3, Duration::from_secs(10), |mut c| {
            let r = c.rank();
            let mut b = vec![r as f32; SLOT_FLOATS + 5];
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            let mut s = vec![1.0f32; 10];
            c.all_reduce_sum(&mut s).unwrap();
            (b, s)
        });
        for (b, s) in out {
            assert!(b.iter().all(|&x| x == 2.0));
            assert_eq!(s, vec![3.0; 10]);
        }
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let mut comms = CpuCommunicator::group(2, Duration::from_millis(200));
        let _absent = comms.pop();
        let mut c = comms.pop().unwrap();
        let t = Instant::now();
        let err = c.all_reduce_sum(&mut [1.0, 2.0]).unwrap_err();
        assert!(matches!(err, CommError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // The group stays failed.
        assert!(matches!(
            c.barrier().unwrap_err(),
            CommError::Aborted { .. }
        ));
    }

    #[test]
    fn abort_wakes_waiting_ranks() {
        let mut comms = CpuCommunicator::group(3, Duration::from_secs(60));
        let failing = comms.pop().unwrap();
        let waiters: Vec<_> = comms
            .into_iter()
            .map(|mut c| std::thread::spawn(move || c.all_reduce_sum(&mut [1.0])))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        failing.abort("injected");
        for w in waiters {
            let err = w.join().unwrap().unwrap_err();
            assert_eq!(
                err,
                CommError::Aborted {
                    rank: 2,
                    reason: "injected".into()
                }
            );
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error_on_every_rank() {
        let out = run_group(2, Duration::from_secs(10), |mut c| {
            let mut b = vec![0.0; 3 + c.rank()];
            c.all_reduce_sum(&mut b)
        });
        for r in out {
            assert!(matches!(
                r,
                Err(CommError::Size { .. }) | Err(CommError::Aborted { .. })
            ));
        }
    }

    #[test]
    fn all_reduce_and_broadcast_of_tensors_over_the_cpu_communicator() {
        let comms = CpuCommunicator::group(3, Duration::from_secs(30));
        let threads: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut t = super::HostTensorComm::new(Box::new(c));
                    let mut x = Tensor::new(&[[r, 1.0], [2.0 * r, -r]], &Device::Cpu).unwrap();
                    t.all_reduce_sum(&mut x).unwrap();
                    let mut b = Tensor::new(&[r + 10.0], &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap();
                    t.broadcast(&mut b, 2).unwrap();
                    assert_eq!(b.dtype(), DType::BF16);
                    let b = b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    (x.to_vec2::<f32>().unwrap(), b)
                })
            })
            .collect();
        for th in threads {
            let (x, b) = th.join().unwrap();
            assert_eq!(x, vec![vec![3.0, 3.0], vec![6.0, -3.0]]);
            assert_eq!(b, vec![12.0]);
        }
    }
}
