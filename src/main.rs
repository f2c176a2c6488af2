//! The `shardline` command: `up`, `coordinator`, `worker`, `bench`, `engine-bench`,
//! `hash-key`.
//!
//! Thin on purpose: parse flags, set up logging and the shutdown token (Ctrl-C /
//! SIGTERM), and call the crate that does the work.

use clap::Parser;
use shardline::cli::{Cli, Command, EngineBenchArgs};
use shardline::up;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: the coordinator allocates small, short-lived
/// buffers per token and per step (about a tenth of its CPU went to glibc's malloc, free
/// and chunk consolidation), and the CPU engine's per-layer tensors come back faster too
/// (batch-1 decode of SmolLM2 on two threads: 188–206 → 244–246 tokens/s, same run).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the engine benchmark on a blocking thread and prints its table and figures.
async fn engine_bench(args: EngineBenchArgs) -> anyhow::Result<()> {
    use shardline_worker::model::bench::{BenchOptions, format_table, run_bench};
    anyhow::ensure!(
        args.model.exists(),
        "{} does not exist",
        args.model.display()
    );
    let opts = BenchOptions {
        threads: args.threads,
        pp_tokens: args.pp_tokens,
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        batches: args.batches,
        device: args.device,
    };
    let report = tokio::task::spawn_blocking(move || {
        run_bench(&args.model, &opts).map(|r| (r, args.model, opts.threads))
    })
    .await??;
    let (report, model, threads) = report;
    print!("{}", format_table(&model, threads, &report.rows));
    print!("{}", report.format_decode());
    Ok(())
}

/// `shardline hash-key`: every line of stdin (a key) as the keys file stores it.
fn hash_keys() -> anyhow::Result<()> {
    use std::io::BufRead;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let key = line.trim_end_matches('\r');
        anyhow::ensure!(!key.is_empty(), "an empty line is not a key");
        println!("{}", shardline_coordinator::keys::hash_key(key));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.runtime.runtime_threads {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        // In the runtime: the trace exporter's gRPC channel runs on it.
        let telemetry = shardline_telemetry::init(&cli.telemetry, cli.command.service_name())?;
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = match cli.command {
            Command::Up(args) => up::run(args, shutdown).await,
            Command::Coordinator(args) => shardline_coordinator::run(args, shutdown).await,
            Command::Worker(args) => match sim_profile(&args) {
                Some(_) if args.tls_cert.is_some() => Err(anyhow::anyhow!(
                    "--tls-cert: the simulated worker (--model sim:…) serves no TLS"
                )),
                Some(profile) => shardline_bench::run_sim(sim_args(args, profile), shutdown).await,
                None => shardline_worker::run(args, shutdown).await,
            },
            Command::Bench(args) => shardline_bench::run(args, shutdown).await,
            Command::EngineBench(args) => engine_bench(args).await,
            Command::HashKey => hash_keys(),
        };
        tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
        result
    })
}

/// `--model sim:<profile>` selects the simulated worker (a cost model, no weights).
fn sim_profile(args: &shardline_worker::WorkerArgs) -> Option<String> {
    let model = args.model.to_str()?;
    model.starts_with("sim:").then(|| model.to_string())
}

/// The simulated worker with the worker flags that apply to it; its own knobs (time
/// scale, tokenizer) are flags of `shardline bench sim`.
fn sim_args(args: shardline_worker::WorkerArgs, profile: String) -> shardline_bench::SimArgs {
    shardline_bench::SimArgs {
        profile,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tokenizer: None,
        chat_template: None,
        group_id: args.group_id,
        time_scale: 1.0,
        kv_blocks: args.kv_blocks.map(|b| b as u32),
        max_num_seqs: Some(args.max_num_seqs as u32),
        registration: args.registration,
    }
}

/// Cancels `shutdown` on the first Ctrl-C or SIGTERM; a second one exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler: this is a bug");
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            tracing::info!("shutting down (signal again to exit at once)");
            shutdown.cancel();
        }
    }
    std::process::exit(130);
}
