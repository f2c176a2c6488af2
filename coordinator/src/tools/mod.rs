//! Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): what the model
//! is told, what it may write, and how its calls are read back.
//!
//! - **Prompt.** A chat template that reads `tools` (Qwen 2.5, Llama 3.1, Hermes, ...)
//!   gets the tools and the conversation's `tool_calls` / `tool` messages as Hugging
//!   Face passes them. A template without tool support (SmolLM2's ChatML) gets the
//!   documented fallback, Hermes-style: a system message listing the tools as JSON inside
//!   `<tools></tools>` and asking for `<tool_call>{"name": ..., "arguments": ...}
//!   </tool_call>`; earlier calls are written into the assistant's text that way and tool
//!   results become user turns wrapped in `<tool_response></tool_response>`.
//! - **Output.** Calls are read in the model's format ([`ToolFormat`], [`parser`]): Llama
//!   3's JSON calls when the template is a Llama 3 tool template (it writes
//!   `<|python_tag|>`), else Hermes' `<tool_call>` blocks.
//! - **Constraint.** `tool_choice: "required"` and a named function constrain the output
//!   to calls in that format whose arguments follow the function's JSON schema
//!   ([`ToolUse::grammar`]),
//!   so the arguments always parse; `auto` leaves the model free (a `response_format` then
//!   constrains its content, or a call); `none` neither shows the tools nor reads calls.

pub mod parser;

pub use parser::ToolFormat;
use serde_json::{Value, json};

use crate::chat_template::{ChatTemplate, Message};
use crate::error::ApiError;
use crate::structured::JsonLayout;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (`None`: no arguments).
    pub parameters: Option<Value>,
    /// OpenAI's `strict`; the schema is enforced exactly whenever calls are constrained.
    pub strict: Option<bool>,
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are not offered; the output is text.
    None,
    /// The model decides between text and calls.
    Auto,
    /// At least one call.
    Required,
    /// Exactly one call of this function.
    Named(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call per answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// What the front end needs to read an answer's tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCalling {
    pub choice: ToolChoice,
    pub parallel: bool,
    pub format: ToolFormat,
}

impl ToolCalling {
    /// OpenAI's `finish_reason` for an answer that made calls: a forced (named) call
    /// finishes with `stop`, the model's own decision with `tool_calls`.
    pub fn finish_reason(&self) -> &'static str {
        match self.choice {
            ToolChoice::Named(_) => "stop",
            _ => "tool_calls",
        }
    }
}

/// Longest function name OpenAI accepts.
const MAX_NAME: usize = 64;

impl ToolUse {
    /// Checks names (OpenAI's `^[a-zA-Z0-9_-]{1,64}$`, unique) and that a named choice
    /// names one of the tools.
    pub fn validate(&self) -> Result<(), ApiError> {
        for (i, tool) in self.tools.iter().enumerate() {
            let field = format!("tools[{i}].function.name");
            let valid = !tool.name.is_empty()
                && tool.name.len() <= MAX_NAME
                && tool
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "function name `{}` must be 1 to {MAX_NAME} letters, digits, `_` or `-`",
                        tool.name
                    ),
                ));
            }
            if self.tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(ApiError::invalid(
                    field,
                    format!("two tools are named `{}`", tool.name),
                ));
            }
            if let Some(p) = &tool.parameters
                && !p.is_object()
            {
                return Err(ApiError::invalid(
                    format!("tools[{i}].function.parameters"),
                    "`parameters` must be a JSON schema object",
                ));
            }
        }
        if let ToolChoice::Named(name) = &self.choice
            && !self.tools.iter().any(|t| &t.name == name)
        {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not among the tools"),
            ));
        }
        Ok(())
    }

    /// Whether the model is shown the tools and its calls are read.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None && !self.tools.is_empty()
    }

    pub fn calling(&self, format: ToolFormat) -> Option<ToolCalling> {
        self.active().then(|| ToolCalling {
            choice: self.choice.clone(),
            parallel: self.parallel,
            format,
        })
    }

    /// The tools as chat templates and the fallback prompt show them.
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools.iter().map(tool_json).collect()
    }

    /// The Lark grammar of the calls `tool_choice` forces (`required` / named) in
    /// `format`, `None` for `auto` and `none`. With `content` (a JSON schema from
    /// `response_format`), `auto` may write either that document or calls.
    pub fn grammar(&self, content: Option<&Value>, format: ToolFormat) -> Option<String> {
        let tools: Vec<&Tool> = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto if content.is_none() => return None,
            ToolChoice::Auto | ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let options = json!({"item_separator": ", ", "key_separator": ": ",
            "whitespace_flexible": false});
        let calls: Vec<Value> = tools
            .iter()
            .map(|t| {
                let arguments = t.parameters.clone().unwrap_or_else(
                    || json!({"type": "object", "properties": {}, "additionalProperties": false}),
                );
                let key = match format {
                    ToolFormat::Hermes => "arguments",
                    ToolFormat::Llama3Json => "parameters",
                };
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, key: arguments},
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut call = if calls.len() == 1 {
            calls.into_iter().next().expect("one call; this is a bug")
        } else {
            json!({"anyOf": calls})
        };
        call["x-guidance"] = options;
        let many = self.parallel && !matches!(self.choice, ToolChoice::Named(_));
        let (separator, call_rule) = match format {
            ToolFormat::Hermes => (
                r#""\n""#.to_string(),
                format!(r#""{}\n" body "\n{}""#, parser::OPEN, parser::CLOSE),
            ),
            ToolFormat::Llama3Json => (r#""; ""#.to_string(), "body".to_string()),
        };
        let calls_rule = if many {
            format!("call ({separator} call)*")
        } else {
            "call".to_string()
        };
        let start = if content.is_some() && self.choice == ToolChoice::Auto {
            "calls | content"
        } else {
            "calls"
        };
        let mut grammar =
            format!("start: {start}\ncalls: {calls_rule}\ncall: {call_rule}\nbody: %json {call}\n");
        if let Some(schema) = content
            && self.choice == ToolChoice::Auto
        {
            let schema = JsonLayout::default().apply(schema.clone());
            grammar.push_str(&format!("content: %json {schema}\n"));
        }
        Some(grammar)
    }
}

/// A tool as `{"type": "function", "function": {"name", "description", "parameters"}}`.
fn tool_json(tool: &Tool) -> Value {
    let mut function = json!({"name": tool.name});
    if let Some(d) = &tool.description {
        function["description"] = json!(d);
    }
    if let Some(p) = &tool.parameters {
        function["parameters"] = p.clone();
    }
    json!({"type": "function", "function": function})
}

/// Whether `template` renders tools itself (it reads the `tools` variable).
pub fn template_supports_tools(template: &ChatTemplate) -> bool {
    template.mentions("tools")
}

/// The format calls are written in with `template`: a Llama 3 tool template writes
/// `<|python_tag|>` and asks for JSON calls; every other template, and the fallback
/// prompt, uses Hermes' `<tool_call>` blocks.
pub fn format_of(template: &ChatTemplate) -> ToolFormat {
    if template_supports_tools(template) && template.mentions(parser::PYTHON_TAG) {
        ToolFormat::Llama3Json
    } else {
        ToolFormat::Hermes
    }
}

/// The conversation and tools to render. Templates with tool support get both as they
/// are (`tools` only when offered); others get the Hermes fallback described in the
/// module doc, which also rewrites earlier calls and tool results.
pub fn prepare(
    template: &ChatTemplate,
    messages: Vec<Message>,
    tools: Option<&ToolUse>,
) -> (Vec<Message>, Option<Vec<Value>>) {
    let offered = tools.filter(|t| t.active()).map(ToolUse::template_tools);
    if template_supports_tools(template) {
        return (messages, offered);
    }
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let mut content = m.content.clone();
                for call in m.tool_calls.iter().flatten() {
                    let f = &call["function"];
                    let body = json!({"name": f["name"], "arguments": f["arguments"]});
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&format!("{}\n{body}\n{}", parser::OPEN, parser::CLOSE));
                }
                out.push(Message::new("assistant", content));
            }
            "tool" => {
                let response = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // Consecutive results share one user turn.
                match out.last_mut() {
                    Some(last)
                        if last.role == "user" && last.content.ends_with("</tool_response>") =>
                    {
                        last.content.push('\n');
                        last.content.push_str(&response);
                    }
                    _ => out.push(Message::new("user", response)),
                }
            }
            _ => out.push(m),
        }
    }
    if let Some(tools) = offered {
        let block = fallback_prompt(&tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{block}", first.content);
            }
            _ => out.insert(0, Message::new("system", block)),
        }
    }
    (out, None)
}

/// The tools section of the fallback system prompt (Hermes format).
fn fallback_prompt(tools: &[Value]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to help with the user's request. \
         The functions you can call are described inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, write a JSON object with its name and arguments \
         inside <tool_call></tool_call>, one call per block:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call>",
    );
    s
}

#[cfg(test)]
mod tests {
    use shardline_constraint::testing::{byte_tokenizer_json, bytes};
    use shardline_constraint::{ConstraintCompiler, lark};

    use super::*;
    use shardline_engine::testing::TEST_CHAT_TEMPLATE;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: Some(json!({"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false})),
            strict: None,
        }
    }

    fn time() -> Tool {
        Tool {
            name: "get_time".into(),
            description: None,
            parameters: None,
            strict: None,
        }
    }

    fn uses(choice: ToolChoice, parallel: bool) -> ToolUse {
        ToolUse {
            tools: vec![weather(), time()],
            choice,
            parallel,
        }
    }

    fn compiler() -> ConstraintCompiler {
        ConstraintCompiler::new(&byte_tokenizer_json(), &[0], 259).unwrap()
    }

    fn accepts(grammar: &str, text: &str) -> bool {
        let mut s = compiler().compile(&lark(grammar)).unwrap();
        s.advance(&bytes(text)).is_ok()
            && (s.is_finished() || s.allowed_tokens().unwrap().allows(0))
    }

    #[test]
    fn validation_names_the_field() {
        let mut u = uses(ToolChoice::Named("nope".into()), true);
        let field = |u: &ToolUse| match u.validate().unwrap_err() {
            ApiError::Invalid { param, .. } => param.unwrap(),
            e => panic!("{e:?}"),
        };
        assert_eq!(field(&u), "tool_choice");
        u.choice = ToolChoice::Auto;
        u.tools[1].name = "get weather!".into();
        assert_eq!(field(&u), "tools[1].function.name");
        u.tools[1].name = "get_weather".into();
        assert_eq!(field(&u), "tools[1].function.name");
        u.tools[1] = time();
        u.tools[1].parameters = Some(json!([1]));
        assert_eq!(field(&u), "tools[1].function.parameters");
        assert!(uses(ToolChoice::Required, true).validate().is_ok());
    }

    #[test]
    fn required_calls_follow_the_schemas() {
        let g = uses(ToolChoice::Required, true)
            .grammar(None, ToolFormat::Hermes)
            .unwrap();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"c\"}}\n</tool_call>";
        let other = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        assert!(accepts(&g, call));
        assert!(accepts(&g, &format!("{call}\n{other}")));
        assert!(!accepts(&g, "Sure!"));
        assert!(!accepts(
            &g,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 3"
        ));
        let single = uses(ToolChoice::Required, false)
            .grammar(None, ToolFormat::Hermes)
            .unwrap();
        let mut s = compiler().compile(&lark(&single)).unwrap();
        s.advance(&bytes(call)).unwrap();
        assert!(s.is_finished(), "one call only without parallel calls");
    }

    #[test]
    fn a_named_choice_allows_that_function_only() {
        let g = uses(ToolChoice::Named("get_time".into()), true)
            .grammar(None, ToolFormat::Hermes)
            .unwrap();
        assert!(accepts(
            &g,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(!accepts(&g, "<tool_call>\n{\"name\": \"get_weather\""));
    }

    #[test]
    fn llama3_calls_are_json_objects_with_parameters() {
        let template = ChatTemplate::new(
            "{% for t in tools %}{{ t }}{% endfor %}<|python_tag|>",
            None,
            None,
        )
        .unwrap();
        assert_eq!(format_of(&template), ToolFormat::Llama3Json);
        let plain = ChatTemplate::new(TEST_CHAT_TEMPLATE, None, None).unwrap();
        assert_eq!(format_of(&plain), ToolFormat::Hermes);
        let g = uses(ToolChoice::Required, true)
            .grammar(None, ToolFormat::Llama3Json)
            .unwrap();
        let one = "{\"name\": \"get_time\", \"parameters\": {}}";
        assert!(accepts(&g, one));
        assert!(accepts(&g, &format!("{one}; {one}")));
        assert!(!accepts(&g, "<tool_call>"));
    }

    #[test]
    fn auto_is_free_unless_a_response_format_constrains_the_content() {
        assert!(
            uses(ToolChoice::Auto, true)
                .grammar(None, ToolFormat::Hermes)
                .is_none()
        );
        assert!(
            uses(ToolChoice::None, true)
                .grammar(None, ToolFormat::Hermes)
                .is_none()
        );
        let g = uses(ToolChoice::Auto, true)
            .grammar(
                Some(
                    &json!({"type": "object", "properties": {"a": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false}),
                ),
                ToolFormat::Hermes,
            )
            .unwrap();
        assert!(accepts(&g, "{\"a\": 3}") || accepts(&g, "{\"a\":3}"));
        assert!(accepts(
            &g,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        ));
    }

    #[test]
    fn fallback_prompt_shows_tools_and_rewrites_history() {
        let template = ChatTemplate::new(TEST_CHAT_TEMPLATE, None, None).unwrap();
        assert!(!template_supports_tools(&template));
        let call = json!({"id": "c1", "type": "function",
            "function": {"name": "get_time", "arguments": {}}});
        let messages = vec![
            Message::new("user", "time?"),
            Message {
                tool_calls: Some(vec![call]),
                ..Message::new("assistant", "")
            },
            Message {
                tool_call_id: Some("c1".into()),
                ..Message::new("tool", "12:00")
            },
        ];
        let u = uses(ToolChoice::Auto, true);
        let (out, tools) = prepare(&template, messages, Some(&u));
        assert!(tools.is_none());
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains("<tools>\n{\"type\":\"function\""));
        assert!(out[0].content.contains("get_weather"));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\":\"get_time\",\"arguments\":{}}\n</tool_call>"
        );
        assert_eq!(out[3].role, "user");
        assert_eq!(out[3].content, "<tool_response>\n12:00\n</tool_response>");
        // tool_choice none: no tools shown, history still rewritten.
        let none = uses(ToolChoice::None, true);
        let (out, _) = prepare(&template, vec![Message::new("user", "hi")], Some(&none));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn templates_with_tools_get_them_as_they_are() {
        let template = ChatTemplate::new(
            "{% for t in tools %}{{ t.function.name }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let (out, tools) = prepare(
            &template,
            vec![Message::new("user", "q")],
            Some(&uses(ToolChoice::Required, true)),
        );
        assert_eq!(out, vec![Message::new("user", "q")]);
        assert_eq!(tools.unwrap().len(), 2);
    }

    #[test]
    fn finish_reason_follows_openai() {
        let c = |choice| ToolCalling {
            choice,
            parallel: true,
            format: ToolFormat::Hermes,
        };
        assert_eq!(c(ToolChoice::Named("f".into())).finish_reason(), "stop");
        assert_eq!(c(ToolChoice::Required).finish_reason(), "tool_calls");
        assert_eq!(c(ToolChoice::Auto).finish_reason(), "tool_calls");
    }
}
