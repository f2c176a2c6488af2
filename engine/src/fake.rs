//! [`FakeRunner`]: a [`ModelRunner`] without a model, for tests of the engine, the gRPC
//! service and the coordinator. Its logits are a pure function of (token, position), so
//! they are batch- and chunking-invariant like the real model's, and greedy decoding
//! follows a known path: the next token after `t` is `(t + 1) % vocab`.
//!
//! The KV cache is simulated exactly (block counts per sequence, a fixed pool), without
//! prefix caching unless [`FakeRunner::with_prefix_cache`] is used, in which case
//! the leading full blocks of a prompt identical to a previous prompt's count as cached.
//!
//! [`FakeRunner::with_model`] swaps the next-token rule for any pure function of the
//! tokens so far (as a language model is), e.g. [`echo_next`], which the coordinator's
//! tests use to control the generated text through the prompt. [`FakeLog::failing`]
//! makes the runner act as a failed group (steps fail, health is bad) until cleared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerInfo, SeqChunk, SeqId,
};

/// What the fake saw, shared with the test that owns a clone.
#[derive(Debug, Default)]
pub struct FakeLog {
    /// Every forward's chunks: (id, number of tokens, logits wanted).
    pub forwards: Vec<Vec<(SeqId, usize, LogitsWanted)>>,
    /// Make the next forward fail with this message.
    pub fail_next_forward: Option<String>,
    /// While set, the runner acts as a failed group: every forward fails with this
    /// message and `healthy()` reports it (clear it to "restart" the group).
    pub failing: Option<String>,
    /// Forwards refused because of `failing`.
    pub failed_forwards: u64,
    /// Prompts of the sequences added, in order.
    pub added_prompts: Vec<Vec<u32>>,
    /// Free blocks and live sequences after the runner's last call.
    pub free_blocks: usize,
    pub live: usize,
}

/// The next-token rule of a fake model: the token after `tokens` (the whole sequence so
/// far); a pure function, so outputs are batch-, chunking- and migration-invariant.
pub type NextToken = fn(&[u32]) -> u32;

/// An echo model: the token after the first occurrence of the last token, or the first
/// token when the last one occurs only at the end. On a prompt whose tokens are all
/// distinct it repeats the prompt (`abc` → `abcabc…`); in general it walks the prompt's
/// own successor links, so a test controls the generated text through the prompt.
pub fn echo_next(tokens: &[u32]) -> u32 {
    let Some((&last, _)) = tokens.split_last() else {
        return 0;
    };
    match tokens.iter().position(|&t| t == last) {
        Some(i) if i + 1 < tokens.len() => tokens[i + 1],
        _ => tokens[0],
    }
}

/// The greedy continuation of `prompt` under `next`, `n` tokens long.
pub fn continuation(next: NextToken, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let t = next(&tokens);
        tokens.push(t);
    }
    tokens.split_off(prompt.len())
}

pub struct FakeRunner {
    info: RunnerInfo,
    /// Tokens per live sequence (cached + computed).
    seqs: HashMap<SeqId, Vec<u32>>,
    used_blocks: usize,
    prefix_cache: bool,
    /// Prompts seen, for the simulated prefix cache.
    seen_prompts: Vec<Vec<u32>>,
    /// `None`: the default rule (after `t` comes `t + 1`).
    model: Option<NextToken>,
    /// Time each forward takes.
    step_delay: std::time::Duration,
    log: Arc<Mutex<FakeLog>>,
}

impl FakeRunner {
    pub fn new(vocab_size: usize, context_length: usize, block_size: usize, blocks: usize) -> Self {
        Self {
            info: RunnerInfo {
                model_id: "fake".into(),
                dtype: "f32".into(),
                tp: 1,
                context_length,
                vocab_size,
                kv_block_size: block_size,
                kv_blocks_total: blocks,
                kv_cache_dtype: "f32".into(),
            },
            seqs: HashMap::new(),
            used_blocks: 0,
            prefix_cache: false,
            seen_prompts: Vec::new(),
            model: None,
            step_delay: std::time::Duration::ZERO,
            log: Arc::new(Mutex::new(FakeLog {
                free_blocks: blocks,
                ..FakeLog::default()
            })),
        }
    }

    /// Next tokens from `next` instead of `t + 1`: each wanted row is a peak of 0 on
    /// `next(tokens so far)` over a floor of -12 (nearly greedy even when sampling).
    pub fn with_model(mut self, next: NextToken) -> Self {
        self.model = Some(next);
        self
    }

    pub fn with_step_delay(mut self, delay: std::time::Duration) -> Self {
        self.step_delay = delay;
        self
    }

    pub fn with_model_id(mut self, model_id: &str) -> Self {
        self.info.model_id = model_id.to_string();
        self
    }

    /// The KV cache element type `Info` reports (the fake computes the same either way).
    pub fn with_kv_cache_dtype(mut self, dtype: &str) -> Self {
        self.info.kv_cache_dtype = dtype.to_string();
        self
    }

    fn record(&self) {
        let mut log = self.log.lock().expect("fake log poisoned");
        log.free_blocks = self.free_blocks();
        log.live = self.seqs.len();
    }

    pub fn with_prefix_cache(mut self) -> Self {
        self.prefix_cache = true;
        self
    }

    /// A handle on what the runner saw (usable after the runner moved into an engine).
    pub fn log(&self) -> Arc<Mutex<FakeLog>> {
        self.log.clone()
    }

    fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.info.kv_block_size)
    }

    /// The logits row after `token` at `pos`: a peak of 8 on `(token + 1) % vocab`, and a
    /// gentle ramp elsewhere so that sampling with temperature has real choices.
    pub fn logits_row(token: u32, pos: usize, vocab: usize) -> Vec<f32> {
        let peak = (token as usize + 1) % vocab;
        (0..vocab)
            .map(|v| {
                if v == peak {
                    8.0
                } else {
                    ((v * 31 + pos * 7 + token as usize * 13) % 17) as f32 / 4.0
                }
            })
            .collect()
    }
}

impl ModelRunner for FakeRunner {
    fn info(&self) -> &RunnerInfo {
        &self.info
    }

    fn add_sequence_with(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        prefix_cache: PrefixCache,
    ) -> Result<usize, RunnerError> {
        if self.seqs.contains_key(&id) {
            return Err(RunnerError::DuplicateSequence(id));
        }
        if prompt.len() > self.info.context_length {
            return Err(RunnerError::ContextExceeded {
                id,
                len: prompt.len(),
                max: self.info.context_length,
            });
        }
        let mut cached = 0;
        if self.prefix_cache && prefix_cache == PrefixCache::Use {
            let bs = self.info.kv_block_size;
            for p in &self.seen_prompts {
                let common = p.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                cached = cached.max(common / bs * bs);
            }
            cached = cached.min(prompt.len().saturating_sub(1) / bs * bs);
            self.seen_prompts.push(prompt.to_vec());
        }
        let needed = self.blocks_for(cached);
        let free = self.free_blocks();
        if needed > free {
            return Err(RunnerError::OutOfBlocks { needed, free });
        }
        self.used_blocks += needed;
        self.seqs.insert(id, prompt[..cached].to_vec());
        self.log
            .lock()
            .expect("fake log poisoned")
            .added_prompts
            .push(prompt.to_vec());
        self.record();
        Ok(cached)
    }

    fn blocks_needed(&self, id: SeqId, n: usize) -> Result<usize, RunnerError> {
        let len = self
            .seqs
            .get(&id)
            .ok_or(RunnerError::UnknownSequence(id))?
            .len();
        Ok(self.blocks_for(len + n) - self.blocks_for(len))
    }

    fn seq_len(&self, id: SeqId) -> Result<usize, RunnerError> {
        Ok(self
            .seqs
            .get(&id)
            .ok_or(RunnerError::UnknownSequence(id))?
            .len())
    }

    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<ChunkLogits>, RunnerError> {
        let mut log = self.log.lock().expect("fake log poisoned");
        if let Some(msg) = log.failing.clone() {
            log.failed_forwards += 1;
            return Err(RunnerError::Model(msg));
        }
        if let Some(msg) = log.fail_next_forward.take() {
            return Err(RunnerError::Model(msg));
        }
        log.forwards.push(
            batch
                .iter()
                .map(|c| (c.id, c.tokens.len(), c.logits))
                .collect(),
        );
        drop(log);
        if !self.step_delay.is_zero() {
            std::thread::sleep(self.step_delay);
        }
        let mut needed = 0;
        for c in batch {
            needed += self.blocks_needed(c.id, c.tokens.len())?;
            let len = self.seqs[&c.id].len() + c.tokens.len();
            if len > self.info.context_length {
                return Err(RunnerError::ContextExceeded {
                    id: c.id,
                    len,
                    max: self.info.context_length,
                });
            }
        }
        if needed > self.free_blocks() {
            return Err(RunnerError::OutOfBlocks {
                needed,
                free: self.free_blocks(),
            });
        }
        self.used_blocks += needed;
        let vocab = self.info.vocab_size;
        let mut out = Vec::new();
        for c in batch {
            let seq = self.seqs.get_mut(&c.id).expect("checked above");
            let start = seq.len();
            seq.extend_from_slice(&c.tokens);
            let rows: Vec<usize> = match c.logits {
                LogitsWanted::None => continue,
                LogitsWanted::Last => vec![c.tokens.len() - 1],
                LogitsWanted::All => (0..c.tokens.len()).collect(),
            };
            let mut data = Vec::with_capacity(rows.len() * vocab);
            for &j in &rows {
                match self.model {
                    None => data.extend(Self::logits_row(c.tokens[j], start + j, vocab)),
                    Some(next) => {
                        let peak = next(&seq[..start + j + 1]) as usize % vocab;
                        data.extend((0..vocab).map(|v| if v == peak { 0.0 } else { -12.0 }));
                    }
                }
            }
            out.push(ChunkLogits {
                id: c.id,
                data,
                rows: rows.len(),
            });
        }
        self.record();
        Ok(out)
    }

    fn remove_sequence(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.used_blocks -= self.blocks_for(seq.len());
        }
        self.record();
    }

    fn healthy(&self) -> Result<(), RunnerError> {
        match &self.log.lock().expect("fake log poisoned").failing {
            Some(msg) => Err(RunnerError::Model(msg.clone())),
            None => Ok(()),
        }
    }

    fn free_blocks(&self) -> usize {
        self.info.kv_blocks_total - self.used_blocks
    }
}
