//! A worker group's serving life around a loaded [`ModelRunner`], the same for a real
//! model (`shardline worker`) and the simulator: start the engine thread, serve the
//! worker API, release idle sequences, register in the membership, and on shutdown drain
//! (DRAINING record, running sequences finish, lease revoked, server stopped).
//!
//! An engine that failed for good (a panicked model, a failed tensor-parallel group)
//! cannot serve again: the group leaves the cluster at once (coordinators drop it and
//! continue its requests elsewhere) and [`serve_group`] returns
//! [`ServeGroupError::EngineFailed`], so the process exits non-zero for its supervisor.

use std::net::SocketAddr;
use std::time::Duration;

use shardline_membership::registration::{
    Registration, RegistrationArgs, RegistrationError, ServedModel, worker_record,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineConfig, EngineError, EngineHandle};
use crate::metrics::{WorkerMetrics, serve_metrics};
use crate::runner::ModelRunner;
use crate::service::{ServeError, WorkerService, serve_service};

/// Seconds running sequences may keep a stopping group up, unless configured.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;

/// Seconds after which a sequence no step has named is released, unless configured.
pub const DEFAULT_SEQ_IDLE_TIMEOUT_SECS: u64 = 120;

/// How a group serves, besides its runner.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub engine: EngineConfig,
    /// Sequences no step has named for this long are released (their coordinator is
    /// gone: a live one names every sequence in every step); `None` never.
    pub seq_idle_timeout: Option<Duration>,
    /// On shutdown, how long running sequences may keep the group up.
    pub drain_timeout: Duration,
    pub registration: RegistrationArgs,
    /// Mutual TLS of the worker API (`None`: plaintext h2c, as before).
    pub tls: Option<shardline_net::tls::Tls>,
    /// Where to serve the group's Prometheus metrics (`GET /metrics`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeGroupError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot read the listener's address: {0}")]
    Addr(std::io::Error),
    #[error("--metrics-listen {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the gRPC server task failed: {0}")]
    ServerTask(#[from] tokio::task::JoinError),
    #[error("the gRPC server stopped unexpectedly")]
    ServerStopped,
    #[error("the engine failed: {0}")]
    EngineFailed(String),
    #[error("the engine thread panicked")]
    EngineThread,
}

/// Serves `runner` on `listener` until `shutdown`, then drains.
pub async fn serve_group(
    runner: Box<dyn ModelRunner>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeGroupError> {
    opts.registration.validate()?;
    let listening = listener.local_addr().map_err(ServeGroupError::Addr)?;
    let info = runner.info().clone();
    let served = ServedModel {
        model_id: info.model_id.clone(),
        tp: info.tp,
        kv_blocks_total: info.kv_blocks_total,
        kv_block_size: info.kv_block_size,
        max_num_seqs: opts.engine.max_num_seqs,
        context_length: info.context_length,
    };
    let group_id = opts.engine.group_id.clone();
    let (engine, engine_thread) = EngineHandle::spawn(runner, opts.engine)?;
    // Stops with this function, however it returns (and lets go of the engine).
    let stop_idle = CancellationToken::new();
    let _stop_idle = stop_idle.clone().drop_guard();
    if let Some(idle) = opts.seq_idle_timeout {
        tokio::spawn(release_idle(engine.clone(), idle, stop_idle.clone()));
    }

    let draining = CancellationToken::new();
    let stop_serving = CancellationToken::new();
    let mut service = WorkerService::new(engine.clone(), draining.clone());
    if let Some(addr) = opts.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeGroupError::MetricsBind { addr, source })?;
        let metrics = WorkerMetrics::new(
            &group_id,
            info.kv_block_size,
            info.kv_blocks_total,
            &info.kv_cache_dtype,
        );
        service = service.with_metrics(metrics.clone());
        let (engine, stop) = (engine.clone(), stop_serving.clone());
        let total = info.kv_blocks_total;
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(listener, metrics, engine, total, stop).await {
                tracing::error!(error = %e, "the metrics endpoint failed");
            }
        });
    }
    let mut server = tokio::spawn(serve_service(
        listener,
        service,
        opts.tls.clone(),
        stop_serving.clone(),
    ));
    let address = opts.registration.address(listening)?;
    let record = worker_record(&group_id, address, &served);
    let registration = Registration::start(&opts.registration, record).await?;

    tokio::select! {
        _ = shutdown.cancelled() => {}
        // A server that stops on its own is an error worth exiting on.
        res = &mut server => {
            res??;
            return Err(ServeGroupError::ServerStopped);
        }
        reason = engine.failed() => {
            tracing::error!(%reason, "the engine failed; leaving the cluster");
            registration.deregister().await;
            stop_serving.cancel();
            let _ = server.await;
            return Err(ServeGroupError::EngineFailed(reason));
        }
    }
    // Draining record first (coordinators stop routing here), then finish the running
    // sequences, then revoke the lease (the record disappears), then stop serving.
    registration.set_draining();
    draining.cancel();
    drain(&engine, opts.drain_timeout).await;
    registration.deregister().await;
    stop_serving.cancel();
    server.await??;
    stop_idle.cancel();
    drop(engine);
    // The engine thread ends once the last handle is gone (the server's went with it).
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await?
        .map_err(|_| ServeGroupError::EngineThread)
}

/// Every quarter of `idle` (at most every 250 ms), releases the sequences no step has
/// named for `idle`: those of a coordinator that crashed would otherwise hold their KV
/// blocks until the worker restarts.
async fn release_idle(engine: EngineHandle, idle: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval((idle / 4).max(Duration::from_millis(250)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match engine.release_idle(idle).await {
            Ok(ids) if !ids.is_empty() => tracing::warn!(
                released = ids.len(),
                ?ids,
                idle_s = idle.as_secs_f64(),
                "released sequences no step named (their coordinator is gone?)"
            ),
            Ok(_) => {}
            Err(_) => return, // the engine stopped
        }
    }
}

/// Waits until no sequence runs on the engine, or `timeout`.
async fn drain(engine: &EngineHandle, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match engine.status().await {
            Ok(s) if s.num_running > 0 && tokio::time::Instant::now() < deadline => {
                tracing::info!(running = s.num_running, "draining");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => return,
        }
    }
}
