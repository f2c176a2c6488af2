//! Spans reach a real OTLP receiver (opentelemetry-proto's generated `TraceService`
//! server on a loopback port) with their names, parents and service; an unreachable
//! collector never holds a span up.

use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use shardline_tests::otlp::{Received, Receiver};
use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_their_parents_and_service() {
    let (endpoint, receiver) = Receiver::start().await;
    let provider = shardline_telemetry::provider(&endpoint, "shardline-test").unwrap();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("shardline")));
    tracing::subscriber::with_default(subscriber, || {
        let request = tracing::info_span!("request", tokens = 3);
        let _entered = request.enter();
        tracing::info_span!("admission").in_scope(|| tracing::info!("admitted"));
    });
    tokio::task::spawn_blocking(move || provider.shutdown().unwrap())
        .await
        .unwrap();
    let spans = receiver.spans();
    let find = |name: &str| {
        spans
            .iter()
            .find(|r| r.span.name == name)
            .map(|Received { service, span }| (service, span))
            .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
    };
    let (service, request) = find("request");
    let (_, admission) = find("admission");
    assert!(service.contains("shardline-test"), "{service}");
    assert_eq!(admission.trace_id, request.trace_id, "one trace");
    assert_eq!(
        admission.parent_span_id, request.span_id,
        "admission is a child of request"
    );
    assert!(
        admission.events.iter().any(|e| e.name == "admitted"),
        "the log event is on its span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_holds_a_span_up() {
    // Nothing listens on a port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let provider =
        shardline_telemetry::provider(&format!("http://127.0.0.1:{port}"), "shardline-test")
            .unwrap();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("shardline")));
    let start = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..20_000 {
            tracing::info_span!("request", i).in_scope(|| {});
        }
    });
    let spent = start.elapsed();
    // 20 000 spans, more than the queue holds, against nothing: the overflow is counted.
    assert!(
        shardline_telemetry::dropped_spans() > 0,
        "spans beyond the queue are dropped and counted"
    );
    // Generous: the point is that no span waits for the collector's timeout (5 s).
    assert!(spent < Duration::from_secs(4), "{spent:?}");
    tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(6)))
        .await
        .unwrap()
        .ok();
}
