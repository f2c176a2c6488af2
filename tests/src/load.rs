//! OpenAI-API requests the end-to-end tests send: numbered greedy completions whose text
//! depends only on the request (so a test can compare a migrated or drained request's
//! text with the same request run undisturbed), plain or streamed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

/// A client whose requests give up after two minutes (a hung stream fails the test).
pub fn client() -> reqwest::Client {
    crate::http::client(Duration::from_secs(120))
}

/// Completion request `i`: greedy, exactly `max_tokens` tokens (EOS ignored).
pub fn body(i: usize, max_tokens: u32) -> Value {
    let prompt = format!(
        "Question {i}: list some facts about the number {}. Answer:",
        i * 7 + 3
    );
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// Non-streaming completion: the status and the body.
pub async fn complete(http: &str, body: Value) -> (u16, Value) {
    match client()
        .post(format!("{http}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({"transport error": e.to_string()})),
    }
}

/// Streams a completion; `Err` on a non-200 status or an error event. `tokens` counts
/// the text chunks received (all streams together).
pub async fn stream(
    http: &str,
    mut body: Value,
    tokens: Arc<AtomicUsize>,
) -> Result<String, String> {
    body["stream"] = json!(true);
    let r = client()
        .post(format!("{http}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!(
            "status {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let (mut text, mut finished) = (String::new(), false);
    sse_events(r, |v| {
        if v.get("error").is_some() {
            return Err(format!("error event after {text:?}: {v}"));
        }
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
            tokens.fetch_add(1, Ordering::Relaxed);
        }
        finished |= v["choices"][0]["finish_reason"].is_string();
        Ok(())
    })
    .await?;
    if !finished {
        return Err(format!(
            "stream ended without a finish reason after {text:?}"
        ));
    }
    Ok(text)
}

/// Reads an SSE response event by event, calling `on_event` with each `data:` JSON
/// object as it arrives (not `[DONE]`); stops at the first error `on_event` returns.
pub async fn sse_events(
    response: reqwest::Response,
    mut on_event: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = String::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        buf.push_str(std::str::from_utf8(&chunk).map_err(|e| e.to_string())?);
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap_or("");
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            on_event(serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?)?;
        }
    }
    Ok(())
}

/// Streams requests `first..first + n` at once.
pub async fn streams(
    http: &str,
    first: usize,
    n: usize,
    max_tokens: u32,
    tokens: Arc<AtomicUsize>,
) -> Vec<Result<String, String>> {
    let all = (first..first + n).map(|i| {
        let (http, tokens) = (http.to_string(), tokens.clone());
        tokio::spawn(async move { stream(&http, body(i, max_tokens), tokens).await })
    });
    futures::future::join_all(all)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}
