//! `POST /v1/chat/completions`: the model's chat template, then the same generation path.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::types::ChatRequest;
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

/// The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn logprobs_json(tokens: &[TokenOut]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({
                "token": t.text, "logprob": t.logprob.unwrap_or(0.0), "bytes": t.text.as_bytes(),
                "top_logprobs": t.top.iter().map(|(s, l)| json!({"token": s, "logprob": l, "bytes": s.as_bytes()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

async fn run(
    service: Service,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(body, service.config.max_body_bytes)?;
    let shape = RequestShape::of(&request.common);
    let want_logprobs = request.logprobs.unwrap_or(false);
    let params = request.into_params()?;
    let Started {
        generation,
        id,
        model,
        created,
        stream,
        include_usage,
    } = start(&service, &headers, shape, params, "chatcmpl")?;
    if stream {
        let head = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
        });
        let (id2, model2) = (id.clone(), model.clone());
        let events = event_stream(
            generation,
            include_usage,
            move |chunk| {
                let delta = if chunk.text.is_empty() && chunk.finish.is_some() {
                    json!({})
                } else {
                    json!({"content": chunk.text})
                };
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{
                        "index": 0, "delta": delta,
                        "logprobs": want_logprobs.then(|| logprobs_json(&chunk.tokens)),
                        "finish_reason": chunk.finish.map(|f| f.as_str()),
                    }],
                })
            },
            move |usage| {
                json!({
                    "id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [], "usage": usage_json(usage),
                })
            },
        );
        return Ok(sse(futures::StreamExt::chain(
            futures::stream::once(async move { head }),
            events,
        )));
    }
    let out = generation.collect().await?;
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": want_logprobs.then(|| logprobs_json(&out.tokens)),
            "finish_reason": out.finish.map(|f| f.as_str()),
        }],
        "usage": usage_json(out.usage),
    }))
    .into_response())
}
