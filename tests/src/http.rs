//! HTTP helpers shared by the end-to-end tests: a client with a whole-request timeout and
//! sums over a Prometheus `/metrics` page.

use std::time::Duration;

/// A client whose requests give up after `timeout` (a hung stream fails the test).
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("an HTTP client")
}

/// Sum of every sample on `http`'s `/metrics` whose line starts with `name` (a metric
/// name, or a name with a label prefix such as `x_bucket{le="7"`).
pub async fn metric_sum(http: &str, name: &str) -> f64 {
    let text = client(Duration::from_secs(30))
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("/metrics body");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
