//! The model's tokenizer, from a GGUF file's `tokenizer.ggml.*` metadata or a Hugging Face
//! `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`).
//!
//! For GGUF we write the equivalent `tokenizer.json` ourselves and load it with the
//! `tokenizers` crate, so the worker can hand coordinators the exact same JSON in `Info`.
//! SentencePiece-BPE vocabularies (`"llama"`: Llama 2, TinyLlama, ...) are built in
//! [`spm`]. Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported with these
//! pre-tokenizers (`tokenizer.ggml.pre`), which follow llama.cpp's definitions:
//! - `smollm`, `starcoder`, `refact`, `codeshell`, ... : every digit split on its own
//!   (`\p{N}` isolated), then the GPT-2 byte-level split, no prefix space;
//! - `gpt2` / `default` / absent: the GPT-2 byte-level split;
//! - `llama-bpe` / `llama3`: Llama 3's split regex, then byte-level without its own regex.
//!
//! Control tokens (`token_type` 3) become special added tokens (never split, skipped by
//! `decode(.., skip_special = true)`); user-defined ones (4) become plain added tokens.
//! candle's `TokenizerFromGguf` is not used: it ignores `tokenizer.ggml.pre`, so it gets
//! digits (and thus SmolLM2) wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

pub mod gguf;
mod spm;

use gguf as gguf_file;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("invalid tokenizer: {0}")]
    Build(String),
    #[error("tokenizer failed: {0}")]
    Encode(String),
}

/// The tokenizer and the facts about it the worker reports in `Info`.
#[derive(Clone)]
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer` serialised as Hugging Face `tokenizer.json`.
    pub json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token that ends generation: the EOS id plus end-of-turn tokens (as llama.cpp
    /// treats `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, ... as end-of-generation).
    pub eos_token_ids: Vec<u32>,
    /// Whether prompts start with the BOS token (the post-processor adds it on encode).
    pub add_bos: bool,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// Token texts llama.cpp treats as end of generation when the vocabulary marks them control.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// Llama 3's pre-tokenizer split (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl ModelTokenizer {
    /// A GGUF file, or a Hugging Face model directory holding `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf_file(path)
        }
    }

    pub fn from_gguf_file(path: &Path) -> Result<Self, TokenizerError> {
        let file = std::fs::File::open(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        let metadata = gguf::read_metadata(std::io::BufReader::new(file)).map_err(|message| {
            TokenizerError::Gguf {
                path: path.to_owned(),
                message,
            }
        })?;
        Self::from_gguf_metadata(&metadata)
    }

    /// Builds the tokenizer from `tokenizer.ggml.*` / `tokenizer.chat_template`.
    pub fn from_gguf_metadata(
        md: &HashMap<String, gguf_file::Value>,
    ) -> Result<Self, TokenizerError> {
        let model = get_str(md, "tokenizer.ggml.model")?.unwrap_or("gpt2");
        if model != "gpt2" && model != "llama" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {model:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece BPE)"
            )));
        }
        let pre = get_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
        let tokens = get_str_array(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| TokenizerError::Metadata("tokenizer.ggml.tokens is missing".into()))?;
        let merges = get_str_array(md, "tokenizer.ggml.merges")?.unwrap_or_default();
        let token_types = get_int_array(md, "tokenizer.ggml.token_type")?.unwrap_or_default();
        let bos_id = get_u32(md, "tokenizer.ggml.bos_token_id")?;
        let eos_id = get_u32(md, "tokenizer.ggml.eos_token_id")?;
        let add_bos = get_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let chat_template = get_str(md, "tokenizer.chat_template")?.map(str::to_owned);

        let token_text = |id: Option<u32>| -> Result<Option<String>, TokenizerError> {
            id.map(|id| {
                tokens
                    .get(id as usize)
                    .map(|t| t.to_string())
                    .ok_or_else(|| {
                        TokenizerError::Metadata(format!("token id {id} is outside the vocabulary"))
                    })
            })
            .transpose()
        };
        let bos_token = token_text(bos_id)?;
        let eos_token = token_text(eos_id)?;

        let mut eos_token_ids: Vec<u32> = eos_id.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eos_token_ids.extend(get_u32(md, key)?);
        }
        for (id, (text, ty)) in tokens.iter().zip(&token_types).enumerate() {
            if *ty == 3 && END_OF_GENERATION.contains(text) {
                eos_token_ids.push(id as u32);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();

        let bos = add_bos.then_some(()).and(bos_token.as_deref()).zip(bos_id);
        let json = if model == "llama" {
            let scores = get_f32_array(md, "tokenizer.ggml.scores")?.ok_or_else(|| {
                TokenizerError::Metadata("tokenizer.ggml.scores is missing".into())
            })?;
            let add_space_prefix = get_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            spm::spm_tokenizer_json(&tokens, &scores, &token_types, add_space_prefix, bos)?
        } else {
            gguf_tokenizer_json(pre, &tokens, &merges, &token_types, bos)?
        };
        let text =
            serde_json::to_string(&json).map_err(|e| TokenizerError::Build(e.to_string()))?;
        let tokenizer: Tokenizer = text
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Build(e.to_string()))?;
        Ok(Self {
            tokenizer,
            json: text,
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
            add_bos,
        })
    }

    /// A Hugging Face directory: `tokenizer.json`, and when present `tokenizer_config.json`
    /// (chat template, BOS/EOS, `add_bos_token`) and `generation_config.json` (EOS ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let text = read(&path)?;
        let tokenizer: Tokenizer = text.parse().map_err(|e: tokenizers::Error| {
            TokenizerError::Build(format!("{}: {e}", path.display()))
        })?;
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_if_exists(&dir.join("generation_config.json"))?;
        let token_field = |name: &str| -> Option<String> {
            match config.get(name)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let bos_token = token_field("bos_token");
        let eos_token = token_field("eos_token");
        let chat_template = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: take "default", else the first.
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let add_bos = config
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let mut eos_token_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .into_iter()
            .collect();
        match generation.get("eos_token_id") {
            Some(Json::Number(n)) => eos_token_ids.extend(n.as_u64().map(|n| n as u32)),
            Some(Json::Array(ids)) => {
                eos_token_ids.extend(ids.iter().filter_map(Json::as_u64).map(|n| n as u32))
            }
            _ => {}
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        Ok(Self {
            tokenizer,
            json: text,
            chat_template,
            bos_token,
            eos_token,
            eos_token_ids,
            add_bos,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are
    /// recognised, and BOS is prepended when the model wants it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }
}

/// `tokenizer.json` for a byte-level BPE vocabulary from GGUF metadata.
fn gguf_tokenizer_json(
    pre: &str,
    tokens: &[&str],
    merges: &[&str],
    token_types: &[i64],
    bos: Option<(&str, u32)>,
) -> Result<Json, TokenizerError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), byte_level(true)]})
        }
        "default" | "gpt2" | "gpt-2" | "olmo" | "mpt" | "jais" => byte_level(true),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        other => {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.pre = {other:?}"
            )));
        }
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        // Duplicate spellings happen in some conversions: the first id wins, as in llama.cpp.
        vocab.entry(token.to_string()).or_insert(json!(id));
    }
    let added: Vec<Json> = tokens
        .iter()
        .zip(token_types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(id, (text, ty))| {
            json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": *ty == 3})
        })
        .collect();
    let post_processor = match bos {
        Some((text, id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [id], "tokens": [text]}}
        }),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    }))
}

fn read(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json_if_exists(path: &Path) -> Result<Json, TokenizerError> {
    if !path.exists() {
        return Ok(Json::Object(Default::default()));
    }
    serde_json::from_str(&read(path)?)
        .map_err(|e| TokenizerError::Build(format!("{}: {e}", path.display())))
}

type Metadata = HashMap<String, gguf_file::Value>;

fn wrong_type(key: &str, want: &str) -> TokenizerError {
    TokenizerError::Metadata(format!("{key} is not {want}"))
}

fn get_str<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    md.get(key)
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|_| wrong_type(key, "a string"))
        })
        .transpose()
}

fn get_bool(md: &Metadata, key: &str) -> Result<Option<bool>, TokenizerError> {
    md.get(key)
        .map(|v| v.to_bool().map_err(|_| wrong_type(key, "a bool")))
        .transpose()
}

fn as_i64(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => i64::from(*x),
        V::I8(x) => i64::from(*x),
        V::U16(x) => i64::from(*x),
        V::I16(x) => i64::from(*x),
        V::U32(x) => i64::from(*x),
        V::I32(x) => i64::from(*x),
        V::U64(x) => i64::try_from(*x).ok()?,
        V::I64(x) => *x,
        _ => return None,
    })
}

fn get_u32(md: &Metadata, key: &str) -> Result<Option<u32>, TokenizerError> {
    md.get(key)
        .map(|v| {
            as_i64(v)
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| wrong_type(key, "a token id"))
        })
        .transpose()
}

fn get_str_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|_| wrong_type(key, "an array"))?;
    items
        .iter()
        .map(|x| {
            x.to_string()
                .map(String::as_str)
                .map_err(|_| wrong_type(key, "an array of strings"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn get_f32_array(md: &Metadata, key: &str) -> Result<Option<Vec<f32>>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|_| wrong_type(key, "an array"))?;
    items
        .iter()
        .map(|x| match x {
            gguf_file::Value::F32(f) => Ok(*f),
            gguf_file::Value::F64(f) => Ok(*f as f32),
            _ => Err(wrong_type(key, "an array of floats")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn get_int_array(md: &Metadata, key: &str) -> Result<Option<Vec<i64>>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let items = v.to_vec().map_err(|_| wrong_type(key, "an array"))?;
    items
        .iter()
        .map(|x| as_i64(x).ok_or_else(|| wrong_type(key, "an array of integers")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value as V;

    /// A toy byte-level vocabulary: 2 control tokens, the letters, digits and a merge.
    fn toy() -> Metadata {
        let tokens = [
            "<|endoftext|>",
            "<|im_end|>",
            "a",
            "b",
            "ab",
            "1",
            "2",
            "Ġ",
            "Ġa",
        ];
        let types = [3, 3, 1, 1, 1, 1, 1, 1, 1];
        let mut md = Metadata::new();
        md.insert("tokenizer.ggml.model".into(), V::String("gpt2".into()));
        md.insert("tokenizer.ggml.pre".into(), V::String("smollm".into()));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.iter().map(|t| V::String(t.to_string())).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|&t| V::I32(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![V::String("a b".into()), V::String("Ġ a".into())]),
        );
        md.insert("tokenizer.ggml.eos_token_id".into(), V::U32(1));
        md.insert(
            "tokenizer.chat_template".into(),
            V::String("{{ x }}".into()),
        );
        md
    }

    #[test]
    fn builds_from_metadata_with_specials_and_digit_split() {
        let t = ModelTokenizer::from_gguf_metadata(&toy()).unwrap();
        assert_eq!(t.eos_token_ids, vec![0, 1]);
        assert_eq!(t.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(t.chat_template.as_deref(), Some("{{ x }}"));
        assert!(!t.add_bos);
        assert_eq!(t.encode("ab a12<|im_end|>").unwrap(), vec![4, 8, 5, 6, 1]);
        assert_eq!(
            t.decode(&[4, 8, 5, 6, 1], false).unwrap(),
            "ab a12<|im_end|>"
        );
        assert_eq!(t.decode(&[4, 8, 5, 6, 1], true).unwrap(), "ab a12");
        // The JSON we ship reloads into the same tokenizer.
        let again: Tokenizer = t.json.parse().unwrap();
        assert_eq!(
            again.encode("ab a12", false).unwrap().get_ids(),
            &[4, 8, 5, 6]
        );
    }

    #[test]
    fn bos_is_prepended_when_asked() {
        let mut md = toy();
        md.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(true));
        md.insert("tokenizer.ggml.bos_token_id".into(), V::U32(0));
        let t = ModelTokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(t.encode("ab").unwrap(), vec![0, 4]);
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let mut md = toy();
        md.insert("tokenizer.ggml.model".into(), V::String("bert".into()));
        let err = ModelTokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("bert"), "{err}");
        let mut md = toy();
        md.insert("tokenizer.ggml.pre".into(), V::String("martian".into()));
        assert!(ModelTokenizer::from_gguf_metadata(&md).is_err());
        let mut md = toy();
        md.insert("tokenizer.ggml.eos_token_id".into(), V::U32(999));
        assert!(ModelTokenizer::from_gguf_metadata(&md).is_err());
        let mut md = toy();
        md.remove("tokenizer.ggml.tokens");
        assert!(ModelTokenizer::from_gguf_metadata(&md).is_err());
    }

    #[test]
    fn hf_directory_with_config() {
        let t = ModelTokenizer::from_gguf_metadata(&toy()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &t.json).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|endoftext|>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [0, 1]}"#,
        )
        .unwrap();
        let h = ModelTokenizer::load(dir.path()).unwrap();
        assert_eq!(h.eos_token_ids, vec![0, 1]);
        assert_eq!(h.chat_template.as_deref(), Some("D"));
        assert_eq!(h.bos_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(h.encode("ab a").unwrap(), vec![4, 8]);
        let missing = ModelTokenizer::load(&dir.path().join("nope.gguf")).unwrap_err();
        assert!(missing.to_string().contains("nope.gguf"), "{missing}");
    }
}
