//! [`DeviceRunner`]: the [`ModelRunner`] over a [`DeviceModel`] and its paged KV cache
//! ([`DeviceKv`]) on one device.

use std::collections::HashSet;

use super::{DeviceKv, DeviceModel};
use crate::kv::BlockManager;
use crate::model::{StepPlan, TokenPlan};
use crate::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerInfo, SeqChunk, SeqId,
};

/// A single-device [`ModelRunner`] over [`DeviceModel`]: the same block bookkeeping and
/// validation as [`crate::model::runner::LlamaRunner`], the forward on the device.
pub struct DeviceRunner {
    model: DeviceModel,
    blocks: BlockManager,
    kv: DeviceKv,
    info: RunnerInfo,
}

impl std::fmt::Debug for DeviceRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRunner")
            .field("info", &self.info)
            .field("device", &self.model.device)
            .finish_non_exhaustive()
    }
}

impl DeviceRunner {
    /// `num_blocks` KV blocks of `block_size` positions on the model's device.
    pub fn new(
        model: DeviceModel,
        model_id: String,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, RunnerError> {
        if num_blocks == 0 || block_size == 0 {
            return Err(RunnerError::Model(format!(
                "KV cache of {num_blocks} blocks × {block_size} positions is empty"
            )));
        }
        let kv = model.new_kv(num_blocks, block_size)?;
        let info = RunnerInfo {
            model_id,
            dtype: model.dtype_name(),
            tp: 1,
            context_length: model.cfg.context_length,
            vocab_size: model.cfg.vocab_size,
            kv_block_size: block_size,
            kv_blocks_total: num_blocks,
        };
        Ok(DeviceRunner {
            model,
            blocks: BlockManager::new(num_blocks, block_size),
            kv,
            info,
        })
    }

    pub fn model(&self) -> &DeviceModel {
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
            rows_per_chunk.push(match c.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => {
                    logit_rows.push(tokens.len() - 1);
                    1
                }
                LogitsWanted::All => {
                    logit_rows.extend(first_row..tokens.len());
                    c.tokens.len()
                }
            });
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
        // All rows to the host in one copy, then each chunk's slice into its own vector.
        // (Not `to_vec1` on the device tensor, which copies twice; and not per chunk from
        // the device: candle brings a tensor's whole storage to the host even for a
        // narrowed view, 2.6× slower at batch 32 on an H200.)
        let logits = match self.model.forward_logits(&step, &mut self.kv)? {
            Some(l) => Some(
                l.to_device(&candle_core::Device::Cpu)
                    .map_err(|e| RunnerError::Model(format!("logits to the host: {e}")))?,
            ),
            None => None,
        };
        let mut out = Vec::with_capacity(batch.len());
        let mut off = 0;
        for (c, rows) in batch.iter().zip(rows_per_chunk) {
            let data = match &logits {
                Some(l) if rows > 0 => l
                    .narrow(0, off, rows)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| RunnerError::Model(format!("logits rows: {e}")))?,
                _ => Vec::new(),
            };
            out.push(ChunkLogits {
                id: c.id,
                data,
                rows,
            });
            off += rows;
        }
        Ok(out)
    }
}

impl ModelRunner for DeviceRunner {
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
