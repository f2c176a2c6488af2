//! Cost-model profiles of the simulated worker: step time = a + b·(tokens in the step) +
//! c·Σ(context lengths in the batch), and the KV capacity, for a named GPU + model.
//!
//! Derivations (public numbers; bandwidth/FLOP efficiencies are our assumptions, stated):
//!
//! **`h100-llama3-8b`** — one H100 SXM 80 GB (HBM3 3.35 TB/s, 989 TFLOP/s dense BF16, per
//! NVIDIA's H100 datasheet) serving Llama-3-8B in BF16 (8.03 B parameters = 16.06 GB;
//! 32 layers, 8 KV heads × 128 dims, per Meta's model card / config.json).
//! - a: a step reads every weight once: 16.06 GB ÷ 3.35 TB/s = 4.8 ms at peak; at 80 % of
//!   peak bandwidth (what tuned kernels reach) ≈ 6.0 ms.
//! - b: 2 FLOP per parameter per token: 16.06 GFLOP ÷ (989 TFLOP/s × 50 % MFU) ≈ 32 µs.
//! - c: attention reads the KV of every context token: 32 layers × 8 × 128 × 2 (K, V) ×
//!   2 B = 128 KiB per token; at 80 % of 3.35 TB/s that is ≈ 49 ns per context token.
//! - KV: 90 % of 80 GB (vLLM's default utilisation) − 16.06 GB weights − ~2 GB
//!   activations ≈ 54 GB ÷ 128 KiB ≈ 412 k tokens → 25 600 blocks of 16.
//!
//! **`4xh100-llama3-70b`** — four H100 SXM, tensor-parallel, Llama-3-70B BF16 (70.6 B
//! parameters = 141 GB; 80 layers, 8 KV heads × 128 dims).
//! - a: 35.3 GB of weights per GPU ÷ (80 % × 3.35 TB/s) ≈ 13.2 ms, plus two all-reduces per
//!   layer (160 × ~10 µs over NVLink) ≈ 1.6 ms → 15 ms.
//! - b: 141.2 GFLOP per token ÷ (4 × 989 TFLOP/s × 50 %) ≈ 71 µs.
//! - c: 80 × 8 × 128 × 2 × 2 B = 320 KiB per token, spread over 4 GPUs reading at
//!   4 × 80 % × 3.35 TB/s ≈ 10.7 TB/s → ≈ 31 ns per context token.
//! - KV: 4 × 72 GB − 141 GB − ~8 GB ≈ 139 GB ÷ 320 KiB ≈ 424 k tokens → 26 500 blocks.
//!
//! **`h100-llama3.2-1b`** — one H100 SXM serving Llama-3.2-1B in BF16 (1.236 B parameters
//! = 2.47 GB; 16 layers, 8 KV heads × 64 dims, per Meta's config.json): a small model on a
//! fast GPU, where a step is short enough that anything the coordinator adds per step shows.
//! - a: 2.47 GB ÷ (80 % × 3.35 TB/s) ≈ 0.92 ms to read the weights, plus ≈ 0.3 ms of fixed
//!   per-step cost that dominates small models (≈ 200 kernel launches for 16 layers, the
//!   sampler, host ↔ device copies) → 1.2 ms.
//! - b: 2.47 GFLOP per token ÷ (989 TFLOP/s × 50 %) ≈ 5 µs.
//! - c: 16 × 8 × 64 × 2 × 2 B = 32 KiB per token; at 80 % of 3.35 TB/s ≈ 12 ns per context
//!   token.
//! - KV: 90 % of 80 GB − 2.47 GB − ~2 GB ≈ 67.5 GB ÷ 32 KiB ≈ 2.06 M tokens; 131 072 blocks
//!   of 16 (2.1 M tokens).
//! - A decode step of 32 sequences with ~300 tokens of context each: 1.2 + 0.16 + 0.12 ≈
//!   1.5 ms, i.e. ≈ 21 800 output tokens/s.
//!
//! **`tiny`** — for tests: 1 ms steps, 64 blocks of 4 tokens, a 256-token context.
//!
//! The model is linear and ignores kernel launch overheads, prefill attention's quadratic
//! term and scheduler gaps; it is good for the shape of scaling curves, not for absolute
//! latencies of a specific deployment.

use std::time::Duration;

/// A simulated group's performance and capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    /// Reported as `model_id` in Info.
    pub model_id: &'static str,
    pub tp: u32,
    /// Fixed cost of any step (weights read once), seconds.
    pub a_s: f64,
    /// Cost per token processed in the step (prefill or decode), seconds.
    pub b_s_per_token: f64,
    /// Cost per context token attended over, summed over the batch, seconds.
    pub c_s_per_ctx_token: f64,
    pub kv_block_size: u32,
    pub kv_blocks: u32,
    pub context_length: u32,
    pub max_num_seqs: u32,
    /// Vocabulary size when no tokenizer is given.
    pub vocab_size: u32,
}

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "h100-llama3-8b",
        model_id: "meta-llama/Meta-Llama-3-8B-Instruct",
        tp: 1,
        a_s: 6.0e-3,
        b_s_per_token: 32e-6,
        c_s_per_ctx_token: 49e-9,
        kv_block_size: 16,
        kv_blocks: 25_600,
        context_length: 8192,
        max_num_seqs: 256,
        vocab_size: 128_256,
    },
    Profile {
        name: "4xh100-llama3-70b",
        model_id: "meta-llama/Meta-Llama-3-70B-Instruct",
        tp: 4,
        a_s: 15.0e-3,
        b_s_per_token: 71e-6,
        c_s_per_ctx_token: 31e-9,
        kv_block_size: 16,
        kv_blocks: 26_500,
        context_length: 8192,
        max_num_seqs: 256,
        vocab_size: 128_256,
    },
    Profile {
        name: "h100-llama3.2-1b",
        model_id: "meta-llama/Llama-3.2-1B-Instruct",
        tp: 1,
        a_s: 1.2e-3,
        b_s_per_token: 5e-6,
        c_s_per_ctx_token: 12e-9,
        kv_block_size: 16,
        kv_blocks: 131_072,
        context_length: 8192,
        max_num_seqs: 256,
        vocab_size: 128_256,
    },
    Profile {
        name: "tiny",
        model_id: "sim-tiny",
        tp: 1,
        a_s: 1.0e-3,
        b_s_per_token: 0.0,
        c_s_per_ctx_token: 0.0,
        kv_block_size: 4,
        kv_blocks: 64,
        context_length: 256,
        max_num_seqs: 16,
        vocab_size: 1000,
    },
];

impl Profile {
    /// Look a profile up by name; `sim:` prefixes (as in `--model sim:NAME`) are accepted.
    pub fn by_name(name: &str) -> Option<Profile> {
        let name = name.strip_prefix("sim:").unwrap_or(name);
        PROFILES.iter().find(|p| p.name == name).cloned()
    }

    pub fn names() -> Vec<&'static str> {
        PROFILES.iter().map(|p| p.name).collect()
    }

    /// Simulated time of a step processing `tokens` tokens with `ctx` total context.
    pub fn step_time(&self, tokens: u64, ctx: u64) -> Duration {
        if tokens == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(
            self.a_s + self.b_s_per_token * tokens as f64 + self.c_s_per_ctx_token * ctx as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_resolve_and_cost_is_linear() {
        let p = Profile::by_name("sim:h100-llama3-8b").unwrap();
        assert_eq!(p.tp, 1);
        assert!(Profile::by_name("a100-unknown").is_none());
        // 6 ms + 10 × 32 µs + 1000 × 49 ns = 6.369 ms.
        assert!((p.step_time(10, 1000).as_secs_f64() - 6.369e-3).abs() < 1e-9);
        assert_eq!(p.step_time(0, 1000), Duration::ZERO);
        assert_eq!(Profile::names().len(), PROFILES.len());
    }
}
