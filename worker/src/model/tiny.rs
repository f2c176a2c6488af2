//! A tiny random Llama written to disk, for tests anywhere in the workspace (model tests,
//! engine tests, end-to-end clusters): Hugging Face layout (`config.json` +
//! `model.safetensors`) and the same weights as a GGUF (f32 or quantized), the way
//! llama.cpp's converter lays them out (q/k rows permuted for interleaved RoPE).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 256,
            context: 512,
            tied: false,
            seed: 1,
        }
    }
}

/// The tiny model's tensors, HF names, row-major f32.
pub struct TinyWeights {
    pub spec: TinySpec,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn rng(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

impl TinyWeights {
    pub fn random(spec: TinySpec) -> Self {
        let mut s = spec.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let (h, hd) = (spec.hidden, spec.hidden / spec.heads);
        let mut tensors = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| offset + scale * rng(&mut s)).collect();
            tensors.push((name, shape, data));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![spec.vocab, h],
            1.0,
            0.0,
        );
        for i in 0..spec.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            add(p("input_layernorm"), vec![h], 0.2, 1.0);
            add(p("self_attn.q_proj"), vec![spec.heads * hd, h], 0.5, 0.0);
            add(p("self_attn.k_proj"), vec![spec.kv_heads * hd, h], 0.5, 0.0);
            add(p("self_attn.v_proj"), vec![spec.kv_heads * hd, h], 0.5, 0.0);
            add(p("self_attn.o_proj"), vec![h, spec.heads * hd], 0.5, 0.0);
            add(p("post_attention_layernorm"), vec![h], 0.2, 1.0);
            add(p("mlp.gate_proj"), vec![spec.ffn, h], 0.5, 0.0);
            add(p("mlp.up_proj"), vec![spec.ffn, h], 0.5, 0.0);
            add(p("mlp.down_proj"), vec![h, spec.ffn], 0.5, 0.0);
        }
        add("model.norm.weight".into(), vec![h], 0.2, 1.0);
        if !spec.tied {
            add("lm_head.weight".into(), vec![spec.vocab, h], 0.5, 0.0);
        }
        TinyWeights { spec, tensors }
    }

    fn config_json(&self) -> serde_json::Value {
        let s = &self.spec;
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "vocab_size": s.vocab, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": s.context, "tie_word_embeddings": s.tied,
            "torch_dtype": "float32"
        })
    }

    /// Writes `config.json` + `model.safetensors` into `dir`.
    pub fn write_hf(&self, dir: &Path) -> candle_core::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), self.config_json().to_string())?;
        let mut map = HashMap::new();
        for (name, shape, data) in &self.tensors {
            map.insert(
                name.clone(),
                Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))
    }

    /// Writes the same weights as a llama.cpp-style GGUF; 2-D weights in `dtype`.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> candle_core::Result<()> {
        let s = &self.spec;
        let hd = s.hidden / s.heads;
        let permute = |data: &[f32], heads: usize, cols: usize| -> Vec<f32> {
            let mut out = vec![0f32; data.len()];
            for hh in 0..heads {
                for i in 0..hd / 2 {
                    for (dst, src) in [(2 * i, i), (2 * i + 1, i + hd / 2)] {
                        let (d, r) = ((hh * hd + dst) * cols, (hh * hd + src) * cols);
                        out[d..d + cols].copy_from_slice(&data[r..r + cols]);
                    }
                }
            }
            out
        };
        let mut qts: Vec<(String, QTensor)> = Vec::new();
        for (name, shape, data) in &self.tensors {
            let gname = gguf_name(name);
            let data = if name.ends_with("q_proj.weight") {
                permute(data, s.heads, s.hidden)
            } else if name.ends_with("k_proj.weight") {
                permute(data, s.kv_heads, s.hidden)
            } else {
                data.clone()
            };
            let t = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?;
            let dt = if shape.len() == 2 {
                dtype
            } else {
                GgmlDType::F32
            };
            qts.push((gname, QTensor::quantize(&t, dt)?));
        }
        let u = |v: usize| Value::U32(v as u32);
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", u(s.hidden)),
            ("llama.block_count", u(s.layers)),
            ("llama.attention.head_count", u(s.heads)),
            ("llama.attention.head_count_kv", u(s.kv_heads)),
            ("llama.feed_forward_length", u(s.ffn)),
            ("llama.vocab_size", u(s.vocab)),
            ("llama.context_length", u(s.context)),
            ("llama.rope.dimension_count", u(hd)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &md_refs, &t_refs)
    }
}

/// HF tensor name → llama.cpp GGUF name.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.trim_start_matches("model.layers.");
    let (i, rest) = rest.split_once('.').unwrap_or(("0", rest));
    let short = match rest.trim_end_matches(".weight") {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => other,
    };
    format!("blk.{i}.{short}.weight")
}
