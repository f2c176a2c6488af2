//! `POST /v1/completions` (OpenAI legacy completions, with vLLM's extensions).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::types::CompletionRequest;
use super::{RequestShape, Started, event_stream, parse_body, sse, start, usage_json};
use crate::error::ApiError;
use crate::generation::TokenOut;
use crate::service::Service;

pub async fn handle(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(service, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The legacy `logprobs` object for `tokens`, offsets counted from `offset`.
fn logprobs_json(tokens: &[TokenOut], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            if t.logprob.is_none() { Value::Null } else {
                Value::Object(t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect())
            }
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

async fn run(
    service: Service,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(body, service.config.max_body_bytes)?;
    let shape = RequestShape::of(&request.common);
    let want_logprobs = request.logprobs.is_some();
    let params = request.into_params()?;
    let Started {
        generation,
        id,
        model,
        created,
        stream,
        include_usage,
    } = start(&service, &headers, shape, params, "cmpl")?;
    if stream {
        let (id2, model2) = (id.clone(), model.clone());
        let offset_cell = std::sync::Mutex::new(0usize);
        let events = event_stream(
            generation,
            include_usage,
            move |chunk| {
                let mut off = offset_cell.lock().expect("lock poisoned; this is a bug");
                let logprobs = want_logprobs.then(|| logprobs_json(&chunk.tokens, *off));
                *off += chunk.text.len();
                json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{
                        "index": 0, "text": chunk.text, "logprobs": logprobs,
                        "finish_reason": chunk.finish.map(|f| f.as_str()),
                    }],
                })
            },
            move |usage| {
                json!({
                    "id": id2, "object": "text_completion", "created": created, "model": model2,
                    "choices": [], "usage": usage_json(usage),
                })
            },
        );
        return Ok(sse(events));
    }
    let out = generation.collect().await?;
    let logprobs = want_logprobs.then(|| {
        let mut all = out.prompt_tokens.clone();
        all.extend(out.tokens.iter().cloned());
        logprobs_json(&all, 0)
    });
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "text": out.text, "logprobs": logprobs,
            "finish_reason": out.finish.map(|f| f.as_str()),
        }],
        "usage": usage_json(out.usage),
    }))
    .into_response())
}
