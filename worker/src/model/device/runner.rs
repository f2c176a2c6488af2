//! [`DeviceRank`]: one rank of a device group (its [`DeviceModel`] shard, its KV shard
//! and its tensor communicator), and [`DeviceRunner`], the [`ModelRunner`] over a group of
//! them: the same [`GroupRunner`] (block bookkeeping, validation, rank threads, failure
//! handling) as the CPU kernels' [`crate::model::runner::LlamaRunner`].
//!
//! [`ModelRunner`]: crate::runner::ModelRunner

use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use super::{DeviceChoice, DeviceError, DeviceKv, DeviceModel};
use crate::kv::BlockId;
use crate::model::group::{GroupRank, OwnedStep, RankGroup};
use crate::model::runner::{DEFAULT_COLLECTIVE_TIMEOUT, GroupRunner};
use crate::model::{LlamaModel, StepPlan};
use crate::runner::{RunnerError, RunnerInfo};
use crate::tp::cpu::{CpuCommunicator, HostTensorComm};
use crate::tp::{CommError, Communicator};

/// The trivial tensor group of one rank: collectives are no-ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleTensorRank;

impl Communicator for SingleTensorRank {
    type Buffer = Tensor;

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buf: &mut Tensor) -> Result<(), CommError> {
        Ok(())
    }

    fn broadcast(&mut self, _buf: &mut Tensor, _root: usize) -> Result<(), CommError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }

    fn abort(&self, _reason: &str) {}
}

/// One rank of a device group.
pub struct DeviceRank {
    model: DeviceModel,
    kv: DeviceKv,
    comm: Box<dyn Communicator<Buffer = Tensor>>,
}

impl DeviceRank {
    /// `model` with a KV shard of `num_blocks` blocks of `block_size` positions; `comm`
    /// must be the communicator of `model`'s rank.
    pub fn new(
        model: DeviceModel,
        comm: Box<dyn Communicator<Buffer = Tensor>>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, DeviceError> {
        let kv = model.new_kv(num_blocks, block_size)?;
        Ok(DeviceRank { model, kv, comm })
    }

    pub fn model(&self) -> &DeviceModel {
        &self.model
    }
}

impl GroupRank for DeviceRank {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn forward(&mut self, step: &OwnedStep) -> Result<Vec<f32>, String> {
        let tables: Vec<&[BlockId]> = step.tables.iter().map(Vec::as_slice).collect();
        let plan = StepPlan {
            tokens: &step.tokens,
            plan: &step.plan,
            tables: &tables,
            logit_rows: &step.logit_rows,
        };
        let rank = self.comm.rank();
        let err = |e: &dyn std::fmt::Display| format!("rank {rank}: {e}");
        let logits = self
            .model
            .forward_rank(&plan, &mut self.kv, self.comm.as_mut())
            .map_err(|e| err(&e))?;
        // All rows to the host in one copy (not `to_vec1` on a device tensor, which
        // copies twice).
        match logits {
            Some(l) => l
                .to_device(&Device::Cpu)
                .and_then(|l| l.flatten_all())
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| err(&format_args!("logits to the host: {e}"))),
            None => Ok(Vec::new()),
        }
    }

    fn abort(&self, reason: &str) {
        self.comm.abort(reason);
    }

    fn is_aborted(&self) -> bool {
        self.comm.is_aborted()
    }
}

/// The [`crate::runner::ModelRunner`] over one or more device ranks.
pub type DeviceRunner = GroupRunner<DeviceRank>;

impl GroupRunner<DeviceRank> {
    /// One rank: `num_blocks` KV blocks of `block_size` positions on the model's device.
    pub fn new(
        model: DeviceModel,
        model_id: String,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, RunnerError> {
        Self::sharded(
            vec![model],
            vec![Box::new(SingleTensorRank)],
            model_id,
            num_blocks,
            block_size,
            DEFAULT_COLLECTIVE_TIMEOUT,
        )
    }

    /// A tensor-parallel group: `models[r]` and `comms[r]` are rank `r`'s; every rank
    /// holds its KV heads of `num_blocks` blocks (the budget is per group).
    pub fn sharded(
        models: Vec<DeviceModel>,
        comms: Vec<Box<dyn Communicator<Buffer = Tensor>>>,
        model_id: String,
        num_blocks: usize,
        block_size: usize,
        timeout: Duration,
    ) -> Result<Self, RunnerError> {
        if num_blocks == 0 || block_size == 0 {
            return Err(RunnerError::Model(format!(
                "KV cache of {num_blocks} blocks × {block_size} positions is empty"
            )));
        }
        if models.is_empty() || models.len() != comms.len() {
            return Err(RunnerError::Model(format!(
                "{} rank models for {} communicators",
                models.len(),
                comms.len()
            )));
        }
        let world = models.len();
        for (r, m) in models.iter().enumerate() {
            let part = m.part();
            if (part.rank, part.world) != (r, world) {
                return Err(DeviceError::Sharded {
                    rank: part.rank,
                    world: part.world,
                    got: world,
                }
                .into());
            }
        }
        let m0 = &models[0];
        let info = RunnerInfo {
            model_id,
            dtype: m0.dtype_name(),
            tp: world,
            context_length: m0.cfg.context_length,
            vocab_size: m0.cfg.vocab_size,
            kv_block_size: block_size,
            kv_blocks_total: num_blocks,
            // The device cache holds the weights' dtype (`DeviceModel::new_kv`).
            kv_cache_dtype: m0.dtype_name(),
        };
        let collectives = std::sync::Arc::new(crate::tp::CollectiveStats::default());
        let ranks = models
            .into_iter()
            .zip(comms)
            .enumerate()
            .map(|(r, (m, c))| {
                // Rank 0's collectives are the group's metrics.
                let c = match r {
                    0 if world > 1 => Box::new(crate::tp::Timed::new(c, collectives.clone()))
                        as Box<dyn Communicator<Buffer = Tensor>>,
                    _ => c,
                };
                DeviceRank::new(m, c, num_blocks, block_size)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut group = RankGroup::from_ranks(ranks, timeout).map_err(RunnerError::Model)?;
        group.set_collectives(collectives);
        Ok(Self::over(group, info))
    }

    /// Rank 0's model (the whole model at tp 1).
    pub fn model(&self) -> &DeviceModel {
        &self.group().rank0().model
    }
}

/// The device models and tensor communicators of a tensor-parallel group over `shards`
/// ([`crate::model::shard::shard_all`]): on `cpu` every rank on candle's CPU device with
/// [`HostTensorComm`]s over a [`CpuCommunicator`] group; on `cuda:N` rank `r` on GPU
/// `N + r` with NCCL (feature `cuda`).
#[allow(clippy::type_complexity)]
pub fn device_group(
    shards: &[LlamaModel],
    choice: DeviceChoice,
    timeout: Duration,
) -> Result<
    (
        Vec<DeviceModel>,
        Vec<Box<dyn Communicator<Buffer = Tensor>>>,
    ),
    DeviceError,
> {
    let world = shards.len();
    let dtype: DType = choice.weight_dtype();
    let (devices, comms): (Vec<Device>, Vec<Box<dyn Communicator<Buffer = Tensor>>>) = match choice
    {
        _ if world == 1 => (vec![choice.open()?], vec![Box::new(SingleTensorRank)]),
        DeviceChoice::Cpu => CpuCommunicator::group(world, timeout)
            .into_iter()
            .map(|c| {
                let c = Box::new(HostTensorComm::new(Box::new(c)));
                (Device::Cpu, c as Box<dyn Communicator<Buffer = Tensor>>)
            })
            .unzip(),
        DeviceChoice::Cuda(first) => nccl_group(first, world, timeout)?,
    };
    let models = shards
        .iter()
        .zip(devices)
        .map(|(s, d)| DeviceModel::from_model_on(s, d, dtype))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((models, comms))
}

#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn nccl_group(
    first: usize,
    world: usize,
    timeout: Duration,
) -> Result<(Vec<Device>, Vec<Box<dyn Communicator<Buffer = Tensor>>>), DeviceError> {
    let ordinals: Vec<usize> = (first..first + world).collect();
    Ok(crate::tp::nccl::init_group(&ordinals, timeout)?
        .into_iter()
        .map(|c| {
            let d = c.device().clone();
            (d, Box::new(c) as Box<dyn Communicator<Buffer = Tensor>>)
        })
        .unzip())
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::type_complexity)]
fn nccl_group(
    first: usize,
    _world: usize,
    _timeout: Duration,
) -> Result<(Vec<Device>, Vec<Box<dyn Communicator<Buffer = Tensor>>>), DeviceError> {
    Err(DeviceError::CudaNotBuilt(
        DeviceChoice::Cuda(first).to_string(),
    ))
}
