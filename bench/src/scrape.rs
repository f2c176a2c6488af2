//! Optional sampling of the server's Prometheus `/metrics` during a run: batch size, KV
//! cache usage and running requests, so a report shows how full the server was.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub const BATCH_SIZE: &str = "shardline_batch_size";
pub const KV_USAGE: &str = "shardline_kv_cache_usage_perc";
pub const RUNNING: &str = "shardline_num_requests_running";
/// The coordinator's time-to-first-token breakdown (histograms, seconds).
pub const QUEUE_TIME: &str = "shardline_request_queue_time_seconds";
pub const FIRST_TOKEN_OVERHEAD: &str = "shardline_first_token_overhead_seconds";
pub const STEP_OVERHEAD: &str = "shardline_step_overhead_seconds";
pub const PREEMPTIONS: &str = "shardline_num_preemptions_total";
pub const PREFIX_QUERIES: &str = "shardline_prefix_cache_queries_total";
pub const PREFIX_HITS: &str = "shardline_prefix_cache_hits_total";

/// Quantiles of a server histogram over one run, in milliseconds, interpolated inside
/// buckets as Prometheus' `histogram_quantile` does (so only as fine as the buckets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HistQuantiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Server gauges over one run (means and maxima of the samples).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub samples: u32,
    /// Mean batch size: from the histogram's Δsum/Δcount when the server exports one,
    /// else the mean of the gauge samples.
    pub batch_size_mean: Option<f64>,
    pub batch_size_max: Option<f64>,
    pub kv_usage_mean: Option<f64>,
    pub kv_usage_max: Option<f64>,
    pub running_mean: Option<f64>,
    pub running_max: Option<f64>,
    /// Waiting in the group's queue before the first step (for the step in flight, the
    /// token budget or a slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_time_ms: Option<HistQuantiles>,
    /// TTFT minus queue time minus the worker's step time: coordinator + gRPC hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_overhead_ms: Option<HistQuantiles>,
    /// Step RPC round trip minus the worker's step time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_overhead_ms: Option<HistQuantiles>,
    /// Requests preempted for KV room during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemptions: Option<f64>,
    /// Prompt tokens of the run's completed prefills, and those the prefix caches
    /// supplied (the rest were computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_cached: Option<f64>,
}

/// Cumulative bucket counts `(le, count)` of histogram `name`, summed over label sets,
/// sorted by `le` (`+Inf` last).
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let le = labels.split(',').find_map(|l| l.trim().strip_prefix("le="));
        let le = le.map(|v| v.trim_matches('"')).and_then(|v| match v {
            "+Inf" => Some(f64::INFINITY),
            v => v.parse().ok(),
        });
        let (Some(le), Some(v)) = (le, value.trim().parse::<f64>().ok()) else {
            continue;
        };
        match out.iter_mut().find(|(l, _)| *l == le) {
            Some((_, c)) => *c += v,
            None => out.push((le, v)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Quantiles (ms) of what histogram `name` recorded between two scrapes.
pub fn delta_quantiles(before: &str, after: &str, name: &str) -> Option<HistQuantiles> {
    let a = buckets(after, name);
    let b = buckets(before, name);
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|&(le, c)| {
            let old = b.iter().find(|(l, _)| *l == le).map_or(0.0, |x| x.1);
            (le, (c - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let q = |q: f64| {
        let rank = q * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(le, c) in &delta {
            if c >= rank {
                if le.is_infinite() {
                    return lo * 1e3;
                }
                let within = if c > below {
                    (rank - below) / (c - below)
                } else {
                    1.0
                };
                return (lo + (le - lo) * within) * 1e3;
            }
            (lo, below) = (le, c);
        }
        lo * 1e3
    };
    Some(HistQuantiles {
        count: total as u64,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
    })
}

/// Sum of every series of `name` (all label sets) in Prometheus text format.
pub fn sum_series(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next();
        if let Some(v) = value.and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Mean over series of `name`: KV usage is per group, so the mean is the cluster view.
fn mean_series(text: &str, name: &str) -> Option<f64> {
    let n = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .count();
    sum_series(text, name).map(|s| s / n.max(1) as f64)
}

/// Takes the run's baseline sample now, before the load starts (histograms are
/// differenced against it, so it must not race the first requests), then samples `url`
/// every `every` in a task until `stop` fires; the task's result summarises the run.
pub async fn start(
    url: String,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<ServerStats> {
    let http = reqwest::Client::new();
    let first = fetch(&http, &url).await;
    tokio::spawn(sample(http, url, first, every, stop))
}

async fn fetch(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(url).send().await.ok()?.text().await.ok()
}

async fn sample(
    http: reqwest::Client,
    url: String,
    first: Option<String>,
    every: Duration,
    stop: CancellationToken,
) -> ServerStats {
    let (mut batch, mut kv, mut running) = (vec![], vec![], vec![]);
    let mut last = first.clone();
    let mut record = |text: String| {
        batch.extend(mean_series(&text, BATCH_SIZE));
        kv.extend(mean_series(&text, KV_USAGE));
        running.extend(sum_series(&text, RUNNING));
        last = Some(text);
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        if let Some(text) = fetch(&http, &url).await {
            record(text);
        }
    }
    // One last sample at the end, so even a run shorter than `every` has one.
    if let Some(text) = fetch(&http, &url).await {
        record(text);
    }
    let mut stats = ServerStats {
        samples: kv.len().max(batch.len()).max(running.len()) as u32,
        ..Default::default()
    };
    let stat = |v: &[f64]| {
        (!v.is_empty()).then(|| {
            (
                v.iter().sum::<f64>() / v.len() as f64,
                v.iter().copied().fold(f64::MIN, f64::max),
            )
        })
    };
    (stats.batch_size_mean, stats.batch_size_max) = stat(&batch).unzip();
    (stats.kv_usage_mean, stats.kv_usage_max) = stat(&kv).unzip();
    (stats.running_mean, stats.running_max) = stat(&running).unzip();
    if let (Some(a), Some(b)) = (first, last) {
        // A series born during the run (its first sample) was 0 before it.
        let delta = |n: &str| Some(sum_series(&b, n)? - sum_series(&a, n).unwrap_or(0.0));
        let sum = delta(&format!("{BATCH_SIZE}_sum"));
        let count = delta(&format!("{BATCH_SIZE}_count"));
        if let (Some(s), Some(c)) = (sum, count)
            && c > 0.0
        {
            stats.batch_size_mean = Some(s / c);
        }
        stats.queue_time_ms = delta_quantiles(&a, &b, QUEUE_TIME);
        stats.first_token_overhead_ms = delta_quantiles(&a, &b, FIRST_TOKEN_OVERHEAD);
        stats.step_overhead_ms = delta_quantiles(&a, &b, STEP_OVERHEAD);
        stats.preemptions = delta(PREEMPTIONS);
        stats.prompt_tokens = delta(PREFIX_QUERIES);
        stats.prompt_tokens_cached = delta(PREFIX_HITS);
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP shardline_kv_cache_usage_perc x\n\
        shardline_kv_cache_usage_perc{group=\"a\"} 0.5\n\
        shardline_kv_cache_usage_perc{group=\"b\"} 0.25\n\
        shardline_num_requests_running{group=\"a\"} 3\n\
        shardline_num_requests_running{group=\"b\"} 4\n\
        shardline_num_requests_running_total 99\n\
        shardline_batch_size_sum 10\nshardline_batch_size_count 4\n";

    #[test]
    fn histogram_quantiles_of_the_run_interpolate_inside_buckets() {
        let before = "h_bucket{g=\"a\",le=\"0.001\"} 5\nh_bucket{g=\"a\",le=\"0.002\"} 5\n\
            h_bucket{g=\"a\",le=\"+Inf\"} 5\n";
        // During the run: 50 in (0, 1 ms], 40 in (1, 2 ms] over two groups, 10 above.
        let after = "h_bucket{g=\"a\",le=\"0.001\"} 35\nh_bucket{g=\"a\",le=\"0.002\"} 55\n\
            h_bucket{g=\"a\",le=\"+Inf\"} 60\n\
            h_bucket{g=\"b\",le=\"0.001\"} 20\nh_bucket{g=\"b\",le=\"0.002\"} 40\n\
            h_bucket{g=\"b\",le=\"+Inf\"} 45\n";
        let q = delta_quantiles(before, after, "h").unwrap();
        assert_eq!(q.count, 100);
        // rank 50 is the top of the first bucket; rank 90 is the top of the second;
        // rank 99 is past the last finite bound, reported as that bound.
        assert!((q.p50 - 1.0).abs() < 1e-9, "{q:?}");
        assert!((q.p90 - 2.0).abs() < 1e-9, "{q:?}");
        assert!((q.p99 - 2.0).abs() < 1e-9, "{q:?}");
        assert_eq!(delta_quantiles(after, after, "h"), None);
        assert_eq!(delta_quantiles(before, after, "missing"), None);
    }

    #[test]
    fn series_are_summed_and_averaged_by_exact_name() {
        assert_eq!(sum_series(TEXT, RUNNING), Some(7.0));
        assert_eq!(mean_series(TEXT, KV_USAGE), Some(0.375));
        assert_eq!(sum_series(TEXT, "shardline_batch_size_count"), Some(4.0));
        assert_eq!(sum_series(TEXT, BATCH_SIZE), None);
    }
}
