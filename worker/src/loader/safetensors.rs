//! Hugging Face loader: `config.json` + one or more `*.safetensors` shards (f32, f16,
//! bf16), tensors named as in `LlamaForCausalLM`. Weights are widened to f32.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use super::{LoadError, TensorNames, WeightSource, build_model, check_shape};
use crate::config::{HfLlamaConfig, LlamaConfig};
use crate::kernels::Linear;
use crate::model::LlamaModel;

/// Reads `config.json` of a Hugging Face model directory.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, LoadError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LoadError::Io {
        path: path.clone(),
        source: e,
    })?;
    let hf: HfLlamaConfig = serde_json::from_str(&text).map_err(|e| LoadError::Corrupt {
        path: path.clone(),
        format: "config.json",
        msg: e.to_string(),
    })?;
    Ok(LlamaConfig::try_from(hf)?)
}

fn shards(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |e| LoadError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(LoadError::MissingTensor(format!(
            "no *.safetensors in {}",
            dir.display()
        )));
    }
    Ok(out)
}

struct Tensors {
    st: MmapedSafetensors,
    dir: PathBuf,
}

impl Tensors {
    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        if !self.has(name) {
            return Err(LoadError::MissingTensor(name.into()));
        }
        let corrupt = |e: candle_core::Error| LoadError::Corrupt {
            path: self.dir.clone(),
            format: "safetensors",
            msg: format!("{name}: {e}"),
        };
        let t = self.st.load(name, &Device::Cpu).map_err(corrupt)?;
        check_shape(name, t.dims(), shape)?;
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(corrupt)
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, LoadError> {
        Ok(Linear::from_f32(
            out_dim,
            in_dim,
            self.f32s(name, &[out_dim, in_dim])?,
        )?)
    }
}

/// Loads a Hugging Face Llama directory.
pub fn load_model(dir: &Path) -> Result<LlamaModel, LoadError> {
    let cfg = read_config(dir)?;
    let paths = shards(dir)?;
    // SAFETY: the files are memory-mapped read-only; shardline never writes model files
    // while serving, and an operator replacing them under a running worker is outside
    // what the loader can guard against (the same contract as candle's and vLLM's loaders).
    let st = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| LoadError::Corrupt {
        path: dir.to_path_buf(),
        format: "safetensors",
        msg: e.to_string(),
    })?;
    let mut t = Tensors {
        st,
        dir: dir.to_path_buf(),
    };
    let mut cfg = cfg;
    cfg.tie_word_embeddings = cfg.tie_word_embeddings || !t.has("lm_head.weight");
    build_model(&mut t, cfg, &HF_NAMES)
}

/// Hugging Face Llama tensor names.
const HF_NAMES: TensorNames = TensorNames {
    layer: "model.layers",
    attn_norm: "input_layernorm",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
    ffn_norm: "post_attention_layernorm",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
    norm: "model.norm.weight",
    embed: "model.embed_tokens.weight",
    lm_head: "lm_head.weight",
};

impl WeightSource for Tensors {
    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, LoadError> {
        Tensors::linear(self, name, out_dim, in_dim)
    }
    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        Tensors::f32s(self, name, shape)
    }
}
