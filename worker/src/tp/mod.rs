//! Tensor parallelism: how the ranks of one worker group talk to each other.
//!
//! A group runs one model over `world` ranks (threads of one process). Each rank owns a
//! column/row shard of every projection and its KV heads ([`RankPart`]); after the two
//! row-parallel projections of a layer (o_proj, down) the ranks sum their partial outputs
//! with a [`Communicator`]'s all-reduce. This module knows nothing of the model: cutting
//! a model into shards is `model::shard`, running a step over the rank threads
//! `model::group`.
//!
//! - [`cpu`]: ranks on CPU cores sharing memory ([`cpu::CpuCommunicator`]).
//! - [`part`]: [`RankPart`], what one rank owns.
//! - `nccl` (feature `cuda`): ranks on GPUs, NCCL through candle-core's bindings.
//!
//! Every collective has a deadline: a rank that errors, panics or hangs fails the whole
//! group's step with [`CommError`] instead of leaving the others waiting.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod part;

pub use part::RankPart;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Collective operations between the ranks of one group. One value per rank thread;
/// a communicator is `Send` (it moves to its rank's thread) but never shared.
pub trait Communicator: Send {
    /// What the collectives operate on: `[f32]` in host memory for [`cpu`], a device
    /// buffer for NCCL.
    type Buffer: ?Sized;

    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`.
    /// Every rank must pass the same length.
    fn all_reduce_sum(&mut self, buf: &mut Self::Buffer) -> Result<(), CommError>;

    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast(&mut self, buf: &mut Self::Buffer, root: usize) -> Result<(), CommError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError>;

    /// Marks the group failed: every rank waiting in (or later entering) a collective
    /// returns [`CommError::Aborted`]. Called by a rank that errs or panics mid-step.
    fn abort(&self, reason: &str);

    /// Whether some rank aborted the group.
    fn is_aborted(&self) -> bool {
        false
    }
}

/// Why a collective did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("{op}: not every rank arrived within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("rank {rank} failed: {reason}")]
    Aborted { rank: usize, reason: String },
    #[error("{op}: rank {rank} passed {got} elements, rank 0 passed {expected}")]
    Size {
        op: &'static str,
        rank: usize,
        expected: usize,
        got: usize,
    },
    #[error("{0}")]
    Backend(String),
}

/// How many collectives a rank ran, for how long, and how many failed; shared between
/// the rank's [`Timed`] communicator and the metrics endpoint.
#[derive(Debug, Default)]
pub struct CollectiveStats {
    calls: AtomicU64,
    nanos: AtomicU64,
    failures: AtomicU64,
}

impl CollectiveStats {
    /// Collectives run, seconds spent in them, failures.
    pub fn snapshot(&self) -> (u64, f64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
            self.failures.load(Ordering::Relaxed),
        )
    }

    fn record<T>(&self, started: Instant, result: Result<T, CommError>) -> Result<T, CommError> {
        let nanos = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// A communicator whose collectives are timed and counted into [`CollectiveStats`]
/// (rank 0's: the group's metrics). Two clock reads per collective.
pub struct Timed<B: ?Sized + 'static> {
    inner: Box<dyn Communicator<Buffer = B>>,
    stats: Arc<CollectiveStats>,
}

impl<B: ?Sized + 'static> Timed<B> {
    pub fn new(inner: Box<dyn Communicator<Buffer = B>>, stats: Arc<CollectiveStats>) -> Self {
        Timed { inner, stats }
    }
}

impl<B: ?Sized + 'static> Communicator for Timed<B> {
    type Buffer = B;

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&mut self, buf: &mut B) -> Result<(), CommError> {
        let started = Instant::now();
        let result = self.inner.all_reduce_sum(buf);
        self.stats.record(started, result)
    }

    fn broadcast(&mut self, buf: &mut B, root: usize) -> Result<(), CommError> {
        let started = Instant::now();
        let result = self.inner.broadcast(buf, root);
        self.stats.record(started, result)
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let started = Instant::now();
        let result = self.inner.barrier();
        self.stats.record(started, result)
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

/// The trivial group of one rank: collectives are no-ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    type Buffer = [f32];

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }

    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<(), CommError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }

    fn abort(&self, _reason: &str) {}
}
