//! `shardline worker`: command-line settings ([`WorkerArgs`]) and [`run`], which loads the
//! model and its tokenizer, starts the engine thread and serves the worker gRPC API
//! until shutdown.
//!
//! Shutdown drains: the worker reports `draining` (Health and grpc.health NOT_SERVING),
//! lets the coordinator finish or move the running sequences for up to
//! `--drain-timeout-secs`, then stops serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineConfig, EngineHandle, ModelFacts};
use crate::loader::{self, LoadOptions, ModelFormat};
use crate::service::{WorkerService, serve_service};
use crate::tokenizer::ModelTokenizer;

/// Serve one worker group: a Llama model on this machine.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Model to serve: a GGUF file, or a Hugging Face directory (config.json,
    /// *.safetensors, tokenizer.json).
    #[arg(long, env = "SHARDLINE_MODEL")]
    pub model: PathBuf,

    /// Address the worker gRPC API listens on.
    #[arg(long, env = "SHARDLINE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Number of KV cache blocks; overrides --kv-cache-bytes.
    #[arg(long, env = "SHARDLINE_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,

    /// KV cache budget in bytes, used when --kv-blocks is not given.
    #[arg(long, env = "SHARDLINE_KV_CACHE_BYTES", default_value_t = 512 << 20)]
    pub kv_cache_bytes: usize,

    /// Token positions per KV cache block.
    #[arg(long, env = "SHARDLINE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// Most sequences the worker holds at once.
    #[arg(long, env = "SHARDLINE_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,

    /// Id of this worker group as reported in Info (default: the listen address).
    #[arg(long, env = "SHARDLINE_GROUP_ID")]
    pub group_id: Option<String>,

    /// Threads for the model's kernels (default: all cores), split between the
    /// tensor-parallel ranks.
    #[arg(long, env = "SHARDLINE_THREADS")]
    pub threads: Option<usize>,

    /// Tensor-parallel ranks: the model is split over this many rank threads (query
    /// heads, KV heads and FFN columns). Must divide the query heads; KV heads are split
    /// or replicated.
    #[arg(long, env = "SHARDLINE_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tp: u16,

    /// Run the model on a candle device instead of the CPU kernels: `cuda` / `cuda:N`
    /// (a binary built with `--features cuda`, see deploy/build-cuda.sh), or `cpu`
    /// (candle's CPU backend; slow, for testing the device path).
    #[arg(long, env = "SHARDLINE_DEVICE")]
    pub device: Option<crate::model::device::DeviceChoice>,

    /// Seconds a tensor-parallel rank waits for the others in a collective before the
    /// step fails and the group reports unhealthy.
    #[arg(long, env = "SHARDLINE_TP_TIMEOUT_SECS", default_value_t = 30.0)]
    pub tp_timeout_secs: f64,

    /// Caps the context length below the model's own (saves KV memory per sequence).
    #[arg(long, env = "SHARDLINE_MAX_CONTEXT")]
    pub max_context: Option<usize>,

    /// Model id reported in Info (default: the file or directory name).
    #[arg(long, env = "SHARDLINE_MODEL_ID")]
    pub model_id: Option<String>,

    /// On shutdown, how long running sequences may keep the worker up.
    #[arg(long, env = "SHARDLINE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// Seconds after which a sequence that no step has named is released (its
    /// coordinator crashed: a live one names every sequence in every step); 0 never.
    #[arg(long, env = "SHARDLINE_SEQ_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    pub seq_idle_timeout_secs: u64,

    /// Membership: `--etcd`, `--etcd-prefix`, `--lease-ttl-secs`, `--advertise`.
    #[command(flatten)]
    pub registration: crate::registration::RegistrationArgs,
}

/// Loads the tokenizer that goes with a model path (the GGUF's metadata, or the HF
/// directory's tokenizer files).
pub fn load_tokenizer(model: &std::path::Path) -> anyhow::Result<ModelTokenizer> {
    let tokenizer = match loader::detect_format(model)? {
        ModelFormat::Gguf(file) => ModelTokenizer::from_gguf_file(&file)?,
        ModelFormat::HfDir(dir) => ModelTokenizer::from_hf_dir(&dir)?,
    };
    Ok(tokenizer)
}

/// Loads the model, binds `--listen` and serves until `shutdown` (then drains).
pub async fn run(args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    run_with_listener(args, listener, shutdown).await
}

/// [`run`] on a listener the caller bound (tests bind `127.0.0.1:0`); `args.listen` is
/// only used as the default group id.
pub async fn run_with_listener(
    args: WorkerArgs,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    args.registration.validate()?;
    let listening = listener.local_addr().context("listener address")?;
    let defaults = LoadOptions::default();
    let opts = LoadOptions {
        block_size: args.block_size,
        kv_blocks: args.kv_blocks,
        kv_cache_bytes: args.kv_cache_bytes,
        threads: args.threads.unwrap_or(defaults.threads),
        model_id: args.model_id.clone(),
        max_context: args.max_context,
        tp: usize::from(args.tp),
        collective_timeout: std::time::Duration::try_from_secs_f64(args.tp_timeout_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--tp-timeout-secs must be a positive number of seconds")?,
        device: args.device,
    };
    let model = args.model.clone();
    let (runner, tokenizer) = tokio::task::spawn_blocking(move || {
        let tokenizer = load_tokenizer(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let runner = loader::load_runner(&model, &opts)
            .with_context(|| format!("loading the model {}", model.display()))?;
        anyhow::Ok((runner, tokenizer))
    })
    .await
    .context("model loading task failed")??;

    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        group_id: args
            .group_id
            .clone()
            .unwrap_or_else(|| args.listen.to_string()),
        model: ModelFacts::from(&tokenizer),
    };
    let info = runner.info().clone();
    let config_group_id = config.group_id.clone();
    tracing::info!(
        model = %info.model_id,
        dtype = %info.dtype,
        context = info.context_length,
        kv_blocks = info.kv_blocks_total,
        block_size = info.kv_block_size,
        "model loaded"
    );
    let (engine, engine_thread) = EngineHandle::spawn(runner, config)?;
    // Stops with this function, however it returns (and lets go of the engine).
    let stop_idle = CancellationToken::new();
    let _stop_idle = stop_idle.clone().drop_guard();
    if args.seq_idle_timeout_secs > 0 {
        let idle = Duration::from_secs(args.seq_idle_timeout_secs);
        tokio::spawn(release_idle(engine.clone(), idle, stop_idle.clone()));
    }

    let draining = CancellationToken::new();
    let stop_serving = CancellationToken::new();
    let service = WorkerService::new(engine.clone(), draining.clone());
    let mut server = tokio::spawn(serve_service(listener, service, stop_serving.clone()));
    let record = crate::registration::worker_record(
        &config_group_id,
        args.registration.address(listening)?,
        &info,
        args.max_num_seqs,
    );
    let registration = crate::registration::Registration::start(&args.registration, record).await?;

    tokio::select! {
        _ = shutdown.cancelled() => {}
        // A server that stops on its own is an error worth exiting on.
        res = &mut server => {
            res.context("server task failed")??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
        // An engine that failed for good (a panicked model, a failed tensor-parallel
        // group) cannot serve again: leave the cluster at once (coordinators drop the
        // group and continue its requests elsewhere) and exit non-zero, so the
        // supervisor (Kubernetes, systemd) starts a fresh process.
        reason = engine.failed() => {
            tracing::error!(%reason, "the engine failed; leaving the cluster");
            registration.deregister().await;
            stop_serving.cancel();
            let _ = server.await;
            anyhow::bail!("the engine failed: {reason}");
        }
    }
    // Draining record first (coordinators stop routing here), then finish the running
    // sequences, then revoke the lease (the record disappears), then stop serving.
    registration.set_draining();
    draining.cancel();
    drain(&engine, Duration::from_secs(args.drain_timeout_secs)).await;
    registration.deregister().await;
    stop_serving.cancel();
    server.await.context("server task failed")??;
    stop_idle.cancel();
    drop(engine);
    // The engine thread ends once the last handle is gone (the server's went with it).
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .context("joining the engine thread")?
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    Ok(())
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
