//! `shardline bench` as a standalone binary, for measuring the generator without building
//! the whole `shardline` command: `cargo run -p shardline-bench --example shardline-bench -- --help`.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "shardline-bench")]
struct Cli {
    #[command(flatten)]
    args: shardline_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    shardline_bench::run(cli.args, shutdown).await
}
