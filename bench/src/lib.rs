//! `shardline bench`: a load generator for any OpenAI-compatible server, and the
//! simulated worker used to study shardline's scaling without GPUs.
//!
//! - [`args`]: the command line ([`BenchArgs`], [`BenchCommand`]).
//! - [`workload`]: random, shared-prefix and trace-replay requests.
//! - [`arrival`]: Poisson / gamma arrival times for open-loop load.
//! - [`client`]: the streaming SSE client that timestamps chunk arrivals.
//! - [`runner`]: closed loop, open loop and trace replay of one load point.
//! - [`metrics`]: TTFT, ITL, TPOT, E2E percentiles, throughput and goodput.
//! - [`report`], [`plot`]: the table, `--json` and PNG/SVG plots.
//! - [`scrape`]: server gauges from `/metrics` during a run.
//! - [`fake`]: a fake OpenAI server (tests, generator saturation).
//! - [`scaling`]: the scaling-study report (`scaling-report`).
//! - [`sim`]: the simulated worker (`shardline worker --model sim:<profile>`).

pub mod args;
pub mod arrival;
pub mod client;
pub mod fake;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod runner;
pub mod scaling;
pub mod scrape;
pub mod sim;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

pub use args::{BenchArgs, BenchCommand};
pub use sim::{SimArgs, run_sim, serve_sim};

use args::WorkloadKind;
use client::ClientConfig;
use metrics::RunSummary;
use runner::{Load, Point};
use workload::{PromptMaker, RequestSpec};

/// Run `shardline bench` (or one of its subcommands) until done or `shutdown`.
pub async fn run(args: BenchArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    match args.command.clone() {
        Some(BenchCommand::FakeServer(f)) => {
            let listener = tokio::net::TcpListener::bind(f.listen)
                .await
                .with_context(|| format!("binding {}", f.listen))?;
            eprintln!("fake OpenAI server on http://{}", listener.local_addr()?);
            fake::serve_fake(listener, f.fake, shutdown).await?;
            Ok(())
        }
        Some(BenchCommand::Sim(s)) => run_sim(s, shutdown).await,
        Some(BenchCommand::ScalingReport(r)) => {
            print!("{}", scaling::write_report(&r)?);
            Ok(())
        }
        None => run_bench(&args, shutdown).await.map(|_| ()),
    }
}

/// The load generator: every load point in turn; prints, writes JSON and plots.
pub async fn run_bench(
    args: &BenchArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<RunSummary>> {
    let http = reqwest::Client::builder()
        .build()
        .context("building the HTTP client")?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&http, &args.base_url).await?,
    };
    let extra_body = match &args.extra_body {
        None => None,
        Some(s) => match serde_json::from_str(s).context("--extra-body is not JSON")? {
            v @ serde_json::Value::Object(_) => Some(v),
            _ => bail!("--extra-body must be a JSON object"),
        },
    };
    let client = Arc::new(ClientConfig {
        base_url: args.base_url.clone(),
        model: model.clone(),
        api_key: args.api_key.clone(),
        endpoint: args.endpoint,
        ignore_eos: args.ignore_eos,
        extra_body,
        timeout: args.timeout,
    });
    let num_requests = match (args.num_requests, args.duration) {
        (None, None) => Some(100),
        (n, _) => n,
    };
    let requests = Arc::new(build_workload(args, num_requests)?);
    let loads = loads(args)?;
    let slo = args.slo.unwrap_or_default();
    let mut runs = Vec::new();
    let mut dists = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        if shutdown.is_cancelled() {
            break;
        }
        if args.warmup_requests > 0 {
            let c = match *load {
                Load::Concurrency(c) => c,
                Load::Rate {
                    max_concurrency, ..
                } => max_concurrency.unwrap_or(8),
                Load::Trace => 8,
            };
            let warm = Point {
                load: Load::Concurrency(c.min(args.warmup_requests)),
                num_requests: Some(args.warmup_requests),
                duration: None,
                seed: args.seed,
                progress: false,
            };
            runner::run_point(
                client.clone(),
                http.clone(),
                requests.clone(),
                &warm,
                shutdown.clone(),
            )
            .await?;
        }
        let point = Point {
            load: *load,
            num_requests,
            duration: args.duration,
            seed: args.seed.wrapping_add(i as u64),
            progress: !args.no_progress,
        };
        let scrape_stop = CancellationToken::new();
        let scraper = args.scrape_metrics.then(|| {
            let url = args
                .metrics_url
                .clone()
                .unwrap_or_else(|| format!("{}/metrics", root_url(&args.base_url)));
            tokio::spawn(scrape::sample(
                url,
                Duration::from_secs(1),
                scrape_stop.clone(),
            ))
        });
        let records = runner::run_point(
            client.clone(),
            http.clone(),
            requests.clone(),
            &point,
            shutdown.clone(),
        )
        .await?;
        scrape_stop.cancel();
        let mut summary = metrics::summarize(&load.label(), load.value(), &records, &slo);
        if load.value() == 0.0 {
            summary.load_value = summary.request_throughput;
        }
        if let Some(task) = scraper {
            summary.server = task.await.ok();
        }
        println!("{}", report::point_table(&summary));
        for r in records.iter().filter_map(|r| r.error.as_ref()).take(3) {
            println!("  e.g. error: {r}");
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ok = records.iter().filter(|r| r.failure.is_none());
        let ttft: Vec<f64> = ok.clone().filter_map(|r| r.ttft()).map(ms).collect();
        let itl: Vec<f64> = ok
            .flat_map(|r| r.itls().map(ms).collect::<Vec<_>>())
            .collect();
        dists.push((ttft, itl));
        runs.push(summary);
    }
    if runs.len() > 1 {
        println!("{}", report::sweep_table(&runs));
    }
    if let Some(path) = &args.json {
        let results = report::Results {
            shardline_bench_version: env!("CARGO_PKG_VERSION"),
            base_url: &args.base_url,
            model: &model,
            endpoint: args.endpoint,
            workload: format!(
                "{:?} input={:?} output={:?}",
                args.workload, args.input_len, args.output_len
            ),
            slo,
            runs: &runs,
        };
        report::write_json(path, &results)?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, (run, (ttft, itl))) in runs.iter().zip(&dists).enumerate() {
            let stem = format!("dist-{i:02}-{}", run.load.replace(['=', '/'], "_"));
            plot::distributions(dir, &stem, &format!("{model} {}", run.load), ttft, itl)?;
        }
        if runs.len() > 1 {
            let x = if args.concurrency.is_empty() {
                "offered request rate (req/s)"
            } else {
                "concurrency"
            };
            plot::sweep(dir, "sweep", &runs, x)?;
        }
        eprintln!("plots written to {}", dir.display());
    }
    Ok(runs)
}

fn root_url(base: &str) -> &str {
    let base = base.trim_end_matches('/');
    base.strip_suffix("/v1").unwrap_or(base)
}

async fn first_model(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let url = format!("{}/v1/models", root_url(base));
    let v: serde_json::Value = http
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("GET {url} (or pass --model)"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON (pass --model)"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{url} lists no model; pass --model"))
}

fn loads(args: &BenchArgs) -> anyhow::Result<Vec<Load>> {
    if args.workload == WorkloadKind::Trace {
        if !args.concurrency.is_empty() || !args.request_rate.is_empty() {
            bail!("a trace sets its own arrival times: drop --concurrency / --request-rate");
        }
        return Ok(vec![Load::Trace]);
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency must be ≥ 1");
    }
    if let Some(r) = args.request_rate.iter().find(|r| r.is_nan() || **r <= 0.0) {
        bail!("--request-rate must be > 0 (got {r})");
    }
    if !(args.burstiness > 0.0 && args.burstiness.is_finite()) {
        bail!("--burstiness must be > 0");
    }
    let mut loads: Vec<Load> = args
        .concurrency
        .iter()
        .map(|&c| Load::Concurrency(c))
        .collect();
    loads.extend(args.request_rate.iter().map(|&rate| Load::Rate {
        rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
    }));
    if loads.is_empty() {
        loads.push(Load::Concurrency(1));
    }
    Ok(loads)
}

fn build_workload(
    args: &BenchArgs,
    num_requests: Option<usize>,
) -> anyhow::Result<Vec<RequestSpec>> {
    let tokenizer = match &args.tokenizer {
        None => None,
        Some(p) => Some(
            tokenizers::Tokenizer::from_file(p)
                .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", p.display()))?,
        ),
    };
    let maker = PromptMaker::new(tokenizer);
    let n = args
        .num_prompts
        .unwrap_or_else(|| num_requests.unwrap_or(1000).min(1000))
        .max(1);
    let reqs = match args.workload {
        WorkloadKind::Random => {
            workload::random(&maker, n, args.input_len, args.output_len, args.seed)?
        }
        WorkloadKind::SharedPrefix => workload::shared_prefix(
            &maker,
            args.prefix_groups.max(1),
            args.prefix_questions.max(1),
            args.prefix_len,
            args.input_len,
            args.output_len,
            args.seed,
        )?,
        WorkloadKind::Trace => {
            let path = args
                .trace
                .as_ref()
                .context("--workload trace needs --trace PATH")?;
            workload::trace(&maker, path, args.trace_speed, args.seed)?
        }
    };
    Ok(reqs)
}
