//! The worker protocol as the end-to-end tests use it: a group's own view of itself.

use shardline_proto::worker::v1::{HealthRequest, HealthResponse, worker_client::WorkerClient};

/// The worker's `Health` answer; `None` while it cannot be reached.
pub async fn health(worker: &str) -> Option<HealthResponse> {
    let mut w = WorkerClient::connect(worker.to_string()).await.ok()?;
    Some(w.health(HealthRequest {}).await.ok()?.into_inner())
}
