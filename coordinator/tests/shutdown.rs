//! A coordinator's shutdown drains: once told to stop (SIGTERM, a rolling update) it
//! accepts no new connection, finishes the streams it serves, and stops; what is still
//! running after `--drain-timeout-secs` is failed. `/livez` answers whatever the groups do.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shardline_coordinator::{Config, Coordinator};
use shardline_engine::testing::{TestWorker, TestWorkerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A coordinator over one test worker whose steps take 20 ms.
async fn slow_coordinator(drain_timeout: Duration) -> (Coordinator, CancellationToken, TestWorker) {
    let worker = TestWorker::start(TestWorkerConfig {
        step_delay: Duration::from_millis(20),
        ..TestWorkerConfig::default()
    })
    .await
    .expect("fake worker");
    let shutdown = CancellationToken::new();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        drain_timeout,
        ..Config::default()
    };
    let coordinator = Coordinator::start(config, http, grpc, shutdown.clone()).unwrap();
    coordinator.groups.add(&worker.url());
    let mut ready = coordinator.groups.ready_count();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|n| *n >= 1))
        .await
        .expect("the group is ready")
        .unwrap();
    (coordinator, shutdown, worker)
}

fn stream_request(base: &str, max_tokens: u32) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(
            // Greedy: the echo model's text is then exactly `abcabc…` (sampled at
            // temperature 1, one token in a few hundred is another byte).
            &json!({"prompt": "abc", "max_tokens": max_tokens, "stream": true,
                    "ignore_eos": true, "temperature": 0}),
        )
}

#[tokio::test]
async fn shutdown_finishes_the_streams_in_flight_and_refuses_new_connections() {
    let (coordinator, shutdown, _worker) = slow_coordinator(Duration::from_secs(30)).await;
    let base = format!("http://{}", coordinator.http_addr);
    let livez = reqwest::get(format!("{base}/livez")).await.unwrap();
    assert_eq!(livez.status(), 200);
    // ~30 steps of 20 ms: still running when the shutdown comes.
    let response = stream_request(&base, 30).send().await.unwrap();
    let events = tokio::spawn(sse_events(response));
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    let stopped = tokio::spawn(coordinator.wait());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        reqwest::get(format!("{base}/health")).await.is_err(),
        "a draining coordinator accepts no new connection"
    );
    let events = events.await.unwrap();
    // Every token arrived, in order.
    assert_eq!(completion_text(&events), "abc".repeat(10));
    assert_eq!(finish_reason(&events).as_deref(), Some("length"));
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the coordinator stops once its streams are done")
        .unwrap()
        .expect("a clean stop");
}

#[tokio::test]
async fn what_outlasts_the_drain_timeout_is_failed_and_the_coordinator_stops() {
    let (coordinator, shutdown, _worker) = slow_coordinator(Duration::from_millis(300)).await;
    let base = format!("http://{}", coordinator.http_addr);
    // 500 steps of 20 ms: far longer than the drain timeout.
    let response = stream_request(&base, 500).send().await.unwrap();
    let body = tokio::spawn(async move { response.text().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), coordinator.wait())
        .await
        .expect("the coordinator stops after the drain timeout, not after the request")
        .expect("a clean stop");
    // The client is not left hanging: its stream ends, with an error event rather than
    // a finish reason.
    let body = tokio::time::timeout(Duration::from_secs(10), body)
        .await
        .expect("the stream ends")
        .unwrap()
        .unwrap_or_default();
    assert!(!body.contains("\"finish_reason\":\"length\""), "{body}");
}
