//! vLLM's `POST /tokenize` and `POST /detokenize`, with the coordinator's copy of the
//! model's tokenizer and chat template (no worker is involved).
//!
//! `/tokenize` takes a `prompt` (special tokens, i.e. BOS for models that want it, added
//! unless `add_special_tokens: false`) or `messages` (rendered with the chat template as
//! a chat request would be, `tools` included; `add_generation_prompt` defaults to true,
//! `add_special_tokens` to false since templates write their own). It answers `count`,
//! `max_model_len`, `tokens` and, with `return_token_strs`, each token's text.
//! `/detokenize` turns `tokens` back into `prompt`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::chat_types::{ChatMessageIn, ToolIn, messages_in};
use super::parse_body;
use super::responses::{DetokenizeResponse, TokenizeResponse};
use crate::error::ApiError;
use crate::groups::ModelInfo;
use crate::service::Service;
use crate::tools::{Tool, ToolChoice, ToolUse};
use crate::validate::{ChatInput, render_chat, served_name};

#[derive(Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub tools: Option<Vec<ToolIn>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

fn check_model(service: &Service, model: &ModelInfo, name: Option<&str>) -> Result<(), ApiError> {
    match name {
        Some(n)
            if !n.is_empty() && n != served_name(&service.config, model) && n != model.model_id =>
        {
            Err(ApiError::ModelNotFound(n.to_string()))
        }
        _ => Ok(()),
    }
}

pub async fn tokenize(
    State(service): State<Service>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    tokenize_body(&service, body).unwrap_or_else(IntoResponse::into_response)
}

fn tokenize_body(
    service: &Service,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: TokenizeRequest = parse_body(body, service.config.max_body_bytes)?;
    let model = service.groups.model()?;
    check_model(service, &model, r.model.as_deref())?;
    let (text, special) = match (r.prompt, r.messages) {
        (Some(prompt), None) => (prompt, r.add_special_tokens.unwrap_or(true)),
        (None, Some(messages)) => {
            let continue_final = r.continue_final_message.unwrap_or(false);
            if continue_final && r.add_generation_prompt == Some(true) {
                return Err(ApiError::invalid(
                    "continue_final_message",
                    "`continue_final_message` and `add_generation_prompt` cannot both be true",
                ));
            }
            let tools = r.tools.map(|tools| ToolUse {
                tools: tools
                    .into_iter()
                    .filter_map(|t| t.function)
                    .map(|f| Tool {
                        name: f.name,
                        description: f.description,
                        parameters: f.parameters,
                        strict: f.strict,
                    })
                    .collect(),
                choice: ToolChoice::Auto,
                parallel: true,
            });
            let chat = ChatInput {
                messages: messages_in(messages)?,
                tools,
                add_generation_prompt: r.add_generation_prompt.unwrap_or(true),
                continue_final_message: continue_final,
            };
            (
                render_chat(&chat, &model)?,
                r.add_special_tokens.unwrap_or(false),
            )
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "one of `prompt` or `messages` is required",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ));
        }
    };
    let encoding = model
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize: {e}")))?;
    let mut tokens = encoding.get_ids().to_vec();
    if special
        && model.add_bos
        && let Some(bos) = model.bos_token_id
        && tokens.first() != Some(&bos)
    {
        tokens.insert(0, bos);
    }
    let token_strs = r.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&t| model.tokenizer.id_to_token(t).unwrap_or_default())
            .collect()
    });
    Ok(axum::Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.context_length,
        tokens,
        token_strs,
    })
    .into_response())
}

pub async fn detokenize(
    State(service): State<Service>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    detokenize_body(&service, body).unwrap_or_else(IntoResponse::into_response)
}

fn detokenize_body(
    service: &Service,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: DetokenizeRequest = parse_body(body, service.config.max_body_bytes)?;
    let model = service.groups.model()?;
    check_model(service, &model, r.model.as_deref())?;
    let Some(tokens) = r.tokens else {
        return Err(ApiError::invalid("tokens", "`tokens` is required"));
    };
    let vocab = model.vocab_size as i64;
    let ids = tokens
        .iter()
        .map(|&t| {
            if (0..vocab).contains(&t) {
                Ok(t as u32)
            } else {
                Err(ApiError::invalid(
                    "tokens",
                    format!("token id {t} is outside the vocabulary (0..{vocab})"),
                ))
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = model
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid("tokens", format!("cannot detokenize: {e}")))?;
    Ok(axum::Json(DetokenizeResponse { prompt }).into_response())
}
