//! The attention of a device step: a step's chunks padded to one
//! `[chunks, kv_heads, queries, keys]` batch with a causal mask, so a step is a fixed
//! number of kernel launches whatever its batch.

use candle_core::{D, DType, Device, Tensor};

use super::DeviceError;
use crate::model::StepPlan;

/// The index tensors that turn a step's tokens into one padded attention batch, built
/// once per step and shared by all layers: `chunks × max_queries` query rows against
/// `chunks × max_keys` key slots, with a causal mask.
pub(super) struct AttentionPlan {
    chunks: usize,
    max_q: usize,
    max_k: usize,
    group: usize,
    /// Token row of each padded query (padding: row 0).
    q_idx: Tensor,
    /// KV slot of each padded key position (padding: slot 0).
    k_idx: Tensor,
    /// `[chunks, 1, max_q * group, max_k]`, 0 or -inf.
    mask: Tensor,
    /// Padded query index of each token, in token order.
    out_idx: Tensor,
    /// Padded layout = token order (every chunk `max_q` tokens, e.g. a decode-only
    /// step): the two query gathers are skipped.
    identity: bool,
}

impl AttentionPlan {
    pub(super) fn new(
        step: &StepPlan<'_>,
        block_size: usize,
        group: usize,
        dev: &Device,
    ) -> Result<Self, DeviceError> {
        let chunks = step.tables.len();
        // Tokens of each chunk in step order (a chunk's positions are consecutive).
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); chunks];
        for (t, p) in step.plan.iter().enumerate() {
            members[p.chunk].push(t);
        }
        let max_q = members.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let keys = |c: usize| {
            members[c]
                .iter()
                .map(|&t| step.plan[t].pos + 1)
                .max()
                .unwrap_or(0)
        };
        let max_k = (0..chunks).map(keys).max().unwrap_or(1).max(1);
        let identity = members.iter().enumerate().all(|(c, m)| {
            m.len() == max_q && m.iter().enumerate().all(|(i, &t)| t == c * max_q + i)
        });
        let mut q_idx = vec![0u32; chunks * max_q];
        let mut out_idx = vec![0u32; step.plan.len()];
        let mut k_idx = vec![0u32; chunks * max_k];
        let mut mask = vec![f32::NEG_INFINITY; chunks * max_q * group * max_k];
        for (c, toks) in members.iter().enumerate() {
            let table = step.tables[c];
            for j in 0..keys(c) {
                k_idx[c * max_k + j] =
                    table[j / block_size] * block_size as u32 + (j % block_size) as u32;
            }
            for m in 0..max_q {
                // A padded query sees key 0 only, so its softmax stays finite.
                let visible = toks.get(m).map_or(1, |&t| step.plan[t].pos + 1);
                if let Some(&t) = toks.get(m) {
                    q_idx[c * max_q + m] = t as u32;
                    out_idx[t] = (c * max_q + m) as u32;
                }
                for qi in 0..group {
                    let row = ((c * max_q + m) * group + qi) * max_k;
                    mask[row..row + visible].fill(0.0);
                }
            }
        }
        Ok(AttentionPlan {
            chunks,
            max_q,
            max_k,
            group,
            q_idx: Tensor::from_vec(q_idx, chunks * max_q, dev)?,
            k_idx: Tensor::from_vec(k_idx, chunks * max_k, dev)?,
            mask: Tensor::from_vec(mask, (chunks, 1, max_q * group, max_k), dev)?,
            out_idx: Tensor::from_vec(out_idx, step.plan.len(), dev)?,
            identity,
        })
    }

    /// Attention of `q` `[tokens, heads * head_dim]` (f32) over the cached keys/values;
    /// returns `[tokens, heads * head_dim]` f32. Head `g * group + i` reads KV head `g`.
    pub(super) fn attend(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        nkv: usize,
        hd: usize,
    ) -> Result<Tensor, DeviceError> {
        let (c, mq, mk, g) = (self.chunks, self.max_q, self.max_k, self.group);
        let q = if self.identity {
            q.clone()
        } else {
            q.index_select(&self.q_idx, 0)?
        };
        let q = q
            .reshape((c, mq, nkv, g, hd))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((c, nkv, mq * g, hd))?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&self.k_idx, 0)?
                .to_dtype(DType::F32)?
                .reshape((c, mk, nkv, hd))
        };
        // Kᵀ `[c, kv_heads, head_dim, keys]` and V `[c, kv_heads, keys, head_dim]`.
        let kt = gather(k_cache)?.permute((0, 2, 3, 1))?.contiguous()?;
        let v = gather(v_cache)?.transpose(1, 2)?.contiguous()?;
        // q carries the 1/√head_dim scale (folded into its weights).
        let scores = q.matmul(&kt)?.broadcast_add(&self.mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let out = p
            .matmul(&v)?
            .reshape((c, nkv, mq, g, hd))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((c * mq, nkv * g * hd))?;
        if self.identity {
            return Ok(out);
        }
        Ok(out.index_select(&self.out_idx, 0)?)
    }
}
