//! Property-based fuzzing (proptest, stable Rust) of what untrusted input reaches:
//!
//! - request JSON → parsing → validation → generation, through the real HTTP server:
//!   every input gets a JSON error or a valid response, streams parse as SSE and end
//!   with `[DONE]` (the SSE encoder fed with arbitrary text), and the server stays up;
//! - chat template rendering with arbitrary roles and contents;
//! - the worker protocol's step messages, through a real worker's `Steps` stream.
//!
//! Each target runs `SHARDLINE_FUZZ_CASES` cases (default 64: a bounded run for CI);
//! `deploy/fuzz.sh` runs many more. A failure prints the minimal input proptest found.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use shardline_coordinator::Config;
use shardline_coordinator::chat_template::{CHATML, ChatMessage, ChatTemplate};
use shardline_engine::testing::{StepStream, TestWorker, TestWorkerConfig};
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;

fn cases() -> u32 {
    std::env::var("SHARDLINE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Strings that stress parsers and encoders: control characters, newlines (SSE framing),
/// quotes, non-ASCII, and the occasional long one.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,24}",
        2 => "[\\n\\r\"\\\\ a:{}\\[\\]\u{0}-\u{1f}é😀]{0,16}",
        1 => Just("data: [DONE]\n\n".to_string()),
        1 => "a{200,2000}",
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..3000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-10.0f64..10.0).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "priority",
    "timeout",
    "user",
    "ignore_eos",
    "min_tokens",
    "suffix",
    "best_of",
    "response_format",
    "tools",
];

/// A field's value: plausible most of the time (so validation, not just parsing, is
/// reached), arbitrary otherwise.
fn field_value(name: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![Just(json!("fake-model")), text().prop_map(Value::from)].boxed(),
        "prompt" => prop_oneof![
            text().prop_map(Value::from),
            prop::collection::vec(text().prop_map(Value::from), 0..3).prop_map(Value::Array),
            prop::collection::vec((0u32..300).prop_map(Value::from), 0..8).prop_map(Value::Array),
        ]
        .boxed(),
        "messages" => prop::collection::vec(
            (
                prop_oneof![
                    Just("user"),
                    Just("system"),
                    Just("assistant"),
                    Just("tool"),
                    Just("")
                ],
                text(),
            )
                .prop_map(|(role, content)| json!({"role": role, "content": content})),
            0..4,
        )
        .prop_map(Value::Array)
        .boxed(),
        "max_tokens" | "max_completion_tokens" | "min_tokens" | "n" | "top_k" | "top_logprobs" => {
            (-2i64..40).prop_map(Value::from).boxed()
        }
        "stream" | "echo" | "ignore_eos" => any::<bool>().prop_map(Value::Bool).boxed(),
        "stream_options" => any::<bool>()
            .prop_map(|b| json!({"include_usage": b}))
            .boxed(),
        "stop" => prop_oneof![
            text().prop_map(Value::from),
            prop::collection::vec(text().prop_map(Value::from), 0..20).prop_map(Value::Array),
        ]
        .boxed(),
        "logit_bias" => prop::collection::btree_map(text(), number(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
        _ => leaf().boxed(),
    };
    prop_oneof![4 => plausible, 1 => value()].boxed()
}

/// A request body: some known fields (and the odd unknown one), or any JSON, or bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let fields = prop::collection::vec(prop::sample::select(FIELDS), 0..8).prop_flat_map(|names| {
        names
            .into_iter()
            .map(|n| field_value(n).prop_map(move |v| (n.to_string(), v)))
            .collect::<Vec<_>>()
    });
    prop_oneof![
        6 => fields.prop_map(|kv| serde_json::to_vec(&Value::Object(kv.into_iter().collect::<Map<_, _>>())).unwrap()),
        2 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// Checks a streamed body: `data:` lines of JSON, ending with `[DONE]`.
fn check_sse(text: &str) -> Result<(), TestCaseError> {
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        prop_assert!(!done, "an event after [DONE]: {text:?}");
        if event.starts_with(':') {
            continue;
        }
        let data = event
            .strip_prefix("data: ")
            .ok_or_else(|| TestCaseError::fail(format!("not an SSE data event: {event:?}")))?;
        prop_assert!(
            !data.contains('\n'),
            "a raw newline inside an event: {event:?}"
        );
        if data == "[DONE]" {
            done = true;
        } else {
            serde_json::from_str::<Value>(data)
                .map_err(|e| TestCaseError::fail(format!("event is not JSON ({e}): {data:?}")))?;
        }
    }
    prop_assert!(done, "the stream did not end with [DONE]: {text:?}");
    Ok(())
}

#[test]
fn request_json_gets_an_error_or_a_valid_response() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(one_worker(Config::default(), TestWorkerConfig::default()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let paths = prop::sample::select(vec!["/v1/completions", "/v1/chat/completions"]);
    runner()
        .run(&(paths, body()), |(path, body)| {
            rt.block_on(async {
                let response = client
                    .post(format!("{}{path}", c.base))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
                let status = response.status().as_u16();
                let stream = response
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "text/event-stream");
                let text = response
                    .text()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("body cut off: {e}")))?;
                prop_assert!(
                    status < 500,
                    "{status} for {}: {text}",
                    String::from_utf8_lossy(&body)
                );
                if stream {
                    prop_assert_eq!(status, 200);
                    check_sse(&text)?;
                } else {
                    let json: Value = serde_json::from_str(&text)
                        .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {text}")))?;
                    if status == 200 {
                        prop_assert!(json["choices"].is_array(), "{json}");
                    } else {
                        prop_assert!(json["error"]["message"].is_string(), "{json}");
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    // Still serving.
    let (status, _) = rt.block_on(c.post(
        "/v1/completions",
        json!({"prompt": "still up", "max_tokens": 2}),
    ));
    assert_eq!(status, 200);
}

#[test]
fn chat_templates_render_or_fail_cleanly() {
    // ChatML, and a template that validates roles (Llama 2's style of raise_exception).
    let strict = "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
        {{ raise_exception('roles must alternate user/assistant') }}{% endif %}\
        {{ bos_token + '[INST] ' + m['content'] | trim + ' [/INST]' }}{% endfor %}";
    let templates = [
        ChatTemplate::new(CHATML, None, None).unwrap(),
        ChatTemplate::new(strict, Some("<s>"), Some("</s>")).unwrap(),
    ];
    let message = (text(), text()).prop_map(|(role, content)| ChatMessage::new(role, content));
    runner()
        .run(
            &(prop::collection::vec(message, 0..6), any::<bool>()),
            |(messages, add_generation_prompt)| {
                let out = templates[0].render(&messages, add_generation_prompt);
                let out = out.map_err(|e| TestCaseError::fail(format!("ChatML failed: {e}")))?;
                for m in &messages {
                    prop_assert!(out.contains(&m.content));
                }
                // May refuse the conversation; must not panic.
                let _ = templates[1].render(&messages, add_generation_prompt);
                Ok(())
            },
        )
        .unwrap();
}

fn sampling() -> impl Strategy<Value = pb::SamplingParams> {
    let float = || {
        prop_oneof![
            -2.0f32..3.0,
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(-f32::INFINITY),
            any::<f32>(),
        ]
    };
    (
        float(),
        float(),
        any::<u32>(),
        float(),
        float(),
        any::<u64>(),
    )
        .prop_map(
            |(temperature, top_p, top_k, min_p, repetition_penalty, seed)| pb::SamplingParams {
                temperature,
                top_p,
                top_k: top_k % 100,
                min_p,
                repetition_penalty,
                seed,
                ..Default::default()
            },
        )
}

fn step() -> impl Strategy<Value = pb::StepRequest> {
    let token = prop_oneof![8 => 0u32..300, 1 => any::<u32>()];
    let chunk = (
        0u64..6,
        prop::collection::vec(token.clone(), 0..24),
        prop::option::of((
            sampling(),
            0u32..40,
            prop::collection::vec(token, 0..3),
            any::<bool>(),
            0u32..8,
        )),
        0u32..3000,
    )
        .prop_map(|(seq_id, prompt, params, max_tokens)| pb::PrefillChunk {
            seq_id,
            prompt,
            params: params.map(
                |(sampling, max_new_tokens, stop_token_ids, ignore_eos, top_logprobs)| {
                    pb::SequenceParams {
                        sampling: Some(sampling),
                        max_new_tokens,
                        stop_token_ids,
                        ignore_eos,
                        top_logprobs,
                        ..Default::default()
                    }
                },
            ),
            max_tokens,
            traceparent: String::new(),
        });
    (
        prop::collection::vec(chunk, 0..3),
        prop::collection::vec(0u64..6, 0..4),
        prop::collection::vec(0u64..6, 0..3),
    )
        .prop_map(|(prefill, decode, release)| pb::StepRequest {
            prefill,
            decode,
            release,
        })
}

#[test]
fn step_messages_get_an_answer_or_a_status_and_the_worker_stays_up() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let worker = rt.block_on(async {
        TestWorker::start(TestWorkerConfig {
            kv_blocks: 64,
            ..TestWorkerConfig::default()
        })
        .await
        .unwrap()
    });
    runner()
        .run(&prop::collection::vec(step(), 1..5), |steps| {
            rt.block_on(async {
                // A connection and a step stream per case, as a coordinator has: a case's
                // steps see the sequences its earlier steps started. A stream that ended
                // with a status is done; the case's sequences are released with it.
                let mut client = WorkerClient::connect(worker.url())
                    .await
                    .map_err(|e| TestCaseError::fail(format!("worker unreachable: {e}")))?;
                let mut stream = StepStream::open(&mut client)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("no step stream: {e}")))?;
                for request in steps {
                    match stream.step(request.clone()).await {
                        Ok(_) => {}
                        Err(status) => {
                            prop_assert!(
                                !matches!(
                                    status.code(),
                                    tonic::Code::Internal
                                        | tonic::Code::Unknown
                                        | tonic::Code::Unavailable
                                ),
                                "{status:?} for {request:?}"
                            );
                            break;
                        }
                    }
                }
                // Forget every sequence so the next case starts clean.
                let release = pb::StepRequest {
                    release: (0..6).collect(),
                    ..Default::default()
                };
                let _ = stream.step(release).await;
                drop(stream);
                let health = client.health(pb::HealthRequest {}).await;
                prop_assert!(health.is_ok(), "worker health after the steps: {health:?}");
                Ok(())
            })
        })
        .unwrap();
}
