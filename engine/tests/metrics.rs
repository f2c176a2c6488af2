//! The worker's metrics endpoint (`--metrics-listen`): a group served by `serve_group`
//! over the fake runner, driven through real steps, scraped over HTTP; the exposition
//! passes `promtool check metrics`.

use std::time::Duration;

use shardline_engine::engine::{EngineConfig, ModelFacts};
use shardline_engine::fake::FakeRunner;
use shardline_engine::serve::{ServeOptions, serve_group};
use shardline_engine::testing::StepStream;
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use tokio_util::sync::CancellationToken;

fn first_chunk(id: u64, prompt: Vec<u32>, max_new_tokens: u32) -> pb::PrefillChunk {
    pb::PrefillChunk {
        seq_id: id,
        prompt,
        params: Some(pb::SequenceParams {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric = series.split('{').next().unwrap_or("");
            metric == name && labels.iter().all(|lab| series.contains(lab))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_exports_steps_kv_sequences_and_the_gateway_gauges() {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", grpc.local_addr().unwrap());
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = ServeOptions {
        engine: EngineConfig {
            max_num_seqs: 8,
            group_id: "group-a".into(),
            model: ModelFacts::default(),
        },
        seq_idle_timeout: None,
        drain_timeout: Duration::from_secs(1),
        registration: Default::default(),
        metrics_listen: Some(metrics_addr),
        tls: None,
    };
    let stop = CancellationToken::new();
    let runner = FakeRunner::new(32, 64, 4, 16).with_prefix_cache();
    let served = tokio::spawn(serve_group(Box::new(runner), grpc, opts, stop.clone()));
    let mut client = loop {
        if let Ok(c) = WorkerClient::connect(url.clone()).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let prompt: Vec<u32> = (1..=9).collect();
    // Sequence 1: the prompt and 3 tokens (the first sampled with the prompt), then done.
    let mut steps = StepStream::open(&mut client).await.unwrap();
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![first_chunk(1, prompt.clone(), 3)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.results[0].has_token);
    for _ in 0..2 {
        steps
            .step(pb::StepRequest {
                decode: vec![1],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Sequence 2: the same prompt, its two full blocks from the prefix cache; it stays.
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![first_chunk(2, prompt, 10)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].cached_tokens, 8, "{r:?}");

    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    let g = "group=\"group-a\"";
    assert_eq!(sample(&text, "shardline_worker_steps_total", &[g]), 4.0);
    assert_eq!(
        sample(&text, "shardline_worker_step_duration_seconds_count", &[g]),
        4.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_step_tokens_sum", &[g]),
        9.0 + 2.0 + 1.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_batch_size_count", &[g]),
        4.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_generation_tokens_total", &[g]),
        4.0
    );
    assert_eq!(
        sample(
            &text,
            "shardline_worker_prefix_cache_hit_tokens_total",
            &[g]
        ),
        8.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_prompt_tokens_total", &[g]),
        10.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_num_requests_running", &[g]),
        1.0
    );
    assert_eq!(
        sample(&text, "shardline_worker_num_requests_waiting", &[g]),
        0.0
    );
    let used = sample(&text, "shardline_worker_kv_blocks", &[g, "state=\"used\""]);
    let free = sample(&text, "shardline_worker_kv_blocks", &[g, "state=\"free\""]);
    assert_eq!(used + free, 16.0);
    assert!(used >= 3.0, "sequence 2 holds its blocks: {used}");
    assert_eq!(
        sample(&text, "shardline_worker_kv_cache_usage_perc", &[g]),
        used / 16.0
    );
    assert_eq!(
        sample(
            &text,
            "shardline_worker_cache_config_info",
            &[
                g,
                "block_size=\"4\"",
                "num_gpu_blocks=\"16\"",
                "cache_dtype=\"f32\""
            ]
        ),
        1.0
    );
    for name in [
        "shardline_worker_sequences_released_idle_total",
        "shardline_worker_tp_collective_seconds_total",
        "shardline_worker_tp_collective_failures_total",
        "shardline_trace_spans_dropped_total",
    ] {
        sample(&text, name, &[g]);
    }
    shardline_tests::promtool_check("the worker's /metrics", &text);
    stop.cancel();
    served.await.unwrap().unwrap();
}
