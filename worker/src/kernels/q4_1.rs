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

/// Q4_1 weights unpacked for the hot loop: per-block scales widened to f32 once at load
/// (f16 → f32 is exact, so results are bitwise those of the block format), nibbles
/// contiguous, 16 bytes a block.
#[derive(Debug, Clone, Default)]
pub struct Q41Packed {
    pub d: Vec<f32>,
    pub m: Vec<f32>,
    pub qs: Vec<u8>,
}

/// Q8_1 activations, unpacked the same way (32 bytes a block).
#[derive(Debug, Clone, Default)]
pub struct Q81Packed {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

impl Q41Packed {
    pub fn from_blocks(blocks: &[BlockQ4_1]) -> Self {
        let (x, _) = views(blocks, &[]);
        let mut p = Q41Packed {
            d: Vec::with_capacity(x.len()),
            m: Vec::with_capacity(x.len()),
            qs: Vec::with_capacity(16 * x.len()),
        };
        for b in x {
            p.d.push(b.d.to_f32());
            p.m.push(b.m.to_f32());
            p.qs.extend_from_slice(&b.qs);
        }
        p
    }

    pub fn num_blocks(&self) -> usize {
        self.d.len()
    }

    pub fn extend(&mut self, other: Q41Packed) {
        self.d.extend(other.d);
        self.m.extend(other.m);
        self.qs.extend(other.qs);
    }

    /// Blocks `[b0, b0 + n)` as f32 (`n * 32` values).
    pub fn dequantize(&self, b0: usize, n: usize, out: &mut [f32]) {
        for b in 0..n {
            let (d, m) = (self.d[b0 + b], self.m[b0 + b]);
            let q = &self.qs[(b0 + b) * 16..(b0 + b + 1) * 16];
            for j in 0..16 {
                out[b * 32 + j] = (q[j] & 0x0F) as f32 * d + m;
                out[b * 32 + j + 16] = (q[j] >> 4) as f32 * d + m;
            }
        }
    }
}

impl Q81Packed {
    /// Quantizes `rows` rows of `x` (each `in_dim` long, a multiple of 32) with ggml's Q8_1.
    pub fn quantize(x: &[f32], rows: usize, in_dim: usize) -> Self {
        use candle_core::quantized::GgmlType;
        let nb = in_dim / 32;
        let mut blocks = vec![BlockQ8_1::zeros(); rows * nb];
        for r in 0..rows {
            BlockQ8_1::from_float(
                &x[r * in_dim..(r + 1) * in_dim],
                &mut blocks[r * nb..(r + 1) * nb],
            );
        }
        let (_, y) = views(&[], &blocks);
        let mut p = Q81Packed {
            d: Vec::with_capacity(y.len()),
            s: Vec::with_capacity(y.len()),
            qs: Vec::with_capacity(32 * y.len()),
        };
        for b in y {
            p.d.push(b.d.to_f32());
            p.s.push(b.s.to_f32());
            p.qs.extend_from_slice(&b.qs);
        }
        p
    }
}

/// Dot product of weight blocks `[wb, wb + n)` with activation blocks `[ab, ab + n)`.
#[inline]
pub fn dot_packed(w: &Q41Packed, wb: usize, a: &Q81Packed, ab: usize, n: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if *HAS_VNNI {
        // SAFETY: the CPU supports the enabled target features (checked at runtime).
        return unsafe { dot_packed_vnni(w, wb, a, ab, n) };
    }
    dot_packed_portable(w, wb, a, ab, n)
}

fn dot_packed_portable(w: &Q41Packed, wb: usize, a: &Q81Packed, ab: usize, n: usize) -> f32 {
    let mut acc = 0f32;
    for b in 0..n {
        let q4 = &w.qs[(wb + b) * 16..(wb + b + 1) * 16];
        let q8 = &a.qs[(ab + b) * 32..(ab + b + 1) * 32];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (q4[j] & 0x0F) as i32 * q8[j] as i32 + (q4[j] >> 4) as i32 * q8[j + 16] as i32;
        }
        acc += sumi as f32 * w.d[wb + b] * a.d[ab + b] + w.m[wb + b] * a.s[ab + b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_packed_vnni(w: &Q41Packed, wb: usize, a: &Q81Packed, ab: usize, n: usize) -> f32 {
    use std::arch::x86_64::*;
    assert!(
        w.qs.len() >= (wb + n) * 16 && a.qs.len() >= (ab + n) * 32,
        "block range out of bounds; this is a bug"
    );
    assert!(
        w.d.len() >= wb + n && a.d.len() >= ab + n && w.m.len() >= wb + n && a.s.len() >= ab + n
    );
    let mask = _mm_set1_epi8(0x0F);
    // Eight lanes of Σ q4·q8 for one block (exact integers).
    let block = |b: usize| -> __m256i {
        // SAFETY: bounds asserted above; unaligned loads of 16 and 32 bytes.
        let (q4, q8) = unsafe {
            (
                _mm_loadu_si128(w.qs.as_ptr().add((wb + b) * 16).cast()),
                _mm256_loadu_si256(a.qs.as_ptr().add((ab + b) * 32).cast()),
            )
        };
        let lo = _mm_and_si128(q4, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q4, 4), mask);
        let q4 = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4, q8)
    };
    let mut acc = 0f32;
    let mut b = 0;
    while b + 8 <= n {
        // Reduce 8 blocks × 8 lanes to one exact sum per block.
        let v: [__m256i; 8] = std::array::from_fn(|j| block(b + j));
        let l1 = [
            _mm256_hadd_epi32(v[0], v[1]),
            _mm256_hadd_epi32(v[2], v[3]),
            _mm256_hadd_epi32(v[4], v[5]),
            _mm256_hadd_epi32(v[6], v[7]),
        ];
        let x = _mm256_hadd_epi32(l1[0], l1[1]);
        let y = _mm256_hadd_epi32(l1[2], l1[3]);
        let sumi = _mm256_add_epi32(
            _mm256_permute2x128_si256(x, y, 0x20),
            _mm256_permute2x128_si256(x, y, 0x31),
        );
        // Same per-block expression as the scalar path (no fused ops), eight at a time.
        // SAFETY: bounds asserted above.
        let t = unsafe {
            let wd = _mm256_loadu_ps(w.d.as_ptr().add(wb + b));
            let xd = _mm256_loadu_ps(a.d.as_ptr().add(ab + b));
            let wm = _mm256_loadu_ps(w.m.as_ptr().add(wb + b));
            let xs = _mm256_loadu_ps(a.s.as_ptr().add(ab + b));
            let t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sumi), wd), xd);
            _mm256_add_ps(t, _mm256_mul_ps(wm, xs))
        };
        let mut tv = [0f32; 8];
        // SAFETY: `tv` holds 8 floats.
        unsafe { _mm256_storeu_ps(tv.as_mut_ptr(), t) };
        for x in tv {
            acc += x;
        }
        b += 8;
    }
    while b < n {
        let s = block(b);
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        let sumi = _mm_cvtsi128_si32(s);
        acc += sumi as f32 * w.d[wb + b] * a.d[ab + b] + w.m[wb + b] * a.s[ab + b];
        b += 1;
    }
    acc
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
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let n = 32 * 26;
        let w: Vec<f32> = (0..n).map(|_| r()).collect();
        let a: Vec<f32> = (0..n).map(|_| r() * 3.0).collect();
        let mut wq = vec![BlockQ4_1::zeros(); n / 32];
        let mut aq = vec![BlockQ8_1::zeros(); n / 32];
        BlockQ4_1::from_float(&w, &mut wq);
        BlockQ8_1::from_float(&a, &mut aq);
        let ours = vec_dot(n, &wq, &aq);
        let (x, y) = views(&wq, &aq);
        assert_eq!(
            ours.to_bits(),
            vec_dot_portable(x, y).to_bits(),
            "kernel {}",
            kernel_name()
        );
        let theirs = BlockQ4_1::vec_dot(n, &wq, &aq);
        let wp = Q41Packed::from_blocks(&wq);
        let ap = Q81Packed::quantize(&a, 1, n);
        assert_eq!(
            dot_packed(&wp, 0, &ap, 0, n / 32).to_bits(),
            theirs.to_bits(),
            "packed"
        );
        assert_eq!(
            dot_packed_portable(&wp, 0, &ap, 0, n / 32).to_bits(),
            theirs.to_bits(),
            "packed portable"
        );
        let mut deq = vec![0f32; n];
        let mut deq_c = vec![0f32; n];
        wp.dequantize(0, n / 32, &mut deq);
        BlockQ4_1::to_float(&wq, &mut deq_c);
        assert_eq!(deq, deq_c);
        assert_eq!(
            ours.to_bits(),
            theirs.to_bits(),
            "{ours} vs candle {theirs}"
        );
    }
}
