//! [`GroupRunner`]: the [`ModelRunner`] over a [`RankGroup`] of one or more ranks, with
//! the paged KV cache's bookkeeping. The block manager (which blocks a sequence owns) is
//! one per group; each rank stores its own KV heads of those blocks. [`LlamaRunner`] is
//! it over [`LlamaModel`] shards on the CPU kernels (model threads are the ranks' own
//! kernel teams, not the async runtime's); [`crate::model::device::DeviceRunner`] over device
//! ranks.

use std::collections::HashSet;
use std::time::Duration;

use crate::kv::{BlockManager, KvCacheDtype, KvCacheShape};
use crate::model::group::{CpuRank, FailureInjector, GroupRank, OwnedStep, RankGroup};
use crate::model::{LlamaModel, TokenPlan};
use crate::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerInfo, SeqChunk, SeqId,
};

/// Default deadline of a tensor-parallel collective.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A runner over the ranks of one group.
pub struct GroupRunner<R: GroupRank> {
    group: RankGroup<R>,
    blocks: BlockManager,
    info: RunnerInfo,
}

/// A Llama runner on the CPU kernels over one or more ranks.
pub type LlamaRunner = GroupRunner<CpuRank>;

impl<R: GroupRank> std::fmt::Debug for GroupRunner<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupRunner")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl GroupRunner<CpuRank> {
    /// One rank: `num_blocks` f32 KV blocks of `block_size` positions; `threads` model
    /// threads.
    pub fn new(
        model: LlamaModel,
        model_id: String,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, RunnerError> {
        Self::sharded(
            vec![model],
            model_id,
            KvCacheShape {
                num_blocks,
                block_size,
                dtype: KvCacheDtype::F32,
            },
            threads,
            DEFAULT_COLLECTIVE_TIMEOUT,
        )
    }

    /// A tensor-parallel group, `shards[r]` being rank `r`'s model
    /// ([`crate::model::shard::shard_all`]), each rank caching its KV heads of `kv`'s
    /// blocks; `threads` model threads in all, split between the ranks; collectives give
    /// up after `timeout`.
    pub fn sharded(
        shards: Vec<LlamaModel>,
        model_id: String,
        kv: KvCacheShape,
        threads: usize,
        timeout: Duration,
    ) -> Result<Self, RunnerError> {
        let world = shards.len().max(1);
        let group = RankGroup::start(shards, kv, (threads / world).max(1), timeout)
            .map_err(RunnerError::Model)?;
        let model = group.model();
        let cfg = &model.cfg;
        let info = RunnerInfo {
            model_id,
            dtype: model.dtype_name(),
            tp: world,
            context_length: cfg.context_length,
            vocab_size: cfg.vocab_size,
            kv_block_size: kv.block_size,
            kv_blocks_total: kv.num_blocks,
            kv_cache_dtype: kv.dtype.to_string(),
        };
        Ok(Self::over(group, info))
    }

    /// Rank 0's model (the whole model at tp 1).
    pub fn model(&self) -> &LlamaModel {
        self.group.model()
    }
}

impl<R: GroupRank> GroupRunner<R> {
    /// A runner over a started `group`; `info.kv_blocks_total` blocks of
    /// `info.kv_block_size` positions, which every rank's KV shard must hold.
    pub fn over(group: RankGroup<R>, info: RunnerInfo) -> Self {
        GroupRunner {
            blocks: BlockManager::new(info.kv_blocks_total, info.kv_block_size),
            group,
            info,
        }
    }

    /// The group's ranks.
    pub fn group(&self) -> &RankGroup<R> {
        &self.group
    }

    /// A handle that makes a rank's next step fail (tests of the failure path).
    pub fn failure_injector(&self) -> FailureInjector {
        self.group.failure_injector()
    }

    fn validate(&self, batch: &[SeqChunk]) -> Result<(), RunnerError> {
        let mut seen = HashSet::with_capacity(batch.len());
        let vocab = self.info.vocab_size;
        for c in batch {
            if !seen.insert(c.id) {
                return Err(RunnerError::Model(format!(
                    "{} appears twice in one step",
                    c.id
                )));
            }
            let len = self.blocks.seq_len(c.id)?;
            if c.tokens.is_empty() {
                return Err(RunnerError::Model(format!("{}: empty chunk", c.id)));
            }
            if let Some(t) = c.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(RunnerError::Model(format!(
                    "{}: token id {t} outside the vocabulary ({vocab})",
                    c.id
                )));
            }
            let max = self.info.context_length;
            if len + c.tokens.len() > max {
                return Err(RunnerError::ContextExceeded {
                    id: c.id,
                    len: len + c.tokens.len(),
                    max,
                });
            }
        }
        Ok(())
    }

    fn run(&mut self, batch: &[SeqChunk]) -> Result<Vec<ChunkLogits>, RunnerError> {
        let mut tokens = Vec::new();
        let mut plan = Vec::new();
        let mut logit_rows = Vec::new();
        let mut rows_per_chunk = Vec::with_capacity(batch.len());
        for (ci, c) in batch.iter().enumerate() {
            let start = self.blocks.seq_len(c.id)?;
            let first_row = tokens.len();
            for (i, &t) in c.tokens.iter().enumerate() {
                let (block, slot) = self.blocks.slot(c.id, start + i)?;
                tokens.push(t);
                plan.push(TokenPlan {
                    chunk: ci,
                    pos: start + i,
                    block,
                    slot,
                });
            }
            let rows = match c.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => {
                    logit_rows.push(tokens.len() - 1);
                    1
                }
                LogitsWanted::All => {
                    logit_rows.extend(first_row..tokens.len());
                    c.tokens.len()
                }
            };
            rows_per_chunk.push(rows);
        }
        let tables = batch
            .iter()
            .map(|c| self.blocks.block_table(c.id).map(<[_]>::to_vec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut logits = self
            .group
            .forward(OwnedStep {
                tokens,
                plan,
                tables,
                logit_rows,
            })
            .map_err(RunnerError::Model)?;
        let vocab = self.info.vocab_size;
        let total: usize = rows_per_chunk.iter().sum();
        if logits.len() != total * vocab {
            return Err(RunnerError::Model(format!(
                "rank 0 returned {} logits for {total} rows of {vocab}",
                logits.len()
            )));
        }
        // Chunks split off from the back: the first keeps the step's allocation (a
        // batch-1 decode copies nothing).
        let mut out = Vec::with_capacity(batch.len());
        let mut end = total;
        for (c, rows) in batch.iter().zip(rows_per_chunk).rev() {
            end -= rows;
            out.push(ChunkLogits {
                id: c.id,
                data: match end {
                    0 => std::mem::take(&mut logits),
                    _ => logits.split_off(end * vocab),
                },
                rows,
            });
        }
        out.reverse();
        Ok(out)
    }
}

impl<R: GroupRank> ModelRunner for GroupRunner<R> {
    fn info(&self) -> &RunnerInfo {
        &self.info
    }

    fn add_sequence_with(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        prefix_cache: PrefixCache,
    ) -> Result<usize, RunnerError> {
        if prompt.is_empty() {
            return Err(RunnerError::Model(format!("{id}: empty prompt")));
        }
        if prompt.len() > self.info.context_length {
            return Err(RunnerError::ContextExceeded {
                id,
                len: prompt.len(),
                max: self.info.context_length,
            });
        }
        self.blocks.add_sequence_with(id, prompt, prefix_cache)
    }

    fn blocks_needed(&self, id: SeqId, n: usize) -> Result<usize, RunnerError> {
        self.blocks.blocks_needed(id, n)
    }

    fn seq_len(&self, id: SeqId) -> Result<usize, RunnerError> {
        self.blocks.seq_len(id)
    }

    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<ChunkLogits>, RunnerError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.validate(batch)?;
        let reqs: Vec<(SeqId, usize)> = batch.iter().map(|c| (c.id, c.tokens.len())).collect();
        let prev = self.blocks.reserve(&reqs)?;
        match self.run(batch) {
            Ok(out) => {
                for c in batch {
                    self.blocks.commit(c.id, &c.tokens)?;
                }
                Ok(out)
            }
            Err(e) => {
                self.blocks.rollback(&reqs, &prev);
                Err(e)
            }
        }
    }

    fn remove_sequence(&mut self, id: SeqId) {
        self.blocks.remove_sequence(id);
    }

    fn free_blocks(&self) -> usize {
        self.blocks.free_blocks()
    }

    fn healthy(&self) -> Result<(), RunnerError> {
        self.group.healthy().map_err(RunnerError::Model)
    }

    fn stats(&self) -> crate::runner::RunnerStats {
        let (collectives, collective_seconds, collective_failures) =
            self.group.collectives().snapshot();
        crate::runner::RunnerStats {
            kv_blocks_cached: self.blocks.cached_blocks(),
            collectives,
            collective_seconds,
            collective_failures,
        }
    }
}
