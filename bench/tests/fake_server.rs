//! The bench end to end against the in-process fake OpenAI server: counts, JSON and plots.

use clap::Parser;
use shardline_bench::fake::{FakeConfig, spawn_fake};
use shardline_bench::{BenchArgs, run_bench};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(extra: &[&str]) -> BenchArgs {
    let mut argv = vec!["bench", "--no-progress"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("arguments parse").args
}

async fn fake(cfg: FakeConfig) -> (String, CancellationToken) {
    let stop = CancellationToken::new();
    let addr = spawn_fake(cfg, stop.clone())
        .await
        .expect("fake server binds");
    (format!("http://{addr}"), stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sweep_writes_json_png_and_svg() {
    let (url, stop) = fake(FakeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let plots = dir.path().join("plots");
    let a = args(&[
        "--base-url",
        &url,
        "--request-rate",
        "200,inf",
        "--num-requests",
        "20",
        "--input-len",
        "uniform:4:12",
        "--output-len",
        "5",
        "--warmup-requests",
        "3",
        "--slo",
        "ttft=10s,tpot=1s",
        "--json",
        json.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    let runs = run_bench(&a, CancellationToken::new())
        .await
        .expect("bench runs");
    assert_eq!(runs.len(), 2);
    for r in &runs {
        assert_eq!((r.completed, r.failed, r.rate_limited), (20, 0, 0), "{r:?}");
        assert_eq!(r.total_output_tokens, 100);
        assert_eq!(r.ttft_ms.count, 20);
        // 5 output chunks per request → 4 gaps each.
        assert_eq!(r.itl_ms.count, 80);
        assert_eq!(r.tpot_ms.count, 20);
        assert!(r.request_throughput > 0.0 && r.output_throughput > 0.0);
        // A zero-latency fake meets generous SLOs.
        assert_eq!(r.slo_attainment, Some(1.0));
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("valid JSON");
    assert_eq!(v["model"], "fake");
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["runs"][1]["load"], "rate=inf");
    assert!(v["runs"][0]["ttft_ms"]["p99"].is_number());
    for stem in ["sweep", "dist-00-rate_200_s", "dist-01-rate_inf"] {
        let png = std::fs::read(plots.join(format!("{stem}.png"))).expect("PNG written");
        assert!(png.len() > 10_000, "{stem}.png is {} bytes", png.len());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(plots.join(format!("{stem}.svg"))).expect("SVG written");
        assert!(
            svg.contains("<svg") && svg.contains("TTFT"),
            "{stem}.svg lacks its labels"
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_429s_apart() {
    let (url, stop) = fake(FakeConfig {
        reject_every: 5,
        ..Default::default()
    })
    .await;
    let a = args(&[
        "--base-url",
        &url,
        "--model",
        "m",
        "--concurrency",
        "4",
        "--num-requests",
        "20",
        "--output-len",
        "3",
    ]);
    let runs = run_bench(&a, CancellationToken::new())
        .await
        .expect("bench runs");
    let r = &runs[0];
    assert_eq!((r.completed, r.rate_limited, r.failed), (16, 4, 0), "{r:?}");
    assert!(r.failed_by_reason.is_empty());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shared_prefix_with_metrics_scrape() {
    let (url, stop) = fake(FakeConfig::default()).await;
    let a = args(&[
        "--base-url",
        &format!("{url}/v1"),
        "--endpoint",
        "chat",
        "--workload",
        "shared-prefix",
        "--prefix-groups",
        "2",
        "--prefix-questions",
        "3",
        "--prefix-len",
        "8",
        "--input-len",
        "4",
        "--output-len",
        "2",
        "--concurrency",
        "2",
        "--num-requests",
        "6",
        "--scrape-metrics",
    ]);
    let runs = run_bench(&a, CancellationToken::new())
        .await
        .expect("bench runs");
    let r = &runs[0];
    assert_eq!(r.completed, 6);
    let srv = r.server.as_ref().expect("scraped");
    assert_eq!(srv.kv_usage_mean, Some(0.5));
    // The fake's batch-size histogram grows by sum 2 per request and count 1.
    assert_eq!(srv.batch_size_mean, Some(2.0));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_replay_sends_every_line() {
    let (url, stop) = fake(FakeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    std::fs::write(&trace, "{\"timestamp\":0,\"input_len\":5,\"output_len\":2}\n{\"timestamp\":20,\"input_len\":7,\"output_len\":3}\n{\"timestamp\":40,\"input_len\":3,\"output_len\":1}\n").unwrap();
    let a = args(&[
        "--base-url",
        &url,
        "--workload",
        "trace",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let runs = run_bench(&a, CancellationToken::new())
        .await
        .expect("bench runs");
    assert_eq!(runs[0].completed, 3);
    assert_eq!(runs[0].total_output_tokens, 6);
    assert_eq!(runs[0].load, "trace");
    stop.cancel();
}

#[tokio::test]
async fn bad_input_is_an_error_not_a_panic() {
    let (url, stop) = fake(FakeConfig::default()).await;
    let e = run_bench(
        &args(&["--base-url", &url, "--concurrency", "0"]),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("concurrency"), "{e}");
    let e = run_bench(
        &args(&["--base-url", &url, "--extra-body", "[1]"]),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("extra-body"), "{e}");
    assert!(Cli::try_parse_from(["bench", "--input-len", "uniform:9:1"]).is_err());
    stop.cancel();
}

/// Requests the fake has received so far (its `/metrics` counts them).
async fn fake_requests(url: &str) -> u64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("fake /metrics answers")
        .text()
        .await
        .expect("fake /metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix("shardline_batch_size_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("fake /metrics has a request count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_run_counts_in_flight_requests_and_still_writes_json() {
    // Every request would take 100 × 1 s: none can complete before the interrupt.
    let (url, stop) = fake(FakeConfig {
        itl_ms: 1000,
        ..FakeConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let a = args(&[
        "--base-url",
        &url,
        "--concurrency",
        "4,8",
        "--num-requests",
        "8",
        "--input-len",
        "4",
        "--output-len",
        "100",
        "--json",
        json.to_str().unwrap(),
    ]);
    let shutdown = CancellationToken::new();
    let bench = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { run_bench(&a, shutdown).await }
    });
    // Interrupt (as Ctrl-C / SIGTERM does) once all four lanes have a request in flight.
    while fake_requests(&url).await < 4 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let runs = bench
        .await
        .unwrap()
        .expect("an interrupted bench still succeeds");
    // The first point was interrupted; the second never started.
    assert_eq!(runs.len(), 1, "{runs:?}");
    let r = &runs[0];
    assert_eq!(
        (r.completed, r.failed, r.rate_limited, r.cancelled),
        (0, 0, 0, 4),
        "{r:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap())
        .expect("the partial results are valid JSON");
    assert_eq!(v["runs"][0]["cancelled"], 4, "{v}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_ends_the_run_on_time_and_counts_the_tokens_streamed() {
    // Answers of 1000 tokens at 20 ms each (20 s) against a 1.5 s run: without the cut-off
    // the run would last until they end.
    let (url, stop) = fake(FakeConfig {
        itl_ms: 20,
        ..FakeConfig::default()
    })
    .await;
    let a = args(&[
        "--base-url",
        &url,
        "--concurrency",
        "4",
        "--duration",
        "1500ms",
        "--cut-off",
        "--input-len",
        "4",
        "--output-len",
        "1000",
    ]);
    let started = std::time::Instant::now();
    let runs = run_bench(&a, CancellationToken::new())
        .await
        .expect("the bench runs");
    let took = started.elapsed();
    let r = &runs[0];
    assert!(
        took < std::time::Duration::from_secs(15),
        "took {took:?}: {r:?}"
    );
    assert_eq!(
        (r.completed, r.failed, r.cancelled, r.cut_off),
        (0, 0, 0, 4),
        "{r:?}"
    );
    // Each lane streamed for about 1.5 s at one token per 20 ms.
    assert!(
        (4 * 20..=4 * 80).contains(&r.total_output_tokens),
        "tokens streamed before the cut-off: {r:?}"
    );
    assert!(r.output_throughput > 0.0, "{r:?}");
    stop.cancel();
}

#[test]
fn cut_off_needs_a_duration() {
    let err = Cli::try_parse_from(["bench", "--cut-off", "--num-requests", "3"])
        .err()
        .expect("--cut-off without --duration is refused");
    assert!(err.to_string().contains("--duration"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_wait_out_retry_after_when_asked() {
    // Every request is refused with `Retry-After: 1`.
    let (url, stop) = fake(FakeConfig {
        reject_every: 1,
        ..Default::default()
    })
    .await;
    let run = |extra: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut argv = vec!["--base-url", &url, "--model", "m", "--concurrency", "2"];
            argv.extend_from_slice(&["--duration", "2500ms", "--output-len", "3"]);
            argv.extend_from_slice(extra);
            let runs = run_bench(&args(&argv), CancellationToken::new())
                .await
                .expect("bench runs");
            runs[0].rate_limited
        }
    };
    // Two lanes, each sending at about 0, 1 and 2 s.
    let waited = run(&["--honor-retry-after"]).await;
    assert!(
        (4..=8).contains(&waited),
        "429s while waiting out Retry-After: {waited}"
    );
    let at_once = run(&[]).await;
    assert!(at_once > 50, "429s when sending again at once: {at_once}");
    stop.cancel();
}
