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

/// Prints a report line. A closed stdout (`shardline bench … | head`) is no reason to stop
/// a benchmark: the run goes on and still writes its JSON and plots.
fn say(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

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
            say(scaling::write_report(&r)?.trim_end());
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
    let mut builder = reqwest::Client::builder();
    if let Some(path) = &args.ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("--ca-cert {}", path.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("--ca-cert {}: not a PEM certificate", path.display()))?;
        builder = builder.add_root_certificate(ca);
    }
    let http = builder.build().context("building the HTTP client")?;
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
    let maker = PromptMaker::new(match &args.tokenizer {
        None => None,
        Some(p) => Some(load_tokenizer(p)?),
    });
    let num_prompts = args
        .num_prompts
        .unwrap_or_else(|| num_requests.unwrap_or(1000).min(1000))
        .max(1);
    let loads = loads(args)?;
    let slo = args.slo.unwrap_or_default();
    let mut runs = Vec::new();
    let mut dists = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        if shutdown.is_cancelled() {
            break;
        }
        // Each point and each warm-up gets its own prompts (same distributions, own
        // seed): a request whose prompt the server has already seen would hit its prefix
        // cache and report a TTFT no fresh request gets.
        let requests = Arc::new(build_workload(
            args,
            &maker,
            num_prompts,
            workload_seed(args.seed, SeedUse::Point, i),
        )?);
        if args.warmup_requests > 0 {
            let warm_requests = Arc::new(build_workload(
                args,
                &maker,
                args.warmup_requests,
                workload_seed(args.seed, SeedUse::Warmup, i),
            )?);
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
                cut_off: false,
                honor_retry_after: args.honor_retry_after,
                seed: args.seed,
                progress: false,
            };
            runner::run_point(
                client.clone(),
                http.clone(),
                warm_requests,
                &warm,
                shutdown.clone(),
            )
            .await?;
            if shutdown.is_cancelled() {
                break;
            }
        }
        let point = Point {
            load: *load,
            num_requests,
            duration: args.duration,
            cut_off: args.cut_off,
            honor_retry_after: args.honor_retry_after,
            seed: args.seed.wrapping_add(i as u64),
            progress: !args.no_progress,
        };
        let scrape_stop = CancellationToken::new();
        let scraper = if args.scrape_metrics {
            let url = args
                .metrics_url
                .clone()
                .unwrap_or_else(|| format!("{}/metrics", root_url(&args.base_url)));
            Some(scrape::start(url, Duration::from_secs(1), scrape_stop.clone()).await)
        } else {
            None
        };
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
        say(&report::point_table(&summary));
        for r in records.iter().filter_map(|r| r.error.as_ref()).take(3) {
            say(&format!("  e.g. error: {r}"));
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
        say(&report::sweep_table(&runs));
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

/// What a workload seed is for: the measured requests of a point or its warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeedUse {
    Point,
    Warmup,
}

/// The prompt seed of point `index` (or of its warm-up): distinct for every (use, index),
/// so no two of them send the same prompts; fixed by `--seed`, so reruns send the same.
fn workload_seed(base: u64, what: SeedUse, index: usize) -> u64 {
    let tag = match what {
        SeedUse::Point => 0x5049_4e54u64,
        SeedUse::Warmup => 0x5741_524du64,
    };
    // splitmix64 finaliser over the three inputs.
    let mut z = base ^ tag.rotate_left(32) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `--tokenizer`: a Hugging Face `tokenizer.json`, a GGUF file (tokenizer from its
/// metadata) or a Hugging Face model directory, read by `shardline-tokenizer`.
pub fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if path.is_file() && is_json {
        return tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()));
    }
    shardline_tokenizer::ModelTokenizer::load(path)
        .map(|t| t.tokenizer)
        .with_context(|| {
            format!(
                "loading --tokenizer {} (a tokenizer.json, a GGUF file or a Hugging Face model directory)",
                path.display()
            )
        })
}

fn build_workload(
    args: &BenchArgs,
    maker: &PromptMaker,
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<RequestSpec>> {
    let reqs = match args.workload {
        WorkloadKind::Random => workload::random(maker, n, args.input_len, args.output_len, seed)?,
        WorkloadKind::SharedPrefix => workload::shared_prefix(
            maker,
            workload::SharedPrefix {
                groups: args.prefix_groups.max(1),
                per_group: args.prefix_questions.max(1),
                prefix_len: args.prefix_len,
                header_len: args.prefix_header_len,
            },
            args.input_len,
            args.output_len,
            seed,
        )?,
        WorkloadKind::Trace => {
            let path = args
                .trace
                .as_ref()
                .context("--workload trace needs --trace PATH")?;
            workload::trace(maker, path, args.trace_speed, seed)?
        }
    };
    Ok(reqs)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments parse").args
    }

    fn prompts(args: &BenchArgs, what: SeedUse, i: usize) -> HashSet<String> {
        let maker = PromptMaker::new(None);
        build_workload(args, &maker, 20, workload_seed(args.seed, what, i))
            .unwrap()
            .into_iter()
            .map(|r| format!("{:?} {}", r.system, r.prompt))
            .collect()
    }

    #[test]
    fn warmup_and_points_never_resend_each_others_prompts() {
        for workload in [
            &["--input-len", "16"][..],
            &[
                "--workload",
                "shared-prefix",
                "--prefix-len",
                "16",
                "--input-len",
                "4",
            ][..],
        ] {
            let a = args(workload);
            let mut seen: Vec<HashSet<String>> = vec![];
            for i in 0..3 {
                for what in [SeedUse::Warmup, SeedUse::Point] {
                    let p = prompts(&a, what, i);
                    // Reruns with the same --seed send the same prompts.
                    assert_eq!(p, prompts(&a, what, i));
                    for other in &seen {
                        assert!(p.is_disjoint(other), "{workload:?} point {i} {what:?}");
                    }
                    seen.push(p);
                }
            }
        }
    }

    fn smollm2() -> PathBuf {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.exists(),
            "{} is missing: run deploy/fetch-model.sh",
            p.display()
        );
        p
    }

    #[test]
    fn tokenizer_loads_from_json_gguf_and_hf_dir_alike() {
        let gguf = smollm2();
        let from_gguf = load_tokenizer(&gguf).expect("tokenizer from the GGUF");
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        let model = shardline_tokenizer::ModelTokenizer::load(&gguf).unwrap();
        std::fs::write(&json, &model.json).unwrap();
        let from_json = load_tokenizer(&json).expect("tokenizer.json");
        let from_dir = load_tokenizer(dir.path()).expect("a directory with tokenizer.json");
        let text = "The quick brown fox, 123 déjà vu 🦀";
        let ids = |t: &tokenizers::Tokenizer| t.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids(&from_gguf), ids(&from_json));
        assert_eq!(ids(&from_gguf), ids(&from_dir));
        assert_eq!(from_gguf.get_vocab_size(true), 49152);
    }

    #[test]
    fn unusable_tokenizer_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{not json").unwrap();
        for p in [
            bad,
            dir.path().join("missing.gguf"),
            dir.path().join("nothing-here"),
        ] {
            let e = load_tokenizer(&p).unwrap_err();
            assert!(format!("{e:#}").contains(&*p.to_string_lossy()), "{e:#}");
        }
    }
}
