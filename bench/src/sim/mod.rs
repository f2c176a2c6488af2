//! The simulated worker group: speaks the real worker protocol, models a GPU's step time
//! instead of running a model, and counts KV blocks exactly. For scaling studies of the
//! coordinator without GPUs; never the default.
//!
//! - [`profile`]: the cost model and its documented parameters.
//! - [`engine`]: sequences, KV blocks and deterministic tokens.
//! - [`service`]: the gRPC `Worker` service.
//! - [`vocab`]: the tokenizer it serves (a given `tokenizer.json` or a synthetic one).

pub mod engine;
pub mod profile;
pub mod service;
pub mod vocab;

use std::net::SocketAddr;
use std::path::PathBuf;

use shardline_proto::v1::{WorkerCapacity, WorkerRecord, WorkerState};
use shardline_proto::worker::v1::InfoResponse;
use shardline_proto::worker::v1::worker_server::WorkerServer;
use shardline_worker::registration::Registration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use engine::SimState;
pub use profile::Profile;
pub use service::SimWorker;

/// Failures starting or serving a simulated worker.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown simulation profile {name:?}; known: {known}")]
    UnknownProfile { name: String, known: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// `shardline worker --model sim:<profile>` / `shardline bench sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Cost-model profile (h100-llama3-8b, 4xh100-llama3-70b, h100-llama3.2-1b, tiny); `sim:` prefix accepted.
    #[arg(long, env = "SHARDLINE_SIM_PROFILE", default_value = "h100-llama3-8b")]
    pub profile: String,
    /// gRPC address to listen on.
    #[arg(long, env = "SHARDLINE_SIM_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Hugging Face tokenizer.json whose vocabulary outputs are drawn from and which Info
    /// serves; default: a synthetic word-level tokenizer (one token per word).
    #[arg(long, env = "SHARDLINE_SIM_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Jinja chat template served in Info (a file); default: ChatML.
    #[arg(long, env = "SHARDLINE_SIM_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Group id reported in Info; default: sim-<port>.
    #[arg(long, env = "SHARDLINE_SIM_GROUP_ID")]
    pub group_id: Option<String>,
    /// Multiplier of modelled step times (0 = answer at once).
    #[arg(long, env = "SHARDLINE_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Override the profile's KV block count.
    #[arg(long, env = "SHARDLINE_SIM_KV_BLOCKS")]
    pub kv_blocks: Option<u32>,
    /// Override the profile's largest number of running sequences.
    #[arg(long, env = "SHARDLINE_SIM_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<u32>,
    /// Membership (`--etcd`, `--lease-ttl-secs`, ...), as for a real worker.
    #[command(flatten)]
    pub registration: shardline_worker::registration::RegistrationArgs,
}

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Build the service for `args` (without serving it): registration code can read
/// [`SimWorker::info`] to write the group's membership record.
pub fn build(args: &SimArgs, bound: SocketAddr) -> Result<SimWorker, SimError> {
    let mut profile = Profile::by_name(&args.profile).ok_or_else(|| SimError::UnknownProfile {
        name: args.profile.clone(),
        known: Profile::names().join(", "),
    })?;
    if let Some(b) = args.kv_blocks {
        profile.kv_blocks = b;
    }
    if let Some(m) = args.max_num_seqs {
        profile.max_num_seqs = m;
    }
    let vocab = match &args.tokenizer {
        Some(path) => vocab::Vocab::from_file(path)?,
        None => vocab::Vocab::synthetic(profile.vocab_size.min(vocab::SYNTHETIC_MAX)),
    };
    let chat_template = match &args.chat_template {
        Some(p) => std::fs::read_to_string(p).map_err(|source| SimError::Io {
            path: p.display().to_string(),
            source,
        })?,
        None => CHATML.to_string(),
    };
    let info = InfoResponse {
        model_id: format!("sim:{}", profile.name),
        dtype: "bf16".into(),
        tp: profile.tp,
        context_length: profile.context_length,
        kv_block_size: profile.kv_block_size,
        kv_blocks_total: profile.kv_blocks,
        kv_blocks_free: profile.kv_blocks,
        tokenizer_json: vocab.json.clone(),
        chat_template,
        eos_token_ids: vocab.eos_ids.clone(),
        bos_token: String::new(),
        eos_token: vocab.eos_token.clone(),
        vocab_size: vocab.size,
        max_num_seqs: profile.max_num_seqs,
        group_id: args
            .group_id
            .clone()
            .unwrap_or_else(|| format!("sim-{}", bound.port())),
        add_bos: false,
    };
    let state = SimState::new(profile, vocab.output_ids, vocab.eos_ids);
    Ok(SimWorker::new(info, state, args.time_scale))
}

/// Serve `worker` on `listener` until `shutdown`.
pub async fn serve_sim(
    listener: TcpListener,
    worker: SimWorker,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    // TCP_NODELAY on accepted sockets (the builder's flag only applies when tonic binds):
    // without it Nagle + delayed ACKs add ~40 ms to steps whose response spans writes.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The membership record of a simulated group, from what its `Info` says.
fn sim_record(info: &InfoResponse, address: String) -> WorkerRecord {
    WorkerRecord {
        group_id: info.group_id.clone(),
        address,
        model: info.model_id.clone(),
        tp: info.tp.max(1),
        capacity: Some(WorkerCapacity {
            kv_blocks_total: info.kv_blocks_total,
            kv_block_size: info.kv_block_size,
            max_num_seqs: info.max_num_seqs,
            context_length: info.context_length,
        }),
        state: WorkerState::Ready as i32,
        version: 0,
        start_time_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// Bind, build and serve a simulated worker until `shutdown`.
pub async fn run_sim(args: SimArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    let worker = build(&args, addr)?;
    let info: &InfoResponse = worker.info();
    tracing::info!(%addr, profile = %args.profile, group = %info.group_id, "simulated worker serving");
    let record = sim_record(info, args.registration.address(addr)?);
    let registration = Registration::start(&args.registration, record).await?;
    // Same lifecycle as a real worker: on shutdown DRAINING first, then stop, then revoke.
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_sim(listener, worker, stop.clone()));
    shutdown.cancelled().await;
    registration.set_draining();
    stop.cancel();
    server.await??;
    registration.deregister().await;
    Ok(())
}
