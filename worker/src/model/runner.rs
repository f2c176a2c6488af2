//! [`LlamaRunner`]: the [`ModelRunner`] over [`LlamaModel`] + paged KV cache, on a
//! dedicated rayon pool so the model's threads are not shared with the async runtime.

use std::collections::HashSet;

use crate::kv::{BlockManager, KvStore};
use crate::model::{LlamaModel, StepPlan, TokenPlan};
use crate::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerInfo, SeqChunk, SeqId,
};

/// A single-rank Llama runner.
pub struct LlamaRunner {
    model: LlamaModel,
    blocks: BlockManager,
    kv: KvStore,
    info: RunnerInfo,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for LlamaRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaRunner")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl LlamaRunner {
    /// `num_blocks` KV blocks of `block_size` positions; `threads` model threads.
    pub fn new(
        model: LlamaModel,
        model_id: String,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, RunnerError> {
        let cfg = &model.cfg;
        let kv = KvStore::new(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("shardline-model-{i}"))
            .build()
            .map_err(|e| RunnerError::Model(format!("model thread pool: {e}")))?;
        let info = RunnerInfo {
            model_id,
            dtype: model.dtype_name(),
            tp: 1,
            context_length: cfg.context_length,
            vocab_size: cfg.vocab_size,
            kv_block_size: block_size,
            kv_blocks_total: num_blocks,
        };
        Ok(LlamaRunner {
            model,
            blocks: BlockManager::new(num_blocks, block_size),
            kv,
            info,
            pool,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    fn validate(&self, batch: &[SeqChunk]) -> Result<(), RunnerError> {
        let mut seen = HashSet::with_capacity(batch.len());
        let vocab = self.model.cfg.vocab_size;
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
            .map(|c| self.blocks.block_table(c.id))
            .collect::<Result<Vec<_>, _>>()?;
        let step = StepPlan {
            tokens: &tokens,
            plan: &plan,
            tables: &tables,
            logit_rows: &logit_rows,
        };
        let model = &self.model;
        let kv = &mut self.kv;
        let logits = self.pool.install(|| model.forward(&step, kv));
        let vocab = self.model.cfg.vocab_size;
        let mut out = Vec::with_capacity(batch.len());
        let mut off = 0;
        for (c, rows) in batch.iter().zip(rows_per_chunk) {
            out.push(ChunkLogits {
                id: c.id,
                data: logits[off * vocab..(off + rows) * vocab].to_vec(),
                rows,
            });
            off += rows;
        }
        Ok(out)
    }
}

impl ModelRunner for LlamaRunner {
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
}
