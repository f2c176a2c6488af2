//! Structured outputs, shared by both sides: a worker-protocol [`Constraint`] (JSON
//! schema, regex or Lark grammar) compiled by [llguidance] against the model's tokenizer.
//!
//! - Coordinators compile a request's constraint once ([`ConstraintCompiler::check`]) so
//!   that a bad schema or grammar gets a 400 naming the problem before anything runs.
//! - Workers compile it per sequence ([`ConstraintCompiler::compile`]) and, every step,
//!   ask the [`ConstraintState`] which tokens may come next ([`TokenMask`]); the sampler
//!   masks the logits with it, and the sampled token advances the state.
//!
//! The token trie comes from the tokenizer's `tokenizer.json` (what workers ship in
//! `Info`) through `toktrie_hf_tokenizers`; every model EOS id ends a grammar. Building
//! it walks the whole vocabulary, so a [`ConstraintCompiler`] is built once per model
//! and shared; compiling one constraint takes about a millisecond for a typical schema.
//!
//! ```
//! use shardline_constraint::{json_schema, ConstraintCompiler};
//! # let tokenizer_json = shardline_constraint::testing::byte_tokenizer_json();
//! let compiler = ConstraintCompiler::new(&tokenizer_json, &[0], 259).unwrap();
//! let schema = json_schema(&serde_json::json!({"type": "integer"}));
//! let mut state = compiler.compile(&schema).unwrap();
//! assert!(state.allowed_tokens().unwrap().allows(3 + b'7' as u32));
//! ```
//!
//! [llguidance]: https://github.com/guidance-ai/llguidance

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory};
use toktrie_hf_tokenizers::ByteTokenizer;

use shardline_proto::worker::v1::Constraint;
use shardline_proto::worker::v1::constraint::Kind;

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema or grammar is malformed or uses something llguidance cannot enforce;
    /// the message says what (a client error).
    #[error("{0}")]
    Invalid(String),
    /// This model's tokenizer cannot drive a constraint (the trie could not be built).
    #[error("structured outputs are unavailable for this model's tokenizer: {0}")]
    Unavailable(String),
    /// A token the grammar does not allow was pushed (a migrated sequence whose generated
    /// tokens do not fit its grammar), or llguidance failed mid-sequence.
    #[error("constraint violated: {0}")]
    Violated(String),
}

/// Compiles constraints for one model. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl ConstraintCompiler {
    /// The token trie of `tokenizer_json` padded to `vocab_size` (the width of a logits
    /// row, which may exceed the tokenizer's), ended by any of `eos_token_ids`.
    pub fn new(
        tokenizer_json: &str,
        eos_token_ids: &[u32],
        vocab_size: usize,
    ) -> Result<Self, ConstraintError> {
        let mut tokenizer =
            ByteTokenizer::from_json_bytes(tokenizer_json.as_bytes()).map_err(unavailable)?;
        let size = tokenizer.tokrx_info().vocab_size as usize;
        let eos: Vec<u32> = eos_token_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < size)
            .collect();
        if !eos.is_empty() {
            tokenizer.set_eos_tokens(&eos);
        }
        let env = tokenizer
            .into_tok_env(Some(vocab_size.max(size)))
            .map_err(unavailable)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(unavailable)?;
        // Problems come back as errors; nothing goes to the process's stderr.
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// Width of the masks this compiler's states produce.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// Compiles `constraint` into a fresh state (at the start of the output).
    pub fn compile(&self, constraint: &Constraint) -> Result<ConstraintState, ConstraintError> {
        let grammar = match &constraint.kind {
            None => {
                return Err(ConstraintError::Invalid(
                    "the constraint names no schema, regex or grammar".into(),
                ));
            }
            Some(Kind::JsonSchema(text)) => {
                let schema: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    ConstraintError::Invalid(format!("the JSON schema is not valid JSON: {e}"))
                })?;
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ConstraintError::Invalid(
                        "a JSON schema must be an object or a boolean".into(),
                    ));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Some(Kind::Regex(regex)) => TopLevelGrammar::from_regex(regex),
            Some(Kind::Lark(lark)) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Invalid(tidy(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // A grammar that admits no output at all is as useless as a malformed one.
        let mask = matcher
            .compute_mask()
            .map_err(|e| ConstraintError::Invalid(tidy(&e.to_string())))?;
        if mask.is_zero() {
            return Err(ConstraintError::Invalid(
                "the grammar allows no output at all".into(),
            ));
        }
        Ok(ConstraintState {
            matcher,
            mask: Some(TokenMask(mask)),
        })
    }

    /// Compiles `constraint` and drops it: `Err` says why a request cannot use it.
    pub fn check(&self, constraint: &Constraint) -> Result<(), ConstraintError> {
        self.compile(constraint).map(drop)
    }
}

/// llguidance reports errors through `anyhow`; only their text crosses this module.
fn unavailable(e: impl std::fmt::Display) -> ConstraintError {
    ConstraintError::Unavailable(e.to_string())
}

/// llguidance's message, kept readable: compile errors point into the grammar over a few
/// lines (kept); errors mid-sequence may append the parser state and the whole grammar
/// (cut after [`MAX_ERROR_LINES`] lines).
fn tidy(message: &str) -> String {
    let lines: Vec<&str> = message.trim().lines().collect();
    let mut out = lines[..lines.len().min(MAX_ERROR_LINES)].join("\n");
    if lines.len() > MAX_ERROR_LINES {
        out.push_str("\n...");
    }
    out
}

/// Lines of an llguidance error kept in ours.
const MAX_ERROR_LINES: usize = 8;

/// One sequence's position in its grammar.
pub struct ConstraintState {
    matcher: Matcher,
    /// The mask of the current position, when already computed (compiling computes the
    /// first one to check that the grammar admits some output).
    mask: Option<TokenMask>,
}

impl std::fmt::Debug for ConstraintState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintState")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl ConstraintState {
    /// The tokens that may come next (EOS among them once the grammar may end). Costs
    /// up to a few hundred microseconds; computed once per position.
    pub fn allowed_tokens(&mut self) -> Result<&TokenMask, ConstraintError> {
        if self.mask.is_none() {
            // A stopped grammar (complete, nothing may follow) allows only EOS.
            let mask = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| ConstraintError::Violated(tidy(&e.to_string())))?;
            self.mask = Some(TokenMask(mask));
        }
        Ok(self.mask.as_ref().expect("set above; this is a bug"))
    }

    /// Moves past `tokens` (the sampled token, or a migrated sequence's earlier output).
    pub fn advance(&mut self, tokens: &[u32]) -> Result<(), ConstraintError> {
        if tokens.is_empty() {
            return Ok(());
        }
        self.mask = None;
        self.matcher
            .consume_tokens(tokens)
            .map_err(|e| ConstraintError::Violated(tidy(&e.to_string())))
    }

    /// The grammar is complete and admits nothing more: the output ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// A set of token ids as a bitmap: bit `t % 32` of word `t / 32` is set when token `t`
/// is allowed.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }

    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

/// A [`Constraint`] holding `schema` (for callers and tests).
pub fn json_schema(schema: &serde_json::Value) -> Constraint {
    Constraint {
        kind: Some(Kind::JsonSchema(schema.to_string())),
    }
}

/// A [`Constraint`] holding a regular expression.
pub fn regex(regex: impl Into<String>) -> Constraint {
    Constraint {
        kind: Some(Kind::Regex(regex.into())),
    }
}

/// A [`Constraint`] holding a Lark grammar.
pub fn lark(grammar: impl Into<String>) -> Constraint {
    Constraint {
        kind: Some(Kind::Lark(grammar.into())),
    }
}

/// A tiny tokenizer for tests and doc examples of crates that use constraints.
#[doc(hidden)]
pub mod testing {
    /// A byte-level BPE `tokenizer.json` without merges: `<|endoftext|>` = 0,
    /// `<|im_start|>` = 1, `<|im_end|>` = 2, then one token per byte (byte `b` is token
    /// `3 + b`), 259 tokens in all.
    pub fn byte_tokenizer_json() -> String {
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let mut vocab = serde_json::Map::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), i.into());
        }
        for b in 0..=255u8 {
            vocab.insert(byte_char(b).to_string(), (3 + b as usize).into());
        }
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null,
            "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []},
        })
        .to_string()
    }

    /// GPT-2's printable stand-in for byte `b` in byte-level vocabularies.
    fn byte_char(b: u8) -> char {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            return b as char;
        }
        let shifted = (0..b)
            .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
            .count();
        char::from_u32(256 + shifted as u32).expect("a valid char; this is a bug")
    }

    /// Token ids of `text` in [`byte_tokenizer_json`] (one per byte).
    pub fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(|b| 3 + b as u32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{byte_tokenizer_json, bytes};
    use super::*;

    const EOS: u32 = 0;

    fn compiler() -> ConstraintCompiler {
        ConstraintCompiler::new(&byte_tokenizer_json(), &[EOS, 2], 300).unwrap()
    }

    fn walk(state: &mut ConstraintState, text: &str) {
        state.advance(&bytes(text)).unwrap();
    }

    #[test]
    fn masks_are_as_wide_as_the_logits_row() {
        let c = compiler();
        assert_eq!(c.vocab_size(), 300);
        let mut s = c.compile(&regex("ab")).unwrap();
        let mask = s.allowed_tokens().unwrap();
        assert!(mask.allows(bytes("a")[0]));
        assert_eq!(mask.count(), 1);
        assert!(!mask.allows(299));
        assert!(!mask.allows(10_000));
    }

    #[test]
    fn json_schema_guides_to_a_valid_document_then_only_eos() {
        let c = compiler();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["n"],
            "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false},
        });
        let mut s = c.compile(&json_schema(&schema)).unwrap();
        assert!(s.allowed_tokens().unwrap().allows(bytes("{")[0]));
        assert!(!s.allowed_tokens().unwrap().allows(bytes(" ")[0]));
        walk(&mut s, r#"{"n":"#);
        let m = s.allowed_tokens().unwrap();
        assert!(m.allows(bytes("3")[0]));
        assert!(!m.allows(bytes("7")[0]), "maximum 5");
        assert!(!m.allows(EOS));
        walk(&mut s, "3}");
        let m = s.allowed_tokens().unwrap();
        assert!(m.allows(EOS) && m.allows(2));
        assert_eq!(m.count(), 2, "only the EOS ids after the closing brace");
    }

    #[test]
    fn a_token_outside_the_grammar_is_a_violation() {
        let c = compiler();
        let mut s = c.compile(&regex("[0-9]+")).unwrap();
        let err = s.advance(&bytes("x")).unwrap_err();
        assert!(matches!(err, ConstraintError::Violated(_)), "{err}");
    }

    #[test]
    fn a_grammar_that_may_end_allows_eos_and_a_complete_one_finishes() {
        let c = compiler();
        let mut s = c.compile(&lark(r#"start: "no" | "nope""#)).unwrap();
        walk(&mut s, "no");
        assert!(!s.is_finished());
        let m = s.allowed_tokens().unwrap();
        assert!(m.allows(EOS) && m.allows(bytes("p")[0]));
        walk(&mut s, "pe");
        assert!(s.is_finished(), "nothing may follow \"nope\"");
        let m = s.allowed_tokens().unwrap();
        assert!(m.allows(EOS) && !m.allows(bytes("e")[0]));
    }

    #[test]
    fn bad_constraints_are_invalid_with_a_reason() {
        let c = compiler();
        let cases = [
            (
                Constraint {
                    kind: Some(Kind::JsonSchema("{not json".into())),
                },
                "not valid JSON",
            ),
            (
                json_schema(&serde_json::json!({"type": "object", "properties": 3})),
                "properties",
            ),
            (
                json_schema(&serde_json::json!({"type": "strnig"})),
                "strnig",
            ),
            (regex("(unclosed"), "unclosed group"),
            (lark("start: undefined_rule"), "undefined_rule"),
            (Constraint { kind: None }, "names no schema"),
        ];
        for (constraint, needle) in cases {
            let err = c.check(&constraint).unwrap_err();
            assert!(
                matches!(err, ConstraintError::Invalid(_)) && err.to_string().contains(needle),
                "{constraint:?}: {err}"
            );
        }
    }

    #[test]
    fn lark_embeds_json_schemas() {
        let c = compiler();
        let grammar = r#"start: "<c>" obj "</c>"
obj: %json {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}"#;
        let mut s = c.compile(&lark(grammar)).unwrap();
        walk(&mut s, r#"<c>{"a":true}</c>"#);
        assert!(s.allowed_tokens().unwrap().allows(EOS));
    }

    #[test]
    fn an_unusable_tokenizer_is_unavailable() {
        let err = ConstraintCompiler::new("{}", &[0], 10).unwrap_err();
        assert!(matches!(err, ConstraintError::Unavailable(_)), "{err}");
    }
}
