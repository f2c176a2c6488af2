//! Spans reach a real OTLP receiver (opentelemetry-proto's generated `TraceService`
//! server on a loopback port) with their names, parents and service; an unreachable
//! collector never holds a span up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tracing_subscriber::layer::SubscriberExt as _;

/// Every span the receiver got, with its resource's service name.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    self.spans.lock().unwrap().push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn receiver() -> (String, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_their_parents_and_service() {
    let (endpoint, receiver) = receiver().await;
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
    let spans = receiver.spans.lock().unwrap().clone();
    let find = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name)
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
