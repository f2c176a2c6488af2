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

use super::{LoadError, TensorNames, WeightSource, build_model, check_shape};
use crate::config::{LlamaConfig, RopeScaling};
use crate::kernels::Linear;
use crate::model::LlamaModel;

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
    build_model(&mut f, cfg, &GGUF_NAMES)
}

/// llama.cpp's tensor names.
const GGUF_NAMES: TensorNames = TensorNames {
    layer: "blk",
    attn_norm: "attn_norm",
    q: "attn_q",
    k: "attn_k",
    v: "attn_v",
    o: "attn_output",
    ffn_norm: "ffn_norm",
    gate: "ffn_gate",
    up: "ffn_up",
    down: "ffn_down",
    norm: "output_norm.weight",
    embed: "token_embd.weight",
    lm_head: "output.weight",
};

impl WeightSource for GgufFile {
    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, LoadError> {
        GgufFile::linear(self, name, out_dim, in_dim)
    }
    fn f32s(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        GgufFile::f32s(self, name, shape)
    }
}
