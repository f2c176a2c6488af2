//! shardline coordinator: the serving front end of a shardline cluster.
//!
//! Request path, one module each:
//! - [`http`] (OpenAI-compatible API) and [`grpc`] (`shardline.v1.Inference`, health,
//!   reflection) parse requests into [`validate::GenerateParams`];
//! - [`service`] runs validate ([`validate`], with the model's [`chat_template`]) →
//!   admit ([`admission`]) → route ([`router`], over the dynamic [`groups`] set) → queue;
//! - [`scheduler`] is one task per worker group driving continuous batching over the pure
//!   [`queue::State`]; [`request`] holds the queue entry and the events it emits;
//! - [`generation`] is the request owner's side: streaming detokenization ([`detok`]),
//!   stop strings, usage;
//! - [`membership`]: groups from etcd registrations (`--etcd`), drain and departure;
//! - [`structured`] (response formats → worker constraints) and [`tools`] (tool
//!   calling: prompt, forced-call grammar, reading calls back);
//! - [`metrics`] (Prometheus), [`error`] (HTTP / gRPC mapping), [`config`] (flags);
//! - [`testing`]: an in-process fake worker for tests (feature `testing`).

pub mod admission;
pub mod chat_template;
pub mod config;
pub mod detok;
pub mod error;
pub mod generation;
pub mod groups;
pub mod grpc;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod queue;
pub mod request;
pub mod router;
pub mod scheduler;
pub mod service;
pub mod structured;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tools;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Config, CoordinatorArgs};
pub use groups::GroupSet;
pub use metrics::Metrics;

/// A started coordinator: both front ends serving, groups added through [`Self::groups`].
pub struct Coordinator {
    pub groups: GroupSet,
    pub metrics: Metrics,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    http: JoinHandle<std::io::Result<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Coordinator {
    /// Starts serving HTTP on `http` and gRPC on `grpc` until `shutdown`. No group yet:
    /// add them with `groups.add(address)`.
    pub fn start(
        config: Config,
        http: TcpListener,
        grpc: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<Coordinator> {
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let groups = GroupSet::new(config.clone(), metrics.clone(), shutdown.clone());
        let service = service::Service::new(config, groups.clone(), metrics.clone());
        let http = tokio::spawn(http::serve(http, service.clone(), shutdown.clone()));
        let grpc = tokio::spawn(grpc::serve(grpc, service, shutdown));
        Ok(Coordinator {
            groups,
            metrics,
            http_addr,
            grpc_addr,
            http,
            grpc,
        })
    }

    /// Waits until both servers stopped (after shutdown).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.http
            .await
            .context("HTTP server task")?
            .context("HTTP server")?;
        self.grpc
            .await
            .context("gRPC server task")?
            .context("gRPC server")?;
        Ok(())
    }
}

/// Serves with the given listeners and worker addresses until `shutdown`.
pub async fn serve(
    config: Config,
    http: TcpListener,
    grpc: TcpListener,
    workers: &[String],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coordinator = Coordinator::start(config, http, grpc, shutdown)?;
    for worker in workers {
        coordinator.groups.add(worker);
    }
    tracing::info!(http = %coordinator.http_addr, grpc = %coordinator.grpc_addr, "coordinator listening");
    coordinator.wait().await
}

/// `shardline coordinator`: binds the configured addresses and serves until `shutdown`.
pub async fn run(args: CoordinatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.config()?;
    if args.workers.is_empty() && args.etcd.is_empty() {
        anyhow::bail!(
            "no worker group given: pass --worker URL (or SHARDLINE_WORKERS) or --etcd URL"
        );
    }
    let http = TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("bind {}", args.http_listen))?;
    let grpc = TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("bind {}", args.grpc_listen))?;
    if args.etcd.is_empty() {
        return serve(config, http, grpc, &args.workers, shutdown).await;
    }
    let membership = shardline_proto::membership::Membership::etcd(&args.etcd, &args.etcd_prefix)
        .await
        .context("--etcd")?;
    let coordinator = Coordinator::start(config, http, grpc, shutdown.clone())?;
    for worker in &args.workers {
        coordinator.groups.add(worker);
    }
    membership::spawn(membership, coordinator.groups.clone(), shutdown);
    tracing::info!(http = %coordinator.http_addr, grpc = %coordinator.grpc_addr, etcd = ?args.etcd, "coordinator listening");
    coordinator.wait().await
}
