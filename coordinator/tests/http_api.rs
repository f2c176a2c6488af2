//! The OpenAI-compatible HTTP API over a fake worker: completions and chat, streaming
//! and not, stop strings, UTF-8, echo + logprobs, usage, and every kind of bad input.

mod common;

use common::*;
use serde_json::json;
use shardline_coordinator::Config;
use shardline_engine::testing::TestWorkerConfig;

#[tokio::test]
async fn completion_non_streaming_and_usage() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"model": "fake-model", "prompt": "abc", "max_tokens": 7, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "abcabca");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].is_number());
}

#[tokio::test]
async fn streamed_text_equals_non_streamed_text() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    for (prompt, seed) in [("The quick brown fox", 7), ("zz top", 3)] {
        let body = json!({"prompt": prompt, "max_tokens": 25, "temperature": 0.8, "seed": seed});
        let (_, plain) = c.post("/v1/completions", body.clone()).await;
        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        streamed_body["stream_options"] = json!({"include_usage": true});
        let events = c.stream("/v1/completions", &streamed_body).await;
        assert_eq!(
            completion_text(&events),
            plain["choices"][0]["text"].as_str().unwrap()
        );
        assert_eq!(finish_reason(&events).as_deref(), Some("length"));
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(
            usage["completion_tokens"], 25,
            "usage chunk last: {events:?}"
        );
        assert_eq!(
            events.last().unwrap()["choices"].as_array().unwrap().len(),
            0
        );
    }
}

#[tokio::test]
async fn chat_completion_streaming_and_not() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 12, "temperature": 0});
    let (status, plain) = c.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    // The echo model walks the rendered prompt; special tokens are skipped in the text.
    let text = plain["choices"][0]["message"]["content"].as_str().unwrap();
    let rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text, expected_greedy(rendered, 12));
    assert!(!text.is_empty());
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = c.stream("/v1/chat/completions", &sbody).await;
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(finish_reason(&events).as_deref(), Some("length"));
}

#[tokio::test]
async fn stop_strings_match_across_token_boundaries() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    // Byte-level tokens: "o w" spans three tokens; the echo model says "wo wo wo…" here.
    let body = json!({"prompt": "hello world ", "max_tokens": 30, "stop": ["o w", "zzz"], "temperature": 0});
    assert!(expected_greedy("hello world ", 30).starts_with("wo wo"));
    let (_, plain) = c.post("/v1/completions", body.clone()).await;
    assert_eq!(plain["choices"][0]["text"], "w");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    let mut sbody = body;
    sbody["stream"] = json!(true);
    let events = c.stream("/v1/completions", &sbody).await;
    assert_eq!(completion_text(&events), "w");
    assert_eq!(finish_reason(&events).as_deref(), Some("stop"));
    // A single string works too.
    let (_, one) = c
        .post(
            "/v1/completions",
            json!({"prompt": "abcdef", "max_tokens": 10, "stop": "de", "temperature": 0}),
        )
        .await;
    assert_eq!(one["choices"][0]["text"], "abc");
}

#[tokio::test]
async fn streaming_never_splits_utf8_characters() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    // Distinct bytes, so the echo model repeats the prompt: 2-, 4- and 3-byte characters.
    let prompt = "é😀€ab";
    let n = prompt.len() * 2;
    let body = json!({"prompt": prompt, "max_tokens": n, "stream": true, "temperature": 0});
    let events = c.stream("/v1/completions", &body).await;
    for e in &events {
        let t = e["choices"][0]["text"].as_str().unwrap_or("");
        assert!(!t.contains('\u{FFFD}'), "broken character in chunk {t:?}");
    }
    assert_eq!(completion_text(&events), format!("{prompt}{prompt}"));
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt_with_zero_max_tokens() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "abcd", "max_tokens": 0, "echo": true, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], "abcd");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b", "c", "d"]));
    assert_eq!(lp["token_logprobs"][0], serde_json::Value::Null);
    let second = lp["token_logprobs"][1].as_f64().unwrap();
    assert!(second < 0.0, "{lp}");
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3]));
    assert_eq!(body["usage"]["completion_tokens"], 0);
    // echo + generation: prompt then completion, logprobs for both.
    let (_, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "ab", "max_tokens": 2, "echo": true, "logprobs": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(body["choices"][0]["text"], "abab");
    assert_eq!(
        body["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        body["choices"][0]["logprobs"]["top_logprobs"][3]
            .as_object()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn chat_logprobs() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let (status, body) = c
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    // The echo model is nearly certain of its token.
    let first = content[0]["logprob"].as_f64().unwrap();
    assert!((-0.01..=0.0).contains(&first), "{first}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn models_health_and_metrics() {
    let c = one_worker(
        Config {
            served_model_name: Some("smol".into()),
            ..Config::default()
        },
        TestWorkerConfig::default(),
    )
    .await;
    let models: serde_json::Value = c
        .http
        .get(format!("{}/v1/models", c.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(
        c.http
            .get(format!("{}/health", c.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, _) = c
        .post(
            "/v1/completions",
            json!({"model": "smol", "prompt": "a", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let m = c.metrics().await;
    for name in [
        "shardline_time_to_first_token_seconds",
        "shardline_e2e_request_latency_seconds",
        "shardline_num_requests_running",
        "shardline_kv_cache_usage_perc",
        "shardline_generation_tokens_total",
        "shardline_batch_size",
        "shardline_coordinator_num_requests_waiting",
        "shardline_coordinator_num_requests_running",
        "shardline_coordinator_kv_cache_usage_perc",
        "shardline_coordinator_cache_config_info",
    ] {
        assert!(m.contains(name), "metric {name} missing from:\n{m}");
    }
    // No tenant named: the `none` series.
    assert!(
        m.contains(
            "shardline_requests_total{finish_reason=\"length\",priority=\"normal\",tenant=\"none\"} 1"
        ),
        "{m}"
    );
    // A named tenant and priority get their own series, tokens included.
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .header("x-shardline-tenant", "acme")
        .header("x-shardline-priority", "high")
        .json(&json!({"model": "smol", "prompt": "a", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = c.metrics().await;
    for series in [
        "shardline_requests_total{finish_reason=\"length\",priority=\"high\",tenant=\"acme\"} 1",
        "shardline_tenant_generation_tokens_total{priority=\"high\",tenant=\"acme\"} 3",
        "shardline_time_to_first_token_seconds_count{priority=\"high\",tenant=\"acme\"} 1",
        "shardline_inter_token_latency_seconds_count{priority=\"high\",tenant=\"acme\"} 2",
    ] {
        assert!(m.contains(series), "{series} missing from:\n{m}");
    }
}

#[tokio::test]
async fn health_is_503_without_a_ready_group() {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord =
        shardline_coordinator::Coordinator::start(Config::default(), http, grpc, shutdown.clone())
            .unwrap();
    coord.groups.add("127.0.0.1:1"); // nothing listens there
    let base = format!("http://{}", coord.http_addr);
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(r.status(), 503);
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    shutdown.cancel();
}

#[tokio::test]
async fn api_key_is_enforced() {
    let c = one_worker(
        Config {
            keys: shardline_coordinator::keys::Keys::single("sekrit", Default::default()),
            ..Config::default()
        },
        TestWorkerConfig::default(),
    )
    .await;
    let (status, body) = c
        .post("/v1/completions", json!({"prompt": "a", "max_tokens": 1}))
        .await;
    assert_eq!(status, 401, "{body}");
    let r = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .bearer_auth("sekrit")
        .json(&json!({"prompt": "a", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.http
            .get(format!("{}/health", c.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Each bad input gets a 4xx naming the problem; serving continues.
#[tokio::test]
async fn bad_inputs_get_clear_4xx_and_serving_continues() {
    let c = one_worker(
        Config::default(),
        TestWorkerConfig {
            context_length: 256,
            ..Default::default()
        },
    )
    .await;
    let url = format!("{}/v1/completions", c.base);
    let chat_url = format!("{}/v1/chat/completions", c.base);
    let raw = |url: String, body: Vec<u8>| {
        let http = c.http.clone();
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.expect("error body is JSON");
            (status, body)
        }
    };
    let cases: Vec<(&str, String, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            url.clone(),
            b"{\"prompt\": \"a\",".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "wrong type",
            url.clone(),
            br#"{"prompt": "a", "temperature": "hot"}"#.to_vec(),
            400,
            "temperature",
        ),
        (
            "wrong type max_tokens",
            url.clone(),
            br#"{"prompt": "a", "max_tokens": "many"}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "empty messages",
            chat_url.clone(),
            br#"{"messages": []}"#.to_vec(),
            400,
            "messages",
        ),
        (
            "missing messages",
            chat_url.clone(),
            br#"{"model": "fake-model"}"#.to_vec(),
            400,
            "messages",
        ),
        (
            "unknown model",
            url.clone(),
            br#"{"model": "gpt-9", "prompt": "a"}"#.to_vec(),
            404,
            "gpt-9",
        ),
        (
            "negative max_tokens",
            url.clone(),
            br#"{"prompt": "a", "max_tokens": -5}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "huge max_tokens",
            url.clone(),
            br#"{"prompt": "a", "max_tokens": 100000000}"#.to_vec(),
            400,
            "max_tokens",
        ),
        (
            "NaN temperature",
            url.clone(),
            br#"{"prompt": "a", "temperature": NaN}"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "inf temperature",
            url.clone(),
            br#"{"prompt": "a", "temperature": 1e999}"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "temperature out of range",
            url.clone(),
            br#"{"prompt": "a", "temperature": -1}"#.to_vec(),
            400,
            "temperature",
        ),
        (
            "prompt too long",
            url.clone(),
            format!(r#"{{"prompt": "{}"}}"#, "x".repeat(300)).into_bytes(),
            400,
            "prompt",
        ),
        (
            "invalid UTF-8",
            url.clone(),
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            400,
            "UTF-8",
        ),
        (
            "n over 128",
            url.clone(),
            br#"{"prompt": "a", "n": 129}"#.to_vec(),
            400,
            "n",
        ),
        (
            "too many stops",
            url.clone(),
            format!(r#"{{"prompt": "a", "stop": {:?}}}"#, vec!["s"; 40]).into_bytes(),
            400,
            "stop",
        ),
        (
            "bad priority",
            url.clone(),
            br#"{"prompt": "a", "priority": "urgent"}"#.to_vec(),
            400,
            "priority",
        ),
        (
            "not an object",
            url.clone(),
            b"[1, 2]".to_vec(),
            400,
            "object",
        ),
        (
            "10 MB body",
            url.clone(),
            {
                let mut b = br#"{"prompt": ""#.to_vec();
                b.extend(std::iter::repeat_n(b'a', 10 << 20));
                b.extend(br#""}"#);
                b
            },
            413,
            "too large",
        ),
    ];
    for (name, url, body, want, mention) in cases {
        let (status, body) = raw(url, body).await;
        assert_eq!(status, want, "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        let param = body["error"]["param"].as_str().unwrap_or_default();
        assert!(
            message.contains(mention) || param.contains(mention),
            "{name}: error should mention {mention:?}: {body}"
        );
    }
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "still fine", "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], "sti");
}

#[tokio::test]
async fn tenant_limits_apply_per_tenant() {
    let config = Config {
        tenant_rate: 0.001,
        tenant_burst: 2.0,
        ..Config::default()
    };
    let c = one_worker(config, TestWorkerConfig::default()).await;
    let send = |tenant: &'static str| {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        async move {
            let r = http
                .post(url)
                .header("x-shardline-tenant", tenant)
                .json(&json!({"prompt": "t", "max_tokens": 1}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
            )
        }
    };
    assert_eq!(send("acme").await.0, 200);
    assert_eq!(send("acme").await.0, 200);
    assert_eq!(send("acme").await, (429, true), "burst of 2 spent");
    assert_eq!(
        send("globex").await.0,
        200,
        "other tenants are not affected"
    );
    // `user` is the tenant when no header is given.
    let (s1, _) = c
        .post(
            "/v1/completions",
            json!({"prompt": "t", "max_tokens": 1, "user": "u1"}),
        )
        .await;
    let (s2, _) = c
        .post(
            "/v1/completions",
            json!({"prompt": "t", "max_tokens": 1, "user": "u1"}),
        )
        .await;
    let (s3, body) = c
        .post(
            "/v1/completions",
            json!({"prompt": "t", "max_tokens": 1, "user": "u1"}),
        )
        .await;
    assert_eq!((s1, s2, s3), (200, 200, 429), "{body}");
}

#[tokio::test]
async fn completions_default_to_16_tokens() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let (_, body) = c.post("/v1/completions", json!({"prompt": "abc"})).await;
    assert_eq!(body["usage"]["completion_tokens"], 16);
}

/// `--stream-interval 4`: the first token goes at once, then one event per four tokens,
/// the rest with the finish reason; text and logprobs are the same as token by token.
#[tokio::test]
async fn stream_interval_sends_the_first_token_then_every_nth() {
    let body = json!({"prompt": "abcdefghij", "max_tokens": 10, "stream": true,
        "temperature": 0, "logprobs": 1});
    let every = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let config = Config {
        stream_interval: 4,
        ..Config::default()
    };
    let fourth = one_worker(config, TestWorkerConfig::default()).await;
    let every = every.stream("/v1/completions", &body).await;
    let fourth = fourth.stream("/v1/completions", &body).await;
    let texts: Vec<&str> = fourth
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["a", "bcde", "fghi", "j"]);
    assert_eq!(finish_reason(&fourth).as_deref(), Some("length"));
    assert_eq!(every.len(), 10);
    assert_eq!(completion_text(&every), completion_text(&fourth));
    let tokens = |events: &[serde_json::Value]| -> Vec<serde_json::Value> {
        events
            .iter()
            .flat_map(|e| {
                e["choices"][0]["logprobs"]["tokens"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect()
    };
    assert_eq!(tokens(&every), tokens(&fourth));
    assert_eq!(tokens(&fourth).len(), 10);
}

/// A stop string inside a held-back stretch ends the stream there, as token by token.
#[tokio::test]
async fn stream_interval_keeps_stop_strings_exact() {
    let config = Config {
        stream_interval: 3,
        ..Config::default()
    };
    let c = one_worker(config, TestWorkerConfig::default()).await;
    let body = json!({"prompt": "abcdefghij", "max_tokens": 10, "stream": true,
        "temperature": 0, "stop": ["fg"]});
    let events = c.stream("/v1/completions", &body).await;
    assert_eq!(completion_text(&events), "abcde");
    assert_eq!(finish_reason(&events).as_deref(), Some("stop"));
}

/// A streamed chat with `--stream-interval 5` carries the same content in fewer events.
#[tokio::test]
async fn chat_stream_interval_sends_the_same_content_in_fewer_events() {
    let config = Config {
        stream_interval: 5,
        ..Config::default()
    };
    let c = one_worker(config, TestWorkerConfig::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 12,
        "temperature": 0, "stream": true});
    let events = c.stream("/v1/chat/completions", &body).await;
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(pieces.concat(), expected_greedy(rendered, 12));
    // The first piece, then at most one per five tokens of the remaining eleven.
    assert!(pieces.len() <= 4, "{pieces:?}");
    assert_eq!(finish_reason(&events).as_deref(), Some("length"));
}

/// A stream that ends in an error (here its deadline) first sends the text it had held
/// back for `--stream-interval`: nothing generated is lost.
#[tokio::test]
async fn stream_interval_sends_held_text_before_an_error() {
    let config = Config {
        stream_interval: 1000,
        ..Config::default()
    };
    let worker = TestWorkerConfig {
        step_delay: std::time::Duration::from_millis(20),
        ..TestWorkerConfig::default()
    };
    let c = one_worker(config, worker).await;
    let body = json!({"prompt": "abcdefghij", "max_tokens": 200, "stream": true,
        "temperature": 0, "timeout": 0.3});
    let events = c.stream("/v1/completions", &body).await;
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "deadline_exceeded", "{events:?}");
    let texts: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    // The first token at once, then everything held back until the deadline.
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[0], "a");
    assert!(texts[1].len() >= 2, "{texts:?}");
    assert!(expected_greedy("abcdefghij", 200).starts_with(&texts.concat()));
}
