//! [`RankPart`]: what one rank of a tensor-parallel group owns of every layer (query and
//! KV heads, an FFN slice, vocabulary rows, reduction segments). The model reads it to
//! run its shard; `model::shard` computes it and cuts the weights by it.

use std::ops::Range;

use crate::config::LlamaConfig;

/// What one rank owns of each layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPart {
    pub rank: usize,
    pub world: usize,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub ffn: Range<usize>,
    /// Vocabulary rows of the embeddings and the LM head.
    pub vocab: Range<usize>,
    /// Reduction segments this rank owns, of `num_segments` (see the module docs).
    pub segments: Range<usize>,
    pub num_segments: usize,
}

impl RankPart {
    /// The whole model on one rank.
    pub fn whole(cfg: &LlamaConfig) -> Self {
        RankPart {
            rank: 0,
            world: 1,
            q_heads: 0..cfg.num_heads,
            kv_heads: 0..cfg.num_kv_heads,
            ffn: 0..cfg.intermediate_size,
            vocab: 0..cfg.vocab_size,
            segments: 0..1,
            num_segments: 1,
        }
    }

    /// Width of this rank's q | k | v projection output.
    pub fn qkv_dim(&self, head_dim: usize) -> usize {
        (self.q_heads.len() + 2 * self.kv_heads.len()) * head_dim
    }
}
