//! Serde views of the OpenAI request bodies, and their conversion into
//! [`GenerateParams`].
//!
//! Nothing is silently ignored: an OpenAI field shardline does not implement gets a 400
//! naming it unless its value asks for nothing beyond the default ([`Unsupported`]).
//! Fields outside OpenAI's API that clients (and vLLM users) send may be ignored.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::structured::{JsonLayout, OutputFormat, StructuredOutput};
use crate::validate::{GenerateParams, Input};

pub use super::chat_types::ChatRequest;

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

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema` (its `description` guides OpenAI's models only; the
/// schema itself is what is enforced here).
#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs` object.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StructuredOutputs {
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    pub structural_tag: Option<Value>,
    pub disable_any_whitespace: Option<bool>,
    pub disable_additional_properties: Option<bool>,
    pub whitespace_pattern: Option<String>,
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
    /// Token id (as a string key, as JSON has it) → bias in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// OpenAI's structured outputs (vLLM accepts it on completions too).
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured outputs, current form.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's structured outputs, the earlier `guided_*` fields.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub guided_whitespace_pattern: Option<String>,
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

/// OpenAI fields shardline knows and does not implement. Each is refused with a 400
/// naming it unless its value asks for nothing (null, or the default behaviour).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Unsupported {
    pub audio: Option<Value>,
    pub modalities: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub store: Option<Value>,
    pub metadata: Option<Value>,
    pub service_tier: Option<Value>,
    pub reasoning_effort: Option<Value>,
    pub verbosity: Option<Value>,
    pub prompt_cache_key: Option<Value>,
}

impl Unsupported {
    /// The first field that asks for something shardline does not do.
    pub fn check(&self) -> Result<(), ApiError> {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let refuse = |field: &str, why: &str| {
            Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported: {why}"),
            ))
        };
        if set(&self.audio) {
            return refuse("audio", "this server generates text only");
        }
        if set(&self.modalities) && self.modalities != Some(serde_json::json!(["text"])) {
            return refuse("modalities", "this server generates text only");
        }
        if set(&self.prediction) {
            return refuse("prediction", "predicted outputs are not implemented");
        }
        if set(&self.web_search_options) {
            return refuse("web_search_options", "there is no web search");
        }
        if set(&self.functions) {
            return refuse("functions", "it is deprecated; use `tools`");
        }
        if set(&self.function_call) {
            return refuse("function_call", "it is deprecated; use `tool_choice`");
        }
        if set(&self.store) && self.store != Some(Value::Bool(false)) {
            return refuse("store", "completions are not stored");
        }
        if set(&self.metadata) {
            return refuse("metadata", "completions are not stored");
        }
        let tier = self.service_tier.as_ref().and_then(Value::as_str);
        if set(&self.service_tier) && !matches!(tier, Some("auto" | "default")) {
            return refuse("service_tier", "there is one tier; use `auto` or `default`");
        }
        if set(&self.reasoning_effort) {
            return refuse("reasoning_effort", "the model is not a reasoning model");
        }
        if set(&self.verbosity) {
            return refuse("verbosity", "the model has no verbosity setting");
        }
        if set(&self.prompt_cache_key) {
            return refuse(
                "prompt_cache_key",
                "prefix caching and routing by prefix are automatic",
            );
        }
        Ok(())
    }
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

    pub(super) fn into_params(self) -> Result<GenerateParams, ApiError> {
        let structured = self.structured()?;
        let logit_bias = logit_bias(self.logit_bias.as_ref())?;
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s],
            Some(StopInput::Many(v)) => v,
        };
        Ok(GenerateParams {
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
            logit_bias,
            structured,
            ..Default::default()
        })
    }

    /// The one structured-output demand among `response_format`, `structured_outputs`
    /// and the `guided_*` fields (more than one is a 400).
    fn structured(&self) -> Result<Option<StructuredOutput>, ApiError> {
        let mut found: Vec<StructuredOutput> = Vec::new();
        if let Some(f) = &self.response_format {
            let format = match f.kind.as_str() {
                "text" => None,
                "json_object" => Some(OutputFormat::JsonObject),
                "json_schema" => {
                    let Some(js) = &f.json_schema else {
                        return Err(ApiError::invalid(
                            "response_format.json_schema",
                            "`response_format` of type `json_schema` needs `json_schema`",
                        ));
                    };
                    if let Some(name) = &js.name {
                        let ok = !name.is_empty()
                            && name.len() <= 64
                            && name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                        if !ok {
                            return Err(ApiError::invalid(
                                "response_format.json_schema.name",
                                "the name must be 1 to 64 letters, digits, `_` or `-`",
                            ));
                        }
                    }
                    let Some(schema) = js.schema.clone() else {
                        return Err(ApiError::invalid(
                            "response_format.json_schema.schema",
                            "`response_format.json_schema` needs a `schema`",
                        ));
                    };
                    Some(OutputFormat::JsonSchema {
                        schema,
                        strict: js.strict.unwrap_or(false),
                    })
                }
                other => {
                    return Err(ApiError::invalid(
                        "response_format.type",
                        format!(
                            "`response_format.type` `{other}` is not supported; use text, json_object or json_schema"
                        ),
                    ));
                }
            };
            found.extend(format.map(|f| StructuredOutput::new("response_format", f)));
        }
        let guided = [
            (
                "guided_json",
                self.guided_json
                    .clone()
                    .map(|schema| json_schema(schema, "guided_json"))
                    .transpose()?,
            ),
            (
                "guided_regex",
                self.guided_regex.clone().map(OutputFormat::Regex),
            ),
            (
                "guided_choice",
                self.guided_choice.clone().map(OutputFormat::Choice),
            ),
            (
                "guided_grammar",
                self.guided_grammar.clone().map(OutputFormat::Grammar),
            ),
        ];
        for (field, format) in guided {
            found.extend(format.map(|f| StructuredOutput::new(field, f)));
        }
        if let Some(so) = &self.structured_outputs {
            if so.structural_tag.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(
                    "structured_outputs.structural_tag",
                    "`structural_tag` is not supported",
                ));
            }
            let forms = [
                (
                    "structured_outputs.json",
                    so.json
                        .clone()
                        .map(|s| json_schema(s, "structured_outputs.json"))
                        .transpose()?,
                ),
                (
                    "structured_outputs.regex",
                    so.regex.clone().map(OutputFormat::Regex),
                ),
                (
                    "structured_outputs.choice",
                    so.choice.clone().map(OutputFormat::Choice),
                ),
                (
                    "structured_outputs.grammar",
                    so.grammar.clone().map(OutputFormat::Grammar),
                ),
                (
                    "structured_outputs.json_object",
                    so.json_object
                        .filter(|&on| on)
                        .map(|_| OutputFormat::JsonObject),
                ),
            ];
            let before = found.len();
            for (field, format) in forms {
                found.extend(format.map(|f| StructuredOutput::new(field, f)));
            }
            if found.len() == before {
                return Err(ApiError::invalid(
                    "structured_outputs",
                    "`structured_outputs` needs one of json, regex, choice, grammar or json_object",
                ));
            }
        }
        if found.len() > 1 {
            let fields: Vec<&str> = found.iter().map(|s| s.field.as_str()).collect();
            return Err(ApiError::invalid(
                found[1].field.clone(),
                format!(
                    "only one structured output may be asked for, got {}",
                    fields.join(", ")
                ),
            ));
        }
        let Some(mut out) = found.pop() else {
            if self.guided_whitespace_pattern.is_some() {
                return Err(ApiError::invalid(
                    "guided_whitespace_pattern",
                    "`guided_whitespace_pattern` needs a JSON structured output",
                ));
            }
            return Ok(None);
        };
        let so = self.structured_outputs.clone().unwrap_or_default();
        out.layout = JsonLayout {
            disable_any_whitespace: so.disable_any_whitespace.unwrap_or(false),
            whitespace_pattern: so
                .whitespace_pattern
                .or_else(|| self.guided_whitespace_pattern.clone()),
            disable_additional_properties: so.disable_additional_properties.unwrap_or(false),
        };
        Ok(Some(out))
    }
}

/// A JSON schema given as an object or as JSON text (vLLM takes both).
fn json_schema(schema: Value, field: &str) -> Result<OutputFormat, ApiError> {
    let schema = match schema {
        Value::String(text) => serde_json::from_str(&text).map_err(|e| {
            ApiError::invalid(field, format!("`{field}` is not a valid JSON schema: {e}"))
        })?,
        other => other,
    };
    Ok(OutputFormat::JsonSchema {
        schema,
        strict: false,
    })
}

/// `logit_bias` keys are token ids written as strings (JSON object keys); values are
/// numbers. Ranges are checked against the model in validation.
fn logit_bias(map: Option<&serde_json::Map<String, Value>>) -> Result<Vec<(i64, f64)>, ApiError> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(key, value)| {
            let token: i64 = key.trim().parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids (integers), got `{key}`"),
                )
            })?;
            let bias = value.as_f64().ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` of token {token} must be a number, got {value}"),
                )
            })?;
            Ok((token, bias))
        })
        .collect()
}

impl CompletionRequest {
    pub fn into_params(self) -> Result<GenerateParams, ApiError> {
        let n = self.common.n.unwrap_or(1);
        if self.best_of.is_some_and(|b| b != n) {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` other than `n` is not supported (no server-side ranking)",
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
        let mut params = self.common.into_params()?;
        // OpenAI's (and vLLM's) legacy completions default.
        params.max_tokens = params.max_tokens.or(Some(DEFAULT_COMPLETION_MAX_TOKENS));
        params.input = Some(input);
        params.logprobs = self.logprobs;
        params.echo = self.echo.unwrap_or(false);
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn common(body: Value) -> Common {
        serde_json::from_value(body).unwrap()
    }

    fn param_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { param, .. } => param.unwrap_or_default(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn every_structured_form_is_read() {
        let cases = [
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": true}}}),
                "response_format",
            ),
            (
                json!({"guided_json": "{\"type\": \"integer\"}"}),
                "guided_json",
            ),
            (json!({"guided_regex": "[0-9]+"}), "guided_regex"),
            (json!({"guided_choice": ["a", "b"]}), "guided_choice"),
            (json!({"guided_grammar": "start: \"a\""}), "guided_grammar"),
            (
                json!({"structured_outputs": {"json": {"type": "integer"}}}),
                "structured_outputs.json",
            ),
            (
                json!({"structured_outputs": {"choice": ["a"]}}),
                "structured_outputs.choice",
            ),
            (
                json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": true}}),
                "structured_outputs.json_object",
            ),
        ];
        for (body, field) in cases {
            let s = common(body.clone()).structured().unwrap().unwrap();
            assert_eq!(s.field, field, "{body}");
        }
        let s = common(json!({"structured_outputs": {"json_object": true,
            "disable_any_whitespace": true, "disable_additional_properties": true}}))
        .structured()
        .unwrap()
        .unwrap();
        assert!(s.layout.disable_any_whitespace && s.layout.disable_additional_properties);
        assert!(
            common(json!({"response_format": {"type": "text"}}))
                .structured()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn structured_mistakes_name_the_field() {
        let cases = [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
            (json!({"structured_outputs": {}}), "structured_outputs"),
            (
                json!({"structured_outputs": {"structural_tag": "{}"}}),
                "structured_outputs.structural_tag",
            ),
            (json!({"guided_json": "{nope"}), "guided_json"),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "a b", "schema": {}}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
            ),
        ];
        for (body, field) in cases {
            let e = common(body.clone()).structured().unwrap_err();
            assert_eq!(param_of(e), field, "{body}");
        }
    }

    #[test]
    fn logit_bias_keys_are_token_ids() {
        let ok = logit_bias(Some(json!({"50": 10, " 7": -100.0}).as_object().unwrap())).unwrap();
        assert_eq!(ok, vec![(50, 10.0), (7, -100.0)]);
        for bad in [json!({"x": 1}), json!({"5": "a"}), json!({"1.5": 1})] {
            let e = logit_bias(Some(bad.as_object().unwrap())).unwrap_err();
            assert_eq!(param_of(e), "logit_bias");
        }
    }

    #[test]
    fn unsupported_fields_are_refused_unless_they_ask_for_nothing() {
        let ok = json!({"store": false, "modalities": ["text"], "service_tier": "auto",
            "metadata": null, "audio": null});
        let u: Unsupported = serde_json::from_value(ok).unwrap();
        u.check().unwrap();
        for (body, field) in [
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"prediction": {"type": "content"}}), "prediction"),
            (json!({"web_search_options": {}}), "web_search_options"),
            (json!({"functions": []}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"store": true}), "store"),
            (json!({"metadata": {"a": "b"}}), "metadata"),
            (json!({"service_tier": "flex"}), "service_tier"),
            (json!({"reasoning_effort": "low"}), "reasoning_effort"),
            (json!({"verbosity": "low"}), "verbosity"),
            (json!({"prompt_cache_key": "k"}), "prompt_cache_key"),
        ] {
            let u: Unsupported = serde_json::from_value(body).unwrap();
            assert_eq!(param_of(u.check().unwrap_err()), field);
        }
    }

    #[test]
    fn best_of_must_equal_n() {
        let r: CompletionRequest =
            serde_json::from_value(json!({"prompt": "a", "n": 2, "best_of": 2})).unwrap();
        assert!(r.into_params().is_ok());
        let r: CompletionRequest =
            serde_json::from_value(json!({"prompt": "a", "best_of": 3})).unwrap();
        assert_eq!(param_of(r.into_params().unwrap_err()), "best_of");
    }
}
