//! The OpenAI API's wider surface over a fake worker: `n` choices (queued after the first
//! choice's prompt is computed), tool calls read back from the output (streamed deltas
//! reassemble to the same calls), vLLM's `/tokenize` and `/detokenize`, and a 400 naming
//! the field for each bad structured output, tool, `logit_bias`, message or unsupported
//! field. The fake ignores constraints and biases; the real worker's tests cover those.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use serde_json::{Value, json};
use shardline_coordinator::Config;
use shardline_coordinator::testing::FakeWorkerConfig;

async fn stream(c: &Cluster, path: &str, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = c
        .http
        .post(format!("{}{path}", c.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    sse_events(r).await
}

#[tokio::test]
async fn n_choices_have_distinct_indexes_and_share_one_prompt() {
    let c = one_worker(Config::default(), FakeWorkerConfig::default()).await;
    let body =
        json!({"prompt": "abcdefgh", "n": 3, "max_tokens": 5, "temperature": 0.7, "seed": 1});
    let (status, plain) = c.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{plain}");
    let choices = plain["choices"].as_array().unwrap();
    let texts: Vec<&str> = choices
        .iter()
        .map(|ch| ch["text"].as_str().unwrap())
        .collect();
    let indexes: Vec<u64> = choices
        .iter()
        .map(|ch| ch["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2]);
    // The fake's output starts at prompt token `seed`: choice i samples with seed 1 + i.
    assert_eq!(texts, ["bcdef", "cdefg", "defgh"]);
    assert_eq!(plain["usage"]["prompt_tokens"], 8);
    assert_eq!(plain["usage"]["completion_tokens"], 15);
    // The first choice ran alone until its prompt was computed, then the others joined.
    let stats = c.workers[0].stats();
    assert_eq!(stats.admitted.load(Ordering::SeqCst), 3);
    assert_eq!(stats.batch_sizes.lock().unwrap()[0], 1);

    let events = stream(&c, "/v1/completions", body).await;
    for (i, text) in texts.iter().enumerate() {
        let streamed: String = events
            .iter()
            .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
            .filter(|ch| ch["index"] == i)
            .filter_map(|ch| ch["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(&streamed, text, "choice {i}");
    }
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 15);

    let chat = json!({"messages": [{"role": "user", "content": "hello"}], "n": 2,
        "max_tokens": 4, "temperature": 0.5, "seed": 9});
    let (status, plain) = c.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"].as_array().unwrap().len(), 2);
    assert_eq!(plain["choices"][1]["index"], 1);
    let events = stream(&c, "/v1/chat/completions", chat).await;
    let heads = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["role"] == "assistant")
        .count();
    assert_eq!(heads, 2, "one role event per choice");
}

/// The fake writes the rendered prompt back; a user message holding a Hermes call makes
/// the output hold one (after the fallback system prompt, whose example is no call).
#[tokio::test]
async fn tool_calls_are_read_back_streamed_and_not() {
    let c = one_worker(Config::default(), FakeWorkerConfig::default()).await;
    let call = "<tool_call>\n{\"name\": \"lookup\", \"arguments\": {\"q\": \"rust \\\"lang\\\"\", \"n\": [1, 2]}}\n</tool_call>";
    let tools = json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "array"}}}}}]);
    let probe = json!({"messages": [{"role": "user", "content": call}], "tools": tools});
    let (_, tokens) = c.post("/tokenize", probe.clone()).await;
    let prompt_len = tokens["count"].as_u64().unwrap();
    let mut body = probe;
    body["max_tokens"] = json!(prompt_len - 1);
    body["temperature"] = json!(0);
    let (status, plain) = c.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{plain}");
    let message = &plain["choices"][0]["message"];
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{message}");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["function"]["name"], "lookup");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap())
        .expect("arguments parse");
    assert_eq!(args, json!({"q": "rust \"lang\"", "n": [1, 2]}));
    assert!(message["content"].as_str().unwrap().contains("# Tools"));

    let events = stream(&c, "/v1/chat/completions", body).await;
    let mut name = String::new();
    let mut arguments = String::new();
    let mut fragments = 0;
    for e in &events {
        for d in e["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(d["index"], 0);
            if let Some(n) = d["function"]["name"].as_str() {
                assert!(d["id"].as_str().unwrap().starts_with("call_"));
                name.push_str(n);
            }
            arguments.push_str(d["function"]["arguments"].as_str().unwrap());
            fragments += 1;
        }
    }
    assert_eq!(name, "lookup");
    assert!(fragments > 2, "arguments arrive in fragments: {fragments}");
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), args);
}

#[tokio::test]
async fn tokenize_and_detokenize_like_vllm() {
    let c = one_worker(Config::default(), FakeWorkerConfig::default()).await;
    let (status, body) = c
        .post(
            "/tokenize",
            json!({"prompt": "hi!", "return_token_strs": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The test tokenizer: one token per byte, byte b = 3 + its index in the byte alphabet.
    assert_eq!(body["count"], 3);
    assert_eq!(body["max_model_len"], 2048);
    assert_eq!(body["token_strs"], json!(["h", "i", "!"]));
    let (status, back) = c
        .post("/detokenize", json!({"tokens": body["tokens"]}))
        .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], "hi!");
    let (_, chat) = c
        .post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let (_, text) = c
        .post("/detokenize", json!({"tokens": chat["tokens"]}))
        .await;
    assert_eq!(
        text["prompt"],
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(chat["token_strs"].is_null());
    for (path, body, field) in [
        ("/tokenize", json!({}), "prompt"),
        (
            "/tokenize",
            json!({"prompt": "a", "model": "other"}),
            "model",
        ),
        ("/detokenize", json!({"tokens": [100000]}), "tokens"),
        ("/detokenize", json!({}), "tokens"),
    ] {
        let (status, e) = c.post(path, body.clone()).await;
        assert!(status == 400 || status == 404, "{path} {body}: {e}");
        assert_eq!(e["error"]["param"], field, "{path} {body}: {e}");
    }
}

#[tokio::test]
async fn every_bad_input_is_a_400_naming_its_field() {
    let c = one_worker(Config::default(), FakeWorkerConfig::default()).await;
    let user = json!([{"role": "user", "content": "x"}]);
    let f =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let chat = |extra: Value| {
        let mut body = json!({"messages": user, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}),
            ),
            "response_format",
        ),
        (chat(json!({"guided_regex": "(a"})), "guided_regex"),
        (chat(json!({"guided_choice": []})), "guided_choice"),
        (
            chat(json!({"guided_grammar": "start: nothing_here"})),
            "guided_grammar",
        ),
        (
            chat(json!({"structured_outputs": {"regex": "a", "json": {}}})),
            "structured_outputs.regex",
        ),
        (chat(json!({"logit_bias": {"300": 5}})), "logit_bias"),
        (chat(json!({"logit_bias": {"10": 150}})), "logit_bias"),
        (chat(json!({"logit_bias": {"ten": 1}})), "logit_bias"),
        (chat(json!({"n": 0})), "n"),
        (
            chat(json!({"audio": {"voice": "alloy", "format": "wav"}})),
            "audio",
        ),
        (chat(json!({"store": true})), "store"),
        (
            chat(json!({"reasoning_effort": "high"})),
            "reasoning_effort",
        ),
        (
            chat(
                json!({"tools": [f], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
        ),
        (
            chat(json!({"tools": [{"type": "function", "function": {"name": "f f"}}]})),
            "tools[0].function.name",
        ),
        (
            chat(
                json!({"tools": [{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}],
                "tool_choice": "required"}),
            ),
            "tools[0].function.parameters",
        ),
        (
            chat(json!({"tools": [f], "tool_choice": "required",
                "response_format": {"type": "json_object"}})),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "1", "tool_call_id": "c"}]}),
            "messages[0].tool_call_id",
        ),
    ];
    for (body, field) in cases {
        let (status, e) = c.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], field, "{body}: {e}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, e) = c
        .post(
            "/v1/completions",
            json!({"prompt": "a", "guided_json": {"type": "object", "properties": 5}}),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "guided_json");
    // Well-formed demands pass validation (the fake worker does not enforce them).
    for body in [
        chat(json!({"response_format": {"type": "json_object"}})),
        chat(json!({"structured_outputs": {"choice": ["yes", "no"]}})),
        chat(json!({"tools": [f], "tool_choice": "required", "logit_bias": {"5": -100}})),
        chat(json!({"tools": [f], "response_format": {"type": "json_object"}})),
    ] {
        let (status, e) = c.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 200, "{body}: {e}");
    }
}
