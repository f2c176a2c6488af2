//! One scheduler task per worker group: it owns the group's queue and running batch
//! ([`State`]) and drives the iteration loop over one `Steps` stream to the worker —
//! sweep cancelled / expired requests (released in the next step), plan a step, send it,
//! fan the answers out.
//!
//! Steps are pipelined: up to [`PIPELINE_DEPTH`] are in flight, so the plan of step N+1
//! is on the worker before step N ends and the worker starts it at once; the answer to N
//! is folded in while N+1 runs. A broken stream, an error status or an answer later than
//! `--step-timeout-s` fails the group (its requests migrate).
//! The [`SchedulerHandle`] is how the rest of the coordinator submits requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use std::collections::VecDeque;

use shardline_proto::worker::v1::worker_client::WorkerClient;
use shardline_proto::worker::v1::{StepRequest, StepResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
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
    /// The group's id, for the requests' queue spans.
    group: Arc<str>,
    pub load: Arc<GroupLoad>,
    limits: Limits,
}

impl SchedulerHandle {
    /// Queues a request; gives it back when the scheduler is gone.
    // The entry comes back whole to be routed elsewhere (rare); boxing it would cost an
    // allocation on every submit instead.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, mut entry: Entry) -> Result<(), Entry> {
        entry.timing = crate::request::Timing {
            submitted: Some(Instant::now()),
            ..Default::default()
        };
        entry.phases.queued(&entry.request.span, &self.group);
        let blocks = entry.start_blocks(&self.limits) as i64;
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
    #[error("step stream failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("step stream closed by the worker")]
    Closed,
    #[error("no step answer within {0:?}")]
    Timeout(Duration),
}

/// Steps a scheduler keeps in flight on its stream: the one running on the worker and
/// the next one, queued behind it.
pub const PIPELINE_DEPTH: usize = 2;

/// A step sent and not answered yet.
struct InFlight {
    sent: std::time::Instant,
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
        group: task.group.as_str().into(),
        load: load.clone(),
        limits: task.limits,
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
    let series = Series::new(&task.metrics, &labels);
    let (steps, requests) = mpsc::channel::<StepRequest>(PIPELINE_DEPTH + 1);
    let requests = step_stream(ReceiverStream::new(requests), &g);
    let opened = tokio::select! {
        _ = task.cancel.cancelled() => None,
        r = tokio::time::timeout(task.step_timeout, task.client.steps(requests)) => Some(r),
    };
    let mut answers = match opened {
        None => return handback(&mut rx, &mut state, &task, None, &labels, None).await,
        Some(Ok(Ok(r))) => r.into_inner(),
        Some(Ok(Err(status))) => {
            let e = Some(SchedulerError::Rpc(status));
            return handback(&mut rx, &mut state, &task, e, &labels, None).await;
        }
        Some(Err(_)) => {
            let e = Some(SchedulerError::Timeout(task.step_timeout));
            return handback(&mut rx, &mut state, &task, e, &labels, None).await;
        }
    };
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(PIPELINE_DEPTH);
    let mut release: Vec<u64> = Vec::new();
    // When the worker started on the step whose answer comes next: the previous answer's
    // arrival (it queued behind that step), or its send time if later.
    let mut last_answer = std::time::Instant::now();
    let error = loop {
        while let Ok(entry) = rx.try_recv() {
            state.push(entry);
        }
        if task.cancel.is_cancelled() {
            break None;
        }
        release.extend(state.sweep(Instant::now()).release);
        // Keep the pipeline full: plan and send until PIPELINE_DEPTH steps are in flight.
        let mut send_failed = false;
        while in_flight.len() < PIPELINE_DEPTH {
            let step = state.next_step();
            if step.is_none() && release.is_empty() {
                break;
            }
            let mut step = step.unwrap_or_default();
            step.release = std::mem::take(&mut release);
            let batch = step.decode.len() + step.prefill.len();
            if batch > 0 {
                let prompt_tokens: usize = step.prefill.iter().map(|c| c.prompt.len()).sum();
                series.batch_size.observe(batch as f64);
                series.prompt_tokens.inc_by(prompt_tokens as u64);
            }
            if steps.send(step).await.is_err() {
                send_failed = true;
                break;
            }
            in_flight.push_back(InFlight {
                sent: std::time::Instant::now(),
            });
        }
        publish(&state, &load, &series);
        if send_failed {
            break Some(SchedulerError::Closed);
        }
        let Some(oldest) = in_flight.front() else {
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
        let deadline = Instant::from_std(oldest.sent + task.step_timeout);
        // A new request while the pipeline is not full is planned into the next step at
        // once; otherwise wait for the oldest answer.
        let full = in_flight.len() >= PIPELINE_DEPTH;
        let answer = tokio::select! {
            _ = task.cancel.cancelled() => break None,
            entry = rx.recv(), if !full => match entry {
                Some(entry) => {
                    state.push(entry);
                    continue;
                }
                None => break None,
            },
            a = tokio::time::timeout_at(deadline, answers.message()) => a,
        };
        let response = match answer {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => break Some(SchedulerError::Closed),
            Ok(Err(status)) => break Some(SchedulerError::Rpc(status)),
            Err(_) => break Some(SchedulerError::Timeout(task.step_timeout)),
        };
        let sent = in_flight
            .pop_front()
            .expect("an answer arrived for a step in flight; this is a bug")
            .sent;
        let now = std::time::Instant::now();
        let began = last_answer.max(sent);
        last_answer = now;
        observe_step(&series, now - began, &response);
        load.kv_blocks_free
            .store(response.kv_blocks_free as i64, Ordering::Relaxed);
        let applied = state.apply(&response);
        series.generation_tokens.inc_by(applied.tokens as u64);
        if applied.prompt_tokens > 0 {
            series
                .prefix_cache_queries
                .inc_by(applied.prompt_tokens as u64);
            series
                .prefix_cache_hits
                .inc_by(applied.cached_tokens as u64);
        }
        if applied.preempted > 0 {
            task.metrics
                .preemptions
                .with_label_values(&labels)
                .inc_by(applied.preempted as u64);
        }
    };
    let stream = error.is_none().then_some((steps, &mut answers));
    handback(&mut rx, &mut state, &task, error, &labels, stream).await
}

/// The request that opens a group's step stream. When traces are exported its metadata
/// carries the `traceparent` of a span for the opening, which the worker's step spans
/// continue (each step also links to the requests it serves).
fn step_stream(
    steps: ReceiverStream<StepRequest>,
    group: &str,
) -> tonic::Request<ReceiverStream<StepRequest>> {
    let mut request = tonic::Request::new(steps);
    if shardline_telemetry::exporting() {
        let span =
            tracing::info_span!(target: shardline_telemetry::TRACE_ONLY, "open step stream", group);
        if let Some(value) = shardline_telemetry::traceparent(&span).and_then(|t| t.parse().ok()) {
            request
                .metadata_mut()
                .insert(shardline_telemetry::TRACEPARENT, value);
        }
    }
    request
}

/// The step's time as the coordinator saw it (from when the worker could start on it to
/// its answer) and what of that the worker did not report as its own.
fn observe_step(series: &Series, took: Duration, response: &StepResponse) {
    series.step_duration.observe(took.as_secs_f64());
    series.step_overhead.observe(
        took.saturating_sub(Duration::from_nanos(response.step_time_ns))
            .as_secs_f64(),
    );
}

/// Ends a scheduler: every request it held goes back to the caller (requests submitted
/// but not yet pulled too). Removed deliberately (`stream` still open), whatever still
/// lives on the worker is released in a last message.
async fn handback(
    rx: &mut mpsc::UnboundedReceiver<Entry>,
    state: &mut State,
    task: &SchedulerTask,
    error: Option<SchedulerError>,
    labels: &[&str],
    stream: Option<(mpsc::Sender<StepRequest>, &mut Streaming<StepResponse>)>,
) -> Stopped {
    rx.close();
    while let Ok(entry) = rx.try_recv() {
        state.push(entry);
    }
    state.forget_in_flight();
    let leftover = state.drain();
    if let Some((steps, answers)) = stream
        && !leftover.is_empty()
    {
        let ids = leftover.iter().map(|e| e.seq_id).collect();
        let release = StepRequest {
            release: ids,
            ..Default::default()
        };
        let _ = tokio::time::timeout(task.step_timeout, async {
            if steps.send(release).await.is_ok() {
                drop(steps);
                // The worker answers what is queued, the release last, then ends.
                while let Ok(Some(_)) = answers.message().await {}
            }
        })
        .await;
    }
    for m in [&task.metrics.running, &task.metrics.waiting] {
        let _ = m.remove_label_values(labels);
    }
    (leftover, error)
}

fn publish(state: &State, load: &GroupLoad, series: &Series) {
    let waiting = state.num_waiting() as i64;
    load.waiting.store(waiting, Ordering::Relaxed);
    load.waiting_blocks
        .store(state.waiting_blocks() as i64, Ordering::Relaxed);
    load.running
        .store(state.running.len() as i64, Ordering::Relaxed);
    load.reserved_blocks
        .store(state.reserved_blocks() as i64, Ordering::Relaxed);
    series.waiting.set(waiting);
    series.running.set(state.running.len() as i64);
    let total = state.limits.total_blocks.max(1) as f64;
    let free = load.kv_blocks_free.load(Ordering::Relaxed) as f64;
    series.kv_usage.set((1.0 - free / total).clamp(0.0, 1.0));
}

/// The group's series of the coordinator's per-group metrics, looked up once rather than
/// by label on every step. (Preemptions are rare and looked up when they happen, so a
/// group that never preempts exports no series for them.)
struct Series {
    running: prometheus::IntGauge,
    waiting: prometheus::IntGauge,
    kv_usage: prometheus::Gauge,
    batch_size: prometheus::Histogram,
    prompt_tokens: prometheus::IntCounter,
    generation_tokens: prometheus::IntCounter,
    step_duration: prometheus::Histogram,
    step_overhead: prometheus::Histogram,
    prefix_cache_queries: prometheus::IntCounter,
    prefix_cache_hits: prometheus::IntCounter,
}

impl Series {
    fn new(metrics: &Metrics, labels: &[&str]) -> Series {
        Series {
            running: metrics.running.with_label_values(labels),
            waiting: metrics.waiting.with_label_values(labels),
            kv_usage: metrics.kv_usage.with_label_values(labels),
            batch_size: metrics.batch_size.with_label_values(labels),
            prompt_tokens: metrics.prompt_tokens.with_label_values(labels),
            generation_tokens: metrics.generation_tokens.with_label_values(labels),
            step_duration: metrics.step_duration.with_label_values(labels),
            step_overhead: metrics.step_overhead.with_label_values(labels),
            prefix_cache_queries: metrics.prefix_cache_queries.with_label_values(labels),
            prefix_cache_hits: metrics.prefix_cache_hits.with_label_values(labels),
        }
    }
}
