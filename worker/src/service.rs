//! The `shardline.worker.v1.Worker` gRPC service: converts messages and calls the
//! [`EngineHandle`]. `Prefill` and `Decode` are a `Step` with one half empty.
//!
//! Per-sequence problems (bad prompt, unknown id, no KV room) come back inside the
//! `StepResponse` as a per-sequence status, so one bad sequence never fails the batch;
//! only engine-wide failures become a gRPC status.
//!
//! `Health` reports `sequences_started`: sequences ever registered with the model (a
//! request refused before that, or never sent, does not count).

use std::net::SocketAddr;

use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_server::{Worker, WorkerServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::engine::{EngineError, EngineHandle};

/// Largest request the worker accepts (a long prompt in a step is a few MB at most).
const MAX_REQUEST_BYTES: usize = 64 << 20;

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
    /// NOT_SERVING, and the coordinator stops sending new sequences.
    draining: CancellationToken,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, draining: CancellationToken) -> Self {
        Self { engine, draining }
    }

    /// Runs a step; while draining, new sequences (chunks carrying a prompt) are refused
    /// with `SEQ_STATUS_OUT_OF_BLOCKS` so the coordinator starts them elsewhere, and the
    /// running ones go on.
    async fn run_step(&self, mut req: pb::StepRequest) -> Result<pb::StepResponse, Status> {
        if !self.draining.is_cancelled() || req.prefill.iter().all(|c| c.prompt.is_empty()) {
            return self.engine.step(req).await.map_err(to_status);
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
        let mut resp = self.engine.step(req).await.map_err(to_status)?;
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
        Ok(resp)
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

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let req = pb::StepRequest {
            prefill: request.into_inner().chunks,
            decode: Vec::new(),
        };
        self.run_step(req).await.map(Response::new)
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let req = pb::StepRequest {
            prefill: Vec::new(),
            decode: request.into_inner().seq_ids,
        };
        self.engine
            .step(req)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn step(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        self.run_step(request.into_inner()).await.map(Response::new)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let free = self
            .engine
            .release(request.into_inner().seq_ids)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReleaseResponse {
            kv_blocks_free: free as u32,
        }))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let draining = self.draining.is_cancelled();
        let (ready, message, free, running, admitted) = match self.engine.status().await {
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
                    s.counters.seqs_admitted,
                )
            }
            Err(e) => (false, e.to_string(), 0, 0, 0),
        };
        Ok(Response::new(pb::HealthResponse {
            ready,
            draining,
            message,
            kv_blocks_free: free as u32,
            num_running: running as u32,
            sequences_started: admitted,
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
    serve_service(listener, WorkerService::new(engine, draining), shutdown).await
}

/// Like [`serve`], with a service whose draining token the caller controls.
pub async fn serve_service(
    listener: TcpListener,
    service: WorkerService,
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
    tracing::info!(%addr, "worker gRPC service listening");
    let worker = WorkerServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            // Every step answer is a few small HTTP/2 writes: no Nagle delay on them.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        )
        .await?;
    Ok(())
}
