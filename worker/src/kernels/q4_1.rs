//! Q4_1 weight × Q8_1 activation dot product (ggml block formats, 32 values a block).
//!
//! Per block the integer sum `Σ q4·q8` is exact, then `acc += (dx·dy)·sumi + mx·sy` in
//! block order. The AVX-512 VNNI path only changes how the exact integer sum is formed,
//! so both paths give bitwise-identical results and the choice can never break batch
//! invariance.

use std::sync::LazyLock;

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1};
use half::f16;

/// Layout mirror of candle's `BlockQ4_1` (whose fields are crate-private).
#[repr(C)]
struct Q41 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// Layout mirror of candle's `BlockQ8_1`.
#[repr(C)]
struct Q81 {
    d: f16,
    s: f16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<Q41>() == std::mem::size_of::<BlockQ4_1>());
const _: () = assert!(std::mem::size_of::<Q81>() == std::mem::size_of::<BlockQ8_1>());
const _: () = assert!(std::mem::align_of::<Q41>() == std::mem::align_of::<BlockQ4_1>());
const _: () = assert!(std::mem::align_of::<Q81>() == std::mem::align_of::<BlockQ8_1>());

static HAS_VNNI: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
});

/// Which implementation [`vec_dot`] runs on this machine.
pub fn kernel_name() -> &'static str {
    if *HAS_VNNI { "avx512-vnni" } else { "portable" }
}

fn views<'a>(xs: &'a [BlockQ4_1], ys: &'a [BlockQ8_1]) -> (&'a [Q41], &'a [Q81]) {
    // SAFETY: `Q41`/`Q81` are `#[repr(C)]` mirrors of candle's `#[repr(C)]` blocks with the
    // same field order, size and alignment (asserted above); the slices keep their lengths.
    unsafe {
        (
            std::slice::from_raw_parts(xs.as_ptr().cast::<Q41>(), xs.len()),
            std::slice::from_raw_parts(ys.as_ptr().cast::<Q81>(), ys.len()),
        )
    }
}

/// `Σ_i x[i]·y[i]` over `n` values (`n` a multiple of 32).
pub fn vec_dot(n: usize, xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    let nb = n / 32;
    let (x, y) = views(&xs[..nb], &ys[..nb]);
    #[cfg(target_arch = "x86_64")]
    if *HAS_VNNI {
        // SAFETY: the CPU supports the enabled target features (checked at runtime above).
        return unsafe { vec_dot_vnni(x, y) };
    }
    vec_dot_portable(x, y)
}

#[inline(always)]
fn combine(acc: f32, x: &Q41, y: &Q81, sumi: i32) -> f32 {
    // Same expression as ggml's / candle's reference kernel.
    acc + (sumi as f32 * x.d.to_f32() * y.d.to_f32() + x.m.to_f32() * y.s.to_f32())
}

fn vec_dot_portable(x: &[Q41], y: &[Q81]) -> f32 {
    let mut acc = 0f32;
    for (xb, yb) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let lo = (xb.qs[j] & 0x0F) as i32;
            let hi = (xb.qs[j] >> 4) as i32;
            sumi += lo * yb.qs[j] as i32 + hi * yb.qs[j + 16] as i32;
        }
        acc = combine(acc, xb, yb, sumi);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn vec_dot_vnni(x: &[Q41], y: &[Q81]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let mut acc = 0f32;
    for (xb, yb) in x.iter().zip(y) {
        // SAFETY: `qs` arrays are 16 and 32 bytes long; unaligned loads.
        let (q4, q8) = unsafe {
            (
                _mm_loadu_si128(xb.qs.as_ptr().cast()),
                _mm256_loadu_si256(yb.qs.as_ptr().cast()),
            )
        };
        let lo = _mm_and_si128(q4, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q4, 4), mask);
        let q4 = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        // u8 (0..15) × i8 → i32 lanes: exact.
        let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4, q8);
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        acc = combine(acc, xb, yb, _mm_cvtsi128_si32(s));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlType;

    #[test]
    fn matches_candle_and_portable() {
        let mut seed = 3u64;
        let mut r = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let n = 32 * 24;
        let w: Vec<f32> = (0..n).map(|_| r()).collect();
        let a: Vec<f32> = (0..n).map(|_| r() * 3.0).collect();
        let mut wq = vec![BlockQ4_1::zeros(); n / 32];
        let mut aq = vec![BlockQ8_1::zeros(); n / 32];
        BlockQ4_1::from_float(&w, &mut wq);
        BlockQ8_1::from_float(&a, &mut aq);
        let ours = vec_dot(n, &wq, &aq);
        let (x, y) = views(&wq, &aq);
        assert_eq!(ours.to_bits(), vec_dot_portable(x, y).to_bits(), "kernel {}", kernel_name());
        let theirs = BlockQ4_1::vec_dot(n, &wq, &aq);
        assert_eq!(ours.to_bits(), theirs.to_bits(), "{ours} vs candle {theirs}");
    }
}
