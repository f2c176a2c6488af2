//! The runtime shape of a Llama-family model ([`LlamaConfig`]) and the two views it is
//! built from: Hugging Face `config.json` ([`HfLlamaConfig`]) and GGUF `llama.*` metadata
//! ([`LlamaConfig::from_gguf_metadata`]).
//!
//! The runtime config is validated once ([`LlamaConfig::validate`]) so the model code can
//! index without re-checking shapes.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

/// Errors turning a checkpoint's description into a [`LlamaConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing config key `{0}`")]
    Missing(String),
    #[error("bad config value for `{key}`: {msg}")]
    Bad { key: String, msg: String },
    #[error("unsupported architecture `{0}` (only the Llama family is supported)")]
    UnsupportedArchitecture(String),
}

/// How rotary position embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF checkpoints, whose q/k rows were permuted by the converter.
    Interleaved,
    /// Pairs `(i, i + d/2)` ("rotate half"): Hugging Face checkpoints.
    Half,
}

/// Rotary frequency scaling for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Per-frequency divisors, as GGUF's `rope_freqs.weight` stores Llama-3 scaling.
    FreqFactors(Vec<f32>),
}

/// Runtime configuration of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Checks the shape invariants the model relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, msg: String| ConfigError::Bad {
            key: key.into(),
            msg,
        };
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.context_length),
        ] {
            if v == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide {} heads",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", "must be even for RoPE".into()));
        }
        // Written so that NaN fails too.
        let positive = |x: f32| x > 0.0;
        if !positive(self.rope_theta) || !positive(self.rms_norm_eps) {
            return Err(bad("rope_theta/rms_norm_eps", "must be > 0".into()));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return Err(bad(
                "rope_freqs",
                format!("{} factors for head_dim {}", f.len(), self.head_dim),
            ));
        }
        Ok(())
    }

    /// Width of the fused q|k|v projection output.
    pub fn qkv_dim(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Inverse rotary frequencies per pair index, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        let base: Vec<f32> = (0..hd / 2)
            .map(|i| 1f32 / self.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::FreqFactors(ff) => base.iter().zip(ff).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Reads `llama.*` keys of a GGUF file. Rope style is interleaved (the GGUF converter
    /// permutes q/k). `rope_freqs.weight`, if present, is applied by the loader.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self, ConfigError> {
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| ConfigError::Missing("general.architecture".into()))?;
        if arch != "llama" {
            return Err(ConfigError::UnsupportedArchitecture(arch));
        }
        let get = |k: &str| md.get(k).ok_or_else(|| ConfigError::Missing(k.to_string()));
        let bad = |k: &str, e: candle_core::Error| ConfigError::Bad {
            key: k.into(),
            msg: e.to_string(),
        };
        let int = |k: &str| -> Result<usize, ConfigError> {
            let v = get(k)?;
            let n = v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64));
            n.map(|n| n as usize).map_err(|e| bad(k, e))
        };
        let float = |k: &str| -> Result<f32, ConfigError> {
            let v = get(k)?;
            v.to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map_err(|e| bad(k, e))
        };
        let hidden_size = int("llama.embedding_length")?;
        let num_heads = int("llama.attention.head_count")?;
        let num_kv_heads = int("llama.attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = match int("llama.attention.key_length") {
            Ok(d) => d,
            Err(_) if num_heads > 0 => hidden_size / num_heads,
            Err(e) => return Err(e),
        };
        let vocab_size = match int("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => return Err(ConfigError::Missing("llama.vocab_size".into())),
            },
        };
        let rope_scaling = match md
            .get("llama.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t == "linear" => RopeScaling::Linear {
                factor: float("llama.rope.scaling.factor")?,
            },
            Some(t) if t != "none" => {
                return Err(ConfigError::Bad {
                    key: "llama.rope.scaling.type".into(),
                    msg: format!("unsupported `{t}`"),
                });
            }
            _ => RopeScaling::None,
        };
        let cfg = LlamaConfig {
            hidden_size,
            num_layers: int("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: int("llama.feed_forward_length")?,
            vocab_size,
            rope_theta: float("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Interleaved,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            context_length: int("llama.context_length").unwrap_or(4096),
            // The loader flips this when the file carries an `output.weight`.
            tie_word_embeddings: true,
        };
        Ok(cfg)
    }
}

/// Serde view of a Hugging Face `config.json` for `LlamaForCausalLM`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// `rope_scaling` object of `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfRopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f32 {
    1e-5
}
fn default_ctx() -> usize {
    4096
}

impl TryFrom<HfLlamaConfig> for LlamaConfig {
    type Error = ConfigError;

    fn try_from(c: HfLlamaConfig) -> Result<Self, ConfigError> {
        let is_llama = c.model_type.as_deref() == Some("llama")
            || c.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            let name = c
                .architectures
                .first()
                .cloned()
                .or(c.model_type.clone())
                .unwrap_or_else(|| "<none>".into());
            return Err(ConfigError::UnsupportedArchitecture(name));
        }
        let need = |k: &str, v: Option<f32>| {
            v.ok_or_else(|| ConfigError::Missing(format!("rope_scaling.{k}")))
        };
        let rope_scaling = match c.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_str() {
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor", s.factor)?,
                    low_freq_factor: need("low_freq_factor", s.low_freq_factor)?,
                    high_freq_factor: need("high_freq_factor", s.high_freq_factor)?,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            ConfigError::Missing(
                                "rope_scaling.original_max_position_embeddings".into(),
                            )
                        })?,
                },
                "linear" => RopeScaling::Linear {
                    factor: need("factor", s.factor)?,
                },
                "default" => RopeScaling::None,
                other => {
                    return Err(ConfigError::Bad {
                        key: "rope_scaling.rope_type".into(),
                        msg: format!("unsupported `{other}`"),
                    });
                }
            },
        };
        let heads = c.num_attention_heads;
        let cfg = LlamaConfig {
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c
                .head_dim
                .unwrap_or(c.hidden_size.checked_div(heads).unwrap_or(0)),
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            rope_theta: c.rope_theta,
            rope_scaling,
            rope_style: RopeStyle::Half,
            rms_norm_eps: c.rms_norm_eps,
            context_length: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_with_llama3_scaling() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rope_theta":500000.0,"rms_norm_eps":1e-5,"max_position_embeddings":256,
            "tie_word_embeddings":true,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let hf: HfLlamaConfig = serde_json::from_str(json).unwrap();
        let cfg = LlamaConfig::try_from(hf).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.num_kv_heads, 2);
        let f = cfg.rope_inv_freq();
        assert_eq!(f.len(), 8);
        // Highest frequency is untouched, the lowest is divided by the factor.
        assert_eq!(f[0], 1.0);
        let unscaled = 1f32 / 500000f32.powf(14.0 / 16.0);
        assert!((f[7] - unscaled / 8.0).abs() < 1e-12);
    }

    #[test]
    fn rejects_other_architectures() {
        let json = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100}"#;
        let hf: HfLlamaConfig = serde_json::from_str(json).unwrap();
        assert!(matches!(
            LlamaConfig::try_from(hf),
            Err(ConfigError::UnsupportedArchitecture(_))
        ));
    }

    #[test]
    fn rejects_bad_gqa() {
        let json = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":100}"#;
        let hf: HfLlamaConfig = serde_json::from_str(json).unwrap();
        assert!(matches!(
            LlamaConfig::try_from(hf),
            Err(ConfigError::Bad { .. })
        ));
    }
}
