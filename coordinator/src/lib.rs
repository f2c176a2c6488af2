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
//! - [`keys`]: API keys → tenants and their limits, reloaded live;
//! - [`membership`]: groups from etcd registrations (`--etcd`), drain and departure;
//! - [`listen`] and [`tls`] (from `shardline-net`): accepting connections (limits, TLS)
//!   for both front ends;
//! - [`structured`] (response formats → worker constraints) and [`tools`] (tool
//!   calling: prompt, forced-call grammar, reading calls back);
//! - [`metrics`] (Prometheus), [`trace`] (a request's spans), [`error`] (HTTP / gRPC
//!   mapping), [`config`] (flags).
//!
//! Tests run against the real worker service over a fake runner (`shardline-engine`'s
//! `testing` feature, a dev-dependency): the fake never ships in this crate.

pub mod admission;
pub mod chat_template;
pub mod config;
pub mod detok;
pub mod error;
pub mod generation;
pub mod groups;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod queue;
pub mod request;
pub mod router;
pub mod scheduler;
pub mod service;
pub mod structured;
pub mod tools;
pub mod trace;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Config, CoordinatorArgs, KvAdmission, Routing};
pub use groups::GroupSet;
pub use metrics::Metrics;
/// The connection layer (shared with the workers): TLS and the accept loop.
pub use shardline_net::{listen, tls};

/// A started coordinator: both front ends serving, groups added through [`Self::groups`].
///
/// Shutdown drains: once `shutdown` is cancelled the servers accept no new connection
/// and finish the requests in flight, which the groups keep serving for up to
/// `config.drain_timeout`; then the groups stop (failing what is left). Dropping the
/// coordinator stops the groups at once.
pub struct Coordinator {
    pub groups: GroupSet,
    pub metrics: Metrics,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    http: JoinHandle<std::io::Result<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    shutdown: CancellationToken,
    drain_timeout: std::time::Duration,
    /// Stops the groups' schedulers: after the drain, or when the coordinator is dropped.
    stop_groups: tokio_util::sync::DropGuard,
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
        let drain_timeout = config.drain_timeout;
        let config = Arc::new(config);
        keys::spawn_reloader(config.keys.clone(), shutdown.clone());
        if let Some(tls) = &config.tls {
            tls::spawn_reloader(tls.clone(), "public API", shutdown.clone());
        }
        let metrics = Metrics::new();
        let stop_groups = CancellationToken::new();
        let groups = GroupSet::new(config.clone(), metrics.clone(), stop_groups.clone());
        let service = service::Service::new(config, groups.clone(), metrics.clone());
        let http = tokio::spawn(http::serve(http, service.clone(), shutdown.clone()));
        let grpc = tokio::spawn(grpc::serve(grpc, service, shutdown.clone()));
        Ok(Coordinator {
            groups,
            metrics,
            http_addr,
            grpc_addr,
            http,
            grpc,
            shutdown,
            drain_timeout,
            stop_groups: stop_groups.drop_guard(),
        })
    }

    /// Serves until `shutdown`, drains (see [`Coordinator`]), and returns once both
    /// servers stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        let Coordinator {
            http,
            grpc,
            shutdown,
            drain_timeout,
            stop_groups,
            ..
        } = self;
        let servers = async {
            let http = http.await.context("HTTP server task")?;
            let grpc = grpc.await.context("gRPC server task")?;
            http.context("HTTP server")?;
            grpc.context("gRPC server")?;
            anyhow::Ok(())
        };
        tokio::pin!(servers);
        tokio::select! {
            // A server that stops before shutdown failed: stop everything with its error.
            res = &mut servers => return res,
            _ = shutdown.cancelled() => {}
        }
        tracing::info!(
            timeout_s = drain_timeout.as_secs_f64(),
            "draining: no new connections, finishing the requests in flight"
        );
        let res = match tokio::time::timeout(drain_timeout, &mut servers).await {
            Ok(res) => res,
            Err(_) => {
                tracing::warn!(
                    timeout_s = drain_timeout.as_secs_f64(),
                    "drain timeout: failing the requests still in flight"
                );
                drop(stop_groups);
                return servers.await;
            }
        };
        drop(stop_groups);
        res
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
    let config = args.load()?;
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
    let membership = shardline_membership::Membership::etcd_secured(
        &args.etcd,
        &args.etcd_prefix,
        &args.etcd_security,
    )
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
