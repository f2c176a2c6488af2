//! `POST /v1/completions` (OpenAI legacy completions, with vLLM's extensions).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::choices::{ChoiceEvent, collect_all, merged};
use super::responses::{Completion, CompletionChoice, CompletionLogprobs};
use super::types::CompletionRequest;
use super::{RequestShape, Started, event_json, parse_body, sse, start};
use crate::error::ApiError;
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
        generations,
        id,
        model,
        created,
        stream,
        include_usage,
    } = start(&service, &headers, shape, params, "cmpl")?;
    let body = move |choices, usage| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    if stream {
        // Text offsets of the logprobs run on per choice.
        let mut offsets = vec![0usize; generations.len()];
        let events = merged(generations).filter_map(move |event| {
            let out = match event {
                ChoiceEvent::Chunk(i, chunk) => {
                    let offset = &mut offsets[i as usize];
                    let logprobs =
                        want_logprobs.then(|| CompletionLogprobs::of(&chunk.tokens, *offset));
                    *offset += chunk.text.len();
                    let choice = CompletionChoice {
                        index: i,
                        text: chunk.text,
                        logprobs,
                        finish_reason: chunk.finish.map(|f| f.as_str()),
                    };
                    Some(event_json(&body(vec![choice], None)))
                }
                ChoiceEvent::Failed(e) => Some(event_json(&e.to_body())),
                ChoiceEvent::Done(usage) if include_usage => {
                    Some(event_json(&body(Vec::new(), Some(usage.into()))))
                }
                ChoiceEvent::Done(_) => None,
            };
            futures::future::ready(out)
        });
        return Ok(sse(events));
    }
    let (all, usage) = collect_all(generations).await?;
    let choices = all
        .into_iter()
        .enumerate()
        .map(|(i, out)| {
            let logprobs = want_logprobs.then(|| {
                let mut all = out.prompt_tokens.clone();
                all.extend(out.tokens.iter().cloned());
                CompletionLogprobs::of(&all, 0)
            });
            CompletionChoice {
                index: i as u32,
                text: out.text,
                logprobs,
                finish_reason: out.finish.map(|f| f.as_str()),
            }
        })
        .collect();
    Ok(axum::Json(body(choices, Some(usage.into()))).into_response())
}
