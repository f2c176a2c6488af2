//! A real Prometheus (Debian's `prometheus`) scrapes `shardline up` with two worker groups
//! — the coordinator's `/metrics` and both groups' `--worker-metrics-listen` endpoints —
//! through a generated config. Every metric docs/observability.md names is in its HTTP
//! API, `promtool check metrics` passes on every endpoint, and every metric a query of the
//! Grafana dashboard uses exists in the scrape.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shardline_tests::cluster::Cluster;
use shardline_tests::{Proc, free_port, workspace_root};

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_shardline"))
}

fn need(tool: &str) {
    let found = Command::new(tool).arg("--version").output().is_ok();
    assert!(
        found,
        "{tool} not found: install Debian's `prometheus` package (deploy/setup.sh does)"
    );
}

/// Every `shardline_…` metric name in `text` (histogram and counter suffixes kept as
/// written).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("shardline_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            .map_or(text.len(), |e| start + e);
        // (`shardline_coordinator::…` is a crate path in a log line, not a metric.)
        if boundary && !text[start..end].ends_with('_') && !text[end..].starts_with("::") {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Series count of `name` (its `_bucket` / `_count` / `_sum` for histograms) in Prometheus.
async fn series(client: &reqwest::Client, prom: &str, name: &str) -> usize {
    let base = name
        .strip_suffix("_bucket")
        .or_else(|| name.strip_suffix("_count"))
        .or_else(|| name.strip_suffix("_sum"))
        .unwrap_or(name);
    let query = format!("{{__name__=~\"{base}(_bucket|_count|_sum)?\"}}");
    let v: Value = client
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", query.as_str())])
        .send()
        .await
        .expect("Prometheus query")
        .json()
        .await
        .expect("Prometheus answer");
    v["data"]["result"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_documented_metric_and_every_dashboard_metric() {
    need("prometheus");
    need("promtool");
    let worker_metrics = free_port();
    let cluster = Cluster::start(
        bin(),
        &[
            "--workers",
            "2",
            "--worker-metrics-listen",
            &format!("127.0.0.1:{worker_metrics}"),
        ],
    );
    let client = shardline_tests::http::client(Duration::from_secs(120));
    // Traffic: plain, with a tenant and a priority, and one refused (400).
    for i in 0..4 {
        let r = client
            .post(format!("{}/v1/completions", cluster.http))
            .header(
                "x-shardline-tenant",
                if i % 2 == 0 { "acme" } else { "globex" },
            )
            .header(
                "x-shardline-priority",
                if i == 3 { "high" } else { "normal" },
            )
            .json(&shardline_tests::load::body(i, 8))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client
        .post(format!("{}/v1/completions", cluster.http))
        .json(&json!({"prompt": "x", "temperature": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let coordinator = cluster.http.trim_start_matches("http://").to_string();
    let workers = [
        format!("127.0.0.1:{worker_metrics}"),
        format!("127.0.0.1:{}", worker_metrics + 1),
    ];
    for target in std::iter::once(&coordinator).chain(&workers) {
        let url = format!("http://{target}/metrics");
        let text = client.get(&url).send().await.unwrap().text().await.unwrap();
        shardline_tests::promtool_check(&url, &text);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let yaml = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
         - job_name: shardline-coordinator\n    static_configs:\n      - targets: ['{coordinator}']\n  \
         - job_name: shardline-worker\n    static_configs:\n      - targets: ['{}', '{}']\n",
        workers[0], workers[1]
    );
    std::fs::write(&config, yaml).unwrap();
    let checked = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    let port = free_port();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut prometheus = Proc::spawn("prometheus", cmd);
    let prom = format!("http://127.0.0.1:{port}");

    // Every target up, then every documented metric present.
    let docs = std::fs::read_to_string(workspace_root().join("docs/observability.md")).unwrap();
    let documented = metric_names(&docs);
    assert!(documented.len() > 30, "{documented:?}");
    let dashboard_path = workspace_root().join("deploy/grafana/shardline.json");
    let dashboard_text = std::fs::read_to_string(&dashboard_path).unwrap();
    assert_eq!(
        dashboard_text,
        std::fs::read_to_string(workspace_root().join("helm/shardline/dashboards/shardline.json"))
            .unwrap(),
        "the chart ships the dashboard in deploy/grafana unchanged"
    );
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        prometheus.assert_running();
        let up: Value = match client
            .get(format!("{prom}/api/v1/query"))
            .query(&[("query", "up")])
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null, // not listening yet
        };
        let targets_up = up["data"]["result"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|s| s["value"][1] == "1").count());
        missing = Vec::new();
        if targets_up == 3 {
            for name in documented.iter().chain(&queried) {
                if series(&client, &prom, name).await == 0 {
                    missing.push(name.clone());
                }
            }
            if missing.is_empty() {
                break;
            }
        } else {
            missing.push(format!("{targets_up} of 3 targets up"));
        }
        assert!(
            Instant::now() < deadline,
            "not in Prometheus: {missing:?}\n{}",
            prometheus.output()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(cluster);
}
