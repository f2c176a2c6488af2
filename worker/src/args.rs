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

use shardline_engine::engine::{EngineConfig, ModelFacts};
use shardline_engine::serve::{
    DEFAULT_DRAIN_TIMEOUT_SECS, DEFAULT_SEQ_IDLE_TIMEOUT_SECS, ServeOptions, serve_group,
};
use shardline_membership::registration::RegistrationArgs;

use crate::kv::KvCacheDtype;
use crate::loader::{self, LoadOptions, ModelFormat};
use crate::tokenizer::ModelTokenizer;

/// Token positions per KV cache block, unless configured.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// KV cache budget in bytes, unless configured.
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 << 20;
/// Seconds a tensor-parallel rank waits for the others, unless configured.
pub const DEFAULT_TP_TIMEOUT_SECS: f64 = 30.0;

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

    /// Address of the group's Prometheus metrics endpoint (`GET /metrics`: steps, KV
    /// cache, sequences, the inference-gateway gauges); default: none.
    #[arg(long, env = "SHARDLINE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Number of KV cache blocks; overrides --kv-cache-bytes.
    #[arg(long, env = "SHARDLINE_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,

    /// KV cache budget in bytes, used when --kv-blocks is not given.
    #[arg(long, env = "SHARDLINE_KV_CACHE_BYTES", default_value_t = DEFAULT_KV_CACHE_BYTES)]
    pub kv_cache_bytes: usize,

    /// Element type of the KV cache: `f16` or `bf16` store keys and values in 16 bits,
    /// so the same --kv-cache-bytes holds twice the blocks (rounded once when written,
    /// attention still computes in f32). CPU kernels only: with --device the cache
    /// holds the device's dtype and this must stay `f32`.
    #[arg(long, env = "SHARDLINE_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::F32)]
    pub kv_cache_dtype: KvCacheDtype,

    /// Token positions per KV cache block.
    #[arg(long, env = "SHARDLINE_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Most sequences the worker holds at once.
    #[arg(long, env = "SHARDLINE_MAX_NUM_SEQS", default_value_t = DEFAULT_MAX_NUM_SEQS)]
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
    #[arg(long, env = "SHARDLINE_TP_TIMEOUT_SECS", default_value_t = DEFAULT_TP_TIMEOUT_SECS)]
    pub tp_timeout_secs: f64,

    /// Caps the context length below the model's own (saves KV memory per sequence).
    #[arg(long, env = "SHARDLINE_MAX_CONTEXT")]
    pub max_context: Option<usize>,

    /// Model id reported in Info (default: the file or directory name).
    #[arg(long, env = "SHARDLINE_MODEL_ID")]
    pub model_id: Option<String>,

    /// On shutdown, how long running sequences may keep the worker up.
    #[arg(long, env = "SHARDLINE_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    pub drain_timeout_secs: u64,

    /// Seconds after which a sequence that no step has named is released (its
    /// coordinator hangs with its connection alive: a live one names every sequence in
    /// every step, a stream that closes has its sequences released at once, and a
    /// connection that goes silent is closed by keepalive pings within 30 s); 0 never.
    #[arg(long, env = "SHARDLINE_SEQ_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_SEQ_IDLE_TIMEOUT_SECS)]
    pub seq_idle_timeout_secs: u64,

    /// Membership: `--etcd`, `--etcd-prefix`, `--lease-ttl-secs`, `--advertise`.
    #[command(flatten)]
    pub registration: RegistrationArgs,

    /// PEM certificate of this worker, signed by the cluster CA; with `--tls-key` and
    /// `--tls-client-ca` the worker API serves mutual TLS only. Its names must cover the
    /// address the worker advertises (coordinators check them). Without: plaintext h2c.
    #[arg(long, env = "SHARDLINE_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SHARDLINE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM cluster CA: only clients (coordinators) with a certificate it signed may call.
    #[arg(long, env = "SHARDLINE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Test hook, hidden from `--help` and read from no environment variable: makes a
    /// tensor-parallel rank fail after some steps, `KIND:RANK:STEPS` (`hang:1:11`: rank 1
    /// stops answering in the step after its first 11; kinds `error`, `panic`, `hang`).
    /// End-to-end tests of a group's failure path pass it; production never does.
    #[arg(long, hide = true)]
    pub inject_failure: Option<String>,
}

impl WorkerArgs {
    /// The flags' defaults for `model` (what `shardline worker --model MODEL` gets,
    /// environment variables aside); `shardline up` starts from these.
    pub fn defaults(model: PathBuf) -> Self {
        Self {
            model,
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            kv_blocks: None,
            kv_cache_bytes: DEFAULT_KV_CACHE_BYTES,
            kv_cache_dtype: KvCacheDtype::F32,
            block_size: DEFAULT_BLOCK_SIZE,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            group_id: None,
            threads: None,
            tp: 1,
            device: None,
            tp_timeout_secs: DEFAULT_TP_TIMEOUT_SECS,
            max_context: None,
            model_id: None,
            drain_timeout_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            seq_idle_timeout_secs: DEFAULT_SEQ_IDLE_TIMEOUT_SECS,
            registration: RegistrationArgs::default(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            inject_failure: None,
        }
    }
}

/// Most sequences a worker holds at once, unless configured.
pub const DEFAULT_MAX_NUM_SEQS: usize = 64;

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
    let defaults = LoadOptions::default();
    let opts = LoadOptions {
        block_size: args.block_size,
        kv_blocks: args.kv_blocks,
        kv_cache_bytes: args.kv_cache_bytes,
        kv_cache_dtype: args.kv_cache_dtype,
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
    let inject = args.inject_failure.clone();
    let (runner, tokenizer) = tokio::task::spawn_blocking(move || {
        let tokenizer = load_tokenizer(&model)
            .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
        let (runner, failures) = loader::load_runner_with_injector(&model, &opts)
            .with_context(|| format!("loading the model {}", model.display()))?;
        if let Some(spec) = &inject {
            failures
                .arm(spec)
                .map_err(|e| anyhow::anyhow!("--inject-failure {spec:?}: {e}"))?;
        }
        anyhow::Ok((runner, tokenizer))
    })
    .await
    .context("model loading task failed")??;
    let info = runner.info();
    tracing::info!(
        model = %info.model_id,
        dtype = %info.dtype,
        context = info.context_length,
        kv_blocks = info.kv_blocks_total,
        block_size = info.kv_block_size,
        kv_cache_dtype = %info.kv_cache_dtype,
        "model loaded"
    );
    let tls = worker_tls(&args)?;
    let opts = ServeOptions {
        engine: EngineConfig {
            max_num_seqs: args.max_num_seqs,
            group_id: args
                .group_id
                .clone()
                .unwrap_or_else(|| args.listen.to_string()),
            model: model_facts(&tokenizer),
        },
        seq_idle_timeout: (args.seq_idle_timeout_secs > 0)
            .then(|| Duration::from_secs(args.seq_idle_timeout_secs)),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        registration: args.registration,
        tls,
        metrics_listen: args.metrics_listen,
    };
    serve_group(runner, listener, opts, shutdown).await?;
    Ok(())
}

/// The worker API's mutual TLS from `--tls-cert`, `--tls-key`, `--tls-client-ca`.
pub fn worker_tls(args: &WorkerArgs) -> anyhow::Result<Option<shardline_net::tls::Tls>> {
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_client_ca)
    else {
        return Ok(None);
    };
    let files = shardline_net::tls::TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: Some(ca.clone()),
    };
    Ok(Some(
        shardline_net::tls::Tls::load(files, shardline_net::tls::ALPN_GRPC)
            .context("--tls-cert")?,
    ))
}

/// What the worker reports about its model in `Info`, from its tokenizer.
pub fn model_facts(t: &ModelTokenizer) -> ModelFacts {
    ModelFacts {
        tokenizer_json: t.json.clone(),
        chat_template: t.chat_template.clone().unwrap_or_default(),
        eos_token_ids: t.eos_token_ids.clone(),
        bos_token: t.bos_token.clone().unwrap_or_default(),
        eos_token: t.eos_token.clone().unwrap_or_default(),
        add_bos: t.add_bos,
    }
}
