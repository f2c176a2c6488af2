//! One scheduler task per worker group: it owns the group's queue and running batch
//! ([`State`]) and drives the iteration loop — sweep cancelled / expired requests
//! (`Release` on the worker), plan one step, send one `Step` RPC, fan the results out.
//! The [`SchedulerHandle`] is how the rest of the coordinator submits requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use shardline_proto::worker::v1::ReleaseRequest;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::queue::{Limits, State};
use crate::request::Entry;

/// Load figures a scheduler publishes for the router and admission.
#[derive(Debug, Default)]
pub struct GroupLoad {
    pub waiting: AtomicI64,
    pub waiting_blocks: AtomicI64,
    pub running: AtomicI64,
    pub reserved_blocks: AtomicI64,
    pub kv_blocks_free: AtomicI64,
    pub total_blocks: AtomicI64,
}

impl GroupLoad {
    /// Blocks neither reserved nor wanted by the queue.
    pub fn free_capacity(&self) -> i64 {
        self.total_blocks.load(Ordering::Relaxed)
            - self.reserved_blocks.load(Ordering::Relaxed)
            - self.waiting_blocks.load(Ordering::Relaxed)
    }
}

/// Cloneable handle to a group's scheduler task.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Entry>,
    pub load: Arc<GroupLoad>,
    block_size: u32,
}

impl SchedulerHandle {
    /// Queues a request; gives it back when the scheduler is gone.
    pub fn submit(&self, mut entry: Entry) -> Result<(), Entry> {
        entry.timing = crate::request::Timing {
            submitted: Some(Instant::now()),
            ..Default::default()
        };
        let blocks = entry.blocks_needed(self.block_size) as i64;
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.load
            .waiting_blocks
            .fetch_add(blocks, Ordering::Relaxed);
        self.tx.send(entry).map_err(|e| {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            self.load
                .waiting_blocks
                .fetch_sub(blocks, Ordering::Relaxed);
            e.0
        })
    }
}

/// Why a scheduler stopped.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("step RPC failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("step RPC timed out after {0:?}")]
    Timeout(Duration),
}

/// Everything a scheduler task needs.
pub struct SchedulerTask {
    pub group: String,
    pub limits: Limits,
    pub client: WorkerClient<Channel>,
    pub metrics: Metrics,
    pub step_timeout: Duration,
    pub cancel: CancellationToken,
}

/// What a stopped scheduler hands back: the requests it still held, and why it stopped
/// (`None`: removed or shut down).
pub type Stopped = (Vec<Entry>, Option<SchedulerError>);

/// Starts a scheduler; the join handle yields the requests it still held when it
/// stopped (group failed or removed), to be continued elsewhere.
pub fn spawn(task: SchedulerTask) -> (SchedulerHandle, tokio::task::JoinHandle<Stopped>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let load = Arc::new(GroupLoad::default());
    load.total_blocks
        .store(task.limits.total_blocks as i64, Ordering::Relaxed);
    load.kv_blocks_free
        .store(task.limits.total_blocks as i64, Ordering::Relaxed);
    let handle = SchedulerHandle {
        tx,
        load: load.clone(),
        block_size: task.limits.block_size,
    };
    let join = tokio::spawn(run(task, rx, load));
    (handle, join)
}

/// How often an otherwise idle scheduler re-checks its queue for cancelled requests.
const IDLE_TICK: Duration = Duration::from_millis(50);

async fn run(
    mut task: SchedulerTask,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    load: Arc<GroupLoad>,
) -> Stopped {
    let mut state = State::new(task.limits);
    let g = task.group.clone();
    let labels = [g.as_str()];
    let error = loop {
        while let Ok(entry) = rx.try_recv() {
            state.push(entry);
        }
        if task.cancel.is_cancelled() {
            break None;
        }
        let sweep = state.sweep(Instant::now());
        if !sweep.release.is_empty() {
            let release = task.client.release(ReleaseRequest {
                seq_ids: sweep.release,
            });
            match tokio::time::timeout(task.step_timeout, release).await {
                Ok(Ok(r)) => load
                    .kv_blocks_free
                    .store(r.into_inner().kv_blocks_free as i64, Ordering::Relaxed),
                Ok(Err(status)) => break Some(SchedulerError::Rpc(status)),
                Err(_) => break Some(SchedulerError::Timeout(task.step_timeout)),
            }
        }
        let step = state.next_step();
        publish(&state, &load, &task.metrics, &labels);
        let Some(step) = step else {
            let wake = state
                .next_deadline()
                .map_or(IDLE_TICK, |d| d.saturating_duration_since(Instant::now()));
            let wait = if state.is_idle() {
                Duration::from_secs(3600)
            } else {
                wake.min(IDLE_TICK)
            };
            tokio::select! {
                _ = task.cancel.cancelled() => break None,
                entry = rx.recv() => match entry {
                    Some(entry) => state.push(entry),
                    None => break None,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        };
        let batch = step.decode.len() + step.prefill.len();
        let prompt_tokens: usize = step.prefill.iter().map(|c| c.prompt.len()).sum();
        task.metrics
            .batch_size
            .with_label_values(&labels)
            .observe(batch as f64);
        task.metrics
            .prompt_tokens
            .with_label_values(&labels)
            .inc_by(prompt_tokens as u64);
        let started = std::time::Instant::now();
        let response = tokio::select! {
            _ = task.cancel.cancelled() => break None,
            r = tokio::time::timeout(task.step_timeout, task.client.step(step)) => r,
        };
        let response = match response {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => break Some(SchedulerError::Rpc(status)),
            Err(_) => break Some(SchedulerError::Timeout(task.step_timeout)),
        };
        let rpc = started.elapsed();
        task.metrics
            .step_duration
            .with_label_values(&labels)
            .observe(rpc.as_secs_f64());
        task.metrics
            .step_overhead
            .with_label_values(&labels)
            .observe(
                rpc.saturating_sub(Duration::from_nanos(response.step_time_ns))
                    .as_secs_f64(),
            );
        load.kv_blocks_free
            .store(response.kv_blocks_free as i64, Ordering::Relaxed);
        let applied = state.apply(&response);
        task.metrics
            .generation_tokens
            .with_label_values(&labels)
            .inc_by(applied.tokens as u64);
    };
    // Requests submitted but not yet pulled are handed back too.
    rx.close();
    while let Ok(entry) = rx.try_recv() {
        state.push(entry);
    }
    let leftover = state.drain();
    if error.is_none() && !leftover.is_empty() {
        // Removed deliberately: free whatever still lives on the worker.
        let ids = leftover.iter().map(|e| e.seq_id).collect();
        let _ = tokio::time::timeout(
            task.step_timeout,
            task.client.release(ReleaseRequest { seq_ids: ids }),
        )
        .await;
    }
    for m in [&task.metrics.running, &task.metrics.waiting] {
        let _ = m.remove_label_values(&labels);
    }
    (leftover, error)
}

fn publish(state: &State, load: &GroupLoad, metrics: &Metrics, labels: &[&str]) {
    let waiting = state.num_waiting() as i64;
    load.waiting.store(waiting, Ordering::Relaxed);
    load.waiting_blocks
        .store(state.waiting_blocks() as i64, Ordering::Relaxed);
    load.running
        .store(state.running.len() as i64, Ordering::Relaxed);
    load.reserved_blocks
        .store(state.reserved_blocks() as i64, Ordering::Relaxed);
    metrics.waiting.with_label_values(labels).set(waiting);
    metrics
        .running
        .with_label_values(labels)
        .set(state.running.len() as i64);
    let total = state.limits.total_blocks.max(1) as f64;
    let free = load.kv_blocks_free.load(Ordering::Relaxed) as f64;
    metrics
        .kv_usage
        .with_label_values(labels)
        .set((1.0 - free / total).clamp(0.0, 1.0));
}
