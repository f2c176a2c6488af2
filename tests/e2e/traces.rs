//! Traces across every hop, over real processes: `shardline coordinator` and two
//! simulated workers (`shardline worker --model sim:…`, the real worker protocol over a
//! cost model) export to an in-process OTLP receiver. A client's `traceparent` is
//! continued, the coordinator's phases are children of the request's span, the worker's
//! sequence span joins the same trace and its step spans link to the request; a worker
//! killed mid-stream shows up as a migration event; an unreachable collector costs no
//! request.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use shardline_tests::Proc;
use shardline_tests::load::{body, client};
use shardline_tests::otlp::{Received, Receiver, hex};
use shardline_tests::worker::health;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_shardline"))
}

/// A simulated worker group exporting to `otlp`.
struct Sim {
    proc: Proc,
    url: String,
    group: String,
}

fn sim_worker(group: &str, otlp: &str) -> Sim {
    let mut cmd = Command::new(bin());
    cmd.args(["worker", "--model", "sim:h100-llama3-8b"])
        .args(["--listen", "127.0.0.1:0", "--group-id", group])
        .args(["--otlp-endpoint", otlp])
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(&format!("sim-{group}"), cmd);
    let addr = proc.logged(
        "worker gRPC service listening",
        "addr",
        Duration::from_secs(60),
    );
    Sim {
        proc,
        url: format!("http://{addr}"),
        group: group.to_string(),
    }
}

/// `shardline coordinator` over `workers`, exporting to `otlp`; ready once every group is.
async fn coordinator(workers: &[&Sim], otlp: &str) -> (Proc, String) {
    coordinator_with(workers, otlp, &[]).await
}

/// [`coordinator`] with `extra` flags.
async fn coordinator_with(workers: &[&Sim], otlp: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["coordinator", "--http-listen", "127.0.0.1:0"])
        .args(["--grpc-listen", "127.0.0.1:0", "--otlp-endpoint", otlp])
        .args(extra)
        .env("RUST_LOG", "info");
    for w in workers {
        cmd.args(["--worker", &w.url]);
    }
    let mut proc = Proc::spawn("coordinator", cmd);
    let addr = proc.logged("coordinator listening", "http", Duration::from_secs(60));
    let http = format!("http://{addr}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match client().get(format!("{http}/health")).send().await {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        };
        if ready.is_some_and(|v| v["groups"].as_u64() == Some(workers.len() as u64)) {
            return (proc, http);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "groups never ready:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SERVICE_COORDINATOR: &str = "shardline-coordinator";
const SERVICE_WORKER: &str = "shardline-worker";

fn in_trace<'a>(spans: &'a [Received], trace: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.trace_id() == trace).collect()
}

/// The coordinator's span of the request in `trace`.
fn request_span(spans: &[Received], trace: &str) -> Option<Received> {
    spans
        .iter()
        .find(|s| {
            s.trace_id() == trace
                && s.service.contains(SERVICE_COORDINATOR)
                && s.span.name == "POST /v1/completions"
        })
        .cloned()
}

/// Random W3C ids: a 32-hex trace id and a 16-hex span id.
fn ids() -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let trace = format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 64));
    let span = format!("{:016x}", (nanos as u64).rotate_left(17) | 1);
    (trace, span)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_is_one_trace_across_coordinator_and_worker_and_shows_its_migration() {
    let (otlp, receiver) = Receiver::start().await;
    let a = sim_worker("group-a", &otlp);
    let b = sim_worker("group-b", &otlp);
    let (mut coord, http) = coordinator(&[&a, &b], &otlp).await;

    // One request with the client's trace context.
    let (trace, client_span) = ids();
    let response = client()
        .post(format!("{http}/v1/completions"))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .json(&body(1, 16))
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-trace-id"].to_str().unwrap(),
        trace,
        "the response names the client's trace"
    );
    let done: Value = response.json().await.unwrap();
    assert_eq!(done["usage"]["completion_tokens"], 16, "{done}");

    let (request, spans) = receiver
        .wait_for(
            Duration::from_secs(20),
            "complete trace of the request",
            |spans| {
                let request = request_span(spans, &trace)?;
                let worker_seq = spans.iter().any(|s| {
                    s.service.contains(SERVICE_WORKER)
                        && s.span.name == "sequence"
                        && s.trace_id() == trace
                });
                let decode = in_trace(spans, &trace)
                    .iter()
                    .any(|s| s.span.name == "decode");
                (worker_seq && decode).then(|| (request, spans.to_vec()))
            },
        )
        .await;
    assert_eq!(
        request.parent_span_id(),
        client_span,
        "the request span continues the client's span"
    );
    assert_eq!(request.attr("finish_reason").as_deref(), Some("length"));
    assert_eq!(request.attr("completion_tokens").as_deref(), Some("16"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        request
            .attr("request_id")
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    let trace_spans = in_trace(&spans, &trace);
    for phase in ["validate", "admission", "queue", "prefill", "decode"] {
        let span = trace_spans
            .iter()
            .find(|s| s.span.name == phase)
            .unwrap_or_else(|| panic!("no {phase} span in the trace: {trace_spans:#?}"));
        assert_eq!(
            span.parent_span_id(),
            request.span_id(),
            "{phase} is a child of the request span"
        );
    }
    let admission = trace_spans
        .iter()
        .find(|s| s.span.name == "admission")
        .unwrap();
    assert_eq!(admission.attr("outcome").as_deref(), Some("admitted"));
    let decode = trace_spans
        .iter()
        .find(|s| s.span.name == "decode")
        .unwrap();
    assert_eq!(decode.attr("tokens").as_deref(), Some("16"));
    assert!(decode.attr("batch_max").is_some(), "{decode:?}");
    let sequence = trace_spans
        .iter()
        .find(|s| s.span.name == "sequence")
        .unwrap();
    assert!(sequence.service.contains(SERVICE_WORKER));
    assert_eq!(
        sequence.parent_span_id(),
        request.span_id(),
        "the worker's sequence span is a child of the request span"
    );
    assert_eq!(sequence.attr("outcome").as_deref(), Some("length"));
    // Steps serve many requests: each links to the requests it served, and belongs to
    // the trace of the step stream the coordinator opened.
    let steps: Vec<&Received> = spans
        .iter()
        .filter(|s| {
            s.span.name == "step"
                && s.span
                    .links
                    .iter()
                    .any(|l| hex(&l.trace_id) == trace && hex(&l.span_id) == request.span_id())
        })
        .collect();
    assert!(
        steps.len() >= 16,
        "every step that sampled a token for the request links to it: {}",
        steps.len()
    );
    for step in &steps {
        assert!(step.service.contains(SERVICE_WORKER));
        assert_ne!(
            step.trace_id(),
            trace,
            "a step has no single request as parent"
        );
        let opened = spans
            .iter()
            .find(|s| s.span_id() == step.parent_span_id())
            .expect("the step's parent: the coordinator's opening of the step stream");
        assert_eq!(opened.span.name, "open step stream");
        assert!(opened.service.contains(SERVICE_COORDINATOR));
    }

    // A long stream whose worker is killed mid-way: it finishes on the other group, and
    // its trace shows the migration.
    let (trace, client_span) = ids();
    let mut streamed = body(2, 400);
    streamed["stream"] = json!(true);
    let response = client()
        .post(format!("{http}/v1/completions"))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .json(&streamed)
        .send()
        .await
        .expect("POST /v1/completions (stream)");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-trace-id"].to_str().unwrap(), trace);
    let groups = [a, b];
    let (mut chunks, mut finish, mut killed) = (0usize, None, None);
    let (mut events, mut buf) = (response.bytes_stream(), String::new());
    while let Some(bytes) = events.next().await {
        buf.push_str(std::str::from_utf8(&bytes.expect("the stream survives")).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap_or("");
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            let event: Value = serde_json::from_str(data).unwrap();
            assert!(event.get("error").is_none(), "error event: {event}");
            chunks += 1;
            if let Some(f) = event["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        if chunks >= 20 && killed.is_none() {
            // The group running it is the one with a sequence.
            for g in &groups {
                if health(&g.url).await.is_some_and(|h| h.num_running > 0) {
                    g.proc.signal("KILL");
                    killed = Some(g.group.clone());
                    break;
                }
            }
            assert!(killed.is_some(), "one group runs the stream");
        }
    }
    assert_eq!(finish.as_deref(), Some("length"));
    let killed = killed.expect("a worker was killed mid-stream");
    let request = receiver
        .wait_for(
            Duration::from_secs(20),
            "the migrated request's span",
            |spans| request_span(spans, &trace),
        )
        .await;
    let migration = request
        .event("migrating a request to another group")
        .unwrap_or_else(|| panic!("no migration event on {request:?}"));
    let attr = |key| shardline_tests::otlp::attr(&migration.attributes, key);
    assert_eq!(attr("from"), Some(killed));
    assert!(attr("reason").is_some_and(|r| !r.is_empty()));
    assert_eq!(request.attr("migrations").as_deref(), Some("1"));
    assert_eq!(request.attr("finish_reason").as_deref(), Some("length"));
    let queues = receiver
        .wait_for(
            Duration::from_secs(20),
            "a queue span per placement",
            |spans| {
                let n = in_trace(spans, &trace)
                    .iter()
                    .filter(|s| s.span.name == "queue")
                    .count();
                (n >= 2).then_some(n)
            },
        )
        .await;
    assert_eq!(queues, 2, "queued once on each group");
    // The coordinator's log line about the migration carries the trace id.
    let output = coord.output();
    let line = output
        .lines()
        .find(|l| l.contains("migrating a request to another group"))
        .unwrap_or_else(|| panic!("no migration log line:\n{output}"));
    assert!(line.contains(&trace), "{line}");
    coord.assert_running();
}

/// Whether `value` (a JSON log line or part of one) has a field `key` equal to `want`,
/// at any depth (the request span's fields sit under `span` / `spans`).
fn has_field(value: &Value, key: &str, want: &str) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == key && v.as_str() == Some(want)) || has_field(v, key, want)),
        Value::Array(items) => items.iter().any(|v| has_field(v, key, want)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_request_continues_the_clients_trace_and_json_logs_carry_it() {
    use shardline_proto::v1::GenerateRequest;
    use shardline_proto::v1::inference_client::InferenceClient;

    let (otlp, receiver) = Receiver::start().await;
    let a = sim_worker("group-a", &otlp);
    let b = sim_worker("group-b", &otlp);
    let (mut coord, _http) = coordinator_with(&[&a, &b], &otlp, &["--log-format", "json"]).await;
    let grpc = coord.logged("coordinator listening", "grpc", Duration::from_secs(10));
    let mut inference = InferenceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect to the gRPC API");
    let with_trace = |request: GenerateRequest, trace: &str, span: &str| {
        let mut request = tonic::Request::new(request);
        let parent = format!("00-{trace}-{span}-01");
        request
            .metadata_mut()
            .insert("traceparent", parent.parse().unwrap());
        request
    };

    // A gRPC Generate with the client's trace context: continued and named back.
    let (trace, client_span) = ids();
    let request = GenerateRequest {
        prompt: "hello over grpc".into(),
        max_tokens: Some(8),
        ..Default::default()
    };
    let response = inference
        .generate(with_trace(request, &trace, &client_span))
        .await
        .expect("Generate");
    assert_eq!(
        response
            .metadata()
            .get("x-trace-id")
            .unwrap()
            .to_str()
            .unwrap(),
        trace,
        "the response names the client's trace"
    );
    assert_eq!(response.into_inner().usage.unwrap().completion_tokens, 8);
    let (server, worker) = receiver
        .wait_for(
            Duration::from_secs(20),
            "the gRPC request's spans on both processes",
            |spans| {
                let server = spans.iter().find(|s| {
                    s.trace_id() == trace
                        && s.service.contains(SERVICE_COORDINATOR)
                        && s.parent_span_id() == client_span
                })?;
                let worker = spans
                    .iter()
                    .find(|s| s.trace_id() == trace && s.service.contains(SERVICE_WORKER))?;
                Some((server.clone(), worker.clone()))
            },
        )
        .await;
    assert!(
        server.span.name.contains("Generate"),
        "the server span names the method: {}",
        server.span.name
    );
    assert_eq!(worker.trace_id(), trace);

    // A gRPC stream whose worker is killed mid-way: it finishes on the other group, and
    // the coordinator's JSON log line about the migration carries the request's trace id.
    let (stream_trace, stream_span) = ids();
    let request = GenerateRequest {
        prompt: "a long answer over grpc".into(),
        max_tokens: Some(400),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = inference
        .generate_stream(with_trace(request, &stream_trace, &stream_span))
        .await
        .expect("GenerateStream")
        .into_inner();
    let (mut messages, mut killed, mut tokens) = (0usize, false, 0u32);
    while let Some(message) = stream.next().await {
        let message = message.expect("the stream survives the kill");
        messages += 1;
        if let Some(usage) = message.usage {
            tokens = usage.completion_tokens;
        }
        if messages >= 20 && !killed {
            for g in [&a, &b] {
                if health(&g.url).await.is_some_and(|h| h.num_running > 0) {
                    g.proc.signal("KILL");
                    killed = true;
                    break;
                }
            }
            assert!(killed, "one group runs the stream");
        }
    }
    assert!(killed);
    assert_eq!(tokens, 400, "the stream finished in full");
    let logged = shardline_tests::wait_until(Duration::from_secs(10), || {
        coord.output().lines().find_map(|l| {
            let line: Value = serde_json::from_str(l).ok()?;
            (has_field(&line, "trace_id", &stream_trace)
                && line
                    .to_string()
                    .contains("migrating a request to another group"))
            .then_some(line)
        })
    });
    let output = coord.output();
    assert!(
        logged.is_some(),
        "no JSON migration log line with the trace id:\n{output}"
    );
    assert!(
        output
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every log line is JSON:\n{output}"
    );
    coord.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_collector_fails_no_request() {
    // Nothing listens on a port that was free a moment ago.
    let dead = format!("http://127.0.0.1:{}", shardline_tests::free_port());
    let worker = sim_worker("group-a", &dead);
    let (mut coord, http) = coordinator(&[&worker], &dead).await;
    for i in 0..8 {
        let response = client()
            .post(format!("{http}/v1/completions"))
            .json(&body(i, 8))
            .send()
            .await
            .expect("POST /v1/completions");
        assert_eq!(response.status(), 200);
        let trace = response.headers()["x-trace-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(trace.len(), 32, "a trace id is still named: {trace}");
        let done: Value = response.json().await.unwrap();
        assert_eq!(done["usage"]["completion_tokens"], 8, "{done}");
    }
    let metrics = client()
        .get(format!("{http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shardline_trace_spans_dropped_total"),
        "the drop counter is exported"
    );
    coord.assert_running();
}
