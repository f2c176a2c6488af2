//! GGUF loader (llama.cpp's format): metadata via candle's `gguf_file`, tensor bytes read
//! straight from the file and kept in their ggml block format for the matmul kernels.
//!
//! The tokenizer side reads the same metadata through [`read_metadata`]
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};

use super::{LoadError, check_shape};
use crate::config::{LlamaConfig, RopeScaling};
use crate::kernels::Linear;
use crate::model::{Embeddings, LayerWeights, LlamaModel, Projection};

/// An open GGUF file: header parsed, tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::NotFound(path.to_path_buf()),
            _ => LoadError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| LoadError::Corrupt {
            path: path.to_path_buf(),
            format: "GGUF",
            msg: e.to_string(),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            reader,
            content,
        })
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor(name.into()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn raw(
        &mut self,
        name: &str,
    ) -> Result<(candle_core::quantized::GgmlDType, Vec<usize>, Vec<u8>), LoadError> {
        let info = self.info(name)?;
        let (dtype, dims, offset) = (info.ggml_dtype, info.shape.dims().to_vec(), info.offset);
        let elems: usize = dims.iter().product();
        let corrupt = |msg: String| LoadError::Corrupt {
            path: self.path.clone(),
            format: "GGUF",
            msg,
        };
        if !elems.is_multiple_of(dtype.block_size()) {
            return Err(corrupt(format!(
                "tensor {name}: {elems} elements not a multiple of the block size"
            )));
        }
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(offset);
        let io = |e| LoadError::Io {
            path: self.path.clone(),
            source: e,
        };
        let file_len = self.reader.seek(SeekFrom::End(0)).map_err(io)?;
        if start.saturating_add(size as u64) > file_len {
            return Err(corrupt(format!(
                "tensor {name} runs past the end of the file (truncated?)"
            )));
        }
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = vec![0u8; size];
        self.reader.read_exact(&mut buf).map_err(io)?;
        Ok((dtype, dims, buf))
    }

    /// A 2-D weight `[out, in]` as a [`Linear`].
    pub fn linear(
        &mut self,
        name: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Linear, LoadError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        check_shape(name, &dims, &[out_dim, in_dim])?;
        Ok(Linear::from_ggml(dtype, out_dim, in_dim, &bytes, name)?)
    }

    /// Any tensor dequantized to f32, checked against `shape`.
    pub fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        check_shape(name, &dims, shape)?;
        let elems: usize = shape.iter().product();
        let inner = *shape.last().unwrap_or(&1);
        let lin = Linear::from_ggml(dtype, elems / inner.max(1), inner, &bytes, name)?;
        let mut out = vec![0f32; elems];
        for (r, row) in out.chunks_exact_mut(inner).enumerate() {
            lin.dequantize_row(r, row);
        }
        Ok(out)
    }
}

/// GGUF metadata (all keys, `tokenizer.ggml.*` included) without reading tensor data.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>, LoadError> {
    Ok(GgufFile::open(path)?.content.metadata)
}

/// Loads a Llama GGUF.
pub fn load_model(path: &Path) -> Result<LlamaModel, LoadError> {
    let mut f = GgufFile::open(path)?;
    let mut cfg = LlamaConfig::from_gguf_metadata(&f.content.metadata)?;
    cfg.tie_word_embeddings = !f.has("output.weight");
    if f.has("rope_freqs.weight") {
        cfg.rope_scaling =
            RopeScaling::FreqFactors(f.f32s("rope_freqs.weight", &[cfg.head_dim / 2])?);
    }
    cfg.validate()?;
    let (h, hd, ffn, v) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        let q = f.linear(&p("attn_q"), qd, h)?;
        let k = f.linear(&p("attn_k"), kvd, h)?;
        let vv = f.linear(&p("attn_v"), kvd, h)?;
        let gate = f.linear(&p("ffn_gate"), ffn, h)?;
        let up = f.linear(&p("ffn_up"), ffn, h)?;
        layers.push(LayerWeights {
            attn_norm: f.f32s(&p("attn_norm"), &[h])?,
            qkv: Projection::new(vec![q, k, vv]),
            o_proj: f.linear(&p("attn_output"), h, qd)?,
            ffn_norm: f.f32s(&p("ffn_norm"), &[h])?,
            gate_up: Projection::new(vec![gate, up]),
            down: f.linear(&p("ffn_down"), h, ffn)?,
        });
    }
    let norm = f.f32s("output_norm.weight", &[h])?;
    let (embed, lm_head) = if cfg.tie_word_embeddings {
        (Embeddings::FromLmHead, f.linear("token_embd.weight", v, h)?)
    } else {
        (
            Embeddings::Dense(f.f32s("token_embd.weight", &[v, h])?),
            f.linear("output.weight", v, h)?,
        )
    };
    Ok(LlamaModel::new(cfg, embed, layers, norm, lm_head))
}
