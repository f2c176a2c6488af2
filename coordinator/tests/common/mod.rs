//! Shared helpers of the coordinator's integration tests: a coordinator over test workers
//! (the real worker service over a fake runner) on loopback ports, and small HTTP / SSE
//! clients.
#![allow(dead_code)]

pub mod pki;

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use shardline_coordinator::{Config, Coordinator};
use shardline_engine::fake::{continuation, echo_next};
use shardline_engine::testing::{TestWorker, TestWorkerConfig, test_tokenizer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Cluster {
    pub coordinator: Coordinator,
    pub workers: Vec<TestWorker>,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
    pub base: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn cluster(config: Config, workers: Vec<TestWorkerConfig>) -> Cluster {
    let mut handles = Vec::new();
    for w in workers {
        handles.push(TestWorker::start(w).await.expect("bind fake worker"));
    }
    let shutdown = CancellationToken::new();
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let coordinator =
        Coordinator::start(config, http, grpc, shutdown.clone()).expect("start coordinator");
    for h in &handles {
        coordinator.groups.add(&h.url());
    }
    let mut ready = coordinator.groups.ready_count();
    let want = handles.len();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|n| *n >= want))
        .await
        .expect("groups ready within 10 s")
        .expect("ready channel open");
    let base = format!("http://{}", coordinator.http_addr);
    Cluster {
        coordinator,
        workers: handles,
        shutdown,
        http: reqwest::Client::new(),
        base,
    }
}

pub async fn one_worker(config: Config, worker: TestWorkerConfig) -> Cluster {
    cluster(config, vec![worker]).await
}

impl Cluster {
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POSTs a streamed request and reads its SSE events ([`sse_events`]).
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("send");
        sse_events(r).await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Reads an SSE response into its JSON events; asserts it ends with `[DONE]`.
pub async fn sse_events(response: reqwest::Response) -> Vec<Value> {
    assert_eq!(response.status(), 200, "stream status");
    let mut buf = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.expect("stream chunk")).expect("utf-8 SSE"));
    }
    let mut events = Vec::new();
    let mut done = false;
    for line in buf.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        events.push(serde_json::from_str(data).expect("event JSON"));
    }
    assert!(done, "stream ended with [DONE]");
    events
}

/// Concatenated completion text of streamed `/v1/completions` events.
pub fn completion_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect()
}

pub fn finish_reason(events: &[Value]) -> Option<String> {
    events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str())
        .map(str::to_string)
}

/// What the test worker's echo model generates greedily after `prompt` (a completion's
/// text): on a prompt of distinct bytes, the prompt's bytes cycled.
pub fn expected_greedy(prompt: &str, tokens: usize) -> String {
    let tokenizer = test_tokenizer();
    let ids = tokenizer
        .encode(prompt, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let out = continuation(echo_next, &ids, tokens);
    tokenizer.decode(&out, true).expect("decode")
}
