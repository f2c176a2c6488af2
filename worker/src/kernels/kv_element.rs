//! The element types a KV cache may store ([`KvElement`]): `f32`, and the 16-bit
//! `half::f16` / `half::bf16` that hold twice the positions in the same bytes.
//!
//! Keys and values are rounded once, when they are written; attention reads them back
//! through [`KvElement::to_f32`] (on AVX-512, sixteen at a time through `load16`). A
//! 16-bit value widens to f32 exactly, so reading changes nothing inside a reduction:
//! attention over a 16-bit cache is the f32 attention of the rounded keys and values,
//! as batch-invariant as the f32 one, and the f32 cache itself reads as it always did.

use half::{bf16, f16};

/// A KV cache element: written from f32 (rounded to nearest, ties to even), read back
/// as f32 exactly.
pub trait KvElement: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Name as the `--kv-cache-dtype` flag spells it.
    const NAME: &'static str;

    /// `x` rounded to this type.
    fn from_f32(x: f32) -> Self;

    /// This value as f32 (exact).
    fn to_f32(self) -> f32;

    /// Sixteen consecutive elements from `p`, widened to f32.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `p` must point at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElement for f32 {
    const NAME: &'static str = "f32";

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller promises 16 readable floats at `p`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElement for f16 {
    const NAME: &'static str = "f16";

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller promises 16 readable halves (32 bytes) at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl KvElement for bf16 {
    const NAME: &'static str = "bf16";

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // A bf16 is the high half of an f32: widen each to 32 bits and shift it up.
        // SAFETY: the caller promises 16 readable bf16 values (32 bytes) at `p`.
        let raw = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;

    fn round_trip<T: KvElement>(xs: &[f32]) -> Vec<f32> {
        xs.iter().map(|&x| T::from_f32(x).to_f32()).collect()
    }

    /// The vector widening gives the scalar one's bits, for every element type.
    #[cfg(target_arch = "x86_64")]
    fn load16_matches_to_f32<T: KvElement>() {
        if !crate::kernels::CPU.avx512 {
            return;
        }
        let mut seed = 3;
        let xs: Vec<T> = (0..16)
            .map(|i| T::from_f32(test_rand(&mut seed) * 10f32.powi(i % 7 - 3)))
            .collect();
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F checked above; `xs` holds 16 elements.
        unsafe {
            std::arch::x86_64::_mm512_storeu_ps(got.as_mut_ptr(), T::load16(xs.as_ptr()));
        }
        let want: Vec<f32> = xs.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got.as_slice(), want.as_slice(), "{}", T::NAME);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_loads_widen_like_scalar_ones() {
        load16_matches_to_f32::<f32>();
        load16_matches_to_f32::<f16>();
        load16_matches_to_f32::<bf16>();
    }

    #[test]
    fn rounding_error_is_within_the_format() {
        let mut seed = 11;
        let xs: Vec<f32> = (0..1000).map(|_| test_rand(&mut seed) * 8.0).collect();
        assert_eq!(round_trip::<f32>(&xs), xs);
        // Relative error at most half an ulp: 2^-11 for f16 (normal range), 2^-8 for bf16.
        for (name, ys, rel) in [
            ("f16", round_trip::<f16>(&xs), 2f32.powi(-11)),
            ("bf16", round_trip::<bf16>(&xs), 2f32.powi(-8)),
        ] {
            for (x, y) in xs.iter().zip(&ys) {
                assert!(
                    (x - y).abs() <= rel * x.abs() + 1e-7,
                    "{name}: {x} became {y}"
                );
            }
        }
    }
}
