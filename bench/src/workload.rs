//! Workloads: the requests a run sends, built ahead of time from a seed. Each load point
//! and each warm-up is built with its own seed (same distributions, different prompts),
//! so no request finds its prompt already in the server's prefix cache.
//!
//! - random prompts with input/output length distributions ([`LenDist`]);
//! - shared prefix: N system prompts × M questions, to exercise prefix caching;
//! - trace replay: JSONL lines `{"timestamp": ms, "input_len": n, "output_len": m}`.
//!
//! Prompt lengths are exact in the given tokenizer's tokens; without one, prompts are
//! made of common English words that are one token each in Llama-style BPE vocabularies,
//! so lengths are close but not exact.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::Deserialize;
use tokenizers::Tokenizer;

/// Bad workload configuration or input file.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("bad length distribution {0:?}: expected fixed:N, uniform:LO:HI or normal:MEAN:STD")]
    LenDist(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("trace {path} line {line}: {msg}")]
    Trace {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("workload is empty")]
    Empty,
}

/// A distribution of token lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LenDist {
    Fixed(u32),
    /// Uniform over `lo..=hi`.
    Uniform(u32, u32),
    /// Normal(mean, std), rounded and clamped to ≥ 1.
    Normal(f64, f64),
}

impl FromStr for LenDist {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || WorkloadError::LenDist(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.trim().parse::<f64>().map_err(|_| bad());
        let dist = match parts.as_slice() {
            [n] | ["fixed", n] => LenDist::Fixed(num(n)? as u32),
            ["uniform", lo, hi] => LenDist::Uniform(num(lo)? as u32, num(hi)? as u32),
            ["normal", mean, std] => LenDist::Normal(num(mean)?, num(std)?),
            _ => return Err(bad()),
        };
        match dist {
            LenDist::Fixed(0) => Err(bad()),
            LenDist::Uniform(lo, hi) if lo == 0 || lo > hi => Err(bad()),
            LenDist::Normal(m, s) if m < 1.0 || s < 0.0 => Err(bad()),
            d => Ok(d),
        }
    }
}

impl LenDist {
    pub fn sample(&self, rng: &mut StdRng) -> u32 {
        match *self {
            LenDist::Fixed(n) => n,
            LenDist::Uniform(lo, hi) => rng.random_range(lo..=hi),
            LenDist::Normal(mean, std) => match Normal::new(mean, std) {
                Ok(n) => n.sample(rng).round().max(1.0) as u32,
                Err(_) => mean.round().max(1.0) as u32,
            },
        }
    }
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// System prompt (shared-prefix workloads); prepended to the prompt on `completions`.
    pub system: Option<String>,
    pub prompt: String,
    /// Prompt tokens, system prompt included.
    pub input_len: u32,
    pub output_len: u32,
    /// Offset from the start of the run (trace replay only).
    pub at: Option<Duration>,
}

/// Makes prompt text of an exact token length.
pub struct PromptMaker {
    tokenizer: Option<Tokenizer>,
    /// Token ids that decode to plain text (no special tokens).
    vocab: Vec<u32>,
}

/// Words that are single tokens (with their leading space) in common BPE vocabularies.
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "was", "by", "at",
    "from", "this", "are", "be", "or", "an", "have", "not", "but", "they", "which", "one", "you",
    "were", "all", "we", "when", "there", "can", "been", "has", "more", "if", "will", "time",
    "would", "about", "what", "so", "some", "into", "first", "new", "two", "other", "people",
    "like", "only", "after", "over", "year", "such", "most", "also",
];

impl PromptMaker {
    pub fn new(tokenizer: Option<Tokenizer>) -> Self {
        let vocab = match &tokenizer {
            None => vec![],
            Some(t) => {
                let special: std::collections::HashSet<u32> =
                    t.get_added_tokens_decoder().keys().copied().collect();
                let mut ids: Vec<u32> = t
                    .get_vocab(false)
                    .into_iter()
                    .filter(|(tok, id)| {
                        !special.contains(id)
                            && tok
                                .chars()
                                .all(|c| c.is_alphanumeric() || c == 'Ġ' || c == '▁')
                    })
                    .map(|(_, id)| id)
                    .collect();
                ids.sort_unstable();
                ids
            }
        };
        Self { tokenizer, vocab }
    }

    /// Count tokens of `text` (approximate word count without a tokenizer).
    pub fn count(&self, text: &str) -> u32 {
        match &self.tokenizer {
            Some(t) => t.encode(text, false).map(|e| e.len() as u32).unwrap_or(0),
            None => text.split_whitespace().count() as u32,
        }
    }

    /// Random text of `len` tokens.
    pub fn make(&self, len: u32, rng: &mut StdRng) -> Result<String, WorkloadError> {
        let Some(tok) = self.tokenizer.as_ref().filter(|_| !self.vocab.is_empty()) else {
            let words: Vec<&str> = (0..len)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            return Ok(words.join(" "));
        };
        let terr = |e: tokenizers::Error| WorkloadError::Tokenizer(e.to_string());
        let ids: Vec<u32> = (0..len)
            .map(|_| self.vocab[rng.random_range(0..self.vocab.len())])
            .collect();
        let mut text = tok.decode(&ids, true).map_err(terr)?;
        // Decoding then re-encoding can merge or split tokens: trim or pad to the length.
        for _ in 0..4 {
            let enc = tok.encode(text.as_str(), false).map_err(terr)?;
            let n = enc.len() as u32;
            if n == len {
                break;
            } else if n > len {
                text = tok
                    .decode(&enc.get_ids()[..len as usize], true)
                    .map_err(terr)?;
            } else {
                let extra: Vec<u32> = (0..len - n)
                    .map(|_| self.vocab[rng.random_range(0..self.vocab.len())])
                    .collect();
                text.push(' ');
                text.push_str(&tok.decode(&extra, true).map_err(terr)?);
            }
        }
        Ok(text)
    }
}

/// Random prompts: `n` requests with sampled lengths.
pub fn random(
    maker: &PromptMaker,
    n: usize,
    input: LenDist,
    output: LenDist,
    seed: u64,
) -> Result<Vec<RequestSpec>, WorkloadError> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (il, ol) = (input.sample(&mut rng), output.sample(&mut rng));
            let prompt = maker.make(il, &mut rng)?;
            Ok(RequestSpec {
                system: None,
                input_len: maker.count(&prompt),
                prompt,
                output_len: ol,
                at: None,
            })
        })
        .collect()
}

/// The shape of the shared-prefix workload.
#[derive(Debug, Clone, Copy)]
pub struct SharedPrefix {
    /// Distinct system prompts.
    pub groups: usize,
    /// Questions per system prompt.
    pub per_group: usize,
    /// System prompt length in tokens (header included).
    pub prefix_len: u32,
    /// Tokens every system prompt starts with (a common preamble): the prompts then
    /// share their first blocks and differ after.
    pub header_len: u32,
}

/// Shared prefix: `shape.groups` system prompts of `shape.prefix_len` tokens (all
/// starting with the same `shape.header_len` tokens), each followed by `shape.per_group`
/// different questions; requests interleave the groups.
pub fn shared_prefix(
    maker: &PromptMaker,
    shape: SharedPrefix,
    input: LenDist,
    output: LenDist,
    seed: u64,
) -> Result<Vec<RequestSpec>, WorkloadError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let header_len = shape.header_len.min(shape.prefix_len);
    let header = if header_len > 0 {
        maker.make(header_len, &mut rng)?
    } else {
        String::new()
    };
    let systems: Vec<String> = (0..shape.groups)
        .map(|_| {
            let rest = maker.make(shape.prefix_len - header_len, &mut rng)?;
            Ok(if header.is_empty() {
                rest
            } else {
                format!("{header} {rest}")
            })
        })
        .collect::<Result<_, WorkloadError>>()?;
    let mut out = Vec::with_capacity(shape.groups * shape.per_group);
    for _ in 0..shape.per_group {
        for sys in &systems {
            let question = maker.make(input.sample(&mut rng), &mut rng)?;
            out.push(RequestSpec {
                input_len: maker.count(sys) + maker.count(&question),
                system: Some(sys.clone()),
                prompt: question,
                output_len: output.sample(&mut rng),
                at: None,
            });
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct TraceLine {
    /// Milliseconds from any origin; replay starts at the first line's timestamp.
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(alias = "input_length")]
    input_len: u32,
    #[serde(alias = "output_length")]
    output_len: u32,
}

/// Replay a JSONL trace; `speed` 2.0 replays twice as fast.
pub fn trace(
    maker: &PromptMaker,
    path: &Path,
    speed: f64,
    seed: u64,
) -> Result<Vec<RequestSpec>, WorkloadError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: p.clone(),
        source,
    })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut origin = None;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let err = |msg: String| WorkloadError::Trace {
            path: p.clone(),
            line: i + 1,
            msg,
        };
        let t: TraceLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if t.input_len == 0 || t.output_len == 0 {
            return Err(err("input_len and output_len must be > 0".into()));
        }
        let at = t.timestamp.map(|ts| {
            let o = *origin.get_or_insert(ts);
            Duration::from_secs_f64(((ts - o) / 1e3 / speed.max(1e-9)).max(0.0))
        });
        let prompt = maker.make(t.input_len, &mut rng)?;
        out.push(RequestSpec {
            system: None,
            input_len: maker.count(&prompt),
            prompt,
            output_len: t.output_len,
            at,
        });
    }
    if out.is_empty() {
        return Err(WorkloadError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_dist_parses_and_samples_in_range() {
        assert_eq!("128".parse::<LenDist>().unwrap(), LenDist::Fixed(128));
        assert_eq!("fixed:5".parse::<LenDist>().unwrap(), LenDist::Fixed(5));
        assert_eq!(
            "uniform:2:9".parse::<LenDist>().unwrap(),
            LenDist::Uniform(2, 9)
        );
        assert_eq!(
            "normal:100:10".parse::<LenDist>().unwrap(),
            LenDist::Normal(100.0, 10.0)
        );
        for bad in ["", "0", "uniform:9:2", "normal:1", "poisson:3", "x"] {
            assert!(bad.parse::<LenDist>().is_err(), "{bad}");
        }
        let mut rng = StdRng::seed_from_u64(1);
        let d = LenDist::Uniform(2, 9);
        assert!(
            (0..1000)
                .map(|_| d.sample(&mut rng))
                .all(|n| (2..=9).contains(&n))
        );
    }

    #[test]
    fn random_prompts_without_tokenizer_have_the_word_count() {
        let m = PromptMaker::new(None);
        let reqs = random(&m, 3, LenDist::Fixed(7), LenDist::Fixed(4), 1).unwrap();
        assert!(reqs.iter().all(|r| r.input_len == 7 && r.output_len == 4));
        assert_eq!(
            reqs,
            random(&m, 3, LenDist::Fixed(7), LenDist::Fixed(4), 1).unwrap()
        );
    }

    #[test]
    fn shared_prefix_reuses_n_system_prompts() {
        let m = PromptMaker::new(None);
        let shape = SharedPrefix {
            groups: 2,
            per_group: 3,
            prefix_len: 20,
            header_len: 0,
        };
        let reqs = shared_prefix(&m, shape, LenDist::Fixed(5), LenDist::Fixed(1), 1).unwrap();
        assert_eq!(reqs.len(), 6);
        let systems: std::collections::HashSet<_> =
            reqs.iter().map(|r| r.system.clone().unwrap()).collect();
        assert_eq!(systems.len(), 2);
        assert!(reqs.iter().all(|r| r.input_len == 25));
    }

    #[test]
    fn a_header_starts_every_system_prompt() {
        let m = PromptMaker::new(None);
        let shape = SharedPrefix {
            groups: 3,
            per_group: 2,
            prefix_len: 40,
            header_len: 16,
        };
        let reqs = shared_prefix(&m, shape, LenDist::Fixed(5), LenDist::Fixed(1), 1).unwrap();
        let systems: std::collections::HashSet<String> =
            reqs.iter().map(|r| r.system.clone().unwrap()).collect();
        assert_eq!(systems.len(), 3, "distinct system prompts");
        let first: Vec<&str> = systems
            .iter()
            .map(|s| s.split(' ').next().unwrap())
            .collect();
        let header = |s: &String| s.split(' ').take(8).collect::<Vec<_>>().join(" ");
        let headers: std::collections::HashSet<String> = systems.iter().map(header).collect();
        assert_eq!(headers.len(), 1, "one shared start: {first:?}");
        for sys in &systems {
            assert!((39..=41).contains(&m.count(sys)), "{} tokens", m.count(sys));
        }
    }

    #[test]
    fn trace_lines_become_timed_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            "{\"timestamp\": 1000, \"input_len\": 3, \"output_len\": 2}\n\n\
             {\"timestamp\": 1500, \"input_length\": 4, \"output_length\": 1}\n",
        )
        .unwrap();
        let m = PromptMaker::new(None);
        let reqs = trace(&m, &path, 1.0, 0).unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].at, Some(Duration::from_millis(500)));
        assert_eq!((reqs[1].input_len, reqs[1].output_len), (4, 1));
        std::fs::write(&path, "{\"input_len\": 0, \"output_len\": 2}\n").unwrap();
        let err = trace(&m, &path, 1.0, 0).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
