//! Scheduling behaviour over fake workers: continuous batching, backpressure,
//! cancellation, deadlines, priorities and migration off a failed group.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;
use shardline_coordinator::{Config, KvAdmission};
use shardline_engine::testing::{TestWorker, TestWorkerConfig, test_tokenizer};

fn slow(step_ms: u64) -> TestWorkerConfig {
    TestWorkerConfig {
        step_delay: Duration::from_millis(step_ms),
        ..Default::default()
    }
}

/// 16 concurrent streams share steps; each output equals its solo output.
#[tokio::test]
async fn concurrent_streams_are_batched() {
    let c = one_worker(Config::default(), slow(5)).await;
    let solo = c
        .post(
            "/v1/completions",
            json!({"prompt": "solo run 0", "max_tokens": 40, "temperature": 0}),
        )
        .await
        .1;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("solo run {i}"), "max_tokens": 40, "temperature": 0, "stream": true});
            let events = sse_events(http.post(url).json(&body).send().await.unwrap()).await;
            completion_text(&events)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let text = t.await.unwrap();
        assert_eq!(text, expected_greedy(&format!("solo run {i}"), 40));
        if i == 0 {
            assert_eq!(text, solo["choices"][0]["text"].as_str().unwrap());
        }
    }
    let max_batch = c.workers[0].batch_sizes().into_iter().max().unwrap();
    assert!(max_batch >= 8, "largest batch was {max_batch}");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("shardline_batch_size_count{group=\"fake-0\"}"),
        "{metrics}"
    );
}

/// Over --max-concurrent-requests → immediate 429 with Retry-After.
#[tokio::test]
async fn excess_requests_get_429_with_retry_after() {
    let config = Config {
        max_concurrent_requests: 4,
        ..Config::default()
    };
    let c = one_worker(config, slow(20)).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"prompt": "busy", "max_tokens": 10}))
                .send()
                .await
                .unwrap();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry_after, body)
        }));
    }
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["usage"]["completion_tokens"], 10);
            }
            429 => {
                rejected += 1;
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 4, "admitted ones complete ({ok})");
    assert!(rejected >= 30, "most of the burst is refused ({rejected})");
    let metrics = c.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shardline_requests_rejected_total{")
                && l.contains("reason=\"max_concurrent_requests\"")),
        "{metrics}"
    );
}

/// Dropped streams give their KV blocks back.
#[tokio::test]
async fn dropped_streams_release_their_kv_blocks() {
    let c = one_worker(Config::default(), slow(10)).await;
    let total = c.workers[0].free_blocks();
    let mut streams = Vec::new();
    for i in 0..8 {
        let body = json!({"prompt": format!("cancel me {i} ").repeat(10), "max_tokens": 1000, "stream": true});
        let r = c
            .http
            .post(format!("{}/v1/completions", c.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut s = r.bytes_stream();
        let first = s.next().await.unwrap().unwrap();
        assert!(!first.is_empty());
        streams.push(s);
    }
    assert!(
        c.workers[0].free_blocks() < total,
        "sequences hold blocks while streaming"
    );
    drop(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.workers[0].free_blocks() != total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "blocks not returned: {} of {total}",
            c.workers[0].free_blocks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.workers[0].running(), 0);
    assert!(
        c.workers[0].status().await.counters.seqs_released >= 1,
        "released by the scheduler"
    );
}

/// A non-streaming request whose client goes away is released as well.
#[tokio::test]
async fn dropped_non_streaming_request_is_released() {
    let c = one_worker(Config::default(), slow(10)).await;
    let total = c.workers[0].free_blocks();
    let http = c.http.clone();
    let url = format!("{}/v1/completions", c.base);
    let request = tokio::spawn(async move {
        let _ = http
            .post(url)
            .json(&json!({"prompt": "long one", "max_tokens": 1500}))
            .send()
            .await;
    });
    while c.workers[0].running() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    request.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.workers[0].free_blocks() != total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "non-streaming request not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request whose deadline passes in the queue gets 504 and never
/// reaches the worker.
#[tokio::test]
async fn deadline_expired_in_queue_never_reaches_the_worker() {
    let c = one_worker(
        Config {
            max_num_seqs: 1,
            ..Config::default()
        },
        slow(20),
    )
    .await;
    let http = c.http.clone();
    let url = format!("{}/v1/completions", c.base);
    let blocker = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"prompt": "blocker", "max_tokens": 30}))
            .send()
            .await
            .unwrap()
            .status()
    });
    while c.workers[0].admitted() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .header("x-shardline-timeout", "0.1")
        .json(&json!({"prompt": "late", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    assert_eq!(blocker.await.unwrap(), 200);
    assert_eq!(
        c.workers[0].admitted(),
        1,
        "the expired request never reached the worker"
    );
    // The body field works too.
    let (status, _) = c
        .post(
            "/v1/completions",
            json!({"prompt": "ok", "max_tokens": 2, "timeout": 30}),
        )
        .await;
    assert_eq!(status, 200);
}

/// With the group saturated, `high` requests run before `low` ones
/// that arrived earlier.
#[tokio::test]
async fn high_priority_overtakes_earlier_low_priority() {
    let c = one_worker(
        Config {
            max_num_seqs: 1,
            ..Config::default()
        },
        slow(10),
    )
    .await;
    let send = |prompt: &str, priority: &str| {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        // The blocker keeps the only slot busy while the others queue.
        let max_tokens = if prompt == "blocker" { 40 } else { 3 };
        let body = json!({"prompt": prompt, "max_tokens": max_tokens});
        let priority = priority.to_string();
        tokio::spawn(async move {
            http.post(url)
                .header("x-shardline-priority", priority)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let blocker = send("blocker", "normal");
    while c.workers[0].admitted() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lows = Vec::new();
    for i in 0..3 {
        lows.push(send(&format!("low {i}"), "low"));
    }
    // Let the low ones reach the queue first.
    tokio::time::sleep(Duration::from_millis(30)).await;
    let high = send("high", "high");
    assert_eq!(blocker.await.unwrap(), 200);
    assert_eq!(high.await.unwrap(), 200);
    for l in lows {
        assert_eq!(l.await.unwrap(), 200);
    }
    let tokenizer = test_tokenizer();
    let order: Vec<String> = c.workers[0]
        .admitted_prompts()
        .iter()
        .map(|p| tokenizer.decode(p, false).unwrap())
        .collect();
    assert_eq!(order[0], "blocker");
    assert_eq!(order[1], "high", "admission order: {order:?}");
}

/// Groups "a" and "b", 10 ms a step.
fn two_slow_groups() -> Vec<TestWorkerConfig> {
    ["a", "b"]
        .map(|g| TestWorkerConfig {
            group_id: g.into(),
            ..slow(10)
        })
        .into()
}

/// The first worker that holds sequences, once one does.
async fn busy_worker(c: &Cluster) -> &TestWorker {
    loop {
        if let Some(w) = c.workers.iter().find(|w| w.running() > 0) {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Failover: when a group's step fails, its requests continue on another group
/// with nothing lost or duplicated.
#[tokio::test]
async fn requests_migrate_off_a_failed_group() {
    migrate_off_a_failed_group(Config::default()).await;
}

/// The same with `--stream-interval 7`: tokens the scheduler held back for the next
/// event when the group failed reach the client, once.
#[tokio::test]
async fn requests_migrate_off_a_failed_group_with_tokens_held_back() {
    migrate_off_a_failed_group(Config {
        stream_interval: 7,
        ..Config::default()
    })
    .await;
}

async fn migrate_off_a_failed_group(config: Config) {
    let c = cluster(config, two_slow_groups()).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("migrate {i} "), "max_tokens": 60, "temperature": 0, "stream": true,
                              "stream_options": {"include_usage": true}});
            sse_events(http.post(url).json(&body).send().await.unwrap()).await
        }));
    }
    // Fail whichever group holds sequences, mid-generation.
    let victim = busy_worker(&c).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    victim.set_failing(Some("the worker was told to fail"));
    for (i, t) in tasks.into_iter().enumerate() {
        let events = t.await.unwrap();
        assert_eq!(
            completion_text(&events),
            expected_greedy(&format!("migrate {i} "), 60),
            "request {i}"
        );
        assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 60);
    }
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("shardline_request_migrations_total"),
        "{metrics}"
    );
}

/// A request migrates to a group that computes as its first one did (same model, weights
/// and KV cache element type), so its text stays what an uninterrupted run gives; a group
/// with a 16-bit KV cache gets none of them while a matching one is ready.
#[tokio::test]
async fn migrated_requests_stay_with_groups_that_compute_alike() {
    let groups = [("a", "f32"), ("b", "f32"), ("c", "f16")]
        .map(|(g, dtype)| TestWorkerConfig {
            group_id: g.into(),
            kv_cache_dtype: dtype.into(),
            ..slow(10)
        })
        .into();
    let c = cluster(Config::default(), groups).await;
    let mut tasks = Vec::new();
    for i in 0..9 {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("alike {i} "), "max_tokens": 60, "temperature": 0,
                              "stream": true});
            sse_events(http.post(url).json(&body).send().await.unwrap()).await
        }));
    }
    // Every request placed (a and b run sequences, c too: new requests go anywhere).
    let (a, b, f16) = (&c.workers[0], &c.workers[1], &c.workers[2]);
    while a.admitted() + b.admitted() + f16.admitted() < 9 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(a.running() > 0, "a runs some of them");
    let (b_before, f16_before) = (b.admitted(), f16.admitted());
    let moving = a.running();
    a.set_failing(Some("the worker was told to fail"));
    for (i, t) in tasks.into_iter().enumerate() {
        let events = t.await.unwrap();
        assert_eq!(
            completion_text(&events),
            expected_greedy(&format!("alike {i} "), 60),
            "request {i}"
        );
    }
    assert_eq!(
        b.admitted() - b_before,
        moving,
        "a's requests continued on b, the other f32 group"
    );
    assert_eq!(
        f16.admitted(),
        f16_before,
        "none continued on the group with a 16-bit KV cache"
    );
}

/// A group whose engine failed for good still answers Info, but its Health says not
/// ready: its requests move to another group, and it gets no new ones (no round trips to
/// it, no second migration) until it is healthy again.
#[tokio::test]
async fn a_group_whose_engine_failed_gets_no_new_requests() {
    let c = cluster(Config::default(), two_slow_groups()).await;
    let run = |from: usize, n: usize, tokens: usize| {
        (from..from + n)
            .map(|i| {
                let http = c.http.clone();
                let url = format!("{}/v1/completions", c.base);
                tokio::spawn(async move {
                    let body = json!({"prompt": format!("broken {i} "), "max_tokens": tokens,
                                      "temperature": 0, "stream": true});
                    let events = sse_events(http.post(url).json(&body).send().await.unwrap()).await;
                    (i, completion_text(&events))
                })
            })
            .collect::<Vec<_>>()
    };
    let tasks = run(0, 6, 40);
    let victim = busy_worker(&c).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    victim.set_failing(Some("the engine failed"));
    for t in tasks {
        let (i, text) = t.await.unwrap();
        assert_eq!(
            text,
            expected_greedy(&format!("broken {i} "), 40),
            "request {i}"
        );
    }
    let refused = victim.failed_steps();
    assert!(refused > 0, "the failure was seen mid-generation");
    let migrations = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("shardline_request_migrations_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = migrations(&c.metrics().await);
    assert!(before > 0.0);
    // Let the coordinator try to reconnect to the failed group a few times.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in run(100, 8, 8) {
        let (i, text) = t.await.unwrap();
        assert_eq!(
            text,
            expected_greedy(&format!("broken {i} "), 8),
            "request {i}"
        );
    }
    assert_eq!(
        victim.failed_steps(),
        refused,
        "the failed group got new steps"
    );
    assert_eq!(
        migrations(&c.metrics().await),
        before,
        "new requests migrated"
    );
    // Healthy again (a restarted process on the same address): it gets requests again.
    victim.set_failing(None);
    let admitted = victim.admitted();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut next = 200;
    while victim.admitted() == admitted {
        assert!(
            std::time::Instant::now() < deadline,
            "the recovered group never got a request"
        );
        for t in run(next, 4, 2) {
            t.await.unwrap();
        }
        next += 4;
    }
}

/// The KV-budget check: queued demand beyond the ratio gets an immediate 429 (counted
/// here by worst cases, `--kv-admission worst-case`, where one request fills the cache).
#[tokio::test]
async fn kv_demand_over_budget_gets_429() {
    let config = Config {
        max_kv_demand_ratio: 1.0,
        kv_admission: KvAdmission::WorstCase,
        ..Config::default()
    };
    let worker = TestWorkerConfig {
        kv_blocks: 8,
        block_size: 16,
        ..slow(10)
    };
    let c = one_worker(config, worker).await;
    let http = c.http.clone();
    let url = format!("{}/v1/completions", c.base);
    // 8 prompt tokens + 120 new = 128 tokens = all 8 blocks.
    let first = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"prompt": "12345678", "max_tokens": 120}))
            .send()
            .await
            .unwrap()
            .status()
    });
    while c.workers[0].running() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "again", "max_tokens": 20}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("KV"),
        "{body}"
    );
    assert_eq!(first.await.unwrap(), 200);
    assert!(c.metrics().await.contains("reason=\"kv_budget\""));
}

/// Removing a group (membership delete) moves its requests to the remaining group.
#[tokio::test]
async fn removed_group_hands_its_requests_over() {
    let c = cluster(Config::default(), two_slow_groups()).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("move {i} "), "max_tokens": 40, "temperature": 0});
            http.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }));
    }
    let victim = busy_worker(&c).await;
    c.coordinator.groups.remove(&victim.url());
    for (i, t) in tasks.into_iter().enumerate() {
        let body = t.await.unwrap();
        assert_eq!(
            body["choices"][0]["text"],
            expected_greedy(&format!("move {i} "), 40),
            "{body}"
        );
    }
    assert_eq!(c.coordinator.groups.ready_groups().len(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while victim.running() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "removed group's sequences were not released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
