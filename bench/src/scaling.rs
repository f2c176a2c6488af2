//! `shardline bench scaling-report`: turns the per-size results of a scaling study
//! (`deploy/bench/scaling.sh`: one `--json` per number of simulated groups, swept over
//! the same per-group rates) into a markdown report and plots against the group count.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::metrics::RunSummary;

/// Inputs of the report.
#[derive(Debug, Clone, clap::Args)]
pub struct ScalingReportArgs {
    /// One study size (repeatable):
    /// GROUPS=RESULTS.json[:COORD_CPU_S[:BENCH_CPU_S:SIMS_CPU_S:MACHINE_BUSY:WALL_S]]:
    /// user + system CPU seconds of the coordinator, the load generator and all simulated
    /// workers over that bench run, the share of the machine's CPU time that was busy
    /// meanwhile (0–1, every process counted) and the run's wall time.
    #[arg(
        long = "size",
        env = "SHARDLINE_SCALING_SIZES",
        value_delimiter = ',',
        required = true
    )]
    pub sizes: Vec<String>,
    /// Modelled time of one request's prefill alone (ms), subtracted from TTFT to estimate
    /// the latency the coordinator adds.
    #[arg(long, env = "SHARDLINE_SCALING_PREFILL_MS", default_value_t = 0.0)]
    pub prefill_ms: f64,
    /// Directory for report.md and the plots.
    #[arg(long, env = "SHARDLINE_SCALING_OUT")]
    pub out: PathBuf,
    /// Free text put at the top of the report (the command that produced it).
    #[arg(long, env = "SHARDLINE_SCALING_COMMAND", default_value = "")]
    pub command: String,
}

#[derive(Deserialize)]
struct ResultsFile {
    runs: Vec<RunSummary>,
}

/// One study size, loaded.
struct Size {
    groups: u32,
    cpu_s: Option<f64>,
    /// Load generator CPU s, simulated workers' CPU s, machine busy share, wall s.
    machine: Option<(f64, f64, f64, f64)>,
    runs: Vec<RunSummary>,
}

fn load(spec: &str) -> anyhow::Result<Size> {
    let (groups, rest) = spec
        .split_once('=')
        .with_context(|| format!("bad --size {spec:?}: expected GROUPS=FILE[:CPU]"))?;
    let groups: u32 = groups
        .parse()
        .with_context(|| format!("bad group count in {spec:?}"))?;
    // Trailing numeric fields are the CPU figures; the rest is the path.
    let mut fields: Vec<&str> = rest.split(':').collect();
    let mut nums = Vec::new();
    while fields.len() > 1 {
        match fields.last().and_then(|f| f.parse::<f64>().ok()) {
            Some(v) => {
                nums.insert(0, v);
                fields.pop();
            }
            None => break,
        }
    }
    let path = fields.join(":");
    let path = path.as_str();
    let cpu = nums.first().copied();
    let machine = match nums[..] {
        [_, bench, sims, busy, wall] => Some((bench, sims, busy, wall)),
        _ => None,
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let file: ResultsFile = serde_json::from_str(&text)
        .with_context(|| format!("{path} is not a shardline bench --json file"))?;
    if groups == 0 || file.runs.is_empty() {
        bail!("{spec}: no groups or no runs");
    }
    Ok(Size {
        groups,
        cpu_s: cpu,
        machine,
        runs: file.runs,
    })
}

/// Write `<out>/report.md`, `<out>/scaling.{png,svg}`; returns the markdown.
pub fn write_report(args: &ScalingReportArgs) -> anyhow::Result<String> {
    let mut sizes: Vec<Size> = args
        .sizes
        .iter()
        .map(|s| load(s))
        .collect::<anyhow::Result<_>>()?;
    sizes.sort_by_key(|s| s.groups);
    let points = sizes.iter().map(|s| s.runs.len()).min().unwrap_or(0);
    let base = &sizes[0];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Scaling study: coordinator + simulated worker groups\n"
    );
    if !args.command.is_empty() {
        let _ = writeln!(md, "Command:\n\n```\n{}\n```\n", args.command);
    }
    let _ = writeln!(
        md,
        "Load point k offers the same per-group rate at every size (the total rate is per-group rate × groups). \
         Efficiency = throughput / (groups × {}-group throughput at the same per-group load). \
         Added TTFT = TTFT − {:.1} ms (one request's modelled prefill alone): the coordinator, the network and \
         waiting for a running step to end. Achieved/offered = completed req/s ÷ offered rate; with Poisson \
         arrivals a point of n requests varies by about 1/√n on its own. CPU/token = coordinator user+system CPU over the whole sweep ÷ output tokens.\n",
        base.groups, args.prefill_ms
    );
    let _ = writeln!(
        md,
        "| point | groups | offered | req/s | achieved/offered | out tok/s | tok/s per group | efficiency | TTFT p50 | TTFT p99 | added TTFT p99 | TPOT p50 | TPOT p99 | failed+429 |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for k in 0..points {
        for s in &sizes {
            let r = &s.runs[k];
            let b = &base.runs[k];
            let eff = r.output_throughput
                / (b.output_throughput * f64::from(s.groups) / f64::from(base.groups)).max(1e-9);
            let _ = writeln!(
                md,
                "| {k} | {} | {} | {:.1} | {} | {:.0} | {:.0} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
                s.groups,
                r.load,
                r.request_throughput,
                if r.load_value > 0.0 {
                    format!("{:.1}%", r.request_throughput / r.load_value * 100.0)
                } else {
                    "-".into()
                },
                r.output_throughput,
                r.output_throughput / f64::from(s.groups),
                eff * 100.0,
                r.ttft_ms.p50,
                r.ttft_ms.p99,
                r.ttft_ms.p99 - args.prefill_ms,
                r.tpot_ms.p50,
                r.tpot_ms.p99,
                r.failed + r.rate_limited
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| groups | coordinator CPU s | output tokens (all points) | CPU µs / output token |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for s in &sizes {
        let tokens: u64 = s.runs.iter().map(|r| r.total_output_tokens).sum();
        let per = s.cpu_s.map_or("-".into(), |c| {
            format!("{:.1}", c * 1e6 / tokens.max(1) as f64)
        });
        let _ = writeln!(
            md,
            "| {} | {} | {tokens} | {per} |",
            s.groups,
            s.cpu_s.map_or("-".into(), |c| format!("{c:.2}"))
        );
    }
    breakdown_tables(&mut md, &sizes, points, args.prefill_ms);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    plots(&args.out, &sizes, points, args.prefill_ms)?;
    let _ = writeln!(md, "\n![scaling](scaling.png)");
    let path = args.out.join("report.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    Ok(md)
}

/// Where the added TTFT goes (from the coordinator's histograms, scraped per point) and
/// how busy the machine was.
fn breakdown_tables(md: &mut String, sizes: &[Size], points: usize, prefill_ms: f64) {
    let _ = writeln!(
        md,
        "\n### Where the added TTFT goes (server-side, per point)\n\n\
         From the coordinator's histograms over each point (`--scrape-metrics`; quantiles \
         interpolated inside buckets, so only as fine as the buckets): *queue* = handed to \
         the group's scheduler → first step sent (waiting for the step in flight, the \
         per-step token budget or a slot); *coordinator + hop* = TTFT − queue − the \
         worker's reported step time for the steps up to the first token (validation, \
         tokenization, scheduling, the gRPC round trip, fan-out and detokenization); \
         *step overhead* = step RPC round trip − the worker's step time, for every step. \
         *extra step time* (p50) = client TTFT p50 − queue p50 − coordinator + hop p50 − \
         {prefill_ms:.1} ms: the first step also carries other requests' decodes and \
         prefills.\n"
    );
    let _ = writeln!(
        md,
        "| point | groups | added TTFT p50 | added TTFT p99 | queue p50 | queue p99 | coordinator + hop p50 | coordinator + hop p90 | coordinator + hop p99 | extra step time p50 | step overhead p50 | step overhead p99 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for k in 0..points {
        for s in sizes {
            let r = &s.runs[k];
            let srv = r.server.as_ref();
            let queue = srv.and_then(|x| x.queue_time_ms);
            let own = srv.and_then(|x| x.first_token_overhead_ms);
            let step = srv.and_then(|x| x.step_overhead_ms);
            let extra = match (queue, own) {
                (Some(q), Some(o)) => Some(r.ttft_ms.p50 - q.p50 - o.p50 - prefill_ms),
                _ => None,
            };
            let _ = writeln!(
                md,
                "| {k} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.groups,
                r.ttft_ms.p50 - prefill_ms,
                r.ttft_ms.p99 - prefill_ms,
                f(queue.map(|q| q.p50)),
                f(queue.map(|q| q.p99)),
                f(own.map(|q| q.p50)),
                f(own.map(|q| q.p90)),
                f(own.map(|q| q.p99)),
                f(extra),
                f(step.map(|q| q.p50)),
                f(step.map(|q| q.p99)),
            );
        }
    }
    if sizes.iter().any(|s| s.machine.is_some()) {
        let _ = writeln!(
            md,
            "\n### CPU accounting (whole sweep per size; the machine has {} cores)\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            md,
            "| groups | coordinator cores | load generator cores | simulated workers cores | machine busy (all processes) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for s in sizes {
            let Some((bench, sims, busy, wall)) = s.machine else {
                continue;
            };
            let wall = wall.max(1e-9);
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2} | {:.2} | {:.0}% |",
                s.groups,
                s.cpu_s.unwrap_or(0.0) / wall,
                bench / wall,
                sims / wall,
                busy * 100.0
            );
        }
    }
}

fn plots(dir: &Path, sizes: &[Size], points: usize, prefill_ms: f64) -> anyhow::Result<()> {
    let labels: Vec<String> = (0..points)
        .map(|k| {
            format!(
                "point {k} ({}/group)",
                per_group(&sizes[0].runs[k], sizes[0].groups)
            )
        })
        .collect();
    let series = |f: &dyn Fn(&RunSummary, u32) -> f64| -> Vec<crate::plot::Series<'_>> {
        (0..points)
            .map(|k| {
                (
                    labels[k].as_str(),
                    sizes
                        .iter()
                        .map(|s| (f64::from(s.groups), f(&s.runs[k], s.groups)))
                        .collect(),
                )
            })
            .collect()
    };
    let per_group_tput = series(&|r, g| r.output_throughput / f64::from(g));
    let total = series(&|r, _| r.output_throughput);
    let ttft = series(&|r, _| r.ttft_ms.p99 - prefill_ms);
    let tpot = series(&|r, _| r.tpot_ms.p99);
    let panels = [
        ("Output tokens/s per group", "tokens/s", &per_group_tput[..]),
        ("Total output tokens/s", "tokens/s", &total[..]),
        ("Added TTFT p99 (TTFT - modelled prefill)", "ms", &ttft[..]),
        ("TPOT p99", "ms", &tpot[..]),
    ];
    crate::plot::grid(dir, "scaling", "simulated worker groups", &panels)?;
    Ok(())
}

fn per_group(r: &RunSummary, groups: u32) -> String {
    if r.load_value > 0.0 {
        format!("{:.1} req/s", r.load_value / f64::from(groups))
    } else {
        r.load.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_efficiency_and_cpu_per_token() {
        let dir = tempfile::tempdir().unwrap();
        let run = |load: f64, tput: f64| RunSummary {
            load: format!("rate={load}/s"),
            load_value: load,
            output_throughput: tput,
            total_output_tokens: 1000,
            ..Default::default()
        };
        for (g, tput) in [(1, 100.0), (2, 190.0)] {
            let runs = vec![run(f64::from(g) * 2.0, tput)];
            std::fs::write(
                dir.path().join(format!("n{g}.json")),
                serde_json::json!({ "runs": runs }).to_string(),
            )
            .unwrap();
        }
        let d = dir.path().display();
        let args = ScalingReportArgs {
            sizes: vec![
                format!("2={d}/n2.json:0.5:0.25:0.125:0.9:0.5"),
                format!("1={d}/n1.json"),
            ],
            prefill_ms: 10.0,
            out: dir.path().join("out"),
            command: "deploy/bench/scaling.sh".into(),
        };
        let md = write_report(&args).unwrap();
        // 190 / (2 × 100) = 95 %; 0.5 s / 1000 tokens = 500 µs.
        assert!(md.contains("| 95.0% |"), "{md}");
        assert!(md.contains("| 2 | 0.50 | 1000 | 500.0 |"), "{md}");
        // Cores = CPU s / wall s.
        assert!(md.contains("| 2 | 1.00 | 0.50 | 0.25 | 90% |"), "{md}");
        assert!(
            dir.path().join("out/scaling.png").exists()
                && dir.path().join("out/report.md").exists()
        );
        let bad = ScalingReportArgs {
            sizes: vec!["x".into()],
            ..args
        };
        assert!(write_report(&bad).is_err());
    }
}
