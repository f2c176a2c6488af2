// The end-to-end cases of the coordinator against the real worker and SmolLM2, included
// by `api.rs` (one worker group, tp 1) and `api_tp.rs` (the same cases with a
// tensor-parallel group). Each file defines `UP_ARGS`, the extra `shardline up` flags of
// every cluster it starts.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use shardline_proto::worker::v1::{InfoRequest, worker_client::WorkerClient};
use shardline_tests::cluster::Cluster;
use shardline_tests::http::metric_sum;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_shardline"))
}

fn client() -> reqwest::Client {
    shardline_tests::http::client(Duration::from_secs(300))
}

async fn completion(http: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{http}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Streams a completion, returning the concatenated text and the time of the first chunk.
async fn stream_text(http: &str, body: Value) -> (String, Instant) {
    let mut body = body;
    body["stream"] = json!(true);
    let r = client()
        .post(format!("{http}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "stream request failed");
    let mut text = String::new();
    let mut first = None;
    shardline_tests::load::sse_events(r, |v| {
        if let Some(t) = v["choices"][0]["text"].as_str() {
            if !t.is_empty() && first.is_none() {
                first = Some(Instant::now());
            }
            text.push_str(t);
        }
        Ok(())
    })
    .await
    .unwrap();
    (text, first.unwrap_or_else(Instant::now))
}

async fn worker_free_blocks(worker: &str) -> u32 {
    let mut w = WorkerClient::connect(worker.to_string()).await.unwrap();
    w.info(InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .kv_blocks_free
}

fn prompt(i: usize) -> String {
    format!(
        "Question {i}: list some facts about the number {}. Answer:",
        i * 7 + 3
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_is_compatible() {
    let up = Cluster::start(bin(), UP_ARGS);
    let out = std::process::Command::new("python3")
        .arg(shardline_tests::workspace_root().join("tests/python/openai_compat.py"))
        .args(["--base-url", &format!("{}/v1", up.http)])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_batch_and_match_solo_outputs() {
    let up = Cluster::start(bin(), UP_ARGS);
    let body = |i: usize| json!({"prompt": prompt(i), "max_tokens": 24, "temperature": 0});
    let mut solo = Vec::new();
    for i in 0..16 {
        let (status, v) = completion(&up.http, body(i)).await;
        assert_eq!(status, 200, "{v}");
        solo.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let streams = (0..16).map(|i| stream_text(&up.http, body(i)));
    let together = futures::future::join_all(streams).await;
    for (i, (text, _)) in together.iter().enumerate() {
        assert_eq!(
            text, &solo[i],
            "request {i}: batched greedy output differs from solo"
        );
    }
    // Batches of at least 8 sequences were run: the histogram has observations above 7.
    let total = metric_sum(&up.http, "shardline_batch_size_count").await;
    let small = metric_sum(&up.http, "shardline_batch_size_bucket{le=\"7\"").await;
    assert!(
        total > small,
        "no step ran 8 or more sequences (steps {total}, <=7: {small})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_gets_fast_429s() {
    let up = Cluster::start(
        bin(),
        &[UP_ARGS, &["--max-concurrent-requests", "4"]].concat(),
    );
    let body = json!({"prompt": prompt(1), "max_tokens": 32, "temperature": 0, "ignore_eos": true});
    let tasks = (0..50).map(|_| {
        let http = up.http.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = client()
                .post(format!("{http}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, t.elapsed(), retry_after, v)
        })
    });
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let mut rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        ok.len() + rejected.len(),
        50,
        "only 200 or 429 expected: {results:?}"
    );
    assert!(ok.len() >= 4, "the admitted requests complete");
    assert!(
        rejected.len() >= 40,
        "the excess is rejected ({} rejected)",
        rejected.len()
    );
    for r in &ok {
        assert_eq!(
            r.3["usage"]["completion_tokens"], 32,
            "admitted request completes: {}",
            r.3
        );
    }
    assert!(
        rejected.iter().all(|r| r.2),
        "every 429 carries Retry-After"
    );
    rejected.sort_by_key(|r| r.1);
    let p90 = rejected[rejected.len() * 9 / 10].1;
    assert!(
        p90 < Duration::from_millis(50),
        "429s must be immediate: p90 {p90:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_return_their_kv_blocks() {
    let up = Cluster::start(bin(), UP_ARGS);
    let before = worker_free_blocks(&up.worker).await;
    let mut handles = Vec::new();
    for i in 0..8 {
        let http = up.http.clone();
        handles.push(tokio::spawn(async move {
            let body =
                json!({"prompt": prompt(i), "max_tokens": 400, "ignore_eos": true, "stream": true});
            let r = client()
                .post(format!("{http}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let mut s = r.bytes_stream();
            // First token arrived: drop the stream (client disconnect).
            let _ = s.next().await;
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let during = worker_free_blocks(&up.worker).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut now = during;
    while Instant::now() < deadline && now != before {
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = worker_free_blocks(&up.worker).await;
    }
    assert_eq!(
        now, before,
        "free KV blocks back to the start within a second (during: {during})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_never_reach_a_worker_and_high_priority_goes_first() {
    let up = Cluster::start(bin(), &[UP_ARGS, &["--max-num-seqs", "1"]].concat());
    let started = |worker: String| async move {
        let mut w = WorkerClient::connect(worker).await.unwrap();
        let h = w
            .health(shardline_proto::worker::v1::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        h.sequences_started
    };
    // Saturate the group with one long request: it must outlast everything below (about
    // 1.1 s of sleeps and timeouts); 200 tokens did not once batch-1 decode passed 300 t/s.
    let http = up.http.clone();
    let long = tokio::spawn(async move {
        completion(
            &http,
            json!({"prompt": prompt(0), "max_tokens": 800, "ignore_eos": true}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = started(up.worker.clone()).await;
    let (status, v) = completion(
        &up.http,
        json!({"prompt": prompt(1), "max_tokens": 4, "timeout": 0.3}),
    )
    .await;
    assert_eq!(
        status, 504,
        "a request whose deadline passed in the queue gets 504: {v}"
    );
    assert_eq!(
        started(up.worker.clone()).await,
        before,
        "the expired request never reached the worker"
    );

    // Low requests arrive first, then high ones; high ones get their first token first.
    let mut lows = Vec::new();
    for i in 0..2 {
        let http = up.http.clone();
        lows.push(tokio::spawn(async move {
            stream_text(
                &http,
                json!({"prompt": prompt(10 + i), "max_tokens": 2, "priority": "low"}),
            )
            .await
            .1
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut highs = Vec::new();
    for i in 0..2 {
        let http = up.http.clone();
        highs.push(tokio::spawn(async move {
            stream_text(
                &http,
                json!({"prompt": prompt(20 + i), "max_tokens": 2, "priority": "high"}),
            )
            .await
            .1
        }));
    }
    let lows: Vec<Instant> = futures::future::join_all(lows)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let highs: Vec<Instant> = futures::future::join_all(highs)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let first_low = lows.iter().min().unwrap();
    assert!(
        highs.iter().all(|h| h < first_low),
        "high-priority requests reach first token before earlier low ones"
    );
    let (status, _) = long.await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_naming_the_problem_and_serving_continues() {
    let up = Cluster::start(bin(), UP_ARGS);
    let c = client();
    let post_raw = |path: &str, body: Vec<u8>| {
        c.post(format!("{}{path}", up.http))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/v1/completions", b"{not json".to_vec(), ""),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "max_tokens": "ten"}"#.to_vec(),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": []}"#.to_vec(),
            "messages",
        ),
        (
            "/v1/completions",
            br#"{"model": "nope", "prompt": "hi"}"#.to_vec(),
            "model",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "max_tokens": -5}"#.to_vec(),
            "max_tokens",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "max_tokens": 100000000}"#.to_vec(),
            "max_tokens",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "temperature": NaN}"#.to_vec(),
            "",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "temperature": 1e999}"#.to_vec(),
            "",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "top_p": 1.5}"#.to_vec(),
            "top_p",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "hi", "n": 0}"#.to_vec(),
            "n",
        ),
        (
            "/v1/completions",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            "",
        ),
        (
            "/v1/completions",
            json!({"prompt": "word ".repeat(20_000)})
                .to_string()
                .into_bytes(),
            "prompt",
        ),
        ("/v1/completions", vec![b' '; 10 * 1024 * 1024], ""),
    ];
    for (path, body, field) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).to_string();
        let oversized = body.len() > 4 * 1024 * 1024;
        let r = match post_raw(path, body).await {
            Ok(r) => r,
            // The server answers 413 after reading up to its limit and closes the
            // connection; a client still uploading may see the close (EPIPE / reset)
            // before it reads the answer. Either way the body was refused.
            Err(e) if oversized && e.is_request() => continue,
            Err(e) => panic!("{shown}: request failed: {e}"),
        };
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            (400..500).contains(&status),
            "{shown}: expected 4xx, got {status}: {text}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{shown}: error is not JSON: {text}"));
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{shown}: no error.message: {v}"));
        assert!(!msg.is_empty());
        assert!(
            msg.contains(field) || v["error"]["param"] == field,
            "{shown}: message names {field}: {v}"
        );
    }
    let (status, v) = completion(&up.http, json!({"prompt": "Hello", "max_tokens": 4})).await;
    assert_eq!(status, 200, "still serving after bad input: {v}");
}
