//! The chat request body: messages validated as OpenAI validates them (roles, content
//! per role, tool calls and the tool results that answer them) and tools
//! (`tools`, `tool_choice`, `parallel_tool_calls`).

use serde::Deserialize;
use serde_json::Value;

use super::types::{Common, Unsupported};
use crate::chat_template::Message;
use crate::error::ApiError;
use crate::tools::{Tool, ToolChoice, ToolUse};
use crate::validate::{ChatInput, GenerateParams, Input};

/// A content part of a chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A call in an assistant message: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: Option<FunctionCallIn>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: Option<String>,
    /// A JSON string, as OpenAI returns it.
    pub arguments: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
    /// An assistant's refusal (stands for its content when that is absent).
    pub refusal: Option<String>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
}

/// An entry of `tools`.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Option<FunctionIn>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    #[serde(flatten)]
    pub unsupported: Unsupported,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<ToolIn>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's extensions: open the assistant's turn (default) or continue the last
    /// message.
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// Stands in for `user` as the tenant (OpenAI's replacement for `user`).
    pub safety_identifier: Option<String>,
}

/// Roles OpenAI accepts (`developer` is the newer name of `system`).
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

impl ChatRequest {
    pub fn into_params(self) -> Result<GenerateParams, ApiError> {
        self.unsupported.check()?;
        let Some(messages) = self.messages else {
            return Err(ApiError::invalid("messages", "`messages` is required"));
        };
        let messages = messages_in(messages)?;
        let tools = tool_use(self.tools, self.tool_choice, self.parallel_tool_calls)?;
        let continue_final = self.continue_final_message.unwrap_or(false);
        if continue_final && self.add_generation_prompt == Some(true) {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` and `add_generation_prompt` cannot both be true",
            ));
        }
        let max_completion = self.max_completion_tokens;
        let mut params = self.common.into_params()?;
        if let Some(m) = max_completion {
            params.max_tokens = Some(m);
            params.max_tokens_field = "max_completion_tokens";
        }
        params.input = Some(Input::Chat(ChatInput {
            messages,
            tools,
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
            continue_final_message: continue_final,
        }));
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

/// The messages as the chat template takes them, or a 400 naming the first bad one.
pub fn messages_in(messages: Vec<ChatMessageIn>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    // Ids of the calls made so far, which `tool` messages answer.
    let mut call_ids: Vec<String> = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let field = |f: &str| format!("messages[{i}].{f}");
        let role = m.role.as_str();
        if !ROLES.contains(&role) {
            let hint = if role == "function" {
                "; `function` messages are deprecated, use `tool`".to_string()
            } else {
                String::new()
            };
            return Err(ApiError::invalid(
                field("role"),
                format!(
                    "unknown role `{role}`; use one of {}{hint}",
                    ROLES.join(", ")
                ),
            ));
        }
        for (name, value) in [("audio", &m.audio), ("function_call", &m.function_call)] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid(
                    field(name),
                    format!("`{name}` in messages is not supported"),
                ));
            }
        }
        if m.tool_calls.is_some() && role != "assistant" {
            return Err(ApiError::invalid(
                field("tool_calls"),
                "only assistant messages carry `tool_calls`",
            ));
        }
        let parts_allowed: &[&str] = match role {
            "assistant" => &["text", "refusal"],
            _ => &["text"],
        };
        if m.refusal.is_some() && role != "assistant" {
            return Err(ApiError::invalid(
                field("refusal"),
                "only assistant messages carry a `refusal`",
            ));
        }
        let content = match m.content {
            None => m.refusal,
            Some(Content::Text(t)) => Some(t),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    if !parts_allowed.contains(&p.kind.as_str()) {
                        return Err(ApiError::invalid(
                            field(&format!("content[{j}].type")),
                            format!(
                                "content parts of type `{}` are not supported in {role} messages (only {})",
                                p.kind,
                                parts_allowed.join(", ")
                            ),
                        ));
                    }
                    let piece = if p.kind == "text" { p.text } else { p.refusal };
                    let Some(piece) = piece else {
                        return Err(ApiError::invalid(
                            field(&format!("content[{j}].{}", p.kind)),
                            format!("a `{}` content part needs its `{}`", p.kind, p.kind),
                        ));
                    };
                    text.push_str(&piece);
                }
                Some(text)
            }
        };
        let mut message = Message {
            name: m.name,
            ..Message::new(role, String::new())
        };
        match role {
            "assistant" => {
                if let Some(calls) = m.tool_calls {
                    let calls = calls_in(calls, &field("tool_calls"))?;
                    call_ids.extend(
                        calls
                            .iter()
                            .filter_map(|c| c["id"].as_str().map(str::to_string)),
                    );
                    message.tool_calls = Some(calls);
                } else if content.is_none() {
                    return Err(ApiError::invalid(
                        field("content"),
                        "an assistant message needs `content` or `tool_calls`",
                    ));
                }
            }
            "tool" => {
                let Some(id) = m.tool_call_id else {
                    return Err(ApiError::invalid(
                        field("tool_call_id"),
                        "a tool message needs the `tool_call_id` it answers",
                    ));
                };
                if !call_ids.contains(&id) {
                    return Err(ApiError::invalid(
                        field("tool_call_id"),
                        format!(
                            "tool message answers `{id}`, which no earlier assistant message called"
                        ),
                    ));
                }
                if content.is_none() {
                    return Err(ApiError::invalid(
                        field("content"),
                        "a tool message needs `content`",
                    ));
                }
                message.tool_call_id = Some(id);
            }
            _ => {
                if content.is_none() {
                    return Err(ApiError::invalid(
                        field("content"),
                        format!("a {role} message needs `content`"),
                    ));
                }
            }
        }
        // Templates know `system`; `developer` is the same instruction role.
        if role == "developer" {
            message.role = "system".into();
        }
        message.content = content.unwrap_or_default();
        out.push(message);
    }
    Ok(out)
}

/// An assistant message's calls as templates take them (arguments as an object where
/// the JSON string parses).
fn calls_in(calls: Vec<ToolCallIn>, field: &str) -> Result<Vec<Value>, ApiError> {
    calls
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            let at = |f: &str| format!("{field}[{j}].{f}");
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(ApiError::invalid(
                    at("type"),
                    "tool calls must be of type `function`",
                ));
            }
            let Some(id) = c.id else {
                return Err(ApiError::invalid(at("id"), "a tool call needs its `id`"));
            };
            let Some(function) = c.function else {
                return Err(ApiError::invalid(
                    at("function"),
                    "a tool call needs its `function`",
                ));
            };
            let Some(name) = function.name else {
                return Err(ApiError::invalid(
                    at("function.name"),
                    "a tool call needs the function's `name`",
                ));
            };
            let arguments = match function.arguments {
                Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                Some(Value::Null) | None => serde_json::json!({}),
                Some(other) => {
                    return Err(ApiError::invalid(
                        at("function.arguments"),
                        format!("`arguments` must be a JSON string, got {other}"),
                    ));
                }
            };
            Ok(serde_json::json!({"id": id, "type": "function",
                "function": {"name": name, "arguments": arguments}}))
        })
        .collect()
}

/// `tools`, `tool_choice` and `parallel_tool_calls` as one [`ToolUse`].
fn tool_use(
    tools: Option<Vec<ToolIn>>,
    choice: Option<Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolUse>, ApiError> {
    let tools: Vec<Tool> = tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "tools of type `{}` are not supported; use `function`",
                        t.kind
                    ),
                ));
            }
            let Some(f) = t.function else {
                return Err(ApiError::invalid(
                    format!("tools[{i}].function"),
                    "a tool needs its `function`",
                ));
            };
            Ok(Tool {
                name: f.name,
                description: f.description,
                parameters: f.parameters,
                strict: f.strict,
            })
        })
        .collect::<Result<_, _>>()?;
    let choice = match &choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "unknown `tool_choice` `{other}`; use none, auto, required or a function"
                    ),
                ));
            }
        }),
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => Some(ToolChoice::Named(name.to_string())),
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ));
                }
            }
        }
    };
    if tools.is_empty() {
        return match choice {
            None | Some(ToolChoice::None) => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` needs `tools`",
            )),
        };
    }
    Ok(Some(ToolUse {
        tools,
        choice: choice.unwrap_or(ToolChoice::Auto),
        parallel: parallel.unwrap_or(true),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request(body: Value) -> Result<GenerateParams, ApiError> {
        serde_json::from_value::<ChatRequest>(body)
            .unwrap()
            .into_params()
    }

    fn param_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { param, .. } => param.unwrap_or_default(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn chat(p: GenerateParams) -> ChatInput {
        match p.input {
            Some(Input::Chat(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    const CALL: &str =
        r#"{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}"#;

    #[test]
    fn a_tool_round_trip_conversation_is_accepted() {
        let call: Value = serde_json::from_str(CALL).unwrap();
        let p = request(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "x?"}]},
            {"role": "assistant", "content": null, "tool_calls": [call], "refusal": null},
            {"role": "tool", "tool_call_id": "c1", "content": "1"},
        ], "tools": [{"type": "function", "function": {"name": "f"}}],
           "tool_choice": "required", "parallel_tool_calls": false}))
        .unwrap();
        let c = chat(p);
        assert_eq!(c.messages[0].role, "system");
        assert_eq!(
            c.messages[2].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert_eq!(c.messages[3].tool_call_id.as_deref(), Some("c1"));
        let tools = c.tools.unwrap();
        assert_eq!(tools.choice, ToolChoice::Required);
        assert!(!tools.parallel);
    }

    #[test]
    fn bad_messages_name_the_field() {
        let call: Value = serde_json::from_str(CALL).unwrap();
        let cases = [
            (
                json!([{"role": "wizard", "content": "x"}]),
                "messages[0].role",
            ),
            (
                json!([{"role": "function", "content": "x"}]),
                "messages[0].role",
            ),
            (json!([{"role": "user"}]), "messages[0].content"),
            (
                json!([{"role": "system", "content": null}]),
                "messages[0].content",
            ),
            (json!([{"role": "assistant"}]), "messages[0].content"),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                "messages[0].content[0].type",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages[0].content[0].text",
            ),
            (
                json!([{"role": "tool", "content": "1", "tool_call_id": "c9"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "1"}]),
                "messages[1].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_calls": []}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                    "function": {"name": "f", "arguments": {"x": 1}}}]}]),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"type": "function",
                    "function": {"name": "f"}}]}]),
                "messages[0].tool_calls[0].id",
            ),
            (
                json!([{"role": "assistant", "content": "a", "audio": {"id": "x"}}]),
                "messages[0].audio",
            ),
        ];
        for (messages, field) in cases {
            let e = request(json!({"messages": messages})).unwrap_err();
            assert_eq!(param_of(e), field, "{messages}");
        }
    }

    #[test]
    fn bad_tools_name_the_field() {
        let f = json!({"type": "function", "function": {"name": "f"}});
        let cases = [
            (
                json!({"tools": [{"type": "code_interpreter"}]}),
                "tools[0].type",
            ),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [f], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [f], "tool_choice": {"type": "function"}}),
                "tool_choice",
            ),
            (json!({"functions": [{"name": "f"}]}), "functions"),
        ];
        for (mut body, field) in cases {
            body["messages"] = json!([{"role": "user", "content": "x"}]);
            let e = request(body.clone()).unwrap_err();
            assert_eq!(param_of(e), field, "{body}");
        }
        let p = request(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [f], "tool_choice": {"type": "function", "function": {"name": "f"}}}))
        .unwrap();
        assert_eq!(chat(p).tools.unwrap().choice, ToolChoice::Named("f".into()));
        let p =
            request(json!({"messages": [{"role": "user", "content": "x"}], "tools": [f]})).unwrap();
        assert_eq!(chat(p).tools.unwrap().choice, ToolChoice::Auto);
    }

    #[test]
    fn continue_final_message_excludes_the_generation_prompt() {
        let e = request(json!({"messages": [{"role": "user", "content": "x"}],
            "continue_final_message": true, "add_generation_prompt": true}))
        .unwrap_err();
        assert_eq!(param_of(e), "continue_final_message");
        let c = chat(
            request(json!({"messages": [{"role": "user", "content": "x"}],
                "continue_final_message": true}))
            .unwrap(),
        );
        assert!(c.continue_final_message);
    }
}
