//! `POST /v1/chat/completions`: the model's chat template, then the same generation path;
//! each choice's text goes through a [`ChoiceOutput`], which reads tool calls out of it
//! when the request offered tools.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::choices::{ChoiceEvent, collect_all, merged};
use super::responses::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs, ChunkChoice,
    Delta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta,
};
use super::types::ChatRequest;
use super::{RequestShape, Started, event_json, parse_body, sse, start};
use crate::error::ApiError;
use crate::generation::{Chunk, TokenOut};
use crate::request::Finish;
use crate::service::Service;
use crate::tools::ToolCalling;
use crate::tools::parser::{self, ToolCallParser};

pub async fn handle(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(service, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One choice's output on its way to the client: plain text, or (with tools) content and
/// tool-call deltas read by a [`ToolCallParser`].
struct ChoiceOutput {
    tools: Option<(ToolCalling, ToolCallParser)>,
    /// Logprobs of tokens whose text produced no delta yet (held back by the parser).
    held_logprobs: Vec<TokenOut>,
}

/// What one chunk of a choice becomes: deltas (the last carries the finish).
struct Piece {
    delta: Delta,
    logprobs: Vec<TokenOut>,
    finish: Option<&'static str>,
}

impl ChoiceOutput {
    fn new(tools: Option<&ToolCalling>) -> Self {
        ChoiceOutput {
            tools: tools.map(|t| (t.clone(), ToolCallParser::new(t.format, t.parallel))),
            held_logprobs: Vec::new(),
        }
    }

    fn finish_reason(&self, finish: Finish) -> &'static str {
        match &self.tools {
            Some((calling, parser)) if parser.called() && finish == Finish::Stop => {
                calling.finish_reason()
            }
            _ => finish.as_str(),
        }
    }

    /// The deltas of `chunk`.
    fn pieces(&mut self, chunk: &Chunk) -> Vec<Piece> {
        let mut deltas: Vec<Delta> = Vec::new();
        match &mut self.tools {
            None => {
                if !(chunk.text.is_empty() && chunk.finish.is_some()) {
                    deltas.push(Delta {
                        content: Some(chunk.text.clone()),
                        ..Delta::default()
                    });
                }
            }
            Some((_, parser)) => {
                let mut parsed = parser.push(&chunk.text);
                if chunk.finish.is_some() {
                    parsed.extend(parser.finish());
                }
                deltas.extend(parsed.into_iter().map(delta_of));
            }
        }
        self.held_logprobs.extend(chunk.tokens.iter().cloned());
        let finish = chunk.finish.map(|f| self.finish_reason(f));
        if deltas.is_empty() && finish.is_none() {
            return Vec::new();
        }
        if deltas.is_empty() {
            deltas.push(Delta::default());
        }
        let last = deltas.len() - 1;
        deltas
            .into_iter()
            .enumerate()
            .map(|(i, delta)| Piece {
                delta,
                logprobs: if i == 0 {
                    std::mem::take(&mut self.held_logprobs)
                } else {
                    Vec::new()
                },
                finish: if i == last { finish } else { None },
            })
            .collect()
    }
}

fn delta_of(d: parser::Delta) -> Delta {
    let call = |index: usize, id: Option<String>, name, arguments| ToolCallDelta {
        index: index as u32,
        kind: id.as_ref().map(|_| "function"),
        id,
        function: FunctionDelta { name, arguments },
    };
    match d {
        parser::Delta::Content(text) => Delta {
            content: Some(text),
            ..Delta::default()
        },
        parser::Delta::CallStart { index, id, name } => Delta {
            tool_calls: vec![call(index, Some(id), Some(name), String::new())],
            ..Delta::default()
        },
        parser::Delta::CallArguments { index, fragment } => Delta {
            tool_calls: vec![call(index, None, None, fragment)],
            ..Delta::default()
        },
    }
}

/// A whole choice's text as the message and finish reason OpenAI returns.
fn message_of(
    text: &str,
    finish: Option<Finish>,
    tools: Option<&ToolCalling>,
) -> (AssistantMessage, Option<&'static str>) {
    let mut output = ChoiceOutput::new(tools);
    let chunk = Chunk {
        text: text.to_string(),
        tokens: Vec::new(),
        finish,
    };
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut finish_reason = None;
    for piece in output.pieces(&chunk) {
        content.push_str(piece.delta.content.as_deref().unwrap_or(""));
        for d in piece.delta.tool_calls {
            match d.id {
                Some(id) => calls.push(ToolCall {
                    id,
                    kind: "function",
                    function: FunctionCall {
                        name: d.function.name.unwrap_or_default(),
                        arguments: d.function.arguments,
                    },
                }),
                None => {
                    if let Some(call) = calls.get_mut(d.index as usize) {
                        call.function.arguments.push_str(&d.function.arguments);
                    }
                }
            }
        }
        finish_reason = piece.finish.or(finish_reason);
    }
    let message = AssistantMessage {
        role: "assistant",
        content: (calls.is_empty() || !content.is_empty()).then_some(content),
        tool_calls: calls,
    };
    (message, finish_reason)
}

async fn run(
    service: Service,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(body, service.config.max_body_bytes)?;
    let mut shape = RequestShape::of(&request.common);
    shape.user = shape.user.or(request.safety_identifier.clone());
    let want_logprobs = request.logprobs.unwrap_or(false);
    let params = request.into_params()?;
    let Started {
        generations,
        id,
        model,
        created,
        stream,
        include_usage,
    } = start(&service, &headers, shape, params, "chatcmpl")?;
    let tools = generations[0].request.tool_calling.clone();
    let (chunk_id, chunk_model) = (id.clone(), model.clone());
    let chunk = move |choices: Vec<ChunkChoice>, usage| ChatCompletionChunk {
        id: chunk_id.clone(),
        object: "chat.completion.chunk",
        created,
        model: chunk_model.clone(),
        choices,
        usage,
    };
    if stream {
        let n = generations.len();
        let heads: Vec<ChatCompletionChunk> = (0..n)
            .map(|i| {
                chunk(
                    vec![ChunkChoice {
                        index: i as u32,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            ..Delta::default()
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect();
        let mut outputs: Vec<ChoiceOutput> =
            (0..n).map(|_| ChoiceOutput::new(tools.as_ref())).collect();
        let events = merged(generations).flat_map(move |event| {
            let out: Vec<String> = match event {
                ChoiceEvent::Chunk(i, c) => outputs[i as usize]
                    .pieces(&c)
                    .into_iter()
                    .map(|p| {
                        let choice = ChunkChoice {
                            index: i,
                            delta: p.delta,
                            logprobs: want_logprobs.then(|| ChatLogprobs::of(&p.logprobs)),
                            finish_reason: p.finish,
                        };
                        event_json(&chunk(vec![choice], None))
                    })
                    .collect(),
                ChoiceEvent::Failed(e) => vec![event_json(&e.to_body())],
                ChoiceEvent::Done(usage) if include_usage => {
                    vec![event_json(&chunk(Vec::new(), Some(usage.into())))]
                }
                ChoiceEvent::Done(_) => Vec::new(),
            };
            futures::stream::iter(out)
        });
        let heads = futures::stream::iter(heads.iter().map(event_json).collect::<Vec<_>>());
        return Ok(sse(heads.chain(events)));
    }
    let (all, usage) = collect_all(generations).await?;
    let choices = all
        .into_iter()
        .enumerate()
        .map(|(i, out)| {
            let (message, finish_reason) = message_of(&out.text, out.finish, tools.as_ref());
            ChatChoice {
                index: i as u32,
                message,
                logprobs: want_logprobs.then(|| ChatLogprobs::of(&out.tokens)),
                finish_reason,
            }
        })
        .collect();
    Ok(axum::Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: usage.into(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ToolChoice;

    fn calling(choice: ToolChoice) -> ToolCalling {
        ToolCalling {
            choice,
            parallel: true,
            format: crate::tools::ToolFormat::Hermes,
        }
    }

    const CALL: &str =
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}\n</tool_call>";

    #[test]
    fn a_call_becomes_tool_calls_with_null_content() {
        let (m, finish) = message_of(CALL, Some(Finish::Stop), Some(&calling(ToolChoice::Auto)));
        assert_eq!(m.content, None);
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.tool_calls[0].function.name, "f");
        assert_eq!(m.tool_calls[0].function.arguments, r#"{"a": [1, 2]}"#);
        assert_eq!(finish, Some("tool_calls"));
        let (_, finish) = message_of(
            CALL,
            Some(Finish::Stop),
            Some(&calling(ToolChoice::Named("f".into()))),
        );
        assert_eq!(finish, Some("stop"));
        let (_, finish) = message_of(CALL, Some(Finish::Length), Some(&calling(ToolChoice::Auto)));
        assert_eq!(finish, Some("length"));
    }

    #[test]
    fn without_tools_the_text_is_the_content() {
        let (m, finish) = message_of(CALL, Some(Finish::Stop), None);
        assert_eq!(m.content.as_deref(), Some(CALL));
        assert!(m.tool_calls.is_empty());
        assert_eq!(finish, Some("stop"));
        let (m, _) = message_of("", Some(Finish::Length), None);
        assert_eq!(m.content.as_deref(), Some(""));
    }

    #[test]
    fn streamed_pieces_carry_logprobs_once_and_the_finish_last() {
        let mut out = ChoiceOutput::new(Some(&calling(ToolChoice::Auto)));
        let token = |t: &str| TokenOut {
            id: 1,
            text: t.into(),
            logprob: Some(-0.1),
            top: Vec::new(),
        };
        // Held back (could be the start of a call): no piece, logprobs kept.
        let none = out.pieces(&Chunk {
            text: "<tool_".into(),
            tokens: vec![token("<tool_")],
            finish: None,
        });
        assert!(none.is_empty());
        let pieces = out.pieces(&Chunk {
            text: CALL["<tool_".len()..].to_string(),
            tokens: vec![token("rest")],
            finish: Some(Finish::Stop),
        });
        assert_eq!(pieces[0].logprobs.len(), 2);
        assert!(pieces[1..].iter().all(|p| p.logprobs.is_empty()));
        assert_eq!(pieces.last().unwrap().finish, Some("tool_calls"));
        assert!(
            pieces[..pieces.len() - 1]
                .iter()
                .all(|p| p.finish.is_none())
        );
        let first = &pieces[0].delta.tool_calls[0];
        assert_eq!(first.kind, Some("function"));
        assert_eq!(first.function.name.as_deref(), Some("f"));
    }
}
