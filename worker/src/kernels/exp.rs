//! `exp` of many f32 values at once, bitwise what the C library's `expf` returns for each
//! (what `f32::exp` and candle call), so softmax and SwiGLU keep their bits while running
//! 16 values a step instead of one call each.
//!
//! glibc's x86-64 `expf` (the FMA variant its dispatcher picks on any CPU with AVX-512)
//! evaluates, in double precision: `k = round(x · 32/ln2)`, `r = x · 32/ln2 − k`,
//! `2^(k/32)` from a 32-entry table of `2^(i/32)` with the exponent added, times a cubic
//! in `r`, each step fused the way that build fuses it; the result rounds once to f32.
//! The vector path does the same operations lane by lane. Lanes outside the main range
//! (|x| ≳ 88, infinities, NaN) go to the library itself. A start-up check compares the
//! two on a sweep of inputs and keeps to the library unless every one agrees, so a
//! different C library changes speed, never bits.

/// `2^(i/32)` rounded to the nearest double, as bits, minus `i << 47`: adding `k << 47`
/// for `k ≡ i (mod 32)` then puts `⌊k/32⌋` into the exponent.
const T: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// 32 / ln 2.
const INV_LN2_N: u64 = 0x40471547652b82fe;
/// 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
const SHIFT: u64 = 0x4338000000000000;
/// The cubic's coefficients (of `r³`, `r²`, `r`).
const C: [u64; 3] = [0x3ebc6af84b912394, 0x3f2ebfce50fac4f3, 0x3f962e42ff0c52d6];
/// Inputs whose top 12 bits (sign cleared) exceed this leave the main range.
const ABSTOP_LIMIT: u32 = 0x42a;

/// `x = exp(x)` for each value.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *VECTOR {
        // SAFETY: the CPU supports AVX-512F (checked by `VECTOR`).
        return unsafe { exp_avx512(xs) };
    }
    for x in xs {
        *x = x.exp();
    }
}

/// Whether the vector path runs: the CPU has it and it agrees with the library.
#[cfg(target_arch = "x86_64")]
static VECTOR: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| super::CPU.avx512 && agrees_with_library());

/// The vector path against `f32::exp` on a sweep of inputs across the main range and
/// its edges.
#[cfg(target_arch = "x86_64")]
fn agrees_with_library() -> bool {
    let mut xs: Vec<f32> = (0..1 << 16)
        .map(|i| f32::from_bits(((i as u32) << 16) | ((i as u32 * 40503) & 0xffff)))
        .chain((-2100..2100).map(|i| i as f32 / 20.0))
        .collect();
    let want: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
    // SAFETY: called only where the CPU supports AVX-512F.
    unsafe { exp_avx512(&mut xs) };
    xs.iter().zip(&want).all(|(x, w)| x.to_bits() == *w)
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let pd = |bits: u64| _mm512_set1_pd(f64::from_bits(bits));
    let (inv_ln2_n, shift) = (pd(INV_LN2_N), pd(SHIFT));
    let (c0, c1, c2, one) = (pd(C[0]), pd(C[1]), pd(C[2]), _mm512_set1_pd(1.0));
    let table = |i: usize| {
        // SAFETY: `T` holds 32 entries; `i + 8 <= 32`.
        unsafe { _mm512_loadu_si512(T.as_ptr().add(i).cast()) }
    };
    let (t0, t1, t2, t3) = (table(0), table(8), table(16), table(24));
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats.
        let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        let xd = _mm512_cvtps_pd(x);
        let z = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
        let ki = _mm512_castpd_si512(z);
        let kd = _mm512_sub_pd(z, shift);
        let r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
        // T[k mod 32]: entries 0..16 or 16..32 by bit 4 of the index.
        let low = _mm512_permutex2var_epi64(t0, ki, t1);
        let high = _mm512_permutex2var_epi64(t2, ki, t3);
        let t =
            _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), low, high);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
        let y0 = _mm512_fmadd_pd(c0, r, c1);
        let r2 = _mm512_mul_pd(r, r);
        let y1 = _mm512_fmadd_pd(r, c2, one);
        let y = _mm512_mul_pd(_mm512_fmadd_pd(y0, r2, y1), s);
        let y = _mm512_cvtpd_ps(y);
        // SAFETY: `c` holds 8 floats.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), y) };
        // Lanes outside the main range: the library's own special cases.
        let top = _mm256_and_si256(
            _mm256_srli_epi32::<20>(_mm256_castps_si256(x)),
            _mm256_set1_epi32(0x7ff),
        );
        let outside = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(ABSTOP_LIMIT as i32));
        if _mm256_movemask_epi8(outside) != 0 {
            for v in c.iter_mut().zip(exp_inputs(x)) {
                if (v.1.to_bits() >> 20) & 0x7ff > ABSTOP_LIMIT {
                    *v.0 = v.1.exp();
                }
            }
        }
    }
    for x in chunks.into_remainder() {
        *x = x.exp();
    }
}

/// The 8 inputs of a chunk (its outputs overwrote them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn exp_inputs(x: std::arch::x86_64::__m256) -> [f32; 8] {
    // SAFETY: `__m256` and `[f32; 8]` have the same size and every bit pattern is valid.
    unsafe { std::mem::transmute(x) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 251st f32 bit pattern (both signs, NaNs, infinities, subnormals, the main
    /// range and both overflow edges), plus softmax's usual inputs: bitwise `f32::exp`.
    #[test]
    fn matches_the_library_bitwise() {
        let mut xs: Vec<f32> = (0..u32::MAX / 251)
            .map(|i| f32::from_bits(i * 251))
            .collect();
        xs.extend((0..20_000).map(|i| -(i as f32) / 256.0));
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            88.72,
            -103.9,
        ]);
        for chunk in xs.chunks(1 << 16) {
            let mut got = chunk.to_vec();
            exp_in_place(&mut got);
            for (x, y) in chunk.iter().zip(&got) {
                assert_eq!(y.to_bits(), x.exp().to_bits(), "exp({x:e}) = {y:e}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_path_is_taken_on_this_machine() {
        assert_eq!(*VECTOR, crate::kernels::CPU.avx512);
    }
}
