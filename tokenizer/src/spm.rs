//! `tokenizer.json` for SentencePiece-BPE vocabularies in GGUF (`tokenizer.ggml.model =
//! "llama"`: Llama 2, TinyLlama, Mistral), shaped like Hugging Face's `LlamaTokenizerFast`:
//! spaces become `▁` (with a `▁` prepended when `add_space_prefix`), BPE whose merges are
//! recovered from the token scores (a merge ranks by the score of the token it makes, as
//! transformers does for files without merges), byte fallback to `<0xNN>` tokens.

use std::collections::HashMap;

use serde_json::{Value as Json, json};

use super::TokenizerError;

/// GGUF token types.
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

pub(super) fn spm_tokenizer_json(
    tokens: &[&str],
    scores: &[f32],
    token_types: &[i64],
    add_space_prefix: bool,
    bos: Option<(&str, u32)>,
) -> Result<Json, TokenizerError> {
    if scores.len() != tokens.len() {
        return Err(TokenizerError::Metadata(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let mut vocab_ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab_ids.entry(t).or_insert(id as u32);
    }
    // (score of the merged token, its id, left id, right id)
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        for (i, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab_ids.get(&t[..i]), vocab_ids.get(&t[i..])) {
                merges.push((scores[id], id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(json!(id));
    }
    let unk = tokens
        .iter()
        .zip(token_types)
        .find(|(_, ty)| **ty == UNKNOWN)
        .map(|(t, _)| t.to_string());
    let added: Vec<Json> = tokens
        .iter()
        .zip(token_types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, UNKNOWN | CONTROL | USER_DEFINED))
        .map(|(id, (text, ty))| {
            json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": *ty != USER_DEFINED})
        })
        .collect();
    let replace_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let (normalizer, decoder) = if add_space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace_space]}),
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        )
    } else {
        (
            replace_space,
            json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]}),
        )
    };
    let post_processor = match bos {
        Some((text, id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [id], "tokens": [text]}}
        }),
        None => Json::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    }))
}

#[cfg(test)]
mod tests {
    use crate::ModelTokenizer;
    use crate::gguf::Value as V;
    use std::collections::HashMap;

    /// A toy Llama-style vocabulary: unk/bos/eos, two byte tokens, pieces with scores.
    fn toy() -> HashMap<String, V> {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "i", "▁h", "▁hi", "hi",
        ];
        let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1];
        // ▁hi scores best, then ▁h, then hi.
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0,
        ];
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), V::String("llama".into()));
        let strings = |xs: &[&str]| V::Array(xs.iter().map(|t| V::String(t.to_string())).collect());
        md.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        md.insert(
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|&t| V::I32(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.scores".into(),
            V::Array(scores.iter().map(|&s| V::F32(s)).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), V::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), V::U32(2));
        md.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(true));
        md
    }

    #[test]
    fn sentencepiece_bpe_with_prefix_space_bos_and_byte_fallback() {
        let t = ModelTokenizer::from_gguf_metadata(&toy()).unwrap();
        assert_eq!(t.eos_token_ids, vec![2]);
        assert!(t.add_bos);
        // "hi hi" → ▁hi▁hi ; bos first
        assert_eq!(t.encode("hi hi").unwrap(), vec![1, 10, 10]);
        // "é\n" has no piece: bytes C3 A9 0A by fallback (after ▁)
        assert_eq!(t.encode("é\n").unwrap(), vec![1, 6, 4, 5, 3]);
        assert_eq!(t.decode(&[1, 10, 10], true).unwrap(), "hi hi");
        assert_eq!(t.decode(&[1, 6, 4, 5, 3], true).unwrap(), "é\n");
        assert_eq!(
            t.encode("x").unwrap(),
            vec![1, 6, 0],
            "unknown char → <unk>"
        );
    }

    #[test]
    fn scores_must_cover_the_vocabulary() {
        let mut md = toy();
        md.insert("tokenizer.ggml.scores".into(), V::Array(vec![V::F32(0.0)]));
        assert!(ModelTokenizer::from_gguf_metadata(&md).is_err());
        md.remove("tokenizer.ggml.scores");
        assert!(ModelTokenizer::from_gguf_metadata(&md).is_err());
    }
}
