//! [`RankGroup`]: the ranks of one worker group running one step together.
//!
//! Rank 0 runs in the caller's thread (the engine's), ranks 1.. each in a thread of their
//! own; every rank owns its model shard, its KV cache shard (its KV heads of every block)
//! and its communicator. A step's plan reaches the other ranks over an in-process channel
//! as one shared allocation — no second network hop — and only rank 0 returns logits.
//! What a rank is, is a [`GroupRank`]: a [`CpuRank`] (the CPU kernels, a kernel
//! [`Team`] per rank, led by the rank's thread) or a device rank ([`crate::model::device::DeviceRank`], a candle device each).
//!
//! Failure: a rank whose forward errs or panics aborts the group's communicator, so the
//! others leave their collectives at once; a rank that stops answering is caught by the
//! collectives' deadline. Either way the step returns an error and the group stays failed
//! (its KV shards may disagree from then on), which the worker reports as unhealthy.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::kernels::team::Team;
use crate::kv::{BlockId, KvCacheShape, KvStore};
use crate::model::{LlamaModel, StepPlan, TokenPlan};
use crate::tp::cpu::CpuCommunicator;
use crate::tp::{CollectiveStats, Communicator, SingleRank, Timed};

/// A step with owned data, shared by all ranks.
#[derive(Debug, Default)]
pub struct OwnedStep {
    pub tokens: Vec<u32>,
    pub plan: Vec<TokenPlan>,
    pub tables: Vec<Vec<BlockId>>,
    pub logit_rows: Vec<usize>,
}

impl OwnedStep {
    fn run(
        &self,
        model: &LlamaModel,
        kv: &mut KvStore,
        comm: &mut dyn Communicator<Buffer = [f32]>,
    ) -> Result<Vec<f32>, String> {
        let tables: Vec<&[BlockId]> = self.tables.iter().map(Vec::as_slice).collect();
        let step = StepPlan {
            tokens: &self.tokens,
            plan: &self.plan,
            tables: &tables,
            logit_rows: &self.logit_rows,
        };
        model
            .forward_rank(&step, kv, comm)
            .map_err(|e| e.to_string())
    }
}

/// A failure to inject into one rank's next step (tests of the failure path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFailure {
    /// The rank's forward returns an error before its first collective.
    Error,
    /// The rank's forward panics.
    Panic,
    /// The rank stops answering (until the group is aborted by the others' deadline).
    Hang,
}

impl std::str::FromStr for InjectedFailure {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Self::Error),
            "panic" => Ok(Self::Panic),
            "hang" => Ok(Self::Hang),
            _ => Err(format!("unknown failure {s:?}: want error, panic or hang")),
        }
    }
}

/// An armed failure: `kind` after `after` more steps run normally.
#[derive(Debug, Default)]
struct Armed {
    kind: Option<InjectedFailure>,
    after: u64,
}

impl Armed {
    /// The failure this step must show, if its turn has come.
    fn fire(&mut self) -> Option<InjectedFailure> {
        self.kind?;
        if self.after == 0 {
            return self.kind.take();
        }
        self.after -= 1;
        None
    }
}

type Hook = Arc<Mutex<Armed>>;

/// A handle that makes one rank's next step fail; it stays usable after the runner moved
/// into the engine thread.
#[derive(Debug, Clone)]
pub struct FailureInjector {
    hooks: Vec<Hook>,
}

impl FailureInjector {
    /// Makes `rank`'s next step fail the way `kind` says (unknown ranks are ignored).
    pub fn inject(&self, rank: usize, kind: InjectedFailure) {
        self.inject_after(rank, kind, 0);
    }

    /// Makes `rank` fail the way `kind` says once `steps` more steps have run.
    pub fn inject_after(&self, rank: usize, kind: InjectedFailure, steps: u64) {
        if let Some(h) = self.hooks.get(rank) {
            *h.lock().unwrap_or_else(|e| e.into_inner()) = Armed {
                kind: Some(kind),
                after: steps,
            };
        }
    }

    /// Arms `KIND:RANK:STEPS` (`hang:1:20`: rank 1 stops answering in the step after its
    /// first 20).
    pub fn arm(&self, spec: &str) -> Result<(), String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let [kind, rank, steps] = parts[..] else {
            return Err("want KIND:RANK:STEPS".into());
        };
        let kind: InjectedFailure = kind.parse()?;
        let rank: usize = rank.parse().map_err(|e| format!("rank: {e}"))?;
        let steps: u64 = steps.parse().map_err(|e| format!("steps: {e}"))?;
        if rank >= self.hooks.len() {
            return Err(format!(
                "rank {rank}: the group has {} ranks",
                self.hooks.len()
            ));
        }
        tracing::warn!(?kind, rank, steps, "failure injection armed (a test run)");
        self.inject_after(rank, kind, steps);
        Ok(())
    }
}

/// One rank of a [`RankGroup`]: what runs a step's forward on that rank (its model
/// shard, KV shard and communicator). The group adds failure injection, panic catching
/// and the abort of the others around [`GroupRank::forward`].
pub trait GroupRank: Send + 'static {
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// This rank's part of `step`; rank 0 returns the logits of `step.logit_rows`.
    fn forward(&mut self, step: &OwnedStep) -> Result<Vec<f32>, String>;

    /// Aborts the group's collectives (see [`Communicator::abort`]).
    fn abort(&self, reason: &str);

    /// Whether some rank aborted the group.
    fn is_aborted(&self) -> bool;
}

/// A rank on the CPU kernels: its [`LlamaModel`] shard, KV shard and kernel team.
pub struct CpuRank {
    model: LlamaModel,
    kv: KvStore,
    team: Team,
    comm: Box<dyn Communicator<Buffer = [f32]>>,
}

impl CpuRank {
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }
}

impl GroupRank for CpuRank {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn forward(&mut self, step: &OwnedStep) -> Result<Vec<f32>, String> {
        let CpuRank {
            model,
            kv,
            team,
            comm,
        } = self;
        team.install(|| step.run(model, kv, comm.as_mut()))
    }

    fn abort(&self, reason: &str) {
        self.comm.abort(reason);
    }

    fn is_aborted(&self) -> bool {
        self.comm.is_aborted()
    }
}

/// A rank with its failure hook.
struct Slot<R> {
    rank: R,
    hook: Hook,
}

impl<R: GroupRank> Slot<R> {
    /// One step on this rank, errors and panics turned into an abort of the group.
    fn step(&mut self, step: &OwnedStep) -> Result<Vec<f32>, String> {
        let injected = self.hook.lock().unwrap_or_else(|e| e.into_inner()).fire();
        let r = &mut self.rank;
        let rank = r.rank();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match injected {
            Some(InjectedFailure::Error) => Err(format!("rank {rank}: injected error")),
            Some(InjectedFailure::Panic) => panic!("rank {rank}: injected panic"),
            Some(InjectedFailure::Hang) => {
                // Wait for the others to give up on us, as a stuck rank would make them.
                while r.world_size() > 1 && !r.is_aborted() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(format!("rank {rank}: injected hang"))
            }
            None => r.forward(step),
        }));
        let result = match outcome {
            Ok(r) => r,
            Err(panic) => Err(format!("rank {rank} panicked: {}", panic_message(&*panic))),
        };
        if let Err(e) = &result {
            self.rank.abort(e);
        }
        result
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct Peer {
    jobs: Option<mpsc::Sender<Arc<OwnedStep>>>,
    done: mpsc::Receiver<Result<(), String>>,
    hook: Hook,
    thread: Option<JoinHandle<()>>,
}

/// The ranks of one group: [`CpuRank`]s, or device ranks
/// ([`crate::model::device::DeviceRank`]).
pub struct RankGroup<R: GroupRank = CpuRank> {
    rank0: Slot<R>,
    peers: Vec<Peer>,
    timeout: Duration,
    failed: Option<String>,
    /// Rank 0's collectives (zero at tp 1, where there are none).
    collectives: Arc<CollectiveStats>,
}

impl<R: GroupRank> std::fmt::Debug for RankGroup<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankGroup")
            .field("world", &(self.peers.len() + 1))
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl RankGroup<CpuRank> {
    /// Starts one rank per shard (`shards[r]` is rank `r`'s model), each with a KV cache
    /// of `cache`'s blocks for its own KV heads and `threads_per_rank` model threads.
    /// Collectives give up after `timeout`.
    pub fn start(
        shards: Vec<LlamaModel>,
        cache: KvCacheShape,
        threads_per_rank: usize,
        timeout: Duration,
    ) -> Result<Self, String> {
        let world = shards.len();
        if world == 0 {
            return Err("a group needs at least one rank".into());
        }
        let collectives = Arc::new(CollectiveStats::default());
        let mut comms: Vec<Box<dyn Communicator<Buffer = [f32]>>> = if world == 1 {
            vec![Box::new(SingleRank)]
        } else {
            CpuCommunicator::group(world, timeout)
                .into_iter()
                .enumerate()
                .map(|(r, c)| match r {
                    0 => Box::new(Timed::new(Box::new(c), collectives.clone()))
                        as Box<dyn Communicator<Buffer = [f32]>>,
                    _ => Box::new(c) as Box<dyn Communicator<Buffer = [f32]>>,
                })
                .collect()
        };
        let mut ranks = Vec::with_capacity(world);
        for (r, (model, comm)) in shards.into_iter().zip(comms.drain(..)).enumerate() {
            let cfg = &model.cfg;
            let kv = KvStore::with_dtype(
                cfg.num_layers,
                cache.num_blocks,
                cache.block_size,
                model.part.kv_heads.len(),
                cfg.head_dim,
                cache.dtype,
            );
            let team = Team::new(threads_per_rank, &format!("shardline-rank{r}"));
            ranks.push(CpuRank {
                model,
                kv,
                team,
                comm,
            });
        }
        let mut group = Self::from_ranks(ranks, timeout)?;
        group.collectives = collectives;
        Ok(group)
    }

    /// Rank 0's shard (the whole model when `world == 1`).
    pub fn model(&self) -> &LlamaModel {
        &self.rank0.rank.model
    }
}

impl<R: GroupRank> RankGroup<R> {
    /// Starts a group over `ranks` (`ranks[r]` is rank `r`, already holding its
    /// communicator): rank 0 stays with the caller, the others get a thread each. Steps of
    /// the others are awaited for `timeout` (plus a second) after rank 0's.
    pub fn from_ranks(ranks: Vec<R>, timeout: Duration) -> Result<Self, String> {
        let world = ranks.len();
        if world == 0 {
            return Err("a group needs at least one rank".into());
        }
        for (r, rank) in ranks.iter().enumerate() {
            if rank.rank() != r || rank.world_size() != world {
                return Err(format!(
                    "rank {r} of {world} holds the communicator of rank {} of {}",
                    rank.rank(),
                    rank.world_size()
                ));
            }
        }
        let mut it = ranks.into_iter().map(|rank| Slot {
            rank,
            hook: Hook::default(),
        });
        let rank0 = it.next().ok_or("no rank 0")?;
        let mut peers = Vec::with_capacity(world - 1);
        for (i, mut rank) in it.enumerate() {
            let (jobs_tx, jobs_rx) = mpsc::channel::<Arc<OwnedStep>>();
            let (done_tx, done_rx) = mpsc::channel();
            let hook = Arc::clone(&rank.hook);
            let thread = std::thread::Builder::new()
                .name(format!("shardline-rank{}", i + 1))
                .spawn(move || {
                    while let Ok(step) = jobs_rx.recv() {
                        let r = rank.step(&step).map(|_| ());
                        if done_tx.send(r).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| format!("rank {} thread: {e}", i + 1))?;
            peers.push(Peer {
                jobs: Some(jobs_tx),
                done: done_rx,
                hook,
                thread: Some(thread),
            });
        }
        Ok(RankGroup {
            rank0,
            peers,
            timeout,
            failed: None,
            collectives: Arc::default(),
        })
    }

    pub fn world_size(&self) -> usize {
        self.peers.len() + 1
    }

    /// Rank 0.
    pub fn rank0(&self) -> &R {
        &self.rank0.rank
    }

    /// Rank 0's collective figures (the group's metrics).
    pub fn collectives(&self) -> &CollectiveStats {
        &self.collectives
    }

    /// Counts rank 0's collectives into `stats` (its communicator must be a [`Timed`]
    /// over the same stats).
    pub fn set_collectives(&mut self, stats: Arc<CollectiveStats>) {
        self.collectives = stats;
    }

    /// `Err` once a step failed; the group does not recover.
    pub fn healthy(&self) -> Result<(), String> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// A handle for tests of the failure path.
    pub fn failure_injector(&self) -> FailureInjector {
        let mut hooks = vec![Arc::clone(&self.rank0.hook)];
        hooks.extend(self.peers.iter().map(|p| Arc::clone(&p.hook)));
        FailureInjector { hooks }
    }

    /// Runs `step` on every rank; rank 0's logits.
    pub fn forward(&mut self, step: OwnedStep) -> Result<Vec<f32>, String> {
        if let Some(e) = &self.failed {
            return Err(format!("tensor-parallel group failed earlier: {e}"));
        }
        let step = Arc::new(step);
        let mut first_error: Option<String> = None;
        for (i, p) in self.peers.iter().enumerate() {
            let sent = p
                .jobs
                .as_ref()
                .is_some_and(|tx| tx.send(Arc::clone(&step)).is_ok());
            if !sent {
                first_error.get_or_insert(format!("rank {} is gone", i + 1));
                self.rank0.rank.abort(&format!("rank {} is gone", i + 1));
            }
        }
        let own = self.rank0.step(&step);
        // Peers finish within the collectives' deadline once rank 0 is done (or failed).
        let wait = self.timeout + Duration::from_secs(1);
        for (i, p) in self.peers.iter().enumerate() {
            match p.done.recv_timeout(wait) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(format!("rank {} did not finish the step", i + 1));
                }
            }
        }
        // Rank 0's error names the rank that aborted the group and why.
        let result = match (own, first_error) {
            (Ok(logits), None) => Ok(logits),
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "tensor-parallel step failed; the group is unhealthy");
            self.failed = Some(e.clone());
        }
        result
    }
}

impl<R: GroupRank> Drop for RankGroup<R> {
    fn drop(&mut self) {
        self.rank0.rank.abort("the group is shutting down");
        for p in &mut self.peers {
            p.jobs.take();
        }
        for p in &mut self.peers {
            if let Some(t) = p.thread.take() {
                // A rank stuck outside the collectives is left behind rather than joined.
                if t.is_finished() || self.failed.is_none() {
                    let _ = t.join();
                }
            }
        }
    }
}
