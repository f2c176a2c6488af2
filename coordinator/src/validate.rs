//! Validation: turns what a front end parsed ([`GenerateParams`]) into a tokenized,
//! bounded [`ValidRequest`], or an [`ApiError`] naming the offending field. Chat input is
//! rendered here ([`render_chat`]: the model's template, with tools per [`crate::tools`]);
//! structured outputs and forced tool calls become one worker [`Constraint`], compiled
//! once here so that a bad schema or grammar is a 400.

use std::time::Duration;

use shardline_constraint as constraint;
use shardline_proto::worker::v1::{Constraint, SamplingParams, SequenceParams};
use tokio::time::Instant;

use crate::chat_template::Message;
use crate::config::Config;
use crate::error::ApiError;
use crate::groups::ModelInfo;
use crate::request::{Priority, ValidRequest};
use crate::structured::{self, OutputFormat, StructuredOutput};
use crate::tools::{self, ToolChoice, ToolUse};

/// The prompt as the client gave it.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
    Chat(ChatInput),
}

/// A conversation to render with the model's chat template.
#[derive(Debug, Clone)]
pub struct ChatInput {
    pub messages: Vec<Message>,
    /// The tools on offer and how they may be used.
    pub tools: Option<ToolUse>,
    /// Open the assistant's turn after the messages (the default).
    pub add_generation_prompt: bool,
    /// Leave the last message open so the model continues it (vLLM's
    /// `continue_final_message`).
    pub continue_final_message: bool,
}

impl ChatInput {
    /// A plain conversation: no tools, the assistant's turn opened.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            tools: None,
            add_generation_prompt: true,
            continue_final_message: false,
        }
    }
}

/// Front-end-neutral request parameters (HTTP and gRPC both fill this).
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub model: Option<String>,
    pub input: Option<Input>,
    pub max_tokens: Option<i64>,
    /// The field name `max_tokens` came from (for messages).
    pub max_tokens_field: &'static str,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// `Some(k)`: logprobs with `k` alternatives.
    pub logprobs: Option<i64>,
    pub echo: bool,
    pub ignore_eos: bool,
    pub min_tokens: Option<i64>,
    pub n: Option<i64>,
    pub priority: Priority,
    pub timeout: Option<Duration>,
    /// `logit_bias`: token id → bias.
    pub logit_bias: Vec<(i64, f64)>,
    /// What the output must look like (`response_format`, vLLM's structured outputs).
    pub structured: Option<StructuredOutput>,
}

/// Upper bound of `top_logprobs` (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Most choices per request (OpenAI's bound on `n`).
pub const MAX_N: i64 = 128;

/// Largest `logit_bias` magnitude (OpenAI's bound).
pub const MAX_LOGIT_BIAS: f64 = 100.0;

fn finite(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if !x.is_finite() => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a finite number"),
        )),
        Some(x) if x < lo || x > hi => Err(ApiError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi}, got {x}"),
        )),
        Some(x) => Ok(Some(x)),
    }
}

/// Model name a request must use (or omit).
pub fn served_name(config: &Config, model: &ModelInfo) -> String {
    config
        .served_model_name
        .clone()
        .unwrap_or_else(|| model.model_id.clone())
}

/// Tokenizes and checks a request. `id` becomes the response id.
pub fn validate(
    id: String,
    p: GenerateParams,
    config: &Config,
    model: &ModelInfo,
) -> Result<ValidRequest, ApiError> {
    let arrival = Instant::now();
    if let Some(name) = &p.model
        && !name.is_empty()
        && *name != served_name(config, model)
        && *name != model.model_id
    {
        return Err(ApiError::ModelNotFound(name.clone()));
    }
    let n = match p.n {
        None => 1,
        Some(n) if !(1..=MAX_N).contains(&n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        Some(n) => n as u32,
    };
    let temperature = finite("temperature", p.temperature, 0.0, 100.0)?.unwrap_or(1.0);
    let top_p = finite("top_p", p.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"));
    }
    let min_p = finite("min_p", p.min_p, 0.0, 1.0)?.unwrap_or(0.0);
    let presence = finite("presence_penalty", p.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency = finite("frequency_penalty", p.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let repetition = finite("repetition_penalty", p.repetition_penalty, 0.0, 100.0)?.unwrap_or(1.0);
    if repetition == 0.0 {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "`repetition_penalty` must be > 0",
        ));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k < -1 || k > u32::MAX as i64 => {
            return Err(ApiError::invalid(
                "top_k",
                "`top_k` must be -1, 0 or a positive integer",
            ));
        }
        Some(k) => k as u32,
    };
    let logprobs = match p.logprobs {
        None => None,
        Some(k) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("logprobs alternatives must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ));
        }
        Some(k) => Some(k as u32),
    };
    if p.stop.len() > config.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {} stop sequences are allowed, got {}",
                config.max_stop_sequences,
                p.stop.len()
            ),
        ));
    }
    if p.stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    let min_tokens = match p.min_tokens {
        None => 0,
        Some(m) if m < 0 || m > u32::MAX as i64 => {
            return Err(ApiError::invalid("min_tokens", "`min_tokens` must be >= 0"));
        }
        Some(m) => m as u32,
    };

    let logit_bias = logit_bias(&p.logit_bias, model)?;
    let tool_use = match &p.input {
        Some(Input::Chat(chat)) => chat.tools.clone(),
        _ => None,
    };
    if let Some(t) = &tool_use {
        t.validate()?;
    }
    let constraint = output_constraint(tool_use.as_ref(), p.structured.as_ref(), model)?;
    let prompt = tokenize(p.input, model)?;
    // A sequence can never hold more tokens than the group's whole KV cache, so that is
    // the usable context too (and what an unset `max_tokens` defaults up to).
    let kv_tokens = model.total_blocks as usize * model.block_size.max(1) as usize;
    let context = match kv_tokens {
        0 => model.context_length.max(1),
        kv => model.context_length.min(kv).max(1),
    };
    let max_input = if config.max_input_tokens == 0 {
        context
    } else {
        config.max_input_tokens.min(context)
    };
    let max_total = if config.max_total_tokens == 0 {
        context
    } else {
        config.max_total_tokens.min(context)
    };
    if prompt.is_empty() && !p.echo {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt.len() > max_input || prompt.len() >= max_total {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens, more than this model accepts ({} input tokens, {} in total)",
                prompt.len(),
                max_input,
                max_total
            ),
        ));
    }
    let room = max_total - prompt.len();
    let field = if p.max_tokens_field.is_empty() {
        "max_tokens"
    } else {
        p.max_tokens_field
    };
    let max_tokens = match p.max_tokens {
        None => room,
        Some(m) if m < 0 => {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` must be >= 0, got {m}"),
            ));
        }
        Some(0) if !p.echo => {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` must be at least 1"),
            ));
        }
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::invalid(
                field,
                format!(
                    "`{field}` = {m} is too large: the prompt has {} tokens and the limit is {max_total} in total",
                    prompt.len()
                ),
            ));
        }
        Some(m) => m as usize,
    };
    if min_tokens as usize > max_tokens {
        return Err(ApiError::invalid(
            "min_tokens",
            "`min_tokens` must not exceed `max_tokens`",
        ));
    }
    let demand = SequenceParams {
        max_new_tokens: max_tokens.max(1) as u32,
        ..Default::default()
    };
    let blocks = shardline_proto::worker::kv_blocks_demand(
        prompt.len(),
        &demand,
        model.context_length,
        model.block_size as usize,
    );
    if model.total_blocks > 0 && blocks > model.total_blocks as usize {
        return Err(ApiError::invalid(
            field,
            format!(
                "prompt + `{field}` need {blocks} KV blocks; the worker group has {}",
                model.total_blocks
            ),
        ));
    }
    let deadline = p.timeout.or(config.default_timeout).map(|t| arrival + t);
    let seed = p.seed.unwrap_or_else(rand::random);
    Ok(ValidRequest {
        id,
        params: SequenceParams {
            sampling: Some(SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                min_p: min_p as f32,
                repetition_penalty: repetition as f32,
                presence_penalty: presence as f32,
                frequency_penalty: frequency as f32,
                seed,
            }),
            // The worker reads 0 as "no limit": a prompt-only request (`echo` with
            // `max_tokens: 0`) runs one token that the coordinator drops.
            max_new_tokens: max_tokens.max(1) as u32,
            stop_token_ids: Vec::new(),
            ignore_eos: p.ignore_eos,
            min_tokens,
            top_logprobs: logprobs.unwrap_or(0),
            skip_logprob: logprobs.is_none(),
            prompt_logprobs: p.echo && logprobs.is_some(),
            num_generated: 0,
            logit_bias,
            constraint,
            priority: p.priority as u32,
        },
        prompt,
        stop: p.stop,
        priority: p.priority,
        deadline,
        logprobs,
        echo: p.echo,
        max_tokens: max_tokens as u32,
        arrival,
        n,
        tool_calling: tool_use
            .as_ref()
            .and_then(|t| t.calling(tools::format_of(&model.chat_template))),
        // The caller's span (`Service::start` sets the request's).
        span: tracing::Span::none(),
        tenant_label: crate::metrics::NO_TENANT.to_string(),
    })
}

/// `logit_bias` as the worker takes it: ids inside the vocabulary, biases in [-100, 100].
fn logit_bias(
    bias: &[(i64, f64)],
    model: &ModelInfo,
) -> Result<std::collections::HashMap<u32, f32>, ApiError> {
    let vocab = model.vocab_size as i64;
    bias.iter()
        .map(|&(token, b)| {
            if !(0..vocab).contains(&token) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` names token id {token}, outside the vocabulary (0..{vocab})"),
                ));
            }
            if !b.is_finite() || b.abs() > MAX_LOGIT_BIAS {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` of token {token} must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, got {b}"),
                ));
            }
            Ok((token as u32, b as f32))
        })
        .collect()
}

/// The one constraint of a request's output: forced tool calls, a structured output, or
/// (tool choice `auto` with a JSON `response_format`) either a call or that document.
/// Compiled here, so a schema or grammar that cannot be enforced is a 400 naming its
/// field.
fn output_constraint(
    tools: Option<&ToolUse>,
    structured: Option<&StructuredOutput>,
    model: &ModelInfo,
) -> Result<Option<Constraint>, ApiError> {
    let compiler = model.constraints.as_ref().map_err(String::as_str);
    let tools = tools.filter(|t| t.active());
    let Some(tools) = tools else {
        let Some(s) = structured else {
            return Ok(None);
        };
        let c = s.to_constraint()?;
        structured::check(compiler, &c, &s.field)?;
        return Ok(Some(c));
    };
    // Each function's schema alone first, so a bad one is named.
    for (i, tool) in tools.tools.iter().enumerate() {
        if let Some(parameters) = &tool.parameters
            && tools.choice != ToolChoice::Auto
        {
            let field = format!("tools[{i}].function.parameters");
            structured::check(compiler, &constraint::json_schema(parameters), &field)?;
        }
    }
    let content = match structured.map(|s| (s, &s.format)) {
        None => None,
        Some((s, OutputFormat::JsonObject)) => {
            Some(s.layout.apply(serde_json::json!({"type": "object"})))
        }
        Some((s, OutputFormat::JsonSchema { schema, .. })) => Some(s.layout.apply(schema.clone())),
        Some((s, _)) => {
            return Err(ApiError::invalid(
                s.field.clone(),
                format!(
                    "`{}` cannot be combined with `tools`; only a JSON response_format can",
                    s.field
                ),
            ));
        }
    };
    if let (Some(s), ToolChoice::Required | ToolChoice::Named(_)) = (structured, &tools.choice) {
        return Err(ApiError::invalid(
            s.field.clone(),
            format!(
                "`tool_choice` forces a tool call, so `{}` cannot apply",
                s.field
            ),
        ));
    }
    let format = tools::format_of(&model.chat_template);
    let Some(grammar) = tools.grammar(content.as_ref(), format) else {
        return Ok(None);
    };
    let c = constraint::lark(grammar);
    let field = structured.map_or("tools", |s| s.field.as_str());
    structured::check(compiler, &c, field)?;
    Ok(Some(c))
}

/// The prompt text of a conversation: the model's chat template over the messages (and
/// tools, see [`crate::tools::prepare`]).
pub fn render_chat(chat: &ChatInput, model: &ModelInfo) -> Result<String, ApiError> {
    if chat.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let (messages, tools) = tools::prepare(
        &model.chat_template,
        chat.messages.clone(),
        chat.tools.as_ref(),
    );
    let open_turn = chat.add_generation_prompt && !chat.continue_final_message;
    let text = model
        .chat_template
        .render_with_tools(&messages, tools.as_deref(), open_turn)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if !chat.continue_final_message {
        return Ok(text);
    }
    // As Hugging Face does: cut the rendering right after the last message's content.
    let last = messages
        .last()
        .map(|m| m.content.trim())
        .unwrap_or_default();
    match text.rfind(last) {
        Some(i) if !last.is_empty() => Ok(text[..i + last.len()].to_string()),
        _ => Err(ApiError::invalid(
            "continue_final_message",
            "the last message's content is not in the rendered prompt, so it cannot be continued",
        )),
    }
}
fn tokenize(input: Option<Input>, model: &ModelInfo) -> Result<Vec<u32>, ApiError> {
    let encode = |text: &str, field: &str| -> Result<Vec<u32>, ApiError> {
        let encoding = model
            .tokenizer
            .encode(text, false)
            .map_err(|e| ApiError::invalid(field, format!("cannot tokenize `{field}`: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if model.add_bos
            && let Some(bos) = model.bos_token_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    };
    match input {
        None => Err(ApiError::invalid(
            "prompt",
            "a prompt (or messages) is required",
        )),
        Some(Input::Text(text)) => encode(&text, "prompt"),
        Some(Input::Tokens(ids)) => {
            let vocab = model.tokenizer.get_vocab_size(true) as u32;
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary"),
                ));
            }
            Ok(ids)
        }
        Some(Input::Chat(chat)) => encode(&render_chat(&chat, model)?, "messages"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat_template::ChatTemplate;
    use shardline_engine::testing::{TEST_CHAT_TEMPLATE, test_tokenizer};

    fn model() -> ModelInfo {
        ModelInfo {
            model_id: "m".into(),
            numerics: "m (weights f32, KV cache f32)".into(),
            tokenizer: test_tokenizer(),
            chat_template: ChatTemplate::new(TEST_CHAT_TEMPLATE, None, None).unwrap(),
            eos_token_ids: vec![0],
            bos_token_id: None,
            add_bos: false,
            context_length: 64,
            block_size: 16,
            total_blocks: 100,
            max_num_seqs: 8,
            vocab_size: 259,
            constraints: shardline_constraint::ConstraintCompiler::new(
                &shardline_engine::testing::test_tokenizer_json(),
                &[0],
                259,
            )
            .map_err(|e| e.to_string()),
        }
    }

    fn text(p: &str) -> GenerateParams {
        GenerateParams {
            input: Some(Input::Text(p.into())),
            max_tokens: Some(4),
            ..Default::default()
        }
    }

    fn check(p: GenerateParams) -> Result<ValidRequest, ApiError> {
        validate("id".into(), p, &Config::default(), &model())
    }

    fn param_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { param, .. } => param.unwrap_or_default(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_is_tokenized_and_bounded() {
        let v = check(GenerateParams {
            temperature: Some(0.0),
            seed: Some(5),
            ..text("hey")
        })
        .unwrap();
        assert_eq!(v.prompt.len(), 3);
        assert_eq!(v.params.max_new_tokens, 4);
        let sampling = v.params.sampling.unwrap();
        assert_eq!((sampling.temperature, sampling.seed), (0.0, 5));
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases: Vec<(GenerateParams, &str)> = vec![
            (
                GenerateParams {
                    temperature: Some(f64::NAN),
                    ..text("a")
                },
                "temperature",
            ),
            (
                GenerateParams {
                    top_p: Some(1.5),
                    ..text("a")
                },
                "top_p",
            ),
            (
                GenerateParams {
                    top_k: Some(-3),
                    ..text("a")
                },
                "top_k",
            ),
            (
                GenerateParams {
                    max_tokens: Some(-1),
                    ..text("a")
                },
                "max_tokens",
            ),
            (
                GenerateParams {
                    max_tokens: Some(1000),
                    ..text("a")
                },
                "max_tokens",
            ),
            (
                GenerateParams {
                    n: Some(0),
                    ..text("a")
                },
                "n",
            ),
            (
                GenerateParams {
                    n: Some(129),
                    ..text("a")
                },
                "n",
            ),
            (
                GenerateParams {
                    logit_bias: vec![(259, 1.0)],
                    ..text("a")
                },
                "logit_bias",
            ),
            (
                GenerateParams {
                    logit_bias: vec![(-1, 1.0)],
                    ..text("a")
                },
                "logit_bias",
            ),
            (
                GenerateParams {
                    logit_bias: vec![(5, 100.5)],
                    ..text("a")
                },
                "logit_bias",
            ),
            (
                GenerateParams {
                    structured: Some(StructuredOutput::new(
                        "guided_regex",
                        OutputFormat::Regex("(".into()),
                    )),
                    ..text("a")
                },
                "guided_regex",
            ),
            (
                GenerateParams {
                    logprobs: Some(50),
                    ..text("a")
                },
                "top_logprobs",
            ),
            (
                GenerateParams {
                    stop: vec![String::new()],
                    ..text("a")
                },
                "stop",
            ),
            (
                GenerateParams {
                    min_tokens: Some(10),
                    ..text("a")
                },
                "min_tokens",
            ),
            (text(&"x".repeat(80)), "prompt"),
            (text(""), "prompt"),
            (
                GenerateParams {
                    input: Some(Input::Chat(ChatInput::new(vec![]))),
                    ..text("a")
                },
                "messages",
            ),
            (
                GenerateParams {
                    input: Some(Input::Tokens(vec![99_999])),
                    ..text("a")
                },
                "prompt",
            ),
        ];
        for (params, field) in cases {
            assert_eq!(param_of(check(params).unwrap_err()), field);
        }
    }

    #[test]
    fn unknown_model_is_404_and_served_names_pass() {
        let e = check(GenerateParams {
            model: Some("other".into()),
            ..text("a")
        })
        .unwrap_err();
        assert!(matches!(e, ApiError::ModelNotFound(_)));
        assert!(
            check(GenerateParams {
                model: Some("m".into()),
                ..text("a")
            })
            .is_ok()
        );
    }

    #[test]
    fn echo_with_zero_max_tokens_runs_one_token() {
        let v = check(GenerateParams {
            echo: true,
            max_tokens: Some(0),
            logprobs: Some(0),
            ..text("ab")
        })
        .unwrap();
        assert_eq!(v.max_tokens, 0);
        assert_eq!(v.params.max_new_tokens, 1);
        assert!(v.params.prompt_logprobs);
    }

    #[test]
    fn chat_uses_the_template() {
        let messages = vec![Message::new("user", "q")];
        let v = check(GenerateParams {
            input: Some(Input::Chat(ChatInput::new(messages))),
            ..text("")
        })
        .unwrap();
        assert_eq!(
            model().tokenizer.decode(&v.prompt, false).unwrap(),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
