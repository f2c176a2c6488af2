//! `shardline up`: a whole cluster in one process for a laptop or a test — worker groups
//! serving the model on loopback ports and a coordinator routing to them — with the URL
//! and a ready-to-paste `curl` printed once it is ready.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Flags of `shardline up`: the model, how many worker groups, and every coordinator flag
/// (`--etcd URL` registers the groups in etcd instead of an in-process membership).
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Model every worker group serves (GGUF file or Hugging Face directory).
    #[arg(
        long,
        env = "SHARDLINE_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Number of worker groups to start in this process.
    #[arg(long = "workers", env = "SHARDLINE_UP_WORKERS", default_value_t = 1)]
    num_groups: usize,
    /// gRPC address of the first worker group; the next groups take the following ports.
    #[arg(
        long,
        env = "SHARDLINE_UP_WORKER_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    worker_listen: SocketAddr,
    /// Metrics endpoint (`GET /metrics`) of the first worker group; the next groups take
    /// the following ports (default: none; the coordinator's own stay on its HTTP port).
    #[arg(long, env = "SHARDLINE_UP_WORKER_METRICS_LISTEN")]
    worker_metrics_listen: Option<SocketAddr>,
    /// KV cache blocks per worker group (default: from the worker's KV memory budget).
    #[arg(long, env = "SHARDLINE_KV_BLOCKS")]
    kv_blocks: Option<usize>,
    /// Element type of each worker group's KV cache (`f16`/`bf16`: twice the blocks in
    /// the same memory; see `shardline worker --help`).
    #[arg(
        long,
        env = "SHARDLINE_KV_CACHE_DTYPE",
        value_enum,
        default_value_t = shardline_worker::kv::KvCacheDtype::F32
    )]
    kv_cache_dtype: shardline_worker::kv::KvCacheDtype,
    /// Kernel threads per worker group (default: all cores).
    #[arg(long, env = "SHARDLINE_THREADS")]
    threads: Option<usize>,
    /// Tensor-parallel ranks per worker group.
    #[arg(long, env = "SHARDLINE_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    tp: u16,
    #[command(flatten)]
    coordinator: shardline_coordinator::CoordinatorArgs,
}

pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(args.num_groups >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        args.model.exists(),
        "model {} not found: run deploy/fetch-model.sh first (or pass --model)",
        args.model.display()
    );
    let config = args.coordinator.load()?;
    let http = TcpListener::bind(args.coordinator.http_listen)
        .await
        .with_context(|| format!("bind {}", args.coordinator.http_listen))?;
    let grpc = TcpListener::bind(args.coordinator.grpc_listen)
        .await
        .with_context(|| format!("bind {}", args.coordinator.grpc_listen))?;

    // Every group registers in one membership the coordinator follows: in-process by
    // default, etcd with --etcd (then other processes may join the same cluster).
    let membership = if args.coordinator.etcd.is_empty() {
        shardline_membership::Membership::in_memory()
    } else {
        let (etcd, prefix) = (&args.coordinator.etcd, &args.coordinator.etcd_prefix);
        let security = &args.coordinator.etcd_security;
        shardline_membership::Membership::etcd_secured(etcd, prefix, security)
            .await
            .context("--etcd")?
    };
    let mut tasks = tokio::task::JoinSet::new();
    let addresses = args.coordinator.workers.clone();
    for i in 0..args.num_groups {
        let mut listen = args.worker_listen;
        listen.set_port(listen.port() + i as u16);
        let metrics_listen = args.worker_metrics_listen.map(|mut addr| {
            addr.set_port(addr.port() + i as u16);
            addr
        });
        let worker = shardline_worker::WorkerArgs {
            listen,
            metrics_listen,
            kv_blocks: args.kv_blocks,
            kv_cache_dtype: args.kv_cache_dtype,
            max_num_seqs: args.coordinator.max_num_seqs,
            group_id: Some(format!("up-{i}")),
            threads: args.threads,
            tp: args.tp,
            // A local cluster stops quickly: Ctrl-C should not wait 30 s for a stream.
            drain_timeout_secs: 2,
            registration: shardline_membership::registration::RegistrationArgs {
                membership: Some(membership.clone()),
                ..Default::default()
            },
            ..shardline_worker::WorkerArgs::defaults(args.model.clone())
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            shardline_worker::run(worker, token)
                .await
                .with_context(|| format!("worker group up-{i}"))
        });
    }

    let coordinator =
        shardline_coordinator::Coordinator::start(config, http, grpc, shutdown.clone())?;
    for address in &addresses {
        coordinator.groups.add(address);
    }
    let groups = coordinator.groups.clone();
    shardline_coordinator::membership::spawn(membership, groups, shutdown.clone());
    let url = format!("http://{}", coordinator.http_addr);
    let ready = wait_ready(&coordinator.groups, &mut tasks, &shutdown).await?;
    if ready {
        println!(
            "shardline is up: {url} (OpenAI-compatible API), grpc://{}",
            coordinator.grpc_addr
        );
        println!(
            "try:\n  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"max_tokens\": 64, \"messages\": [{{\"role\": \"user\", \"content\": \"Write a haiku about Rust.\"}}]}}'"
        );
        println!("Ctrl-C stops it.");
    }
    serve_groups(&mut tasks, &shutdown).await?;
    while let Some(res) = tasks.join_next().await {
        res.context("worker task")??;
    }
    coordinator.wait().await
}

/// Runs until `shutdown`. A group that stops meanwhile (its engine failed: it has left
/// the membership, and the coordinator continues its requests on the others) is logged;
/// when the last one stops, everything shuts down with its error.
async fn serve_groups(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(res) = tasks.join_next() => {
                let error = match res.context("worker task") {
                    Ok(Ok(())) => anyhow::anyhow!("it stopped unexpectedly"),
                    Ok(Err(e)) | Err(e) => e,
                };
                if tasks.is_empty() {
                    shutdown.cancel();
                    return Err(error.context("the last worker group stopped"));
                }
                tracing::error!(error = format!("{error:#}"), groups_left = tasks.len(), "a worker group stopped; serving on the others");
            }
        }
    }
}

/// Waits until at least one group is ready; fails if a worker task ends first.
async fn wait_ready(
    groups: &shardline_coordinator::GroupSet,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut ready = groups.ready_count();
    loop {
        if *ready.borrow_and_update() > 0 {
            return Ok(true);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            Some(res) = tasks.join_next() => {
                res.context("worker task")??;
                anyhow::bail!("a worker group stopped before it was ready");
            }
            changed = ready.changed() => changed.context("the group set stopped")?,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_failed_group_leaves_the_others_serving() {
        let (shutdown, last) = (CancellationToken::new(), CancellationToken::new());
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async { anyhow::bail!("the engine failed: rank 1 hung") });
        tasks.spawn({
            let last = last.clone();
            async move {
                last.cancelled().await;
                anyhow::bail!("the engine failed: rank 2 hung")
            }
        });
        let serving = tokio::time::timeout(
            Duration::from_millis(200),
            serve_groups(&mut tasks, &shutdown),
        )
        .await;
        assert!(serving.is_err(), "up stopped with a group still serving");
        assert!(!shutdown.is_cancelled());
        last.cancel();
        let err = serve_groups(&mut tasks, &shutdown).await.unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("the last worker group stopped"), "{err}");
        assert!(err.contains("rank 2 hung"), "{err}");
        assert!(
            shutdown.is_cancelled(),
            "the coordinator is told to stop too"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_serving_without_an_error() {
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(std::future::pending::<anyhow::Result<()>>());
        shutdown.cancel();
        serve_groups(&mut tasks, &shutdown).await.unwrap();
    }
}
