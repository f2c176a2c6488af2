//! Chat templates: the model's own Jinja template (`tokenizer.chat_template` in a GGUF,
//! `chat_template` in `tokenizer_config.json`) rendered with `minijinja`.
//!
//! The worker only reads the template from the model and ships it in `Info`; the
//! coordinator renders prompts with it, here. A model without a template gets plain
//! ChatML.
//!
//! The environment mimics Hugging Face's `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, `raise_exception(msg)` raising a render error, `strftime_now(fmt)`,
//! and the Python string/dict methods HF templates call (`.strip()`, `.startswith()`,
//! `.split()`, `.items()`, `.get()`, ...) through an unknown-method callback.
//!
//! ```
//! use shardline_coordinator::chat_template::{ChatMessage, ChatTemplate};
//! let t = ChatTemplate::new(
//!     "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}",
//!     None,
//!     None,
//! )
//! .unwrap();
//! let out = t.render(&[ChatMessage::new("user", " hi ")], false).unwrap();
//! assert_eq!(out, "<user>hi\n");
//! ```

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, State};
use serde::{Deserialize, Serialize};

/// The names the coordinator's request types use.
pub use self::{ChatMessage as Message, ChatTemplateError as TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0:#}")]
    Compile(JinjaError),
    #[error("chat template failed to render: {0:#}")]
    Render(JinjaError),
}

/// One chat message as the templates see it (`message['role']`, `message['content']`,
/// and for tool use `message['tool_calls']`, `message['tool_call_id']`,
/// `message['name']`, absent unless set, as Hugging Face passes them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`, the arguments as an object where they parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// What a template renders: the conversation, the tools on offer (Hugging Face's `tools`
/// variable: `[{"type": "function", "function": {...}}]`, absent when `None`) and
/// whether to open the assistant's turn.
#[derive(Serialize)]
struct RenderContext<'a> {
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [serde_json::Value]>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

const TEMPLATE_NAME: &str = "chat";

/// The template used when a model ships none.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A compiled chat template. Cheap to render many times; `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's source (to tell what it supports, e.g. tools).
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (empty: [`CHATML`]); `bos_token` / `eos_token` are exposed to
    /// the template as variables of the same names (empty strings when the model has none).
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatTemplateError> {
        let source = if source.trim().is_empty() {
            CHATML
        } else {
            source
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(ChatTemplateError::Compile)?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// Renders the conversation. `add_generation_prompt` appends the header that makes the
    /// model answer as the assistant.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with the tools on offer passed as the template's `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        template
            .render(Value::from_serialize(RenderContext {
                messages,
                tools,
                add_generation_prompt,
                bos_token: &self.bos_token,
                eos_token: &self.eos_token,
            }))
            .map_err(ChatTemplateError::Render)
    }

    /// Whether the template's source contains `needle` (e.g. whether it reads `tools`).
    pub fn mentions(&self, needle: &str) -> bool {
        self.source.contains(needle)
    }
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)` as Llama 3 templates use it for "Today Date". Only the directives
/// those templates use are supported (`%d %b %Y %m %B %H %M %S %%`), computed in UTC.
fn strftime_now(format: String) -> Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(format_utc(secs, &format)))
}

fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn str_arg<'a>(args: &'a [Value], i: usize, method: &str) -> Result<Option<&'a str>, JinjaError> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("{method}() expects a string argument"),
            )
        }),
    }
}

/// Python methods HF chat templates call on strings and dicts.
fn python_methods(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    let unknown = || {
        JinjaError::new(
            ErrorKind::UnknownMethod,
            format!("{} has no method named {method}", value.kind()),
        )
    };
    if let Some(s) = value.as_str() {
        let chars = str_arg(args, 0, method)?;
        let strip_set = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(strip_set)),
            "lstrip" => Value::from(s.trim_start_matches(strip_set)),
            "rstrip" => Value::from(s.trim_end_matches(strip_set)),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" => Value::from(title_case(s)),
            "startswith" => Value::from(chars.is_some_and(|p| s.starts_with(p))),
            "endswith" => Value::from(chars.is_some_and(|p| s.ends_with(p))),
            "split" => {
                let parts: Vec<Value> = match chars {
                    Some(sep) if !sep.is_empty() => s.split(sep).map(Value::from).collect(),
                    _ => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "replace" => {
                let (Some(from), Some(to)) = (chars, str_arg(args, 1, method)?) else {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "replace() takes two strings",
                    ));
                };
                Value::from(s.replace(from, to))
            }
            "find" => Value::from(
                chars
                    .and_then(|p| s.find(p))
                    .map_or(-1, |i| s[..i].chars().count() as i64),
            ),
            "count" => Value::from(chars.map_or(0, |p| s.matches(p).count())),
            _ => return Err(unknown()),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let mut items = Vec::new();
                for key in value.try_iter()? {
                    let v = value.get_item(&key)?;
                    items.push(Value::from(vec![key, v]));
                }
                Ok(Value::from(items))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut values = Vec::new();
                for key in value.try_iter()? {
                    values.push(value.get_item(&key)?);
                }
                Ok(Value::from(values))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or(Value::UNDEFINED);
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        };
    }
    Err(unknown())
}

fn title_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.extend(c.to_lowercase());
        }
        start = !c.is_alphanumeric();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>")).unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "What is 2+2?")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_chatml_with_own_system_prompt_and_no_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        let msgs = [
            ChatMessage::new("system", "Be terse."),
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "hello"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nhello<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            None,
            None,
        )
        .unwrap();
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
            "ok"
        );
    }

    #[test]
    fn python_string_methods_and_bos_token() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() | upper }}|{{ m.content.lstrip() }}|{{ m.content.rstrip() }}|{{ m.role.startswith('us') }}|{{ m.content.split(',') | length }}{% endfor %}",
            Some("<s>"),
            None,
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  a,b ")], false)
            .unwrap();
        assert_eq!(out, "<s>A,B|a,b |  a,b|True|2");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "    a\n    b\n");
    }

    #[test]
    fn tools_and_tool_calls_reach_the_template_only_when_set() {
        let t = ChatTemplate::new(
            "{% if tools is defined %}{{ tools[0].function.name }};{% endif %}{% for m in messages %}{{ m.role }}{% if m.tool_calls is defined %}:{{ m.tool_calls[0].function.arguments.x }}{% endif %}{% if m.tool_call_id is defined %}@{{ m.tool_call_id }}{% endif %};{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert!(t.mentions("tools"));
        let call = serde_json::json!({"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": {"x": 7}}});
        let msgs = [
            ChatMessage::new("user", "q"),
            ChatMessage {
                tool_calls: Some(vec![call]),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("c1".into()),
                ..ChatMessage::new("tool", "42")
            },
        ];
        assert_eq!(t.render(&msgs, false).unwrap(), "user;assistant:7;tool@c1;");
        let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
        assert_eq!(
            t.render_with_tools(&msgs[..1], Some(&tools), false)
                .unwrap(),
            "f;user;"
        );
    }

    #[test]
    fn empty_template_falls_back_to_chatml() {
        let t = ChatTemplate::new("", None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "a")], true).unwrap(),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn bad_template_is_a_compile_error() {
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Compile(_)), "{err}");
    }

    #[test]
    fn utc_formatting() {
        // 2024-02-29 13:05:09 UTC
        assert_eq!(
            format_utc(1_709_211_909, "%d %b %Y %H:%M:%S %B %m %%"),
            "29 Feb 2024 13:05:09 February 02 %"
        );
    }
}
