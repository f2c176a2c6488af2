//! The serving engine: an actor that owns the [`ModelRunner`] on its own OS thread.
//!
//! [`EngineHandle`] is the cloneable front: each call sends an [`EngineCommand`] over a
//! bounded channel and awaits the reply on a oneshot. The thread runs one command at a
//! time against [`EngineState`], which holds every live sequence. The gRPC service only
//! converts messages and calls the handle.
//!
//! A panic inside the model does not take the process down: the step fails with
//! [`EngineError::Failed`], the engine refuses further steps and `Health` reports it.
//! [`EngineHandle::failed`] resolves then, so the worker can leave the cluster.

mod constraint;
mod seq;
mod state;

use std::panic::AssertUnwindSafe;

use shardline_proto::worker::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

pub use state::{EngineConfig, EngineCounters, EngineState, EngineStatus, Released};

use crate::runner::{ModelRunner, RunnerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped")]
    Closed,
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error("the engine failed and refuses work: {0}")]
    Failed(String),
    #[error("cannot start the engine thread: {0}")]
    Spawn(std::io::Error),
}

/// What the worker reports about its model in `Info`, besides the runner's own facts.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    pub tokenizer_json: String,
    pub chat_template: String,
    /// Tokens that end generation (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    pub bos_token: String,
    pub eos_token: String,
    pub add_bos: bool,
}

/// Requests the engine thread serves.
pub enum EngineCommand {
    Step(
        pb::StepRequest,
        oneshot::Sender<Result<pb::StepResponse, EngineError>>,
    ),
    Release(Vec<u64>, oneshot::Sender<Released>),
    /// Release the sequences no step has named for this long; replies with their ids.
    ReleaseIdle(std::time::Duration, oneshot::Sender<Vec<u64>>),
    Info(oneshot::Sender<pb::InfoResponse>),
    Status(oneshot::Sender<EngineStatus>),
}

/// Cloneable front of the engine thread. The thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<EngineCommand>,
    /// The engine's health after its last command.
    health: watch::Receiver<Result<(), String>>,
}

/// Commands waiting for the engine; each coordinator keeps at most a couple of steps in
/// flight per group, so a short queue is plenty and pushes back on misbehaving clients.
const QUEUE: usize = 64;

/// The answer to a step, once the engine has run it.
pub type StepReply = oneshot::Receiver<Result<pb::StepResponse, EngineError>>;

impl EngineHandle {
    /// Starts the engine thread around `runner`.
    pub fn spawn(
        runner: Box<dyn ModelRunner>,
        config: EngineConfig,
    ) -> Result<(Self, std::thread::JoinHandle<()>), EngineError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let state = EngineState::new(runner, config);
        let (health_tx, health) = watch::channel(state.healthy());
        let join = std::thread::Builder::new()
            .name("shardline-engine".into())
            .spawn(move || run_engine(state, rx, health_tx))
            .map_err(EngineError::Spawn)?;
        Ok((Self { tx, health }, join))
    }

    /// Resolves with the reason once the engine has failed for good (a panic in the
    /// model, a failed tensor-parallel group) or its thread is gone.
    pub async fn failed(&self) -> String {
        let mut health = self.health.clone();
        match health.wait_for(Result::is_err).await {
            Ok(h) => h.clone().err().unwrap_or_default(),
            Err(_) => "the engine thread has stopped".into(),
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> EngineCommand,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Closed)?;
        rx.await.map_err(|_| EngineError::Closed)
    }

    /// One forward over a mixed batch (prefill chunks and decode sequences).
    pub async fn step(&self, req: pb::StepRequest) -> Result<pb::StepResponse, EngineError> {
        self.submit(req)
            .await?
            .await
            .map_err(|_| EngineError::Closed)?
    }

    /// Queues a step and returns at once (once the queue has room) with its pending
    /// answer: steps queued back to back run back to back, which is how the step stream
    /// pipelines them.
    pub async fn submit(&self, req: pb::StepRequest) -> Result<StepReply, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EngineCommand::Step(req, reply))
            .await
            .map_err(|_| EngineError::Closed)?;
        Ok(rx)
    }

    /// Drops sequences (unknown ids ignored).
    pub async fn release(&self, ids: Vec<u64>) -> Result<Released, EngineError> {
        self.call(|r| EngineCommand::Release(ids, r)).await
    }

    /// Releases the sequences no step has named for `idle` (abandoned by a coordinator
    /// that crashed); their ids.
    pub async fn release_idle(&self, idle: std::time::Duration) -> Result<Vec<u64>, EngineError> {
        self.call(|r| EngineCommand::ReleaseIdle(idle, r)).await
    }

    pub async fn info(&self) -> Result<pb::InfoResponse, EngineError> {
        self.call(EngineCommand::Info).await
    }

    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        self.call(EngineCommand::Status).await
    }
}

fn run_engine(
    mut state: EngineState,
    mut rx: mpsc::Receiver<EngineCommand>,
    health: watch::Sender<Result<(), String>>,
) {
    while let Some(cmd) = rx.blocking_recv() {
        let changes_health = matches!(
            cmd,
            EngineCommand::Step(..) | EngineCommand::Release(..) | EngineCommand::ReleaseIdle(..)
        );
        match cmd {
            EngineCommand::Step(req, reply) => {
                let out = std::panic::catch_unwind(AssertUnwindSafe(|| state.step(req)));
                let out = out.unwrap_or_else(|panic| {
                    let msg = panic_message(panic.as_ref());
                    tracing::error!(%msg, "model panicked during a step");
                    state.poison(format!("model panicked: {msg}"));
                    Err(EngineError::Failed(format!("model panicked: {msg}")))
                });
                // The caller may have gone (client cancelled): nothing to do.
                let _ = reply.send(out);
            }
            EngineCommand::Release(ids, reply) => {
                if let Some(released) = releasing(&mut state, |s| s.release(&ids)) {
                    let _ = reply.send(released);
                }
            }
            EngineCommand::ReleaseIdle(idle, reply) => {
                let now = std::time::Instant::now();
                if let Some(ids) = releasing(&mut state, |s| s.release_idle(now, idle)) {
                    let _ = reply.send(ids);
                }
            }
            EngineCommand::Info(reply) => {
                let _ = reply.send(state.info());
            }
            EngineCommand::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        // Once failed, the engine stays failed: only the first failure is sent.
        if changes_health
            && health.borrow().is_ok()
            && let Err(e) = state.healthy()
        {
            let _healthy_before = health.send_replace(Err(e));
        }
    }
}

/// Runs a release on `state`; a panic inside the runner poisons the engine (and drops
/// the reply, which the caller sees as a closed engine).
fn releasing<T>(state: &mut EngineState, f: impl FnOnce(&mut EngineState) -> T) -> Option<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| f(state))) {
        Ok(v) => Some(v),
        Err(panic) => {
            let msg = panic_message(panic.as_ref());
            state.poison(format!("model panicked in release: {msg}"));
            None
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
