//! [`FakeRunner`]: a [`ModelRunner`] without a model, for tests of the engine, the gRPC
//! service and the coordinator. Its logits are a pure function of (token, position), so
//! they are batch- and chunking-invariant like the real model's, and greedy decoding
//! follows a known path: the next token after `t` is `(t + 1) % vocab`.
//!
//! The KV cache is simulated exactly (block counts per sequence, a fixed pool), without
//! prefix caching unless [`FakeRunner::with_prefix_cache`] is used, in which case
//! the leading full blocks of a prompt identical to a previous prompt's count as cached.

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
}

pub struct FakeRunner {
    info: RunnerInfo,
    /// Tokens per live sequence (cached + computed).
    seqs: HashMap<SeqId, Vec<u32>>,
    used_blocks: usize,
    prefix_cache: bool,
    /// Prompts seen, for the simulated prefix cache.
    seen_prompts: Vec<Vec<u32>>,
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
            },
            seqs: HashMap::new(),
            used_blocks: 0,
            prefix_cache: false,
            seen_prompts: Vec::new(),
            log: Arc::default(),
        }
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
                data.extend(Self::logits_row(c.tokens[j], start + j, vocab));
            }
            out.push(ChunkLogits {
                id: c.id,
                data,
                rows: rows.len(),
            });
        }
        Ok(out)
    }

    fn remove_sequence(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.used_blocks -= self.blocks_for(seq.len());
        }
    }

    fn free_blocks(&self) -> usize {
        self.info.kv_blocks_total - self.used_blocks
    }
}
