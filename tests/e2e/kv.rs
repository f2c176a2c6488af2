//! KV memory under real traffic, end to end on `shardline up` with the default model:
//! blocks taken as sequences grow (not reserved for `max_tokens`), preemption when a
//! small cache runs out — every text the same as the request run alone, nothing lost —
//! and chats without `max_tokens` (what the OpenAI clients send) running side by side.
//!
//! The tests run one at a time (a process-wide lock): on a 2-core machine two clusters at
//! once would only measure contention.

use serde_json::{Value, json};
use shardline_tests::cluster::Cluster;
use shardline_tests::http::metric_sum;
use shardline_tests::load::{body, client, complete};
use shardline_tests::worker::health;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_shardline"))
}

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

/// Completes requests `ids` at once; their texts in order.
async fn all_at_once(http: &str, ids: &[usize], max_tokens: u32) -> Vec<String> {
    let all = ids.iter().map(|&i| {
        let http = http.to_string();
        tokio::spawn(async move { complete(&http, body(i, max_tokens)).await })
    });
    futures::future::join_all(all)
        .await
        .into_iter()
        .map(|r| {
            let (status, v) = r.unwrap();
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
            text(&v)
        })
        .collect()
}

/// Eight greedy requests that cannot all fit in a 16-block cache (each grows to ~5
/// blocks): all finish, the worker preempts some, and every text equals the same
/// request run alone. Afterwards every block is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_requests_finish_with_the_text_they_have_alone() {
    let _serial = serial().await;
    let c = Cluster::start(bin(), &["--kv-blocks", "16", "--threads", "2"]);
    let ids: Vec<usize> = (0..8).collect();
    let mut alone = Vec::new();
    for &i in &ids {
        alone.extend(all_at_once(&c.http, &[i], 48).await);
    }
    assert_eq!(
        metric_sum(&c.http, "shardline_num_preemptions_total").await,
        0.0,
        "one request at a time fits"
    );
    let together = all_at_once(&c.http, &ids, 48).await;
    let preemptions = metric_sum(&c.http, "shardline_num_preemptions_total").await;
    assert!(
        preemptions > 0.0,
        "8 sequences of ~5 blocks in 16 blocks must preempt"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, t,
            "request {i}: preempted text differs from its run alone"
        );
    }
    let h = health(&c.worker).await.expect("worker health");
    assert_eq!(h.sequences_preempted as f64, preemptions);
    assert_eq!(h.num_running, 0);
    assert_eq!(h.kv_blocks_free, 16, "every block is free after the load");
    let log = c.proc.output();
    assert!(
        log.contains("preempt"),
        "a preemption is logged with its reason:\n{log}"
    );
}

/// Chats without `max_tokens` (the official clients' default) run side by side on the
/// default KV budget instead of one at a time: each would reserve ~510 of the 728 blocks
/// for its worst case, but holds only what it fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_without_max_tokens_run_concurrently() {
    let _serial = serial().await;
    let c = Cluster::start(bin(), &["--threads", "2"]);
    let n = 8;
    let all = (0..n).map(|i| {
        let http = c.http.clone();
        tokio::spawn(async move {
            let r = client()
                .post(format!("{http}/v1/chat/completions"))
                .json(&json!({
                    "messages": [{"role": "user", "content": format!("Name one fact about the number {}.", i * 7 + 3)}],
                    "temperature": 0,
                    // Short answers keep the test quick on a CPU; no `max_tokens`.
                    "stop": ["."],
                }))
                .send()
                .await
                .expect("chat request");
            let status = r.status().as_u16();
            let v: Value = r.json().await.expect("chat body");
            (status, v)
        })
    });
    for r in futures::future::join_all(all).await {
        let (status, v) = r.unwrap();
        assert_eq!(status, 200, "{v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    }
    let mean_batch = metric_sum(&c.http, "shardline_batch_size_sum").await
        / metric_sum(&c.http, "shardline_batch_size_count").await;
    assert!(
        mean_batch > 4.0,
        "8 chats without max_tokens should share steps; mean batch size {mean_batch:.2}"
    );
    assert_eq!(
        metric_sum(&c.http, "shardline_num_preemptions_total").await,
        0.0,
        "the default cache holds 8 short chats without preempting"
    );
}
