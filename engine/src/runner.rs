//! The contract between the serving engine ([`crate::engine`]) and the model
//! ([`crate::model`]): a [`ModelRunner`] owns the weights and the paged KV cache of one
//! worker group (all its tensor-parallel ranks) and runs one forward over a mixed batch.
//!
//! The engine decides *what* runs in a step (which sequences, how many prompt tokens);
//! the runner decides *how* (block tables, kernels, ranks). Sampling stays in the engine.

use std::fmt;

/// Worker-wide sequence id, chosen by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// Whether a new sequence may reuse cached prefix blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixCache {
    Use,
    Skip,
}

/// Which logits a chunk wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The row of the chunk's last token (a decode token, or the last prefill chunk).
    Last,
    /// One row per token of the chunk (prompt logprobs for `echo`).
    All,
}

/// One sequence's part of a step: `tokens` are appended at the sequence's current length
/// (the tokens already in its KV cache, cached prefix included).
#[derive(Debug, Clone)]
pub struct SeqChunk {
    pub id: SeqId,
    pub tokens: Vec<u32>,
    pub logits: LogitsWanted,
}

/// Static facts a runner reports about itself.
#[derive(Debug, Clone)]
pub struct RunnerInfo {
    pub model_id: String,
    pub dtype: String,
    pub tp: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub kv_block_size: usize,
    pub kv_blocks_total: usize,
    /// Element type the KV cache stores (`f32`, `f16`, `bf16`).
    pub kv_cache_dtype: String,
}

/// What a runner counts about itself, for the worker's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunnerStats {
    /// Free blocks that still hold a cached prefix (evictable: they count as free).
    pub kv_blocks_cached: usize,
    /// Tensor-parallel collectives (all-reduce, broadcast, barrier) run by rank 0, their
    /// total time in seconds, and those that failed.
    pub collectives: u64,
    pub collective_seconds: f64,
    pub collective_failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0} is unknown to the KV cache")]
    UnknownSequence(SeqId),
    #[error("{0} already exists")]
    DuplicateSequence(SeqId),
    #[error("KV cache out of blocks: need {needed}, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("{id}: {len} tokens exceed the context length {max}")]
    ContextExceeded { id: SeqId, len: usize, max: usize },
    #[error("model error: {0}")]
    Model(String),
}

/// Logits rows of one chunk, in the order of its tokens (`Last` → one row).
#[derive(Debug, Clone)]
pub struct ChunkLogits {
    pub id: SeqId,
    /// `rows.len() * vocab` floats, row-major.
    pub data: Vec<f32>,
    pub rows: usize,
}

/// A group's model: weights + paged KV cache, possibly across tensor-parallel ranks.
///
/// Invariants the engine relies on:
/// - a sequence's logits do not depend on what else is in the batch or on how its prompt
///   was chunked (batch-invariant kernels), so seeded sampling is reproducible;
/// - `free_blocks()` is exact after every call; blocks of a removed sequence are free
///   again unless shared with another live sequence or kept by the prefix cache as
///   evictable (evictable blocks count as free).
pub trait ModelRunner: Send {
    fn info(&self) -> &RunnerInfo;

    /// Registers a sequence with its whole prompt. Full blocks of the prompt that are in
    /// the prefix cache are attached (refcounted) and their tokens count as computed.
    /// Returns how many prompt tokens are already computed (at most `prompt.len() - 1`, so
    /// the last prompt token always runs and yields logits). Fails without side effects.
    fn add_sequence(&mut self, id: SeqId, prompt: &[u32]) -> Result<usize, RunnerError> {
        self.add_sequence_with(id, prompt, PrefixCache::Use)
    }

    /// [`Self::add_sequence`], optionally ignoring the prefix cache: a sequence that wants
    /// the logits of every prompt token (prompt logprobs) must compute all of them. Its
    /// full blocks still enter the cache for later sequences.
    fn add_sequence_with(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        prefix_cache: PrefixCache,
    ) -> Result<usize, RunnerError>;

    /// Blocks `id` would need to append `n` more tokens (0 if they fit in its last block).
    fn blocks_needed(&self, id: SeqId, n: usize) -> Result<usize, RunnerError>;

    /// Tokens in the KV cache of `id` (cached prefix + computed).
    fn seq_len(&self, id: SeqId) -> Result<usize, RunnerError>;

    /// One forward over all chunks. On error no sequence advanced. Returns one
    /// [`ChunkLogits`] per chunk, in batch order (`rows == 0` for [`LogitsWanted::None`]).
    /// A sequence may appear at most once per step.
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<ChunkLogits>, RunnerError>;

    /// Drops a sequence (unknown ids are ignored) and returns its blocks to the pool;
    /// its full prompt blocks stay in the prefix cache until evicted.
    fn remove_sequence(&mut self, id: SeqId);

    fn free_blocks(&self) -> usize;

    /// The runner's own figures for the metrics endpoint; zeros where a runner has none
    /// (no prefix cache, one rank).
    fn stats(&self) -> RunnerStats {
        RunnerStats::default()
    }

    /// Per-rank health for tensor-parallel groups; `Err` once a rank has failed.
    fn healthy(&self) -> Result<(), RunnerError> {
        Ok(())
    }
}
