//! The simulated worker.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {}
pub async fn run_sim(_a: SimArgs, _s: tokio_util::sync::CancellationToken) -> anyhow::Result<()> { Ok(()) }
pub async fn serve_sim() {}
