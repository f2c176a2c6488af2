//! The `shardline.worker.v1.Worker` gRPC service: converts messages and calls the
//! [`EngineHandle`].
//!
//! `Steps` is one bidirectional stream per coordinator. Each request is queued on the
//! engine as soon as it arrives, so a coordinator that sends step N+1 while N runs has
//! N+1 start the moment N ends; answers go back in request order. A stream ends when the
//! coordinator closes it, when a step fails engine-wide (the error status ends it) or when
//! the server stops (`UNAVAILABLE`, so graceful shutdown never waits on a coordinator).
//! The sequences a stream started belong to it: when it ends, whichever way, those still
//! alive are released at once (after the steps it had queued), so a coordinator that
//! crashed or lost its connection does not hold KV blocks until the idle timeout. A
//! connection that goes silent without closing (the coordinator's machine vanished) is
//! found by HTTP/2 keepalive pings ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]) and
//! closed. A coordinator never continues a sequence on another stream: a broken stream
//! is a failed group, whose requests continue elsewhere.
//!
//! Per-sequence problems (bad prompt, unknown id, no KV room) come back inside the
//! `StepResponse` as a per-sequence status, so one bad sequence never fails the batch;
//! only engine-wide failures become a gRPC status.
//!
//! `Health` reports `sequences_started`: sequences ever registered with the model (a
//! request refused before that, or never sent, does not count).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use shardline_net::tls::Tls;
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_server::{Worker, WorkerServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{EngineError, EngineHandle, StepReply};
use crate::metrics::WorkerMetrics;
use crate::trace::StreamTrace;

/// Largest request the worker accepts (a long prompt in a step is a few MB at most).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Steps of one stream queued on the engine or waiting to be sent back. A coordinator
/// keeps two in flight; the bound pushes back on one that sends more.
const STREAM_PIPELINE: usize = 8;

/// HTTP/2 pings on every connection: one after this long without traffic, and the
/// connection closes when one goes unanswered for [`KEEPALIVE_TIMEOUT`]. A coordinator
/// whose machine vanished (no FIN, no RST) then loses its step streams, and their
/// sequences are released, within about half a minute instead of after the idle timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot read the listener's address: {0}")]
    Addr(std::io::Error),
}

pub struct WorkerService {
    engine: EngineHandle,
    /// Cancelled when the worker starts draining: `Health` says so, tonic-health reports
    /// NOT_SERVING, and new sequences are refused (the coordinator starts them elsewhere).
    draining: CancellationToken,
    /// Cancelled when the server stops: open step streams end with `UNAVAILABLE`.
    stopping: CancellationToken,
    /// Step figures go here as each answer goes back (`--metrics-listen`).
    metrics: Option<WorkerMetrics>,
    /// HTTP/2 keepalive: ping interval and how long a ping may go unanswered.
    keepalive: (Duration, Duration),
}

impl WorkerService {
    pub fn new(engine: EngineHandle, draining: CancellationToken) -> Self {
        Self {
            engine,
            draining,
            stopping: CancellationToken::new(),
            metrics: None,
            keepalive: (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
        }
    }

    /// Pings after `interval` without traffic; closes a connection whose ping goes
    /// unanswered for `timeout` (defaults [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]).
    pub fn with_keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive = (interval, timeout);
        self
    }

    /// Observes every step's answer into `metrics`.
    pub fn with_metrics(mut self, metrics: WorkerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

/// While draining, new sequences (chunks carrying a prompt) are taken out of a step and
/// answered `SEQ_STATUS_OUT_OF_BLOCKS` so the coordinator starts them elsewhere; the
/// running ones go on. Returns the refused ones with their position in the request.
fn refuse_new(req: &mut pb::StepRequest) -> Vec<(usize, u64)> {
    if req.prefill.iter().all(|c| c.prompt.is_empty()) {
        return Vec::new();
    }
    let mut refused = Vec::new();
    let mut kept = Vec::new();
    for (i, c) in std::mem::take(&mut req.prefill).into_iter().enumerate() {
        if c.prompt.is_empty() {
            kept.push(c);
        } else {
            refused.push((i, c.seq_id));
        }
    }
    req.prefill = kept;
    refused
}

/// Puts the refused sequences' answers back at their request positions.
fn answer_refused(resp: &mut pb::StepResponse, refused: Vec<(usize, u64)>) {
    // Ascending original positions: each insert restores request order.
    for (i, seq_id) in refused {
        let result = pb::SeqResult {
            seq_id,
            status: pb::SeqStatus::OutOfBlocks as i32,
            error: "the worker is draining; start the sequence elsewhere".into(),
            ..Default::default()
        };
        resp.results.insert(i.min(resp.results.len()), result);
    }
}

/// One queued step of a stream: the engine's pending answer and the sequences refused
/// while draining.
struct Pending {
    reply: StepReply,
    refused: Vec<(usize, u64)>,
    /// The step's span, when traces are exported.
    span: Option<tracing::Span>,
}

/// The sequences a stream started and that may still be alive on the engine.
#[derive(Default)]
struct StreamSeqs(Mutex<HashSet<u64>>);

impl StreamSeqs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.0.lock().expect("lock poisoned; this is a bug")
    }

    /// A step about to be queued: the sequences it starts join, those it releases leave.
    fn queued(&self, req: &pb::StepRequest) {
        let mut live = self.lock();
        for id in &req.release {
            live.remove(id);
        }
        live.extend(
            req.prefill
                .iter()
                .filter(|c| !c.prompt.is_empty())
                .map(|c| c.seq_id),
        );
    }

    /// A step's answer: the sequences it finished, refused or preempted leave (an
    /// invalid one may still be alive: it stays, and releasing it later costs nothing).
    fn answered(&self, resp: &pb::StepResponse) {
        let mut live = self.lock();
        for r in &resp.results {
            let gone = r.finish_reason != pb::FinishReason::Unspecified as i32
                || r.status == pb::SeqStatus::OutOfBlocks as i32
                || r.status == pb::SeqStatus::Preempted as i32;
            if gone {
                live.remove(&r.seq_id);
            }
        }
    }
}

/// Reads a stream's requests and queues each on the engine at once; once the stream has
/// ended, releases the sequences it started that are still alive.
async fn queue_steps(
    inbound: Streaming<pb::StepRequest>,
    engine: EngineHandle,
    draining: CancellationToken,
    pending: mpsc::Sender<Result<Pending, Status>>,
    trace: Option<Arc<StreamTrace>>,
    seqs: Arc<StreamSeqs>,
) {
    let why = forward_steps(inbound, &engine, draining, pending, trace, &seqs).await;
    let ids: Vec<u64> = seqs.lock().drain().collect();
    if ids.is_empty() {
        return;
    }
    // Queued behind the stream's own steps, so none of them loses a sequence it names.
    match engine.release(ids).await {
        Ok(r) if r.sequences > 0 => tracing::info!(
            sequences = r.sequences,
            kv_blocks_free = r.kv_blocks_free,
            "released the sequences of a step stream that {why}"
        ),
        Ok(_) => {} // the idle timeout or their own ends got there first
        Err(e) => tracing::debug!(error = %e, "cannot release a closed stream's sequences"),
    }
}

/// Queues the stream's requests until it ends; says how it ended.
async fn forward_steps(
    mut inbound: Streaming<pb::StepRequest>,
    engine: &EngineHandle,
    draining: CancellationToken,
    pending: mpsc::Sender<Result<Pending, Status>>,
    trace: Option<Arc<StreamTrace>>,
    seqs: &StreamSeqs,
) -> &'static str {
    loop {
        let req = tokio::select! {
            // The answering side ended (server stopping, failed step, coordinator gone).
            _ = pending.closed() => return "stopped answering",
            r = inbound.message() => r,
        };
        let mut req = match req {
            Ok(Some(req)) => req,
            Ok(None) => return "its coordinator closed",
            Err(status) => {
                tracing::debug!(%status, "a step stream broke");
                return "broke";
            }
        };
        let refused = if draining.is_cancelled() {
            refuse_new(&mut req)
        } else {
            Vec::new()
        };
        let span = trace.as_ref().map(|t| t.step(&req));
        seqs.queued(&req);
        let queued = engine
            .submit(req)
            .await
            .map(|reply| Pending {
                reply,
                refused,
                span,
            })
            .map_err(to_status);
        let failed = queued.is_err();
        if pending.send(queued).await.is_err() {
            return "stopped answering";
        }
        if failed {
            return "failed";
        }
    }
}

/// Sends a stream's answers back in request order until the stream ends.
async fn answer_steps(
    mut pending: mpsc::Receiver<Result<Pending, Status>>,
    out: mpsc::Sender<Result<pb::StepResponse, Status>>,
    stopping: CancellationToken,
    trace: Option<Arc<StreamTrace>>,
    metrics: Option<WorkerMetrics>,
    seqs: Arc<StreamSeqs>,
) {
    loop {
        let next = tokio::select! {
            _ = stopping.cancelled() => Err(Status::unavailable("the worker is stopping")),
            p = pending.recv() => match p {
                None => return,
                Some(Err(status)) => Err(status),
                Some(Ok(p)) => tokio::select! {
                    _ = stopping.cancelled() => Err(Status::unavailable("the worker is stopping")),
                    r = p.reply => match r {
                        Ok(Ok(mut resp)) => {
                            answer_refused(&mut resp, p.refused);
                            seqs.answered(&resp);
                            if let (Some(trace), Some(span)) = (&trace, p.span) {
                                trace.answered(span, &resp);
                            }
                            if let Some(metrics) = &metrics {
                                metrics.observe_step(&resp);
                            }
                            Ok(resp)
                        }
                        Ok(Err(e)) => Err(to_status(e)),
                        Err(_) => Err(to_status(EngineError::Closed)),
                    },
                },
            },
        };
        let failed = next.is_err();
        if out.send(next).await.is_err() || failed {
            return; // the coordinator left, or the stream ends with the error
        }
    }
}

fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::Closed => Status::unavailable(e.to_string()),
        EngineError::Failed(_) => Status::unavailable(e.to_string()),
        EngineError::Runner(_) | EngineError::Spawn(_) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.engine
            .info()
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    type StepsStream = Pin<Box<dyn Stream<Item = Result<pb::StepResponse, Status>> + Send>>;

    async fn steps(
        &self,
        request: Request<Streaming<pb::StepRequest>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let (pending_tx, pending_rx) = mpsc::channel(STREAM_PIPELINE);
        let (out_tx, out_rx) = mpsc::channel(STREAM_PIPELINE);
        let trace = StreamTrace::new(request.metadata());
        let seqs = Arc::new(StreamSeqs::default());
        tokio::spawn(queue_steps(
            request.into_inner(),
            self.engine.clone(),
            self.draining.clone(),
            pending_tx,
            trace.clone(),
            seqs.clone(),
        ));
        tokio::spawn(answer_steps(
            pending_rx,
            out_tx,
            self.stopping.clone(),
            trace,
            self.metrics.clone(),
            seqs,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let draining = self.draining.is_cancelled();
        let (ready, message, free, running, counters) = match self.engine.status().await {
            Ok(s) => {
                let message = match (&s.healthy, draining) {
                    (Err(e), _) => e.clone(),
                    (Ok(()), true) => "draining".to_owned(),
                    (Ok(()), false) => "ok".to_owned(),
                };
                (
                    s.healthy.is_ok() && !draining,
                    message,
                    s.kv_blocks_free,
                    s.num_running,
                    s.counters,
                )
            }
            Err(e) => (false, e.to_string(), 0, 0, Default::default()),
        };
        Ok(Response::new(pb::HealthResponse {
            ready,
            draining,
            message,
            kv_blocks_free: free as u32,
            num_running: running as u32,
            sequences_started: counters.seqs_admitted,
            sequences_preempted: counters.seqs_preempted,
            prompt_tokens_computed: counters.prompt_tokens_computed,
            prompt_tokens_cached: counters.prompt_tokens_cached,
        }))
    }
}

/// Serves the worker API (plus `grpc.health.v1`) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    engine: EngineHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let draining = shutdown.child_token();
    serve_service(
        listener,
        WorkerService::new(engine, draining),
        None,
        shutdown,
    )
    .await
}

/// Connections a worker accepts at once: coordinators hold one or two each.
const WORKER_MAX_CONNECTIONS: usize = 4096;

/// Like [`serve`], with a service whose draining token the caller controls; with `tls`
/// (whose configuration should require client certificates) only over mutual TLS.
pub async fn serve_service(
    listener: TcpListener,
    service: WorkerService,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr: SocketAddr = listener.local_addr().map_err(ServeError::Addr)?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    let draining = service.draining.clone();
    let watch_shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = draining.cancelled() => {
                reporter.set_not_serving::<WorkerServer<WorkerService>>().await;
            }
            _ = watch_shutdown.cancelled() => {}
        }
    });
    match &tls {
        Some(_) => tracing::info!(%addr, "worker gRPC service listening (mutual TLS)"),
        None => tracing::warn!(
            %addr,
            "worker gRPC service listening WITHOUT TLS: anyone who reaches this port can run \
             steps; give --tls-cert, --tls-key and --tls-client-ca outside a trusted network"
        ),
    }
    if let Some(tls) = &tls {
        shardline_net::tls::spawn_reloader(tls.clone(), "worker", shutdown.clone());
    }
    let mut service = service;
    service.stopping = shutdown.clone();
    let (ping_after, ping_timeout) = service.keepalive;
    let worker = WorkerServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(ping_after))
        .http2_keepalive_timeout(Some(ping_timeout))
        .add_service(health_service)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            // Every step answer is a few small HTTP/2 writes: `incoming` sets TCP_NODELAY.
            shardline_net::listen::incoming(
                listener,
                tls,
                shardline_net::listen::ConnLimits {
                    max_connections: WORKER_MAX_CONNECTIONS,
                    handshake_timeout: std::time::Duration::from_secs(10),
                },
                "worker",
                shutdown.clone(),
            ),
            shutdown.cancelled(),
        )
        .await?;
    Ok(())
}
