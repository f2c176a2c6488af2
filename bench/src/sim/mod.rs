//! The simulated worker group: the real engine and worker service over a model runner
//! that models a GPU's step time instead of running a model, with exact KV block counts
//! and deterministic tokens. For scaling studies of the coordinator without GPUs; never
//! the default.
//!
//! - [`profile`]: the cost model and its documented parameters.
//! - [`runner`]: [`SimRunner`], the simulated model behind the engine.
//! - [`vocab`]: the tokenizer it serves (a given `tokenizer.json` or a synthetic one).

pub mod profile;
pub mod runner;
pub mod vocab;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shardline_engine::engine::{EngineConfig, ModelFacts};
use shardline_engine::serve::{
    DEFAULT_DRAIN_TIMEOUT_SECS, DEFAULT_SEQ_IDLE_TIMEOUT_SECS, ServeOptions, serve_group,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use profile::Profile;
pub use runner::SimRunner;

/// Largest synthetic vocabulary. The engine samples every logits row over the whole
/// vocabulary on the CPU, between two steps, where a GPU worker samples on the device
/// inside the modelled step time. Engine CPU per 32-sequence decode step (the
/// `sim_step_cost` example, 2-core development machine): 286 µs with 512 tokens, a fifth
/// of the fast profile's 1.5 ms step; 14 µs with 128, which still hold the specials, the
/// roles and every word the bench's prompts use.
pub const SIM_VOCAB_MAX: u32 = 128;

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
    Serve(#[from] shardline_engine::serve::ServeGroupError),
}

/// `shardline worker --model sim:<profile>` / `shardline bench sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Cost-model profile (h100-llama3-8b, 4xh100-llama3-70b, h100-llama3.2-1b, tiny);
    /// `sim:` prefix accepted.
    #[arg(long, env = "SHARDLINE_SIM_PROFILE", default_value = "h100-llama3-8b")]
    pub profile: String,
    /// gRPC address to listen on.
    #[arg(long, env = "SHARDLINE_SIM_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Address of the group's Prometheus metrics endpoint (`GET /metrics`); default: none.
    #[arg(long, env = "SHARDLINE_SIM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
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
    pub registration: shardline_membership::registration::RegistrationArgs,
}

const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The simulated group `args` describe, bound at `bound`: its runner and engine settings.
pub fn build(args: &SimArgs, bound: SocketAddr) -> Result<(SimRunner, EngineConfig), SimError> {
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
        None => vocab::Vocab::synthetic(profile.vocab_size.min(SIM_VOCAB_MAX)),
    };
    let chat_template = match &args.chat_template {
        Some(p) => std::fs::read_to_string(p).map_err(|source| SimError::Io {
            path: p.display().to_string(),
            source,
        })?,
        None => CHATML.to_string(),
    };
    let engine = EngineConfig {
        max_num_seqs: profile.max_num_seqs as usize,
        group_id: args
            .group_id
            .clone()
            .unwrap_or_else(|| format!("sim-{}", bound.port())),
        model: ModelFacts {
            tokenizer_json: vocab.json.clone(),
            chat_template,
            eos_token_ids: vocab.eos_ids.clone(),
            bos_token: String::new(),
            eos_token: vocab.eos_token.clone(),
            add_bos: false,
        },
    };
    let runner = SimRunner::new(
        profile,
        vocab.size as usize,
        vocab.output_ids,
        args.time_scale,
    );
    Ok((runner, engine))
}

/// Serves the simulated group `args` describe on `listener` until `shutdown`, with a
/// real worker's lifecycle (registration, idle release, drain).
pub async fn serve_sim(
    listener: TcpListener,
    args: SimArgs,
    shutdown: CancellationToken,
) -> Result<(), SimError> {
    let addr = listener.local_addr().map_err(|source| SimError::Bind {
        addr: args.listen,
        source,
    })?;
    let (runner, engine) = build(&args, addr)?;
    tracing::info!(%addr, profile = %args.profile, group = %engine.group_id, "simulated worker serving");
    let opts = ServeOptions {
        engine,
        seq_idle_timeout: Some(Duration::from_secs(DEFAULT_SEQ_IDLE_TIMEOUT_SECS)),
        drain_timeout: Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_SECS),
        registration: args.registration,
        tls: None,
        metrics_listen: args.metrics_listen,
    };
    serve_group(Box::new(runner), listener, opts, shutdown).await?;
    Ok(())
}

/// Binds `--listen` and serves a simulated worker until `shutdown`.
pub async fn run_sim(args: SimArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: args.listen,
            source,
        })?;
    serve_sim(listener, args, shutdown).await?;
    Ok(())
}
