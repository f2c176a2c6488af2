//! Command-line configuration of `shardline bench` and the parsers of its value syntax
//! (durations like `500ms`, SLOs like `ttft=500ms,tpot=50ms`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::Endpoint;
use crate::fake::FakeConfig;
use crate::metrics::Slo;
use crate::workload::LenDist;

/// `shardline bench`: load-test any OpenAI-compatible endpoint.
///
/// Without a subcommand it runs the load generator; `fake-server` and `sim` are helpers.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,

    /// Server root (an `/v1` suffix is accepted), e.g. http://127.0.0.1:8000.
    #[arg(
        long,
        env = "SHARDLINE_BENCH_BASE_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub base_url: String,
    /// Model name to send; default: the first model `GET /v1/models` lists.
    #[arg(long, env = "SHARDLINE_BENCH_MODEL")]
    pub model: Option<String>,
    /// Bearer token for the server.
    #[arg(long, env = "SHARDLINE_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` base URL (a private CA); the
    /// client trusts nothing else.
    #[arg(long, env = "SHARDLINE_BENCH_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Which endpoint to call.
    #[arg(
        long,
        env = "SHARDLINE_BENCH_ENDPOINT",
        value_enum,
        default_value = "completions"
    )]
    pub endpoint: Endpoint,

    /// Closed loop: requests kept in flight; a comma list sweeps (e.g. 1,4,16).
    #[arg(
        long,
        env = "SHARDLINE_BENCH_CONCURRENCY",
        value_delimiter = ',',
        conflicts_with = "request_rate"
    )]
    pub concurrency: Vec<usize>,
    /// Open loop: arrivals per second; a comma list sweeps; `inf` sends all at once.
    #[arg(long, env = "SHARDLINE_BENCH_REQUEST_RATE", value_delimiter = ',')]
    pub request_rate: Vec<f64>,
    /// Gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier, > 1 smoother.
    #[arg(long, env = "SHARDLINE_BENCH_BURSTINESS", default_value_t = 1.0)]
    pub burstiness: f64,
    /// Open loop: cap on requests in flight (arrivals wait for a slot).
    #[arg(long, env = "SHARDLINE_BENCH_MAX_CONCURRENCY")]
    pub max_concurrency: Option<usize>,
    /// Requests per load point (default 100 when --duration is not given either).
    #[arg(long, env = "SHARDLINE_BENCH_NUM_REQUESTS")]
    pub num_requests: Option<usize>,
    /// Time per load point (e.g. 30s, 2m); requests in flight at the end still count.
    #[arg(long, env = "SHARDLINE_BENCH_DURATION", value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// With --duration: cancel the requests still in flight when it ends, so a run whose
    /// answers have no length limit (chats without max_tokens) ends on time. Their tokens
    /// so far count in the token throughput; they are reported as cut off.
    #[arg(long, env = "SHARDLINE_BENCH_CUT_OFF", requires = "duration")]
    pub cut_off: bool,
    /// After a 429 with `Retry-After`, the lane (closed loop) or slot (--max-concurrency)
    /// that sent it waits that long before the next request, as the OpenAI SDKs do,
    /// instead of sending again at once (at most 60 s, never past --duration).
    #[arg(long, env = "SHARDLINE_BENCH_HONOR_RETRY_AFTER")]
    pub honor_retry_after: bool,
    /// Requests sent (and not counted) before each load point, with prompts of their own.
    #[arg(long, env = "SHARDLINE_BENCH_WARMUP_REQUESTS", default_value_t = 0)]
    pub warmup_requests: usize,
    /// Per-request timeout (e.g. 600s).
    #[arg(long, env = "SHARDLINE_BENCH_TIMEOUT", value_parser = parse_secs, default_value = "600s")]
    pub timeout: Duration,

    /// What to send.
    #[arg(
        long,
        env = "SHARDLINE_BENCH_WORKLOAD",
        value_enum,
        default_value = "random"
    )]
    pub workload: WorkloadKind,
    /// Prompt length in tokens: N, fixed:N, uniform:LO:HI or normal:MEAN:STD.
    #[arg(long, env = "SHARDLINE_BENCH_INPUT_LEN", default_value = "256")]
    pub input_len: LenDist,
    /// Output length in tokens (sent as max_tokens, and min_tokens with --ignore-eos).
    #[arg(long, env = "SHARDLINE_BENCH_OUTPUT_LEN", default_value = "128")]
    pub output_len: LenDist,
    /// Shared prefix: number of distinct system prompts (N).
    #[arg(long, env = "SHARDLINE_BENCH_PREFIX_GROUPS", default_value_t = 4)]
    pub prefix_groups: usize,
    /// Shared prefix: questions per system prompt (M).
    #[arg(long, env = "SHARDLINE_BENCH_PREFIX_QUESTIONS", default_value_t = 16)]
    pub prefix_questions: usize,
    /// Shared prefix: system prompt length in tokens.
    #[arg(long, env = "SHARDLINE_BENCH_PREFIX_LEN", default_value_t = 512)]
    pub prefix_len: u32,
    /// Shared prefix: tokens every system prompt starts with (one common preamble, so
    /// the prompts share their first blocks and differ after; part of --prefix-len).
    #[arg(long, env = "SHARDLINE_BENCH_PREFIX_HEADER_LEN", default_value_t = 0)]
    pub prefix_header_len: u32,
    /// Trace: JSONL file of {"timestamp": ms, "input_len": n, "output_len": m}.
    #[arg(
        long,
        env = "SHARDLINE_BENCH_TRACE",
        required_if_eq("workload", "trace")
    )]
    pub trace: Option<PathBuf>,
    /// Trace: replay speed-up (2 = twice as fast).
    #[arg(long, env = "SHARDLINE_BENCH_TRACE_SPEED", default_value_t = 1.0)]
    pub trace_speed: f64,
    /// Distinct random prompts to build (cycled); default: the request count, at most 1000.
    #[arg(long, env = "SHARDLINE_BENCH_NUM_PROMPTS")]
    pub num_prompts: Option<usize>,
    /// The served model's tokenizer, for exact token counts: a Hugging Face
    /// tokenizer.json, a GGUF file or a Hugging Face model directory.
    #[arg(long, env = "SHARDLINE_BENCH_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Send ignore_eos + min_tokens so every output has exactly max_tokens tokens.
    #[arg(long, env = "SHARDLINE_BENCH_IGNORE_EOS", default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// JSON object merged into every request body, e.g. '{"temperature": 0.7}'.
    #[arg(long, env = "SHARDLINE_BENCH_EXTRA_BODY")]
    pub extra_body: Option<String>,
    /// Seed of prompts and arrivals.
    #[arg(long, env = "SHARDLINE_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Goodput objectives, e.g. ttft=500ms,tpot=50ms,itl=100ms,e2e=10s (bare numbers are ms).
    #[arg(long, env = "SHARDLINE_BENCH_SLO", value_parser = parse_slo)]
    pub slo: Option<Slo>,
    /// Write the results as JSON here.
    #[arg(long, env = "SHARDLINE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Write PNG and SVG plots into this directory.
    #[arg(long, env = "SHARDLINE_BENCH_PLOTS")]
    pub plots: Option<PathBuf>,
    /// Sample the server's Prometheus metrics during each load point.
    #[arg(long, env = "SHARDLINE_BENCH_SCRAPE_METRICS")]
    pub scrape_metrics: bool,
    /// Metrics URL; default: <base-url>/metrics.
    #[arg(long, env = "SHARDLINE_BENCH_METRICS_URL")]
    pub metrics_url: Option<String>,
    /// No live progress bar.
    #[arg(long, env = "SHARDLINE_BENCH_NO_PROGRESS")]
    pub no_progress: bool,
}

/// Helpers run as `shardline bench <command>`.
#[derive(Debug, Clone, clap::Subcommand)]
// Parsed once per process: boxing the large variant would save nothing worth its noise.
#[allow(clippy::large_enum_variant)]
pub enum BenchCommand {
    /// Serve a fake OpenAI endpoint (zero latency by default) to measure the generator.
    FakeServer(FakeServerArgs),
    /// Run a simulated worker group (same as `shardline worker --model sim:<profile>`).
    Sim(crate::sim::SimArgs),
    /// Write the markdown report and plots of a scaling study (deploy/bench/scaling.sh).
    ScalingReport(crate::scaling::ScalingReportArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct FakeServerArgs {
    /// Address to listen on.
    #[arg(long, env = "SHARDLINE_FAKE_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub fake: FakeConfig,
}

/// The kind of workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Random prompts with --input-len / --output-len distributions.
    Random,
    /// N system prompts × M questions (--prefix-groups, --prefix-questions, --prefix-len).
    SharedPrefix,
    /// Replay --trace.
    Trace,
}

/// A duration with a unit (ns, us, ms, s, m, h); bare numbers are in `bare_unit`.
pub fn parse_duration(s: &str, bare_unit: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 30s, 2m"))?;
    let scale = match if unit.is_empty() {
        bare_unit
    } else {
        unit.trim()
    } {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => {
            return Err(format!(
                "bad duration unit {u:?} in {s:?}: use ns, us, ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("bad duration {s:?}: {e}"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    parse_duration(s, "s")
}

/// `ttft=500ms,tpot=50ms,itl=100ms,e2e=10s`.
pub fn parse_slo(s: &str) -> Result<Slo, String> {
    let mut slo = Slo::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("bad SLO {part:?}: expected name=duration"))?;
        let d = Some(parse_duration(value, "ms")?);
        match key.trim().to_ascii_lowercase().as_str() {
            "ttft" => slo.ttft = d,
            "tpot" => slo.tpot = d,
            "itl" => slo.itl = d,
            "e2e" | "e2el" => slo.e2e = d,
            k => return Err(format!("unknown SLO {k:?}: use ttft, tpot, itl or e2e")),
        }
    }
    if slo.is_empty() {
        return Err("empty SLO".into());
    }
    Ok(slo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_slos_parse() {
        assert_eq!(parse_duration("500ms", "s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m", "s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5", "s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs", "s").is_err());
        assert!(parse_duration("ms", "s").is_err());
        let slo = parse_slo("ttft=500ms, tpot=50,e2e=10s").unwrap();
        assert_eq!(slo.ttft, Some(Duration::from_millis(500)));
        assert_eq!(slo.tpot, Some(Duration::from_millis(50)));
        assert_eq!(slo.e2e, Some(Duration::from_secs(10)));
        assert!(parse_slo("latency=1s").is_err());
        assert!(parse_slo("ttft").is_err());
    }
}
