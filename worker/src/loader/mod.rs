//! Model loading: a GGUF file ([`gguf`]) or a Hugging Face directory with `config.json`
//! and `*.safetensors` shards ([`safetensors`]) → [`LlamaModel`] → [`LlamaRunner`].
//!
//! ```no_run
//! use shardline_worker::loader::{load_runner, LoadOptions};
//! let runner = load_runner("models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &LoadOptions::default())?;
//! # Ok::<(), shardline_worker::loader::LoadError>(())
//! ```

pub mod gguf;
pub mod safetensors;

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, LlamaConfig};
use crate::kernels::KernelError;
use crate::kernels::Linear;
use crate::kv::{KvCacheDtype, KvCacheShape, KvStore};
use crate::model::group::FailureInjector;
use crate::model::runner::LlamaRunner;
use crate::model::{Embeddings, LayerWeights, LlamaModel, Projection};
use crate::runner::{ModelRunner, RunnerError};

/// How to size and run a loaded model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Positions per KV block.
    pub block_size: usize,
    /// Number of KV blocks; `None` sizes the cache from `kv_cache_bytes`.
    pub kv_blocks: Option<usize>,
    /// KV cache budget in bytes when `kv_blocks` is `None`.
    pub kv_cache_bytes: usize,
    /// Element type of the CPU kernels' KV cache; a 16-bit one gets twice the blocks of
    /// `kv_cache_bytes`. The device backend holds its own dtype and takes only the
    /// default ([`KvCacheDtype::F32`]).
    pub kv_cache_dtype: KvCacheDtype,
    /// Model threads (the machine's cores by default).
    pub threads: usize,
    /// Reported model id; defaults to the file or directory name.
    pub model_id: Option<String>,
    /// Caps the context length below the model's.
    pub max_context: Option<usize>,
    /// Tensor-parallel ranks (threads of this process) the model is split over.
    pub tp: usize,
    /// Deadline of one tensor-parallel collective.
    pub collective_timeout: std::time::Duration,
    /// Run on a candle device (e.g. CUDA) through [`crate::model::device`] instead of the
    /// CPU kernels; tensor parallelism is CPU-only for now.
    pub device: Option<crate::model::device::DeviceChoice>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            block_size: 16,
            kv_blocks: None,
            kv_cache_bytes: 512 << 20,
            kv_cache_dtype: KvCacheDtype::F32,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            model_id: None,
            max_context: None,
            tp: 1,
            collective_timeout: crate::model::runner::DEFAULT_COLLECTIVE_TIMEOUT,
            device: None,
        }
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid {format} file: {msg}")]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        msg: String,
    },
    #[error("{0}: neither a .gguf file nor a directory with config.json (or a single .gguf)")]
    UnknownFormat(PathBuf),
    #[error("model config: {0}")]
    Config(#[from] ConfigError),
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor data: {0}")]
    Kernel(#[from] KernelError),
    #[error("invalid load options: {0}")]
    Options(String),
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

/// Which loader a path goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

/// Classifies `path`: a `.gguf` file, a directory with `config.json`, or a directory
/// holding exactly one `.gguf`.
pub fn detect_format(path: &Path) -> Result<ModelFormat, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        return Ok(ModelFormat::Gguf(path.to_path_buf()));
    }
    if path.join("config.json").is_file() {
        return Ok(ModelFormat::HfDir(path.to_path_buf()));
    }
    let io = |e| LoadError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut ggufs = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "gguf") {
            ggufs.push(p);
        }
    }
    match ggufs.len() {
        1 => Ok(ModelFormat::Gguf(ggufs.remove(0))),
        _ => Err(LoadError::UnknownFormat(path.to_path_buf())),
    }
}

/// Loads the model weights only.
pub fn load_model(path: &Path) -> Result<LlamaModel, LoadError> {
    match detect_format(path)? {
        ModelFormat::Gguf(p) => gguf::load_model(&p),
        ModelFormat::HfDir(p) => safetensors::load_model(&p),
    }
}

/// What both runners are built from: the rank shards of the model at `path`, the
/// group's KV block count (from `opts`, each KV element `kv_elem_bytes` wide) and the
/// model id.
struct Loaded {
    shards: Vec<LlamaModel>,
    blocks: usize,
    id: String,
}

fn load_shards(path: &Path, opts: &LoadOptions, kv_elem_bytes: usize) -> Result<Loaded, LoadError> {
    if opts.block_size == 0 {
        return Err(LoadError::Options("block_size must be > 0".into()));
    }
    let mut model = load_model(path)?;
    if let Some(max) = opts.max_context {
        model.cfg.context_length = model.cfg.context_length.min(max.max(1));
    }
    let shards = crate::model::shard::shard_all(model, opts.tp.max(1))
        .map_err(|e| LoadError::Options(e.to_string()))?;
    let cfg = &shards[0].cfg;
    // The budget is the group's: every rank's KV heads (replicated ones counted on each).
    let kv_heads: usize = shards.iter().map(|m| m.part.kv_heads.len()).sum();
    let per_block = KvStore::bytes_per_block(
        cfg.num_layers,
        opts.block_size,
        kv_heads,
        cfg.head_dim,
        kv_elem_bytes,
    );
    let blocks = opts
        .kv_blocks
        .unwrap_or(opts.kv_cache_bytes / per_block.max(1));
    if blocks == 0 {
        return Err(LoadError::Options(format!(
            "KV cache of {} bytes holds no block of {per_block} bytes",
            opts.kv_cache_bytes
        )));
    }
    let id = opts.model_id.clone().unwrap_or_else(|| model_name(path));
    Ok(Loaded { shards, blocks, id })
}

/// Loads a model and builds its runner (CPU kernels, a KV cache of
/// `opts.kv_cache_dtype`) sized by `opts`.
pub fn load_llama_runner(path: &Path, opts: &LoadOptions) -> Result<LlamaRunner, LoadError> {
    let dtype = opts.kv_cache_dtype;
    let Loaded { shards, blocks, id } = load_shards(path, opts, dtype.size_in_bytes())?;
    let runner = LlamaRunner::sharded(
        shards,
        id,
        KvCacheShape {
            num_blocks: blocks,
            block_size: opts.block_size,
            dtype,
        },
        opts.threads,
        opts.collective_timeout,
    )?;
    Ok(runner)
}

/// The runner `opts` asks for behind the engine's trait object: [`load_llama_runner`]
/// on the CPU kernels, or a [`crate::model::device::DeviceRunner`] with `opts.device`
/// (a group of `opts.tp` device ranks: NCCL on `cuda:N..N+tp`, the host communicator on
/// `cpu`; the KV cache in the device dtype).
pub fn load_runner(path: &Path, opts: &LoadOptions) -> Result<Box<dyn ModelRunner>, LoadError> {
    load_runner_with_injector(path, opts).map(|(runner, _)| runner)
}

/// [`load_runner`], plus the handle that makes a rank fail on purpose (end-to-end tests
/// of the failure path arm it through `shardline worker`'s hidden `--inject-failure`).
pub fn load_runner_with_injector(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(Box<dyn ModelRunner>, FailureInjector), LoadError> {
    let Some(device) = opts.device else {
        let runner = load_llama_runner(path, opts)?;
        let injector = runner.failure_injector();
        return Ok((Box::new(runner), injector));
    };
    if opts.kv_cache_dtype != KvCacheDtype::F32 {
        let own = format!("{:?}", device.weight_dtype()).to_lowercase();
        return Err(LoadError::Options(format!(
            "--kv-cache-dtype {} is for the CPU kernels; the device backend (--device \
             {device}) keeps its KV cache in its own dtype ({own}), so leave \
             --kv-cache-dtype at f32 there",
            opts.kv_cache_dtype,
        )));
    }
    let Loaded { shards, blocks, id } =
        load_shards(path, opts, device.weight_dtype().size_in_bytes())?;
    let (models, comms) =
        crate::model::device::device_group(&shards, device, opts.collective_timeout)
            .map_err(|e| LoadError::Options(e.to_string()))?;
    drop(shards);
    let runner = crate::model::device::DeviceRunner::sharded(
        models,
        comms,
        id,
        blocks,
        opts.block_size,
        opts.collective_timeout,
    )?;
    let injector = runner.failure_injector();
    Ok((Box::new(runner), injector))
}

fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| "model".into())
}

fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<(), LoadError> {
    if got != expected {
        return Err(LoadError::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// Where a loader reads named weights from (a GGUF file, safetensors shards).
trait WeightSource {
    /// A 2-D weight `[out_dim, in_dim]` as a [`Linear`].
    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, LoadError>;
    /// Any tensor as f32, checked against `shape`.
    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError>;
}

/// A checkpoint format's tensor names. Layer `i`'s tensors are
/// `<layer>.<i>.<name>.weight`; the others are full names.
struct TensorNames {
    layer: &'static str,
    attn_norm: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    ffn_norm: &'static str,
    gate: &'static str,
    up: &'static str,
    down: &'static str,
    norm: &'static str,
    embed: &'static str,
    lm_head: &'static str,
}

/// Builds the Llama of `cfg` from `src`, the one place that knows which weight goes
/// where; `cfg.tie_word_embeddings` decides whether the head reuses the embeddings.
fn build_model(
    src: &mut impl WeightSource,
    cfg: LlamaConfig,
    names: &TensorNames,
) -> Result<LlamaModel, LoadError> {
    let (h, hd, ffn, v) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("{}.{i}.{s}.weight", names.layer);
        let q = src.linear(&p(names.q), qd, h)?;
        let k = src.linear(&p(names.k), kvd, h)?;
        let vv = src.linear(&p(names.v), kvd, h)?;
        let gate = src.linear(&p(names.gate), ffn, h)?;
        let up = src.linear(&p(names.up), ffn, h)?;
        layers.push(LayerWeights {
            attn_norm: src.f32s(&p(names.attn_norm), &[h])?,
            qkv: Projection::new(vec![q, k, vv]),
            o_proj: src.linear(&p(names.o), h, qd)?,
            ffn_norm: src.f32s(&p(names.ffn_norm), &[h])?,
            gate_up: Projection::new(vec![gate, up]),
            down: src.linear(&p(names.down), h, ffn)?,
        });
    }
    let norm = src.f32s(names.norm, &[h])?;
    let (embed, lm_head) = if cfg.tie_word_embeddings {
        (Embeddings::FromLmHead, src.linear(names.embed, v, h)?)
    } else {
        (
            Embeddings::Dense(src.f32s(names.embed, &[v, h])?),
            src.linear(names.lm_head, v, h)?,
        )
    };
    Ok(LlamaModel::new(cfg, embed, layers, norm, lm_head))
}
