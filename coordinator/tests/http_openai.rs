//! The OpenAI API's wider surface over a test worker (the real engine, so constraints
//! and biases are enforced, over a fake model): `n` choices (queued after the first
//! choice's prompt is computed), tool calls read back from the output (streamed deltas
//! reassemble to the same calls), forced calls and response formats that always parse,
//! `logit_bias`, vLLM's `/tokenize` and `/detokenize`, and a 400 naming the field for
//! each bad structured output, tool, `logit_bias`, message or unsupported field.

mod common;

use std::sync::OnceLock;

use common::*;
use serde_json::{Value, json};
use shardline_coordinator::Config;
use shardline_engine::testing::{EOS_ID, TestWorkerConfig, test_tokenizer};

/// A Hermes tool call, as the scripted model writes it.
const HERMES_CALL: &str = "<tool_call>\n{\"name\": \"lookup\", \"arguments\": {\"q\": \"rust \\\"lang\\\"\", \"n\": [1, 2]}}\n</tool_call>";

/// A fake model that answers every chat with [`HERMES_CALL`], then ends: the token after
/// the last `<|im_start|>assistant\n` header is the next one of the script.
fn scripted_call(tokens: &[u32]) -> u32 {
    static SCRIPT: OnceLock<(Vec<u32>, Vec<u32>)> = OnceLock::new();
    let (header, script) = SCRIPT.get_or_init(|| {
        let t = test_tokenizer();
        let ids = |s: &str| t.encode(s, false).unwrap().get_ids().to_vec();
        (ids("<|im_start|>assistant\n"), ids(HERMES_CALL))
    });
    let start = (0..=tokens.len().saturating_sub(header.len()))
        .rev()
        .find(|&i| tokens[i..].starts_with(header))
        .map_or(tokens.len(), |i| i + header.len());
    script.get(tokens.len() - start).copied().unwrap_or(EOS_ID)
}

async fn stream(c: &Cluster, path: &str, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    c.stream(path, &body).await
}

#[tokio::test]
async fn n_choices_have_distinct_indexes_and_share_one_prompt() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
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
    // The echo model repeats a prompt of distinct tokens, with a peak no seed moves.
    assert_eq!(texts, ["abcde"; 3]);
    assert_eq!(plain["usage"]["prompt_tokens"], 8);
    assert_eq!(plain["usage"]["completion_tokens"], 15);
    // The first choice ran alone until its prompt was computed, then the others joined.
    assert_eq!(c.workers[0].admitted(), 3);
    assert_eq!(c.workers[0].batch_sizes()[0], 1);

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

/// The scripted model answers with a Hermes call, which `tool_choice: auto` reads back
/// into `tool_calls`, whole and as streamed deltas.
#[tokio::test]
async fn tool_calls_are_read_back_streamed_and_not() {
    let worker = TestWorkerConfig {
        model: scripted_call,
        ..Default::default()
    };
    let c = one_worker(Config::default(), worker).await;
    let tools = json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "array"}}}}}]);
    let body = json!({"messages": [{"role": "user", "content": "look up rust"}], "tools": tools,
        "max_tokens": 200, "temperature": 0});
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
    assert_eq!(plain["choices"][0]["finish_reason"], "tool_calls");
    assert!(
        message["content"].as_str().unwrap_or_default().is_empty(),
        "{message}"
    );

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
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
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
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
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
    // Well-formed demands pass validation.
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

/// The engine enforces what the coordinator compiled: a named or required call follows
/// its function's schema and parses, whatever the model would rather write; the call
/// goes back as an assistant message beside the tool's answer.
#[tokio::test]
async fn forced_tool_calls_parse_and_make_a_round_trip() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let weather = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}}});
    let other = json!({"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc"]}},
            "required": ["zone"], "additionalProperties": false}}});
    let question = json!({"role": "user", "content": "Weather in Paris?"});
    for (choice, finish) in [
        (json!("required"), "tool_calls"),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            "stop",
        ),
    ] {
        let body = json!({"messages": [question], "tools": [weather, other],
            "tool_choice": choice, "parallel_tool_calls": false, "max_tokens": 120});
        let (status, plain) = c.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{plain}");
        assert_eq!(plain["choices"][0]["finish_reason"], finish, "{plain}");
        let call = &plain["choices"][0]["message"]["tool_calls"][0];
        let name = call["function"]["name"].as_str().unwrap();
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        match name {
            "get_weather" => {
                assert!(["Paris", "Oslo"].contains(&args["city"].as_str().unwrap()));
                assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
            }
            "get_time" => assert_eq!(args, json!({"zone": "utc"})),
            other => panic!("unknown function {other}"),
        }
        let answer = json!({"messages": [question,
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}],
            "tools": [weather, other], "max_tokens": 8});
        let (status, last) = c.post("/v1/chat/completions", answer).await;
        assert_eq!(status, 200, "{last}");
        assert!(
            last["choices"][0]["message"]["content"].is_string(),
            "{last}"
        );
    }
}

/// A JSON schema response format and a regex hold on the echo model too. (Where the
/// model has no preference the engine picks the lowest allowed id, whitespace: each gap
/// between JSON tokens fills its bound of 21, hence the room in `max_tokens`.)
#[tokio::test]
async fn response_formats_are_enforced() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let schema = json!({"type": "object", "properties": {
        "answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["answer", "confidence"], "additionalProperties": false});
    let body = json!({"messages": [{"role": "user", "content": "Sure?"}], "max_tokens": 400,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema, "strict": true}}});
    let (status, plain) = c.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{plain}");
    let content = plain["choices"][0]["message"]["content"].as_str().unwrap();
    let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {plain}"));
    assert!(
        ["yes", "no"].contains(&v["answer"].as_str().unwrap()),
        "{v}"
    );
    assert!((1..=5).contains(&v["confidence"].as_i64().unwrap()), "{v}");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");

    let (status, plain) = c
        .post(
            "/v1/completions",
            json!({"prompt": "pin:", "max_tokens": 20, "guided_regex": "[0-9]{4}"}),
        )
        .await;
    assert_eq!(status, 200, "{plain}");
    let text = plain["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()),
        "{text}"
    );
}

/// `logit_bias` of +100 on one token makes every generated token that token.
#[tokio::test]
async fn logit_bias_of_100_picks_the_token() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let z = test_tokenizer().token_to_id("z").unwrap();
    let body = json!({"prompt": "abc", "max_tokens": 6, "temperature": 1.0, "seed": 3,
        "logit_bias": {z.to_string(): 100}});
    let (status, plain) = c.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["choices"][0]["text"], "zzzzzz");
}
