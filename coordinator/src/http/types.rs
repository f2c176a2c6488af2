//! Serde views of the OpenAI request bodies, and their conversion into
//! [`GenerateParams`]. Unknown fields are ignored, as OpenAI clients send extras.

use serde::Deserialize;

use crate::chat_template::Message;
use crate::error::ApiError;
use crate::validate::{GenerateParams, Input};

/// `prompt`: a string, a list with one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `max_tokens` of `/v1/completions` when the request sets none (OpenAI's default).
/// Chat requests default to the room left in the context instead.
pub const DEFAULT_COMPLETION_MAX_TOKENS: i64 = 16;

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields both endpoints share.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopInput>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    /// `high`, `normal` or `low` (shardline extension).
    pub priority: Option<String>,
    /// Deadline in seconds from arrival (shardline extension).
    pub timeout: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Option<PromptInput>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
}

/// A content part of a chat message (only text is supported).
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

impl Common {
    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    fn into_params(self) -> GenerateParams {
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s],
            Some(StopInput::Many(v)) => v,
        };
        GenerateParams {
            model: self.model,
            max_tokens: self.max_tokens,
            max_tokens_field: "max_tokens",
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed.map(|s| s as u64),
            stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            min_tokens: self.min_tokens,
            n: self.n,
            ..Default::default()
        }
    }
}

impl CompletionRequest {
    pub fn into_params(self) -> Result<GenerateParams, ApiError> {
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than 1 is not supported",
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
        }
        let input = match self.prompt {
            None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
            Some(PromptInput::Text(t)) => Input::Text(t),
            Some(PromptInput::Tokens(t)) => Input::Tokens(t),
            Some(PromptInput::Texts(mut v)) if v.len() == 1 => Input::Text(v.remove(0)),
            Some(PromptInput::TokenLists(mut v)) if v.len() == 1 => Input::Tokens(v.remove(0)),
            Some(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "only one prompt per request is supported",
                ));
            }
        };
        let mut params = self.common.into_params();
        // OpenAI's (and vLLM's) legacy completions default.
        params.max_tokens = params.max_tokens.or(Some(DEFAULT_COMPLETION_MAX_TOKENS));
        params.input = Some(input);
        params.logprobs = self.logprobs;
        params.echo = self.echo.unwrap_or(false);
        Ok(params)
    }
}

impl ChatRequest {
    pub fn into_params(self) -> Result<GenerateParams, ApiError> {
        let Some(messages) = self.messages else {
            return Err(ApiError::invalid("messages", "`messages` is required"));
        };
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.into_iter().enumerate() {
            if m.role.is_empty() {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    "`role` must not be empty",
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content"),
                                format!("content parts of type `{}` are not supported", p.kind),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            out.push(Message {
                role: m.role,
                content,
            });
        }
        let max_completion = self.max_completion_tokens;
        let mut params = self.common.into_params();
        if let Some(m) = max_completion {
            params.max_tokens = Some(m);
            params.max_tokens_field = "max_completion_tokens";
        }
        params.input = Some(Input::Chat(out));
        params.logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, k) => Some(k.unwrap_or(0)),
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` requires `logprobs: true`",
                ));
            }
            (false, _) => None,
        };
        Ok(params)
    }
}
