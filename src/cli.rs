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
    /// The async runtime every command runs on.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The async runtime's flags, for every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Threads of the async runtime that serves the APIs, the step streams and the
    /// schedulers (default: one per CPU this process may use; the model kernels have their
    /// own, `--threads`). A request's tokens pass between tasks that run on any of them,
    /// and each hand-over to an idle thread wakes it: a coordinator that needs less than
    /// its CPUs spends less CPU per token on fewer threads (measured on 2 cores, 16
    /// groups: about a fifth less with 1 than with 2; docs/benchmarks.md).
    #[arg(
        long,
        env = "SHARDLINE_RUNTIME_THREADS",
        global = true,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub runtime_threads: Option<u16>,
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
    /// Print the SHA-256 form (`sha256:<hex>`) of the API key read from stdin, as the
    /// keys file (`--api-keys-file`) stores it; e.g. `printf %s "$KEY" | shardline
    /// hash-key`. One key per line hashes each line.
    HashKey,
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
            Command::HashKey => "shardline-hash-key",
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

    /// `--runtime-threads` goes after any subcommand; zero threads is refused.
    #[test]
    fn runtime_threads_is_taken_by_every_command_and_must_be_positive() {
        use clap::Parser;
        for command in [
            &["coordinator"][..],
            &["worker", "--model=sim:h100-llama3-8b"],
            &["up"],
            &["bench"],
        ] {
            let argv = ["shardline"]
                .iter()
                .chain(command)
                .chain(&["--runtime-threads=1"]);
            let cli =
                super::Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{command:?}: {e}"));
            assert_eq!(cli.runtime.runtime_threads, Some(1), "{command:?}");
        }
        let e = super::Cli::try_parse_from(["shardline", "coordinator", "--runtime-threads=0"])
            .err()
            .expect("0 threads refused");
        assert!(e.to_string().contains("--runtime-threads"), "{e}");
    }
}
