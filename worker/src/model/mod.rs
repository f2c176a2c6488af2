//! Llama-family transformer for continuous batching on CPU.
//!
//! One [`LlamaModel::forward`] runs a mixed step: prefill chunks and decode tokens of many
//! sequences, each at its own position. Projections and the MLP are one matmul over all
//! tokens of the step; attention runs per sequence, per query position, per KV-head group
//! over that sequence's paged blocks, keys in position order. Every reduction has an order
//! fixed by its own row, so results are batch- and chunking-invariant (see
//! [`crate::kernels`]).
//!
//! Weights are held per layer ([`LayerWeights`]); a model may be one tensor-parallel
//! rank's shard of the full one ([`crate::model::shard`]): its [`RankPart`] says which query
//! and KV heads and which FFN slice it holds, and [`LlamaModel::forward_rank`] sums the
//! row-parallel outputs with the group's [`Communicator`].

pub mod bench;
pub mod device;
pub mod group;
pub mod runner;
pub mod shard;
pub mod tiny;

use crate::config::{LlamaConfig, RopeStyle};
use crate::kernels::{
    KvBlocks, KvElement, Linear, attend, rms_norm, rope, silu_mul, sum_segments, team,
};
use crate::kv::{BlockId, KvRuns, KvStore, KvView};
use crate::tp::RankPart;
use crate::tp::{CommError, Communicator, SingleRank};

/// Input projection that may be fused (one matmul) or, when the parts' storage formats
/// differ, a list run one after the other and stitched along the output axis.
#[derive(Debug, Clone)]
pub enum Projection {
    Fused(Linear),
    Split(Vec<Linear>),
}

impl Projection {
    pub fn new(parts: Vec<Linear>) -> Self {
        match Linear::concat(parts.clone()) {
            Some(l) => Projection::Fused(l),
            None => Projection::Split(parts),
        }
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        match self {
            Projection::Fused(l) => l.forward(x, rows),
            Projection::Split(parts) => {
                let total: usize = parts.iter().map(|p| p.out_dim).sum();
                let mut y = vec![0f32; rows * total];
                let mut off = 0;
                for p in parts {
                    let part = p.forward(x, rows);
                    for r in 0..rows {
                        y[r * total + off..r * total + off + p.out_dim]
                            .copy_from_slice(&part[r * p.out_dim..(r + 1) * p.out_dim]);
                    }
                    off += p.out_dim;
                }
                y
            }
        }
    }
}

/// Weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// q | k | v along the output axis.
    pub qkv: Projection,
    pub o_proj: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate | up along the output axis.
    pub gate_up: Projection,
    pub down: Linear,
}

/// Where the embedding rows come from.
#[derive(Debug, Clone)]
pub enum Embeddings {
    /// f32 table, `vocab × hidden`.
    Dense(Vec<f32>),
    /// Rows dequantized on lookup from the (tied) lm_head.
    FromLmHead,
}

/// All weights of a Llama model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub embed: Embeddings,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
    /// The heads and FFN slice this model holds (all of them unless sharded).
    pub part: RankPart,
    inv_freq: Vec<f32>,
}

/// One token of a step: which chunk it belongs to and its absolute position.
#[derive(Debug, Clone, Copy)]
pub struct TokenPlan {
    pub chunk: usize,
    pub pos: usize,
    pub block: BlockId,
    pub slot: usize,
}

/// What the model needs to know about one step.
#[derive(Debug)]
pub struct StepPlan<'a> {
    pub tokens: &'a [u32],
    pub plan: &'a [TokenPlan],
    /// Block table of each chunk's sequence (covering every position of the step).
    pub tables: &'a [&'a [BlockId]],
    /// Rows (indices into `tokens`) whose logits are wanted, in output order.
    pub logit_rows: &'a [usize],
}

impl LlamaModel {
    pub fn new(
        cfg: LlamaConfig,
        embed: Embeddings,
        layers: Vec<LayerWeights>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Self {
        let inv_freq = cfg.rope_inv_freq();
        let part = RankPart::whole(&cfg);
        LlamaModel {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            part,
            inv_freq,
        }
    }

    /// This model as the shard `part` (its weights must already be that shard's).
    pub fn with_part(mut self, part: RankPart) -> Self {
        self.part = part;
        self
    }

    /// Storage formats of the weights, e.g. `q4_1` (for `Info.dtype`).
    pub fn dtype_name(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        let mut add = |n: &'static str| {
            if !names.contains(&n) {
                names.push(n);
            }
        };
        for l in &self.layers {
            match &l.qkv {
                Projection::Fused(p) => add(p.dtype_name()),
                Projection::Split(ps) => ps.iter().for_each(|p| add(p.dtype_name())),
            }
            add(l.o_proj.dtype_name());
            add(l.down.dtype_name());
        }
        add(self.lm_head.dtype_name());
        names.join("+")
    }

    /// Embedding rows of `tokens`. A rank holds the rows of its vocabulary slice only;
    /// other tokens' rows come from their owners through an all-reduce (zeros elsewhere,
    /// so the sum is exact).
    fn embed_rows(
        &self,
        tokens: &[u32],
        comm: &mut dyn Communicator<Buffer = [f32]>,
    ) -> Result<Vec<f32>, CommError> {
        let h = self.cfg.hidden_size;
        let vocab = &self.part.vocab;
        let mut x = vec![0f32; tokens.len() * h];
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            let t = *t as usize;
            if !vocab.contains(&t) {
                continue;
            }
            let t = t - vocab.start;
            match &self.embed {
                Embeddings::Dense(e) => row.copy_from_slice(&e[t * h..(t + 1) * h]),
                Embeddings::FromLmHead => self.lm_head.dequantize_row(t, row),
            }
        }
        if comm.world_size() > 1 {
            comm.all_reduce_sum(&mut x)?;
        }
        Ok(x)
    }

    /// Logits of the final hidden rows `last` (`rows × hidden`): each rank computes its
    /// vocabulary slice; rank 0 gets the whole rows (every logit is one rank's whole dot
    /// product, so they are those of tp 1).
    fn head(
        &self,
        last: &[f32],
        rows: usize,
        comm: &mut dyn Communicator<Buffer = [f32]>,
    ) -> Result<Vec<f32>, CommError> {
        let mine = self.lm_head.forward(last, rows);
        if comm.world_size() == 1 {
            return Ok(mine);
        }
        let (v, local) = (self.cfg.vocab_size, self.part.vocab.clone());
        let mut all = vec![0f32; rows * v];
        for (r, row) in mine.chunks_exact(local.len()).enumerate() {
            all[r * v + local.start..r * v + local.end].copy_from_slice(row);
        }
        comm.all_reduce_sum(&mut all)?;
        Ok(if comm.rank() == 0 { all } else { Vec::new() })
    }

    /// Runs one step of an unsharded model; see [`Self::forward_rank`].
    pub fn forward(&self, step: &StepPlan<'_>, kv: &mut KvStore) -> Vec<f32> {
        match self.forward_rank(step, kv, &mut SingleRank) {
            Ok(logits) => logits,
            Err(e) => unreachable!("a single rank has no collectives to fail: {e}"),
        }
    }

    /// Runs one step on this rank. K/V of the rank's KV heads are written to `kv` at each
    /// token's slot; embeddings, o_proj and down outputs and the logits are combined over
    /// the group with `comm`. Rank 0 returns the logits of `step.logit_rows` (`logit_rows.len() × vocab`), the
    /// other ranks an empty vector.
    pub fn forward_rank(
        &self,
        step: &StepPlan<'_>,
        kv: &mut KvStore,
        comm: &mut dyn Communicator<Buffer = [f32]>,
    ) -> Result<Vec<f32>, CommError> {
        let cfg = &self.cfg;
        let n = step.tokens.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (self.part.q_heads.len(), self.part.kv_heads.len());
        let half = hd / 2;
        // cos/sin per token, shared by all layers.
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (t, p) in step.plan.iter().enumerate() {
            for i in 0..half {
                let a = p.pos as f32 * self.inv_freq[i];
                cos[t * half + i] = a.cos();
                sin[t * half + i] = a.sin();
            }
        }
        let interleaved = cfg.rope_style == RopeStyle::Interleaved;
        let mut x = self.embed_rows(step.tokens, comm)?;
        let qkv_dim = self.part.qkv_dim(hd);
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps);
            let mut qkv = layer.qkv.forward(&xn, n);
            for t in 0..n {
                let (c, s) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                let row = &mut qkv[t * qkv_dim..(t + 1) * qkv_dim];
                for head in row[..(nh + nkv) * hd].chunks_exact_mut(hd) {
                    rope(head, c, s, interleaved);
                }
                let p = step.plan[t];
                for g in 0..nkv {
                    let k = &row[(nh + g) * hd..(nh + g + 1) * hd];
                    let v = &row[(nh + nkv + g) * hd..(nh + nkv + g + 1) * hd];
                    kv.write(li, p.block, g, p.slot, k, v);
                }
            }
            let attn = self.attention(li, step, &qkv, kv);
            let o = self.row_parallel(&layer.o_proj, &attn, n, comm)?;
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let xn = rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps);
            let gu = layer.gate_up.forward(&xn, n);
            let act = silu_mul(&gu, self.part.ffn.len());
            let d = self.row_parallel(&layer.down, &act, n, comm)?;
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
        let mut last = Vec::with_capacity(step.logit_rows.len() * h);
        for &r in step.logit_rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let last = rms_norm(&last, &self.norm, cfg.rms_norm_eps);
        self.head(&last, step.logit_rows.len(), comm)
    }

    /// A row-parallel layer's output over the whole group: this rank's segment products
    /// (`segments × n × hidden`) summed with every other rank's, in segment order on
    /// every rank, so the result does not depend on the tensor-parallel size.
    fn row_parallel(
        &self,
        layer: &Linear,
        x: &[f32],
        n: usize,
        comm: &mut dyn Communicator<Buffer = [f32]>,
    ) -> Result<Vec<f32>, CommError> {
        let segments = self.part.segments.len();
        if comm.world_size() == 1 {
            return Ok(layer.forward_summed(x, n, segments));
        }
        let size = n * self.cfg.hidden_size;
        // Each segment's product travels apart (zeros elsewhere add exactly), so the
        // order of the final sum is the segments', not the ranks'.
        let mut all = vec![0f32; self.part.num_segments * size];
        all[self.part.segments.start * size..self.part.segments.end * size]
            .copy_from_slice(&layer.forward_segments(x, n, segments));
        comm.all_reduce_sum(&mut all)?;
        Ok(sum_segments(&all, size))
    }

    /// Causal attention of every token of the step over its own sequence's blocks, with
    /// the kernel built for the cache's element type.
    fn attention(&self, layer: usize, step: &StepPlan<'_>, qkv: &[f32], kv: &KvStore) -> Vec<f32> {
        let bs = kv.block_size();
        match kv.view() {
            KvView::F32(runs) => self.attention_over(layer, step, qkv, runs, bs),
            KvView::F16(runs) => self.attention_over(layer, step, qkv, runs, bs),
            KvView::Bf16(runs) => self.attention_over(layer, step, qkv, runs, bs),
        }
    }

    /// [`Self::attention`] over a cache of `T`s with blocks of `bs` positions.
    /// Parallel over (token, KV-head group); each output is reduced over key positions
    /// `0..=pos` in order, so it does not depend on the rest of the batch.
    fn attention_over<T: KvElement>(
        &self,
        layer: usize,
        step: &StepPlan<'_>,
        qkv: &[f32],
        kv: KvRuns<'_, T>,
        bs: usize,
    ) -> Vec<f32> {
        let hd = self.cfg.head_dim;
        let (nh, nkv) = (self.part.q_heads.len(), self.part.kv_heads.len());
        let group = nh / nkv;
        let qkv_dim = self.part.qkv_dim(hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; step.tokens.len() * nh * hd];
        team::for_each_chunk_mut(&mut out, group * hd, |idx, out_g| {
            let (t, g) = (idx / nkv, idx % nkv);
            let p = step.plan[t];
            let table = step.tables[p.chunk];
            let npos = p.pos + 1;
            let blocks = &table[..npos.div_ceil(bs)];
            let keys: Vec<&[T]> = blocks.iter().map(|&b| kv.keys(layer, b, g)).collect();
            let values: Vec<&[T]> = blocks.iter().map(|&b| kv.values(layer, b, g)).collect();
            let mut scores = Vec::with_capacity(group * blocks.len() * bs);
            let q = &qkv[t * qkv_dim + g * group * hd..t * qkv_dim + (g + 1) * group * hd];
            attend(
                q,
                hd,
                KvBlocks {
                    keys: &keys,
                    values: &values,
                    block_size: bs,
                    len: npos,
                },
                scale,
                &mut scores,
                out_g,
            );
        });
        out
    }
}
