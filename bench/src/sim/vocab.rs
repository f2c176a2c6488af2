//! The tokenizer a simulated worker serves in Info and draws its outputs from: a real
//! Hugging Face `tokenizer.json`, or a synthetic word-level one whose words include the
//! bench's prompt words, so `shardline bench` prompts count one token per word.

use std::path::Path;
use std::str::FromStr;

use serde_json::json;
use tokenizers::Tokenizer;

use super::SimError;

/// Largest synthetic vocabulary (keeps the Info message small).
pub const SYNTHETIC_MAX: u32 = 4096;

/// Names of end-of-sequence tokens across Llama 3, ChatML, GPT-2 and SentencePiece models.
const EOS_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "<eos>",
];

/// A tokenizer and what the simulator needs of it.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// The `tokenizer.json` text served in Info.
    pub json: String,
    /// Ordinary tokens outputs are drawn from (no special tokens).
    pub output_ids: Vec<u32>,
    pub eos_ids: Vec<u32>,
    pub eos_token: String,
    pub size: u32,
}

impl Vocab {
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let p = path.display().to_string();
        let json = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_json(json).map_err(|msg| SimError::Tokenizer { path: p, msg })
    }

    fn from_json(json: String) -> Result<Self, String> {
        let tok = Tokenizer::from_str(&json).map_err(|e| e.to_string())?;
        let special: std::collections::HashSet<u32> = tok
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let mut output_ids: Vec<u32> = tok
            .get_vocab(false)
            .into_values()
            .filter(|id| !special.contains(id))
            .collect();
        output_ids.sort_unstable();
        let eos: Vec<(&str, u32)> = EOS_NAMES
            .iter()
            .filter_map(|n| Some((*n, tok.token_to_id(n)?)))
            .collect();
        output_ids.retain(|id| !eos.iter().any(|(_, e)| e == id));
        if output_ids.is_empty() {
            return Err("the vocabulary has no ordinary tokens".into());
        }
        Ok(Self {
            eos_token: eos.first().map(|(n, _)| n.to_string()).unwrap_or_default(),
            eos_ids: eos.iter().map(|(_, id)| *id).collect(),
            size: tok.get_vocab_size(true) as u32,
            output_ids,
            json,
        })
    }

    /// A word-level tokenizer of `size` tokens: ChatML specials, the bench's prompt words,
    /// then `w<i>` fillers. Split on whitespace; decoding joins words with spaces.
    pub fn synthetic(size: u32) -> Self {
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"];
        let mut words: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
        for w in ["system", "user", "assistant"]
            .iter()
            .chain(crate::workload::WORDS)
        {
            if !words.iter().any(|x| x == w) {
                words.push(w.to_string());
            }
        }
        let target = (size as usize).max(words.len() + 16);
        let mut i = 0;
        while words.len() < target {
            words.push(format!("w{i}"));
            i += 1;
        }
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(id, w)| (w.clone(), json!(id)))
            .collect();
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(id, s)| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
        .to_string();
        Self::from_json(json).expect("the synthetic tokenizer is well-formed; this is a bug")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokenizer_loads_and_counts_bench_words_one_each() {
        let v = Vocab::synthetic(1000);
        assert_eq!(v.size, 1000);
        assert_eq!(v.eos_token, "<|im_end|>");
        assert_eq!(v.eos_ids, vec![2, 0]);
        assert!(!v.output_ids.contains(&0) && !v.output_ids.contains(&3));
        let tok = Tokenizer::from_str(&v.json).unwrap();
        let enc = tok.encode("the people of the first year", false).unwrap();
        assert_eq!(enc.len(), 6);
        assert!(
            !enc.get_ids().contains(&3),
            "unknown word in {:?}",
            enc.get_ids()
        );
        let chat = tok
            .encode("<|im_start|>user\nhello<|im_end|>", false)
            .unwrap();
        assert_eq!(chat.get_ids()[0], 1);
        assert_eq!(tok.decode(&[40, 41], true).unwrap().split(' ').count(), 2);
    }

    #[test]
    fn a_bad_tokenizer_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, "{not json").unwrap();
        assert!(matches!(
            Vocab::from_file(&p),
            Err(SimError::Tokenizer { .. })
        ));
        assert!(matches!(
            Vocab::from_file(&dir.path().join("none")),
            Err(SimError::Io { .. })
        ));
    }
}
