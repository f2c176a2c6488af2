//! CPU kernels of the model, written for batch invariance: every output element is
//! reduced in an order that depends only on its own row and column, never on how many
//! rows a call carries. That is what makes a sequence's logits bitwise identical alone
//! or in a batch, and whatever its prefill chunking.
//!
//! - [`Linear`] (`linear`): `y = x · Wᵀ` over rows of activations; weights stay in their
//!   storage format (f32, or ggml quantized blocks with activations quantized per row, as
//!   llama.cpp does). Parallel over output columns only.
//! - [`rms_norm`], [`rope`], [`dot_f32`], [`silu_mul`] (`rowops`): per-row
//!   elementwise/reduction ops.
//! - [`tiles`]: weights in 16-row tiles; [`q4_1`] and [`q8_0`]: their AVX-512 VNNI
//!   matmul kernels (portable fallbacks, same bits), bitwise candle's per-output order;
//!   [`act`]: activations quantized for them.
//! - [`attend`]: attention of a token's query heads over its paged KV blocks, stored as
//!   any [`KvElement`] (`kv_element`: f32, f16, bf16).
//! - [`exp`]: `exp` over many values, bitwise the C library's.
//! - [`team`]: the threads the kernels split their loops over.

pub mod act;
mod attention;
pub mod exp;
mod kv_element;
mod linear;
pub mod q4_1;
pub mod q8_0;
mod rowops;
pub mod team;
pub mod tiles;

pub use attention::{KvBlocks, attend};
pub use kv_element::KvElement;
pub use linear::{KernelError, Linear, WeightData, sum_segments};
pub(crate) use rowops::per_row;
pub use rowops::{dot_f32, rms_norm, rope, silu_mul};

/// CPU features the kernels pick their paths by, detected once. Every path of a kernel
/// gives the same bits; only speed differs.
pub(crate) struct Cpu {
    /// FMA and AVX2.
    pub fma: bool,
    /// AVX-512 F, BW and VL (with FMA).
    pub avx512: bool,
    /// AVX-512 VNNI on top of `avx512`.
    pub vnni: bool,
}

pub(crate) static CPU: std::sync::LazyLock<Cpu> = std::sync::LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let fma = has!("fma") && has!("avx2");
        let avx512 = fma && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        Cpu {
            fma,
            avx512,
            vnni: avx512 && has!("avx512vnni"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Cpu {
            fma: false,
            avx512: false,
            vnni: false,
        }
    }
});

/// A deterministic value in [-0.5, 0.5) for kernel tests.
#[cfg(test)]
pub(crate) fn test_rand(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
}
