//! The Llama on a candle [`Device`] (CUDA, or candle's CPU backend for tests), built from
//! an already loaded [`LlamaModel`] so every checkpoint format the loaders read works here.
//!
//! [`DeviceModel::forward`] takes the same [`StepPlan`] as [`LlamaModel::forward`] (a mixed
//! step of prefill chunks and decode tokens, each sequence at its own position) and runs it
//! with candle tensor ops only. The paged KV cache ([`DeviceKv`]) is one `[slots, kv_dim]`
//! tensor per layer for keys and one for values, slot = `block * block_size + slot`:
//! written in place with `scatter_set`, gathered per sequence with `index_select`.
//! Attention pads the step's chunks to one `[chunks, kv_heads, queries, keys]` batch with a
//! causal mask, so a step is a fixed number of kernel launches whatever its batch.
//!
//! Weights are dequantized to f32 on the host and uploaded as bf16 on CUDA, f32 on CPU;
//! norms, RoPE, softmax and the residual stream stay f32. Unlike the CPU kernels these ops
//! are not batch invariant (cuBLAS picks kernels by shape).
//!
//! **Tensor parallelism.** A rank shard of a [`LlamaModel`] ([`crate::model::shard`]) becomes
//! a rank's [`DeviceModel`]: its q/KV heads, FFN slice and vocabulary slice.
//! [`DeviceModel::forward_rank`] gathers the embeddings (rows outside the rank's slice
//! are zero, then an all-reduce), all-reduces after o_proj and after down, and gathers the
//! vocab-parallel head's logits to rank 0 (zero-padded all-reduce). Unlike the CPU kernels
//! the row-parallel sums are plain sums of each rank's product, so device logits are not
//! bitwise tp-invariant: they agree with tp 1 to rounding. At tp 1 no collective runs.
//!
//! [`DeviceRunner`] is the [`ModelRunner`] over a group of [`DeviceRank`]s, the same
//! runner (block bookkeeping, [`crate::model::group::RankGroup`]) as
//! [`crate::model::runner::LlamaRunner`].

use std::str::FromStr;

use candle_core::{D, DType, Device, Tensor};

use crate::config::{LlamaConfig, RopeStyle};
use crate::kernels::{Linear, WeightData};
use crate::model::{Embeddings, LlamaModel, Projection, StepPlan, TokenPlan};
use crate::runner::RunnerError;
use crate::tp::RankPart;
use crate::tp::{CommError, Communicator};

mod attention;
mod runner;

use attention::AttentionPlan;

pub use runner::{DeviceRank, DeviceRunner, SingleTensorRank, device_group};

/// Errors of the device backend.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("bad device `{0}`: expected `cpu`, `cuda` or `cuda:N`")]
    BadDevice(String),
    #[error("device `{0}` needs a binary built with `--features cuda` (deploy/build-cuda.sh)")]
    CudaNotBuilt(String),
    #[error("this model is tensor-parallel shard {rank} of {world}, run with a group of {got}")]
    Sharded {
        rank: usize,
        world: usize,
        got: usize,
    },
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<DeviceError> for RunnerError {
    fn from(e: DeviceError) -> Self {
        RunnerError::Model(e.to_string())
    }
}

/// Where the model runs, as given on the command line (`cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| DeviceError::BadDevice(s.into())),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device; `cuda` in a binary without the feature is a clear error.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) if cfg!(feature = "cuda") => Ok(Device::new_cuda(n)?),
            DeviceChoice::Cuda(_) => Err(DeviceError::CudaNotBuilt(self.to_string())),
        }
    }

    /// Weight dtype: bf16 on CUDA (tensor cores, half the bytes), f32 on CPU (exact
    /// comparison with the CPU kernels).
    pub fn weight_dtype(self) -> DType {
        match self {
            DeviceChoice::Cpu => DType::F32,
            DeviceChoice::Cuda(_) => DType::BF16,
        }
    }
}

/// A linear layer's weights as f32, `out_dim × in_dim` row-major.
fn dequantize(l: &Linear) -> Vec<f32> {
    if let WeightData::F32(w) = &l.w {
        return w.clone();
    }
    let mut out = vec![0f32; l.out_dim * l.in_dim];
    for (o, row) in out.chunks_exact_mut(l.in_dim).enumerate() {
        l.dequantize_row(o, row);
    }
    out
}

fn projection_parts(p: &Projection) -> Vec<&Linear> {
    match p {
        Projection::Fused(l) => vec![l],
        Projection::Split(parts) => parts.iter().collect(),
    }
}

/// One decoder layer on the device.
#[derive(Debug)]
struct DeviceLayer {
    attn_norm: Tensor,
    /// `[q | k | v, hidden]`.
    qkv: Tensor,
    o_proj: Tensor,
    ffn_norm: Tensor,
    /// `[gate | up, hidden]`.
    gate_up: Tensor,
    down: Tensor,
}

/// Paged KV cache on the device: per layer `[num_blocks * block_size, kv_heads * head_dim]`.
#[derive(Debug)]
pub struct DeviceKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
}

impl DeviceKv {
    pub fn block_size(&self) -> usize {
        self.block_size
    }
}

/// The Llama's weights on a device.
#[derive(Debug)]
pub struct DeviceModel {
    pub cfg: LlamaConfig,
    device: Device,
    dtype: DType,
    /// Dense embedding table, or `None` when tied to `lm_head`.
    embed: Option<Tensor>,
    layers: Vec<DeviceLayer>,
    norm: Tensor,
    /// `[vocab slice, hidden]`.
    lm_head: Tensor,
    /// The heads, FFN slice and vocabulary slice this rank holds.
    part: RankPart,
    inv_freq: Vec<f32>,
    /// Bytes of the weights a decode step reads (every matrix once, norms; not the
    /// embedding rows).
    weight_bytes: usize,
}

impl DeviceModel {
    /// Uploads `model` (whole, or a rank shard) to `choice`'s device, dequantizing every
    /// matrix.
    pub fn from_model(model: &LlamaModel, choice: DeviceChoice) -> Result<Self, DeviceError> {
        Self::from_model_on(model, choice.open()?, choice.weight_dtype())
    }

    /// [`Self::from_model`] onto an opened `device` (e.g. an NCCL rank's), weights in
    /// `dtype`.
    pub fn from_model_on(
        model: &LlamaModel,
        device: Device,
        dtype: DType,
    ) -> Result<Self, DeviceError> {
        let mut weight_bytes = 0usize;
        // The attention scale 1/√head_dim is folded into q's rows of the qkv weights (RoPE
        // is linear, so it commutes), which saves one op per layer.
        let q_rows = model.part.q_heads.len() * model.cfg.head_dim;
        let q_scale = 1.0 / (model.cfg.head_dim as f32).sqrt();
        let mut matrix = |parts: &[&Linear], scaled_rows: usize| -> Result<Tensor, DeviceError> {
            let in_dim = parts[0].in_dim;
            let out_dim: usize = parts.iter().map(|p| p.out_dim).sum();
            let mut data = Vec::with_capacity(out_dim * in_dim);
            for p in parts {
                data.extend(dequantize(p));
            }
            for w in &mut data[..scaled_rows * in_dim] {
                *w *= q_scale;
            }
            weight_bytes += out_dim * in_dim * dtype.size_in_bytes();
            let t = Tensor::from_vec(data, (out_dim, in_dim), &Device::Cpu)?;
            Ok(t.to_dtype(dtype)?.to_device(&device)?)
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            layers.push(DeviceLayer {
                attn_norm: Tensor::new(l.attn_norm.as_slice(), &device)?,
                qkv: matrix(&projection_parts(&l.qkv), q_rows)?,
                o_proj: matrix(&[&l.o_proj], 0)?,
                ffn_norm: Tensor::new(l.ffn_norm.as_slice(), &device)?,
                gate_up: matrix(&projection_parts(&l.gate_up), 0)?,
                down: matrix(&[&l.down], 0)?,
            });
        }
        let lm_head = matrix(&[&model.lm_head], 0)?;
        let h = model.cfg.hidden_size;
        let embed = match &model.embed {
            Embeddings::Dense(e) => Some(
                Tensor::from_slice(e, (e.len() / h, h), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(&device)?,
            ),
            Embeddings::FromLmHead => None,
        };
        let norms = (2 * model.layers.len() + 1) * h * 4;
        let norm = Tensor::new(model.norm.as_slice(), &device)?;
        Ok(DeviceModel {
            cfg: model.cfg.clone(),
            inv_freq: model.cfg.rope_inv_freq(),
            device,
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            part: model.part.clone(),
            weight_bytes: weight_bytes + norms,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What this rank holds (everything at tp 1).
    pub fn part(&self) -> &RankPart {
        &self.part
    }

    /// Weight bytes one decode step reads (for the memory-bandwidth figure).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// `bf16`/`f32`: the dtype the weights are held in on the device.
    pub fn dtype_name(&self) -> String {
        format!("{:?}", self.dtype).to_lowercase()
    }

    /// A zeroed paged KV cache of `num_blocks` blocks on this model's device (bf16 on
    /// CUDA, f32 on CPU).
    pub fn new_kv(&self, num_blocks: usize, block_size: usize) -> Result<DeviceKv, DeviceError> {
        let shape = (
            num_blocks * block_size,
            self.part.kv_heads.len() * self.cfg.head_dim,
        );
        let mut k = Vec::with_capacity(self.cfg.num_layers);
        let mut v = Vec::with_capacity(self.cfg.num_layers);
        for _ in 0..self.cfg.num_layers {
            k.push(Tensor::zeros(shape, self.dtype, &self.device)?);
            v.push(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        Ok(DeviceKv { k, v, block_size })
    }

    /// Runs one step: K/V of every token are written to `kv` at its slot; returns the
    /// logits of `step.logit_rows`, `logit_rows.len() × vocab`.
    pub fn forward(&self, step: &StepPlan<'_>, kv: &mut DeviceKv) -> Result<Vec<f32>, DeviceError> {
        match self.forward_logits(step, kv)? {
            Some(l) => Ok(l.flatten_all()?.to_vec1::<f32>()?),
            None => Ok(Vec::new()),
        }
    }

    /// [`Self::forward`] with the logits left on the device, `[logit_rows, vocab]` f32;
    /// `None` when no row is wanted. The model must be whole (tp 1).
    pub fn forward_logits(
        &self,
        step: &StepPlan<'_>,
        kv: &mut DeviceKv,
    ) -> Result<Option<Tensor>, DeviceError> {
        self.forward_rank(step, kv, &mut SingleTensorRank)
    }

    /// One step on this rank of a group: K/V of the rank's KV heads are written to `kv`;
    /// embeddings, o_proj and down outputs and the logits are combined over the group with
    /// `comm`. Rank 0 gets `[logit_rows, vocab]` f32 (`None` when no row is wanted), the
    /// other ranks `None`.
    pub fn forward_rank(
        &self,
        step: &StepPlan<'_>,
        kv: &mut DeviceKv,
        comm: &mut dyn Communicator<Buffer = Tensor>,
    ) -> Result<Option<Tensor>, DeviceError> {
        let cfg = &self.cfg;
        let dev = &self.device;
        let n = step.tokens.len();
        let world = comm.world_size();
        if world != self.part.world || comm.rank() != self.part.rank {
            return Err(DeviceError::Sharded {
                rank: self.part.rank,
                world: self.part.world,
                got: world,
            });
        }
        let hd = cfg.head_dim;
        let (nh, nkv) = (self.part.q_heads.len(), self.part.kv_heads.len());
        let (qd, kvd) = (nh * hd, nkv * hd);
        if n == 0 {
            return Ok(None);
        }
        let mut x = self.embed_rows(step.tokens, comm)?;
        let (cos, sin) = self.rope_tables(step.plan)?;
        let att = AttentionPlan::new(step, kv.block_size, nh / nkv, dev)?;
        let slots: Vec<u32> = step
            .plan
            .iter()
            .map(|p| p.block * kv.block_size as u32 + p.slot as u32)
            .collect();
        let slot_idx = Tensor::from_vec(slots, (n, 1), dev)?
            .broadcast_as((n, kvd))?
            .contiguous()?;
        let eps = cfg.rms_norm_eps as f64;
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = self.linear(&xn, &layer.qkv)?;
            // q and k rotated in one go: `[tokens, heads + kv_heads, head_dim]`.
            let qk = qkv.narrow(1, 0, qd + kvd)?.reshape((n, nh + nkv, hd))?;
            let qk = self.rope(&qk, &cos, &sin)?;
            let k = qk.narrow(1, nh, nkv)?.reshape((n, kvd))?;
            let v = qkv.narrow(1, qd + kvd, kvd)?;
            let k = k.to_dtype(self.dtype)?.contiguous()?;
            let v = v.to_dtype(self.dtype)?.contiguous()?;
            kv.k[li].scatter_set(&slot_idx, &k, 0)?;
            kv.v[li].scatter_set(&slot_idx, &v, 0)?;
            let q = qk.narrow(1, 0, nh)?.reshape((n, qd))?;
            let a = att.attend(&q, &kv.k[li], &kv.v[li], nkv, hd)?;
            let mut o = self.linear(&a, &layer.o_proj)?;
            if world > 1 {
                comm.all_reduce_sum(&mut o)?;
            }
            x = (x + o)?;
            let xn = rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = self.linear(&xn, &layer.gate_up)?;
            let ffn = self.part.ffn.len();
            let act = (gu.narrow(1, 0, ffn)?.silu()? * gu.narrow(1, ffn, ffn)?)?;
            let mut d = self.linear(&act, &layer.down)?;
            if world > 1 {
                comm.all_reduce_sum(&mut d)?;
            }
            x = (x + d)?;
        }
        if step.logit_rows.is_empty() {
            return Ok(None);
        }
        let rows: Vec<u32> = step.logit_rows.iter().map(|&r| r as u32).collect();
        let last = x.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let last = rms_norm(&last, &self.norm, eps)?;
        let mut logits = self.linear(&last, &self.lm_head)?;
        if world > 1 {
            // Vocab-parallel head: each rank's slice in place, zeros elsewhere (exact).
            let v = &self.part.vocab;
            logits = logits.pad_with_zeros(1, v.start, cfg.vocab_size - v.end)?;
            comm.all_reduce_sum(&mut logits)?;
        }
        Ok((self.part.rank == 0).then_some(logits))
    }

    /// Embedding rows of `tokens` (f32 `[tokens, hidden]`): at tp > 1 each rank looks up
    /// the tokens of its vocabulary slice, zeros for the others, and the group sums.
    fn embed_rows(
        &self,
        tokens: &[u32],
        comm: &mut dyn Communicator<Buffer = Tensor>,
    ) -> Result<Tensor, DeviceError> {
        let dev = &self.device;
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        if comm.world_size() == 1 {
            let ids = Tensor::new(tokens, dev)?;
            return Ok(table.index_select(&ids, 0)?.to_dtype(DType::F32)?);
        }
        let v = &self.part.vocab;
        let (ids, mask): (Vec<u32>, Vec<f32>) = tokens
            .iter()
            .map(|&t| match v.contains(&(t as usize)) {
                true => (t - v.start as u32, 1.0),
                false => (0, 0.0),
            })
            .unzip();
        let n = tokens.len();
        let ids = Tensor::from_vec(ids, n, dev)?;
        let mask = Tensor::from_vec(mask, (n, 1), dev)?;
        let mut x = table
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&mask)?;
        comm.all_reduce_sum(&mut x)?;
        Ok(x)
    }

    /// `x · Wᵀ` in the weights' dtype, f32 out.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor, DeviceError> {
        Ok(x.to_dtype(self.dtype)?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?)
    }

    /// cos/sin per token and frequency, `[tokens, 1, head_dim / 2]`.
    fn rope_tables(&self, plan: &[TokenPlan]) -> Result<(Tensor, Tensor), DeviceError> {
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(plan.len() * half);
        let mut sin = Vec::with_capacity(plan.len() * half);
        for p in plan {
            for f in &self.inv_freq {
                let a = p.pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (plan.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?,
            Tensor::from_vec(sin, shape, &self.device)?,
        ))
    }

    /// Rotates `x` `[tokens, heads, head_dim]` (f32) by each token's position.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, DeviceError> {
        let (n, heads, hd) = x.dims3()?;
        let half = hd / 2;
        let rotate = |a: &Tensor, b: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
            let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
            Ok((ra, rb))
        };
        Ok(match self.cfg.rope_style {
            RopeStyle::Half => {
                let (a, b) = rotate(&x.narrow(2, 0, half)?, &x.narrow(2, half, half)?)?;
                Tensor::cat(&[a, b], 2)?
            }
            RopeStyle::Interleaved => {
                let pairs = x.reshape((n, heads, half, 2))?;
                let (a, b) = rotate(
                    &pairs.narrow(3, 0, 1)?.squeeze(3)?,
                    &pairs.narrow(3, 1, 1)?.squeeze(3)?,
                )?;
                Tensor::stack(&[a, b], 3)?.reshape((n, heads, hd))?
            }
        })
    }
}

/// `x / rms(x) · w` per row, f32.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor, DeviceError> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let m = (ms + eps)?.sqrt()?;
    Ok(x.broadcast_div(&m)?.broadcast_mul(w)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_parses_and_refuses_bad_names() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.to_string().contains("expected `cpu`"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = DeviceChoice::Cuda(0).open().unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }
}
