//! Hugging Face loader: `config.json` + one or more `*.safetensors` shards (f32, f16,
//! bf16), tensors named as in `LlamaForCausalLM`. Weights are widened to f32.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use super::{LoadError, check_shape};
use crate::config::{HfLlamaConfig, LlamaConfig};
use crate::kernels::Linear;
use crate::model::{Embeddings, LayerWeights, LlamaModel, Projection};

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
    let t = Tensors {
        st,
        dir: dir.to_path_buf(),
    };
    let (h, hd, ffn, v) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        let q = t.linear(&p("self_attn.q_proj"), qd, h)?;
        let k = t.linear(&p("self_attn.k_proj"), kvd, h)?;
        let vv = t.linear(&p("self_attn.v_proj"), kvd, h)?;
        let gate = t.linear(&p("mlp.gate_proj"), ffn, h)?;
        let up = t.linear(&p("mlp.up_proj"), ffn, h)?;
        layers.push(LayerWeights {
            attn_norm: t.f32s(&p("input_layernorm"), &[h])?,
            qkv: Projection::new(vec![q, k, vv]),
            o_proj: t.linear(&p("self_attn.o_proj"), h, qd)?,
            ffn_norm: t.f32s(&p("post_attention_layernorm"), &[h])?,
            gate_up: Projection::new(vec![gate, up]),
            down: t.linear(&p("mlp.down_proj"), h, ffn)?,
        });
    }
    let norm = t.f32s("model.norm.weight", &[h])?;
    let tied = cfg.tie_word_embeddings || !t.has("lm_head.weight");
    let (embed, lm_head) = if tied {
        (
            Embeddings::FromLmHead,
            t.linear("model.embed_tokens.weight", v, h)?,
        )
    } else {
        (
            Embeddings::Dense(t.f32s("model.embed_tokens.weight", &[v, h])?),
            t.linear("lm_head.weight", v, h)?,
        )
    };
    let mut cfg = cfg;
    cfg.tie_word_embeddings = tied;
    Ok(LlamaModel::new(cfg, embed, layers, norm, lm_head))
}
