//! The `shardline` command line: every subcommand's flags, parsed by clap. The binary
//! (`src/main.rs`) runs what it parses; the tests parse command lines with the same
//! parser (the Helm chart's rendered containers, the README's `--help` text).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shardline",
    version,
    about = "Distributed LLM inference: coordinator, worker groups, load generator"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Logs and trace export, for every command.
    #[command(flatten)]
    pub telemetry: shardline_telemetry::TelemetryArgs,
}

// Parsed once at start-up and consumed at once: the variants' sizes do not matter.
// The serving commands take a flag given twice as its last value (a deployment's extra
// arguments override what its template set); repeatable flags (`--worker`, `--etcd`)
// still collect every value.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Start a local cluster: a coordinator and worker groups in this process.
    #[command(args_override_self = true)]
    Up(crate::up::UpArgs),
    /// Run a coordinator (OpenAI-compatible HTTP API, gRPC API) over worker groups.
    #[command(args_override_self = true)]
    Coordinator(shardline_coordinator::CoordinatorArgs),
    /// Run one worker group serving a model (`--model sim:<profile>` for the simulator).
    #[command(args_override_self = true)]
    Worker(shardline_worker::WorkerArgs),
    /// Load generator against an OpenAI-compatible endpoint, and scaling studies.
    Bench(shardline_bench::BenchArgs),
    /// Benchmark the model engine alone (no server): prompt processing and decode
    /// tokens/s per batch, and on a device the memory-bandwidth ratio.
    EngineBench(EngineBenchArgs),
}

impl Command {
    /// The service name of the process in traces.
    pub fn service_name(&self) -> &'static str {
        match self {
            Command::Up(_) => "shardline-up",
            Command::Coordinator(_) => "shardline-coordinator",
            Command::Worker(_) => "shardline-worker",
            Command::Bench(_) => "shardline-bench",
            Command::EngineBench(_) => "shardline-engine-bench",
        }
    }
}

/// Flags of `shardline engine-bench`.
#[derive(clap::Args)]
pub struct EngineBenchArgs {
    /// Model: a GGUF file or a Hugging Face directory (config.json + *.safetensors).
    #[arg(long, env = "SHARDLINE_ENGINE_BENCH_MODEL")]
    pub model: std::path::PathBuf,
    /// `cpu`, `cuda` or `cuda:N`: run through the device backend on that candle device
    /// (bf16 weights on CUDA). Without it: the CPU engine's own kernels.
    #[arg(long, env = "SHARDLINE_ENGINE_BENCH_DEVICE")]
    pub device: Option<shardline_worker::model::device::DeviceChoice>,
    /// Decode batch sizes, comma-separated.
    #[arg(
        long,
        env = "SHARDLINE_ENGINE_BENCH_BATCHES",
        value_delimiter = ',',
        default_value = "1,32"
    )]
    pub batches: Vec<usize>,
    /// Tokens generated per sequence in each decode run.
    #[arg(long, env = "SHARDLINE_ENGINE_BENCH_NEW_TOKENS", default_value_t = 128)]
    pub new_tokens: usize,
    /// Prompt length of each sequence in the decode runs.
    #[arg(
        long,
        env = "SHARDLINE_ENGINE_BENCH_PROMPT_TOKENS",
        default_value_t = 128
    )]
    pub prompt_tokens: usize,
    /// Prompt length of the prompt-processing run.
    #[arg(long, env = "SHARDLINE_ENGINE_BENCH_PP_TOKENS", default_value_t = 512)]
    pub pp_tokens: usize,
    /// CPU threads for the CPU kernels.
    #[arg(long, env = "SHARDLINE_ENGINE_BENCH_THREADS", default_value_t = default_threads())]
    pub threads: usize,
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value_and_lists_collect() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "shardline",
            "coordinator",
            "--max-num-seqs=64",
            "--worker=http://a:1",
            "--max-num-seqs=32",
            "--worker=http://b:2",
        ])
        .unwrap();
        let super::Command::Coordinator(args) = cli.command else {
            panic!("not the coordinator")
        };
        assert_eq!(args.max_num_seqs, 32);
        assert_eq!(args.workers, ["http://a:1", "http://b:2"]);
    }
}
