//! Coordinator configuration: the clap flags (`CoordinatorArgs`) and the validated
//! [`Config`] the rest of the crate reads. No other module reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::keys::{KeySource, Keys, TenantLimits};
pub use crate::router::Routing;
use crate::tls::{ALPN_HTTP, ClientFiles, Tls, TlsFiles, client_config};

/// Flags of `shardline coordinator`. Every flag can also be set through its
/// `SHARDLINE_…` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// Address of a worker group's gRPC endpoint (repeat for several groups), e.g.
    /// `http://127.0.0.1:50061`.
    #[arg(long = "worker", env = "SHARDLINE_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// etcd endpoints (comma-separated or repeated) to discover worker groups from, in
    /// addition to any `--worker`; groups come and go as they register and leave.
    #[arg(long = "etcd", env = "SHARDLINE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of the cluster in etcd.
    #[arg(long, env = "SHARDLINE_ETCD_PREFIX", default_value = shardline_membership::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    #[command(flatten)]
    pub etcd_security: shardline_membership::EtcdSecurity,
    /// Address the OpenAI-compatible HTTP API listens on.
    #[arg(long, env = "SHARDLINE_HTTP_LISTEN", default_value = "0.0.0.0:8000")]
    pub http_listen: SocketAddr,
    /// Address the gRPC API (`shardline.v1.Inference`, health, reflection) listens on.
    #[arg(long, env = "SHARDLINE_GRPC_LISTEN", default_value = "0.0.0.0:50051")]
    pub grpc_listen: SocketAddr,
    /// Most sequences one group runs in a step (vLLM's `--max-num-seqs`).
    #[arg(long, env = "SHARDLINE_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Token budget of one step: decodes count one each, prefill chunks their length
    /// (vLLM's `--max-num-batched-tokens`). Longer prompts are prefilled in chunks.
    #[arg(long, env = "SHARDLINE_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Requests waiting in queues (all groups together) before new ones get 429.
    #[arg(long, env = "SHARDLINE_MAX_QUEUED_REQUESTS", default_value_t = 1024)]
    pub max_queued_requests: usize,
    /// Requests admitted at once (queued + running) before new ones get 429.
    #[arg(long, env = "SHARDLINE_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Most prompt tokens a request may carry (0 = the model's context length).
    #[arg(long, env = "SHARDLINE_MAX_INPUT_TOKENS", default_value_t = 0)]
    pub max_input_tokens: usize,
    /// Most prompt + generated tokens of a request (0 = the model's context length).
    #[arg(long, env = "SHARDLINE_MAX_TOTAL_TOKENS", default_value_t = 0)]
    pub max_total_tokens: usize,
    /// Per-tenant request rate (requests per second, token bucket; 0 = unlimited): the
    /// default of every tenant in the keys file. Without API keys the tenant is the
    /// `x-shardline-tenant` header, else the request's `user`; with keys it is the key's.
    #[arg(long, env = "SHARDLINE_TENANT_RATE", default_value_t = 0.0)]
    pub tenant_rate: f64,
    /// Per-tenant burst size of the token bucket (defaults to max(1, rate)).
    #[arg(long, env = "SHARDLINE_TENANT_BURST")]
    pub tenant_burst: Option<f64>,
    /// Per-tenant concurrent requests (0 = unlimited).
    #[arg(long, env = "SHARDLINE_TENANT_MAX_CONCURRENT", default_value_t = 0)]
    pub tenant_max_concurrent: usize,
    /// Require `Authorization: Bearer <key>` on the API (health and metrics stay open):
    /// one key, the tenant `default` with the `--tenant-*` limits. Combines with
    /// `--api-keys-file`.
    #[arg(long, env = "SHARDLINE_API_KEY")]
    pub api_key: Option<String>,
    /// TOML file mapping SHA-256 hashed API keys to tenants and their limits (see
    /// docs/security.md); every route but `/health`, `/livez` and `/metrics` then needs
    /// a key, and the tenant comes from the key. Reloaded on SIGHUP and when it changes.
    #[arg(long, env = "SHARDLINE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Model name reported by `/v1/models` and accepted in requests (default: the
    /// worker's model id).
    #[arg(long, env = "SHARDLINE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Default per-request deadline in seconds when the request sets none (0 = none).
    #[arg(long, env = "SHARDLINE_DEFAULT_TIMEOUT_S", default_value_t = 0.0)]
    pub default_timeout_s: f64,
    /// How long the answer to one step may take from when the step was sent, in seconds;
    /// a group that exceeds it is considered failed.
    #[arg(long, env = "SHARDLINE_STEP_TIMEOUT_S", default_value_t = 120.0)]
    pub step_timeout_s: f64,
    /// Most stop strings per request.
    #[arg(long, env = "SHARDLINE_MAX_STOP_SEQUENCES", default_value_t = 16)]
    pub max_stop_sequences: usize,
    /// A streamed response sends its first token at once, then one event per this many
    /// tokens (and the last at the end): fewer, larger events cost the coordinator and
    /// the client less CPU per token; 1 sends every token as it comes. Tokens reach the
    /// request's front end this many at a time, so a stop string may be found that many
    /// tokens late: the worker may compute up to that many past it (never sent).
    #[arg(long, env = "SHARDLINE_STREAM_INTERVAL", default_value_t = 1)]
    pub stream_interval: u32,
    /// KV budget of admission: a request gets 429 when, on every group, the KV blocks
    /// reserved by running sequences plus those wanted by queued ones would exceed this
    /// many times the group's KV cache.
    #[arg(long, env = "SHARDLINE_MAX_KV_DEMAND_RATIO", default_value_t = 4.0)]
    pub max_kv_demand_ratio: f64,
    /// PEM certificate chain of the public HTTP and gRPC APIs: with `--tls-key` both
    /// serve TLS only (rustls). Re-read when the file changes.
    #[arg(long, env = "SHARDLINE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SHARDLINE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: with it, API clients must present a certificate this CA signed
    /// (mutual TLS). Needs `--tls-cert`.
    #[arg(long, env = "SHARDLINE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM cluster CA for calling workers over mutual TLS: a worker's certificate must be
    /// signed by it and name the address the worker is known by (etcd, `--worker`).
    /// With `--worker-tls-cert` and `--worker-tls-key`; without, workers are called over
    /// plaintext h2c.
    #[arg(long, env = "SHARDLINE_WORKER_TLS_CA", requires_all = ["worker_tls_cert", "worker_tls_key"])]
    pub worker_tls_ca: Option<PathBuf>,
    /// PEM client certificate (signed by the cluster CA) this coordinator presents to
    /// workers.
    #[arg(long, env = "SHARDLINE_WORKER_TLS_CERT", requires = "worker_tls_ca")]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of `--worker-tls-cert`.
    #[arg(long, env = "SHARDLINE_WORKER_TLS_KEY", requires = "worker_tls_ca")]
    pub worker_tls_key: Option<PathBuf>,
    /// Most connections open at once on each API (HTTP, gRPC); more are closed at once.
    #[arg(long, env = "SHARDLINE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (and to finish its TLS
    /// handshake) before its connection is closed: slow clients cannot hold the server.
    #[arg(long, env = "SHARDLINE_HEADER_READ_TIMEOUT_S", default_value_t = 10.0)]
    pub header_read_timeout_s: f64,
    /// Seconds a client has to send a request body; slower gets 408.
    #[arg(long, env = "SHARDLINE_BODY_READ_TIMEOUT_S", default_value_t = 60.0)]
    pub body_read_timeout_s: f64,
    /// Largest request body in bytes; larger gets 413.
    #[arg(long, env = "SHARDLINE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Of a body over `--max-body-bytes`, how many bytes are read and discarded so the
    /// client, still uploading, receives its 413 instead of a reset connection.
    #[arg(long, env = "SHARDLINE_BODY_DRAIN_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub body_drain_bytes: usize,
    /// Largest request header section in bytes (HTTP/1 read buffer, HTTP/2 header list);
    /// larger gets 431 (HTTP/1) or a stream reset (HTTP/2).
    #[arg(long, env = "SHARDLINE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request; more gets 431.
    #[arg(long, env = "SHARDLINE_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Deepest nesting of arrays and objects in a JSON request body; deeper gets 400.
    #[arg(long, env = "SHARDLINE_MAX_JSON_DEPTH", default_value_t = 32)]
    pub max_json_depth: usize,
    /// Most concurrent HTTP/2 streams (requests) per connection, on both APIs.
    #[arg(
        long,
        env = "SHARDLINE_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub http2_max_concurrent_streams: u32,
    /// How a group's KV cache is budgeted when requests start. `on-demand`: a request
    /// starts when its prompt's blocks fit next to what the running sequences hold,
    /// keeping `--kv-watermark` of the cache free for them to grow into; sequences take
    /// blocks as they grow, and when a step runs out the worker preempts the least
    /// important, most recently started sequence, which continues later by prefilling
    /// again (vLLM's policy). `worst-case`: a request starts only when its prompt +
    /// `max_tokens` (the whole context without `max_tokens`) fits next to the worst cases
    /// of the running ones: never preempted, far fewer sequences at once.
    #[arg(long, env = "SHARDLINE_KV_ADMISSION", value_enum, default_value_t = KvAdmission::OnDemand)]
    pub kv_admission: KvAdmission,
    /// Fraction of a group's KV cache kept free for running sequences to grow into when
    /// requests start under `--kv-admission on-demand` (vLLM's watermark).
    #[arg(long, env = "SHARDLINE_KV_WATERMARK", default_value_t = 0.01)]
    pub kv_watermark: f64,
    /// How a request picks its group. `prefix`: the cheapest group, costing
    /// `--route-prefix-weight` × the prompt blocks not in that group's prefix cache + the
    /// KV blocks it has in use or queued (what each group caches is tracked from what was
    /// sent where). `first-block`: the group with the most free KV capacity, the one that
    /// last saw the prompt's first block among near ties.
    #[arg(long, env = "SHARDLINE_ROUTING", value_enum, default_value_t = Routing::Prefix)]
    pub routing: Routing,
    /// Under `--routing prefix`: what one prompt block to prefill costs next to one block
    /// of load (higher keeps a shared prefix on fewer groups longer; 4 measured best of
    /// 1 and 4 with deploy/bench/kv.sh, 1 spread system prompts too eagerly).
    #[arg(long, env = "SHARDLINE_ROUTE_PREFIX_WEIGHT", default_value_t = 4.0)]
    pub route_prefix_weight: f64,
    /// On shutdown (SIGTERM, Ctrl-C), how long requests in flight may keep the
    /// coordinator up: it stops accepting connections at once, finishes what it is
    /// serving, and fails what is left after this many seconds.
    #[arg(long, env = "SHARDLINE_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// See `--kv-admission`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvAdmission {
    #[default]
    OnDemand,
    WorstCase,
}

/// Everything the serving code needs, validated once.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_queued_requests: usize,
    pub max_concurrent_requests: usize,
    /// 0 = context length.
    pub max_input_tokens: usize,
    /// 0 = context length.
    pub max_total_tokens: usize,
    pub tenant_rate: f64,
    pub tenant_burst: f64,
    pub tenant_max_concurrent: usize,
    /// API keys and their tenants (disabled: open API, client-named tenants).
    pub keys: Keys,
    pub served_model_name: Option<String>,
    pub default_timeout: Option<Duration>,
    pub step_timeout: Duration,
    pub max_stop_sequences: usize,
    /// Tokens per streamed event after the first (`--stream-interval`).
    pub stream_interval: u32,
    /// See `--max-kv-demand-ratio`.
    pub max_kv_demand_ratio: f64,
    pub kv_admission: KvAdmission,
    /// See `--kv-watermark`.
    pub kv_watermark: f64,
    pub routing: Routing,
    /// See `--route-prefix-weight`.
    pub route_prefix_weight: f64,
    /// Body size limit of the HTTP API.
    pub max_body_bytes: usize,
    /// Connection and protocol limits of both front ends.
    pub server: ServerLimits,
    /// TLS of both public APIs (`None`: plaintext, h2c for gRPC).
    pub tls: Option<Tls>,
    /// Mutual TLS towards the workers (`None`: plaintext h2c).
    pub worker_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// See `--drain-timeout-secs`.
    pub drain_timeout: Duration,
}

/// Limits on connections and on what a client may send before its request is parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub body_drain_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub http2_max_concurrent_streams: u32,
    pub max_json_depth: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            body_drain_bytes: 16 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_json_depth: 32,
            http2_max_concurrent_streams: 256,
        }
    }
}

impl ServerLimits {
    pub fn conn(&self) -> crate::listen::ConnLimits {
        crate::listen::ConnLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.header_read_timeout,
        }
    }
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid flag --{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_queued_requests: 1024,
            max_concurrent_requests: 512,
            max_input_tokens: 0,
            max_total_tokens: 0,
            tenant_rate: 0.0,
            tenant_burst: 1.0,
            tenant_max_concurrent: 0,
            keys: Keys::disabled(),
            served_model_name: None,
            default_timeout: None,
            step_timeout: Duration::from_secs(120),
            max_stop_sequences: 16,
            stream_interval: 1,
            max_kv_demand_ratio: 4.0,
            kv_admission: KvAdmission::OnDemand,
            kv_watermark: 0.01,
            routing: Routing::Prefix,
            route_prefix_weight: 4.0,
            max_body_bytes: 4 * 1024 * 1024,
            server: ServerLimits::default(),
            tls: None,
            worker_tls: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

fn secs(flag: &'static str, v: f64) -> Result<Option<Duration>, ConfigError> {
    if !v.is_finite() || v < 0.0 {
        return Err(ConfigError {
            flag,
            message: format!("{v} is not a non-negative number of seconds"),
        });
    }
    Ok((v > 0.0).then(|| Duration::from_secs_f64(v)))
}

impl Config {
    /// The limits of a tenant named by the client (no keys configured): the flags'.
    pub fn tenant_defaults(&self) -> TenantLimits {
        TenantLimits {
            requests_per_second: self.tenant_rate,
            burst: self.tenant_burst,
            max_concurrent: self.tenant_max_concurrent,
            ..TenantLimits::default()
        }
    }
}

impl CoordinatorArgs {
    /// [`Self::config`] with the files loaded (API keys, TLS certificates): what a
    /// coordinator serves with.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = self.config()?;
        config.keys = Keys::load(KeySource {
            file: self.api_keys_file.clone(),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            defaults: config.tenant_defaults(),
        })
        .map_err(|e| ConfigError {
            flag: "api-keys-file",
            message: e.to_string(),
        })?;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            };
            config.tls = Some(Tls::load(files, ALPN_HTTP).map_err(|e| ConfigError {
                flag: "tls-cert",
                message: e.to_string(),
            })?);
        }
        if let (Some(ca), Some(cert), Some(key)) = (
            &self.worker_tls_ca,
            &self.worker_tls_cert,
            &self.worker_tls_key,
        ) {
            let files = ClientFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            config.worker_tls = Some(client_config(&files).map_err(|e| ConfigError {
                flag: "worker-tls-ca",
                message: e.to_string(),
            })?);
        }
        Ok(config)
    }

    /// Checks the flags and turns them into a [`Config`], reading no file: its keys are
    /// disabled and TLS off until [`Self::load`].
    pub fn config(&self) -> Result<Config, ConfigError> {
        let positive = |flag: &'static str, v: usize| {
            if v == 0 {
                Err(ConfigError {
                    flag,
                    message: "must be at least 1".into(),
                })
            } else {
                Ok(v)
            }
        };
        if !self.tenant_rate.is_finite() || self.tenant_rate < 0.0 {
            return Err(ConfigError {
                flag: "tenant-rate",
                message: "must be >= 0".into(),
            });
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            // Every running sequence decodes one token in every step; with fewer tokens
            // per step than sequences, the same ones would be left out of every step.
            return Err(ConfigError {
                flag: "max-num-batched-tokens",
                message: format!(
                    "must be at least --max-num-seqs ({}): each running sequence takes one token of every step",
                    self.max_num_seqs
                ),
            });
        }
        let burst = self.tenant_burst.unwrap_or(self.tenant_rate.max(1.0));
        if !burst.is_finite() || burst < 1.0 {
            return Err(ConfigError {
                flag: "tenant-burst",
                message: "must be >= 1".into(),
            });
        }
        Ok(Config {
            max_num_seqs: positive("max-num-seqs", self.max_num_seqs)?,
            max_num_batched_tokens: positive(
                "max-num-batched-tokens",
                self.max_num_batched_tokens,
            )?,
            max_queued_requests: positive("max-queued-requests", self.max_queued_requests)?,
            max_concurrent_requests: positive(
                "max-concurrent-requests",
                self.max_concurrent_requests,
            )?,
            max_input_tokens: self.max_input_tokens,
            max_total_tokens: self.max_total_tokens,
            tenant_rate: self.tenant_rate,
            tenant_burst: burst,
            tenant_max_concurrent: self.tenant_max_concurrent,
            keys: Keys::disabled(),
            served_model_name: self.served_model_name.clone(),
            default_timeout: secs("default-timeout-s", self.default_timeout_s)?,
            step_timeout: secs("step-timeout-s", self.step_timeout_s)?.ok_or(ConfigError {
                flag: "step-timeout-s",
                message: "must be > 0".into(),
            })?,
            max_stop_sequences: self.max_stop_sequences,
            stream_interval: positive("stream-interval", self.stream_interval as usize)? as u32,
            max_kv_demand_ratio: if self.max_kv_demand_ratio.is_finite()
                && self.max_kv_demand_ratio >= 1.0
            {
                self.max_kv_demand_ratio
            } else {
                return Err(ConfigError {
                    flag: "max-kv-demand-ratio",
                    message: "must be >= 1".into(),
                });
            },
            kv_admission: self.kv_admission,
            kv_watermark: if (0.0..1.0).contains(&self.kv_watermark) {
                self.kv_watermark
            } else {
                return Err(ConfigError {
                    flag: "kv-watermark",
                    message: format!("{} is not a fraction in [0, 1)", self.kv_watermark),
                });
            },
            routing: self.routing,
            route_prefix_weight: if self.route_prefix_weight.is_finite()
                && self.route_prefix_weight >= 0.0
            {
                self.route_prefix_weight
            } else {
                return Err(ConfigError {
                    flag: "route-prefix-weight",
                    message: "must be >= 0".into(),
                });
            },
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            max_body_bytes: positive("max-body-bytes", self.max_body_bytes)?,
            server: ServerLimits {
                max_connections: positive("max-connections", self.max_connections)?,
                header_read_timeout: secs("header-read-timeout-s", self.header_read_timeout_s)?
                    .ok_or(ConfigError {
                        flag: "header-read-timeout-s",
                        message: "must be > 0".into(),
                    })?,
                body_read_timeout: secs("body-read-timeout-s", self.body_read_timeout_s)?.ok_or(
                    ConfigError {
                        flag: "body-read-timeout-s",
                        message: "must be > 0".into(),
                    },
                )?,
                body_drain_bytes: self.body_drain_bytes,
                max_header_bytes: if self.max_header_bytes >= 8192 {
                    self.max_header_bytes
                } else {
                    return Err(ConfigError {
                        flag: "max-header-bytes",
                        message: "must be at least 8192".into(),
                    });
                },
                max_headers: positive("max-headers", self.max_headers)?,
                max_json_depth: positive("max-json-depth", self.max_json_depth)?,
                http2_max_concurrent_streams: positive(
                    "http2-max-concurrent-streams",
                    self.http2_max_concurrent_streams as usize,
                )? as u32,
            },
            ..Config::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CoordinatorArgs,
    }

    #[test]
    fn flags_parse_into_a_config() {
        let cli = Cli::try_parse_from([
            "x",
            "--worker",
            "http://a:1",
            "--worker",
            "b:2",
            "--max-num-seqs",
            "8",
            "--default-timeout-s",
            "2.5",
        ])
        .unwrap();
        assert_eq!(cli.args.workers, vec!["http://a:1", "b:2"]);
        let config = cli.args.config().unwrap();
        assert_eq!(config.max_num_seqs, 8);
        assert_eq!(config.default_timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn keys_load_from_the_flags() {
        let cli = Cli::try_parse_from(["x", "--api-key", "k"]).unwrap();
        assert!(
            !cli.args.config().unwrap().keys.enabled(),
            "config reads no file"
        );
        let keys = cli.args.load().unwrap().keys.current().unwrap();
        assert_eq!(keys.lookup("k").unwrap().name, crate::keys::API_KEY_TENANT);
        let cli = Cli::try_parse_from(["x", "--api-keys-file", "/nonexistent/keys.toml"]).unwrap();
        let err = cli.args.load().unwrap_err();
        assert_eq!(err.flag, "api-keys-file");
        assert!(
            err.message.contains("/nonexistent/keys.toml"),
            "{}",
            err.message
        );
    }

    #[test]
    fn impossible_values_name_the_flag() {
        let cli = Cli::try_parse_from(["x", "--max-num-batched-tokens", "0"]).unwrap();
        assert_eq!(
            cli.args.config().unwrap_err().flag,
            "max-num-batched-tokens"
        );
        let cli = Cli::try_parse_from(["x", "--step-timeout-s", "0"]).unwrap();
        assert_eq!(cli.args.config().unwrap_err().flag, "step-timeout-s");
        let cli = Cli::try_parse_from([
            "x",
            "--max-num-seqs",
            "64",
            "--max-num-batched-tokens",
            "32",
        ])
        .unwrap();
        let err = cli.args.config().unwrap_err();
        assert_eq!(err.flag, "max-num-batched-tokens");
        assert!(
            err.message.contains("--max-num-seqs (64)"),
            "{}",
            err.message
        );
    }
}
