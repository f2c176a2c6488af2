//! The simulated worker's gRPC service: the real `shardline.worker.v1.Worker` protocol
//! over [`SimState`], sleeping for each step's modelled time while holding the state, so
//! a group runs one forward at a time like a real one.

use std::sync::Arc;
use std::time::Duration;

use shardline_proto::worker::v1::worker_server::Worker;
use shardline_proto::worker::v1::{
    DecodeRequest, HealthRequest, HealthResponse, InfoRequest, InfoResponse, PrefillRequest,
    ReleaseRequest, ReleaseResponse, StepRequest, StepResponse,
};
use std::time::Instant;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::engine::SimState;

/// The service: static facts plus the state behind one lock.
#[derive(Clone)]
pub struct SimWorker {
    info: Arc<InfoResponse>,
    state: Arc<Mutex<SimState>>,
    /// Multiplies every modelled step time (0 = no sleeping, for tests).
    time_scale: f64,
    /// Total modelled step time so far, for reports.
    busy: Arc<std::sync::atomic::AtomicU64>,
}

impl SimWorker {
    pub fn new(info: InfoResponse, state: SimState, time_scale: f64) -> Self {
        Self {
            info: Arc::new(info),
            state: Arc::new(Mutex::new(state)),
            time_scale: time_scale.max(0.0),
            busy: Arc::default(),
        }
    }

    /// The Info answer without KV occupancy (for registration records).
    pub fn info(&self) -> &InfoResponse {
        &self.info
    }

    /// Modelled busy time so far (sum of step times, before `time_scale`).
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn run_step(&self, req: StepRequest) -> Result<Response<StepResponse>, Status> {
        let mut state = self.state.lock().await;
        let started = Instant::now();
        let (resp, cost) = state.step(&req.prefill, &req.decode);
        self.busy
            .fetch_add(cost.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.time_scale > 0.0 && !cost.is_zero() {
            // Sleep to an absolute deadline so the bookkeeping above is inside the step.
            sleep_precisely(started + cost.mul_f64(self.time_scale)).await;
        }
        Ok(Response::new(resp))
    }
}

/// Sleeps until `deadline` on a blocking-pool thread. The OS timer wakes within tens of
/// microseconds, where tokio's millisecond timer wheel makes every step up to a
/// millisecond longer than the model says — time a scaling study would then wrongly put
/// on the coordinator.
async fn sleep_precisely(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    if tokio::task::spawn_blocking(move || std::thread::sleep(left))
        .await
        .is_err()
    {
        // The blocking pool is shutting down: fall back to the coarse timer.
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
    }
}

#[tonic::async_trait]
impl Worker for SimWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let mut info = (*self.info).clone();
        info.kv_blocks_free = self.state.lock().await.free_blocks();
        Ok(Response::new(info))
    }

    async fn prefill(
        &self,
        req: Request<PrefillRequest>,
    ) -> Result<Response<StepResponse>, Status> {
        self.run_step(StepRequest {
            prefill: req.into_inner().chunks,
            decode: vec![],
        })
        .await
    }

    async fn decode(&self, req: Request<DecodeRequest>) -> Result<Response<StepResponse>, Status> {
        self.run_step(StepRequest {
            prefill: vec![],
            decode: req.into_inner().seq_ids,
        })
        .await
    }

    async fn step(&self, req: Request<StepRequest>) -> Result<Response<StepResponse>, Status> {
        self.run_step(req.into_inner()).await
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let mut state = self.state.lock().await;
        state.release(&req.into_inner().seq_ids);
        Ok(Response::new(ReleaseResponse {
            kv_blocks_free: state.free_blocks(),
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let state = self.state.lock().await;
        Ok(Response::new(HealthResponse {
            ready: true,
            draining: false,
            message: format!("simulated {}", self.info.model_id),
            kv_blocks_free: state.free_blocks(),
            num_running: state.num_running(),
            ..Default::default()
        }))
    }
}
