//! Structured outputs as requests ask for them — OpenAI's `response_format` (`json_object`,
//! `json_schema` with `strict`) and vLLM's extensions (`structured_outputs` with `json`,
//! `regex`, `choice`, `grammar`, `json_object`; the older `guided_json`, `guided_regex`,
//! `guided_choice`, `guided_grammar`) — turned into the worker protocol's
//! [`Constraint`], which workers enforce token by token.
//!
//! Every constraint is compiled here once ([`ConstraintCompiler::check`]), so a schema or
//! grammar llguidance cannot enforce gets a 400 naming the field and the problem instead
//! of failing on a worker.
//!
//! JSON whitespace: between two JSON tokens the output may put at most one line break
//! and 20 spaces or tabs ([`JSON_WHITESPACE`]: enough for pretty-printed JSON), unless the request sets vLLM's `whitespace_pattern` or `disable_any_whitespace`.
//! Unbounded whitespace lets a small model fill `max_tokens` with blank lines — the
//! failure OpenAI's JSON-mode documentation warns about, and what SmolLM2 does when it
//! samples at temperature 0.8.

use serde_json::{Value, json};
use shardline_constraint::{self as constraint, ConstraintCompiler, ConstraintError};
use shardline_proto::worker::v1::Constraint;

use crate::error::ApiError;

/// The whitespace allowed between two JSON tokens by default: a line break and up to 20
/// spaces or tabs, or one to 20 spaces or tabs.
pub const JSON_WHITESPACE: &str = r"\r?\n[\x20\x09]{0,20}|[\x20\x09]{1,20}";

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A document valid under `schema`. `strict` is OpenAI's flag; the schema is enforced
    /// exactly either way.
    JsonSchema { schema: Value, strict: bool },
    /// A regular expression the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Grammar(String),
}

/// JSON layout options (vLLM's `structured_outputs` knobs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonLayout {
    /// No whitespace at all between JSON tokens.
    pub disable_any_whitespace: bool,
    /// The whitespace allowed between JSON tokens, as a regex.
    pub whitespace_pattern: Option<String>,
    /// Objects that do not say otherwise get `additionalProperties: false`.
    pub disable_additional_properties: bool,
}

/// A request's structured-output demand, with the field it came from (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredOutput {
    pub format: OutputFormat,
    pub layout: JsonLayout,
    /// The request field that asked for it (`response_format`, `guided_json`, ...).
    pub field: String,
}

impl StructuredOutput {
    pub fn new(field: impl Into<String>, format: OutputFormat) -> Self {
        Self {
            format,
            layout: JsonLayout::default(),
            field: field.into(),
        }
    }

    /// The constraint workers enforce. Only the shape is checked here; see [`check`].
    pub fn to_constraint(&self) -> Result<Constraint, ApiError> {
        let field = &self.field;
        Ok(match &self.format {
            OutputFormat::JsonObject => {
                constraint::json_schema(&self.layout.apply(json!({"type": "object"})))
            }
            OutputFormat::JsonSchema { schema, .. } => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ApiError::invalid(
                        field.clone(),
                        "the JSON schema must be an object",
                    ));
                }
                constraint::json_schema(&self.layout.apply(schema.clone()))
            }
            OutputFormat::Regex(regex) => {
                if regex.is_empty() {
                    return Err(ApiError::invalid(field.clone(), "the regex is empty"));
                }
                constraint::regex(regex.clone())
            }
            OutputFormat::Choice(choices) => {
                if choices.is_empty() {
                    return Err(ApiError::invalid(
                        field.clone(),
                        "the list of choices is empty",
                    ));
                }
                constraint::regex(choice_regex(choices))
            }
            OutputFormat::Grammar(grammar) => {
                if grammar.trim().is_empty() {
                    return Err(ApiError::invalid(field.clone(), "the grammar is empty"));
                }
                constraint::lark(grammar.clone())
            }
        })
    }
}

impl JsonLayout {
    /// `schema` with llguidance's `x-guidance` compile options for this layout (options
    /// the schema already sets itself are kept).
    pub fn apply(&self, mut schema: Value) -> Value {
        if self.disable_additional_properties {
            close_objects(&mut schema);
        }
        let Value::Object(map) = &mut schema else {
            // `true` / `false` schemas: wrap so the options have somewhere to live.
            return self.apply(json!({"allOf": [schema]}));
        };
        if let Some(options) = map
            .entry("x-guidance")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            && !options.contains_key("whitespace_flexible")
            && !options.contains_key("whitespace_pattern")
        {
            options.insert("whitespace_flexible".into(), json!(false));
            if !self.disable_any_whitespace {
                let pattern = self
                    .whitespace_pattern
                    .clone()
                    .unwrap_or_else(|| JSON_WHITESPACE.to_string());
                options.insert("whitespace_pattern".into(), json!(pattern));
            }
        }
        schema
    }
}

/// Sets `additionalProperties: false` on every object schema that leaves it open.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_object =
                map.get("type").is_some_and(|t| t == "object") || map.contains_key("properties");
            if is_object && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), json!(false));
            }
            for (key, value) in map.iter_mut() {
                if key != "const" && key != "enum" && key != "default" && key != "examples" {
                    close_objects(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// A regex matching exactly one of `choices`.
fn choice_regex(choices: &[String]) -> String {
    let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
    format!("(?:{})", alternatives.join("|"))
}

/// Compiles `constraint` for the served model: a 400 naming `field` when it cannot be
/// enforced.
pub fn check(
    compiler: Result<&ConstraintCompiler, &str>,
    constraint: &Constraint,
    field: &str,
) -> Result<(), ApiError> {
    let compiler = compiler.map_err(|e| {
        ApiError::invalid(
            field,
            format!("structured outputs are unavailable for this model: {e}"),
        )
    })?;
    compiler.check(constraint).map_err(|e| match e {
        ConstraintError::Invalid(why) => {
            ApiError::invalid(field, format!("`{field}` cannot be enforced: {why}"))
        }
        other => ApiError::invalid(field, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use shardline_constraint::testing::byte_tokenizer_json;
    use shardline_proto::worker::v1::constraint::Kind;

    use super::*;

    fn compiler() -> ConstraintCompiler {
        ConstraintCompiler::new(&byte_tokenizer_json(), &[0], 259).unwrap()
    }

    fn schema_of(c: &Constraint) -> Value {
        match &c.kind {
            Some(Kind::JsonSchema(s)) => serde_json::from_str(s).unwrap(),
            other => panic!("not a schema: {other:?}"),
        }
    }

    #[test]
    fn json_gets_bounded_whitespace_unless_the_request_says_otherwise() {
        let s = StructuredOutput::new("response_format", OutputFormat::JsonObject);
        let schema = schema_of(&s.to_constraint().unwrap());
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], false);
        assert_eq!(schema["x-guidance"]["whitespace_pattern"], JSON_WHITESPACE);
        let mut s = s;
        s.layout.disable_any_whitespace = true;
        let schema = schema_of(&s.to_constraint().unwrap());
        assert!(schema["x-guidance"].get("whitespace_pattern").is_none());
        // A schema's own options win.
        let s = StructuredOutput::new(
            "guided_json",
            OutputFormat::JsonSchema {
                schema: json!({"type": "integer", "x-guidance": {"whitespace_flexible": true}}),
                strict: false,
            },
        );
        let schema = schema_of(&s.to_constraint().unwrap());
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], true);
    }

    #[test]
    fn default_whitespace_allows_pretty_json_but_one_line_break_per_gap() {
        let c = StructuredOutput::new(
            "response_format",
            OutputFormat::JsonSchema {
                schema: json!({"type": "array", "items": {"type": "integer"}}),
                strict: true,
            },
        )
        .to_constraint()
        .unwrap();
        let compiler = compiler();
        let fits = |text: &str| {
            let mut s = compiler.compile(&c).unwrap();
            s.advance(&shardline_constraint::testing::bytes(text))
                .is_ok()
        };
        assert!(fits("[\n  1,\n  2\n]"));
        assert!(fits("[1, 2]"));
        assert!(fits("[1,2]"));
        assert!(!fits("[\n\n1"), "two line breaks in one gap");
        assert!(!fits(&format!("[{}1", " ".repeat(21))));
    }

    #[test]
    fn disable_additional_properties_closes_open_objects_only() {
        let mut s = StructuredOutput::new(
            "structured_outputs.json",
            OutputFormat::JsonSchema {
                schema: json!({"type": "object", "properties": {
                    "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                    "c": {"type": "object", "additionalProperties": true},
                }}),
                strict: true,
            },
        );
        s.layout.disable_additional_properties = true;
        let schema = schema_of(&s.to_constraint().unwrap());
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["c"]["additionalProperties"], true);
    }

    #[test]
    fn choices_are_literal_strings() {
        let s = StructuredOutput::new(
            "guided_choice",
            OutputFormat::Choice(vec!["a.b".into(), "(x)".into(), "yes|no".into()]),
        );
        let c = s.to_constraint().unwrap();
        let compiler = compiler();
        check(Ok(&compiler), &c, "guided_choice").unwrap();
        let mut state = compiler.compile(&c).unwrap();
        state
            .advance(&shardline_constraint::testing::bytes("yes|no"))
            .unwrap();
        assert!(state.is_finished());
    }

    #[test]
    fn bad_demands_name_their_field() {
        let compiler = compiler();
        let cases = [
            (
                StructuredOutput::new("guided_regex", OutputFormat::Regex("[".into())),
                "guided_regex",
            ),
            (
                StructuredOutput::new(
                    "response_format",
                    OutputFormat::JsonSchema {
                        schema: json!({"type": "object", "properties": {"a": {"type": "nope"}}}),
                        strict: true,
                    },
                ),
                "response_format",
            ),
            (
                StructuredOutput::new("guided_grammar", OutputFormat::Grammar("start: x".into())),
                "guided_grammar",
            ),
        ];
        for (s, field) in cases {
            let c = s.to_constraint().unwrap();
            match check(Ok(&compiler), &c, &s.field).unwrap_err() {
                ApiError::Invalid { param, message } => {
                    assert_eq!(param.as_deref(), Some(field));
                    assert!(message.contains(field), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        for empty in [
            OutputFormat::Choice(vec![]),
            OutputFormat::Regex(String::new()),
            OutputFormat::Grammar(" ".into()),
            OutputFormat::JsonSchema {
                schema: json!(3),
                strict: false,
            },
        ] {
            let s = StructuredOutput::new("structured_outputs", empty);
            assert!(s.to_constraint().is_err());
        }
        let err = check(Err("no trie"), &constraint::regex("a"), "response_format").unwrap_err();
        assert!(err.to_string().contains("no trie"));
    }
}
