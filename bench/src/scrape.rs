//! Optional sampling of the server's Prometheus `/metrics` during a run: batch size, KV
//! cache usage and running requests, so a report shows how full the server was.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub const BATCH_SIZE: &str = "shardline_batch_size";
pub const KV_USAGE: &str = "shardline_kv_cache_usage_perc";
pub const RUNNING: &str = "shardline_num_requests_running";

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

/// Sample `url` every `every` until `stop` fires; then summarise.
pub async fn sample(url: String, every: Duration, stop: CancellationToken) -> ServerStats {
    let http = reqwest::Client::new();
    let get = |http: reqwest::Client, url: String| async move {
        http.get(url).send().await.ok()?.text().await.ok()
    };
    let first = get(http.clone(), url.clone()).await;
    let (mut batch, mut kv, mut running) = (vec![], vec![], vec![]);
    let mut last = first.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        if let Some(text) = get(http.clone(), url.clone()).await {
            batch.extend(mean_series(&text, BATCH_SIZE));
            kv.extend(mean_series(&text, KV_USAGE));
            running.extend(sum_series(&text, RUNNING));
            last = Some(text);
        }
    }
    // One last sample at the end, so even a run shorter than `every` has one.
    if let Some(text) = get(http, url).await {
        batch.extend(mean_series(&text, BATCH_SIZE));
        kv.extend(mean_series(&text, KV_USAGE));
        running.extend(sum_series(&text, RUNNING));
        last = Some(text);
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
        let delta = |n: &str| Some(sum_series(&b, n)? - sum_series(&a, n)?);
        let sum = delta(&format!("{BATCH_SIZE}_sum"));
        let count = delta(&format!("{BATCH_SIZE}_count"));
        if let (Some(s), Some(c)) = (sum, count)
            && c > 0.0
        {
            stats.batch_size_mean = Some(s / c);
        }
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
    fn series_are_summed_and_averaged_by_exact_name() {
        assert_eq!(sum_series(TEXT, RUNNING), Some(7.0));
        assert_eq!(mean_series(TEXT, KV_USAGE), Some(0.375));
        assert_eq!(sum_series(TEXT, "shardline_batch_size_count"), Some(4.0));
        assert_eq!(sum_series(TEXT, BATCH_SIZE), None);
    }
}
