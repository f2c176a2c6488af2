//! The end-of-run table and the `--json` results file.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::metrics::{Dist, RunSummary};

/// What `--json` writes: the run's configuration and one summary per load point.
#[derive(Debug, Serialize)]
pub struct Results<'a> {
    pub shardline_bench_version: &'static str,
    pub base_url: &'a str,
    pub model: &'a str,
    pub endpoint: crate::client::Endpoint,
    pub workload: String,
    pub slo: crate::metrics::Slo,
    pub runs: &'a [RunSummary],
}

/// Errors writing results.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn write_json(path: &Path, results: &Results<'_>) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(results)?;
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn dist_row(out: &mut String, name: &str, d: &Dist) {
    let _ = writeln!(
        out,
        "  {name:<10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        d.mean, d.p50, d.p90, d.p95, d.p99, d.max
    );
}

/// The detailed table of one load point.
pub fn point_table(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== {} ==", s.load);
    let _ = writeln!(
        out,
        "  completed {}  failed {}  rate-limited (429) {}  duration {:.2} s",
        s.completed, s.failed, s.rate_limited, s.duration_s
    );
    for (reason, n) in &s.failed_by_reason {
        let _ = writeln!(out, "    failed {reason}: {n}");
    }
    if s.cancelled > 0 {
        let _ = writeln!(
            out,
            "  interrupted: {} request(s) still in flight were cancelled (not completed)",
            s.cancelled
        );
    }
    if s.cut_off > 0 {
        let _ = writeln!(
            out,
            "  cut off at the end of --duration: {} request(s) still in flight (their \
             tokens so far count in the token throughputs)",
            s.cut_off
        );
    }
    let _ = writeln!(
        out,
        "  throughput: {:.2} req/s  {:.1} output tok/s  {:.1} total tok/s",
        s.request_throughput, s.output_throughput, s.total_token_throughput
    );
    if let (Some(g), Some(a)) = (s.goodput, s.slo_attainment) {
        let _ = writeln!(
            out,
            "  goodput: {g:.2} req/s ({:.1}% of completed met the SLO)",
            a * 100.0
        );
    }
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "(ms)", "mean", "p50", "p90", "p95", "p99", "max"
    );
    dist_row(&mut out, "TTFT", &s.ttft_ms);
    dist_row(&mut out, "ITL", &s.itl_ms);
    dist_row(&mut out, "TPOT", &s.tpot_ms);
    dist_row(&mut out, "E2E", &s.e2e_ms);
    if let Some(srv) = &s.server {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "  server: batch size mean {} max {}  KV usage mean {} max {}  running mean {} max {}",
            f(srv.batch_size_mean),
            f(srv.batch_size_max),
            f(srv.kv_usage_mean),
            f(srv.kv_usage_max),
            f(srv.running_mean),
            f(srv.running_max)
        );
        for (name, q) in [
            ("queue time", srv.queue_time_ms),
            (
                "coordinator + hop share of TTFT",
                srv.first_token_overhead_ms,
            ),
            ("step overhead", srv.step_overhead_ms),
        ] {
            if let Some(q) = q {
                let _ = writeln!(
                    out,
                    "  server {name} (ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  (n = {})",
                    q.p50, q.p90, q.p99, q.count
                );
            }
        }
        if let Some(p) = srv.preemptions {
            let _ = writeln!(out, "  server preemptions: {p:.0}");
        }
        if let (Some(all), Some(cached)) = (srv.prompt_tokens, srv.prompt_tokens_cached) {
            let rate = if all > 0.0 { cached / all * 100.0 } else { 0.0 };
            let _ = writeln!(
                out,
                "  server prompt tokens: {all:.0}, computed {:.0}, from prefix caches {cached:.0} ({rate:.1}%)",
                all - cached
            );
        }
    }
    out
}

/// One line per load point, for sweeps.
pub fn sweep_table(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:>6} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "load",
        "ok",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "goodput"
    );
    for s in runs {
        let _ = writeln!(
            out,
            "{:<18} {:>6} {:>5} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>8}",
            s.load,
            s.completed,
            s.failed + s.rate_limited,
            s.request_throughput,
            s.output_throughput,
            s.ttft_ms.p50,
            s.ttft_ms.p99,
            s.tpot_ms.p50,
            s.tpot_ms.p99,
            s.goodput.map_or("-".into(), |g| format!("{g:.2}")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_name_every_metric() {
        let s = RunSummary {
            load: "rate=1/s".into(),
            completed: 3,
            goodput: Some(1.5),
            slo_attainment: Some(0.5),
            ..Default::default()
        };
        let t = point_table(&s);
        for word in ["TTFT", "ITL", "TPOT", "E2E", "goodput", "rate-limited"] {
            assert!(t.contains(word), "{word} missing in\n{t}");
        }
        assert!(sweep_table(&[s]).contains("rate=1/s"));
    }

    #[test]
    fn server_breakdown_and_interruptions_are_shown() {
        let q = crate::scrape::HistQuantiles {
            count: 7,
            p50: 1.25,
            p90: 2.5,
            p99: 4.0,
        };
        let s = RunSummary {
            load: "rate=1/s".into(),
            cancelled: 3,
            server: Some(crate::scrape::ServerStats {
                first_token_overhead_ms: Some(q),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = point_table(&s);
        assert!(
            t.contains("3 request(s) still in flight were cancelled"),
            "{t}"
        );
        assert!(
            t.contains(
                "coordinator + hop share of TTFT (ms): p50 1.25  p90 2.50  p99 4.00  (n = 7)"
            ),
            "{t}"
        );
        assert!(!t.contains("queue time"), "{t}");
    }
}
