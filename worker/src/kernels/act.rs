//! Activations quantized per row to ggml's Q8_1 (for Q4_1 weights) and Q8_0 (for Q8_0
//! weights), bitwise what candle's `from_float` produces, laid out for the tile kernels:
//! scales widened to f32, values as little-endian dwords (four values each) that a kernel
//! broadcasts with one aligned load.

use half::f16;

/// One block of 32 values quantized as ggml does: `d = amax / 127`, values
/// `round(x / d)` (half away from zero). Returns `(d as f16, values, Σ values)`.
#[inline(always)]
fn quantize_block(x: &[f32]) -> (f16, [i8; 32], i32) {
    let x: &[f32; 32] = x.try_into().expect("blocks are 32 values; this is a bug");
    // `max` is exact and order-free (NaN is skipped either way), so 16 lanes then a tree
    // give the sequential result.
    let mut m = [0f32; 16];
    for c in x.chunks_exact(16) {
        for l in 0..16 {
            m[l] = m[l].max(c[l].abs());
        }
    }
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            m[l] = m[l].max(m[l + w]);
        }
        w /= 2;
    }
    let d = m[0] / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // Rounded values stay in -127..=127, so the i8 cast never saturates.
    let mut q = [0i8; 32];
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    let sum = q.iter().map(|&v| v as i32).sum();
    (f16::from_f32(d), q, sum)
}

/// Quantizes `rows × in_dim` values block by block into `make(d, values, Σ values)`, rows
/// in parallel when there are many.
fn quantize_rows<B: Clone + Default + Send>(
    x: &[f32],
    rows: usize,
    in_dim: usize,
    make: impl Fn(f16, [i8; 32], i32) -> B + Sync,
) -> Vec<B> {
    super::per_row(&x[..rows * in_dim], in_dim, in_dim / 32, |x, out| {
        quantize_row(x, out, &make)
    })
}

/// One row, on AVX-512 where the CPU has it; same bits either way.
fn quantize_row<B>(x: &[f32], out: &mut [B], make: &(impl Fn(f16, [i8; 32], i32) -> B + Sync)) {
    #[cfg(target_arch = "x86_64")]
    if super::CPU.avx512 {
        // SAFETY: the CPU supports AVX-512 F/BW/VL (checked at runtime).
        return unsafe { quantize_row_avx512(x, out, make) };
    }
    for (b, o) in x.chunks_exact(32).zip(out) {
        let (d, q, sum) = quantize_block(b);
        *o = make(d, q, sum);
    }
}

/// [`quantize_row`] with [`quantize_block`] in AVX-512 registers.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_avx512<B>(
    x: &[f32],
    out: &mut [B],
    make: &impl Fn(f16, [i8; 32], i32) -> B,
) {
    use std::arch::x86_64::*;
    let abs = |v: __m512| {
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(0x7FFF_FFFF),
        ))
    };
    for (b, o) in x.chunks_exact(32).zip(out) {
        // SAFETY: `b` holds 32 floats.
        let v = unsafe {
            [
                _mm512_loadu_ps(b.as_ptr()),
                _mm512_loadu_ps(b.as_ptr().add(16)),
            ]
        };
        // `max_ps(a, m)` returns `m` when `a` is NaN: NaN is skipped, as `f32::max` does.
        let m = _mm512_max_ps(abs(v[1]), _mm512_max_ps(abs(v[0]), _mm512_setzero_ps()));
        let d = _mm512_reduce_max_ps(m) / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut q = [0i8; 32];
        let mut sum = _mm512_setzero_si512();
        for (h, v) in v.into_iter().enumerate() {
            // `round` (half away from zero), exactly: truncate, then step away from zero
            // where the dropped fraction is at least one half.
            let y = _mm512_mul_ps(v, id);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let up =
                _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs(_mm512_sub_ps(y, t)), _mm512_set1_ps(0.5));
            let sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN));
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                sign,
                _mm512_castps_si512(_mm512_set1_ps(1.0)),
            ));
            // NaN lanes become 0, as `NaN as i8` does.
            let r = _mm512_maskz_cvtps_epi32(
                _mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y),
                _mm512_mask_add_ps(t, up, t, step),
            );
            sum = _mm512_add_epi32(sum, r);
            // SAFETY: 16 bytes at `16 h` of `q`.
            unsafe { _mm_storeu_si128(q.as_mut_ptr().add(16 * h).cast(), _mm512_cvtepi32_epi8(r)) };
        }
        *o = make(f16::from_f32(d), q, _mm512_reduce_add_epi32(sum));
    }
}

fn dwords(q: &[i8; 32]) -> [i32; 8] {
    std::array::from_fn(|k| {
        i32::from_le_bytes([
            q[4 * k] as u8,
            q[4 * k + 1] as u8,
            q[4 * k + 2] as u8,
            q[4 * k + 3] as u8,
        ])
    })
}

fn values(dw: &[i32; 8]) -> [i8; 32] {
    std::array::from_fn(|j| dw[j / 4].to_le_bytes()[j % 4] as i8)
}

/// One activation block as the kernels read it: its 32 values as 8 little-endian dwords,
/// plus format-specific scales.
pub trait ActBlock: Clone + Default + Send {
    fn dwords(&self) -> &[i32; 8];
}

/// Rows of activation blocks, `nb` blocks a row.
#[derive(Debug, Clone, Default)]
pub struct Rows<B> {
    pub nb: usize,
    pub blocks: Vec<B>,
}

impl<B: ActBlock> Rows<B> {
    /// `rows` rows of `in_dim` values (a multiple of 32), each block built by
    /// `make(d, values, Σ values)`.
    fn quantize_with(
        x: &[f32],
        rows: usize,
        in_dim: usize,
        make: impl Fn(f16, [i8; 32], i32) -> B + Sync,
    ) -> Self {
        Rows {
            nb: in_dim / 32,
            blocks: quantize_rows(x, rows, in_dim, make),
        }
    }

    pub fn rows(&self) -> usize {
        self.blocks.len().checked_div(self.nb).unwrap_or(0)
    }

    /// The 32 values of block `ab`.
    pub fn values(&self, ab: usize) -> [i8; 32] {
        values(self.blocks[ab].dwords())
    }
}

/// A Q8_1 block: values as 8 dwords, `d` and `s = d · Σ values` (both rounded through
/// f16, as ggml), widened to f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct Q81Block {
    pub qs: [i32; 8],
    pub d: f32,
    pub s: f32,
}

impl ActBlock for Q81Block {
    fn dwords(&self) -> &[i32; 8] {
        &self.qs
    }
}

/// Rows of Q8_1 blocks (for Q4_1 weights).
pub type Q81Rows = Rows<Q81Block>;

impl Q81Rows {
    /// `rows` rows of `in_dim` values (a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, in_dim: usize) -> Self {
        Self::quantize_with(x, rows, in_dim, |d, q, sum| Q81Block {
            qs: dwords(&q),
            d: d.to_f32(),
            s: (f16::from_f32(sum as f32) * d).to_f32(),
        })
    }
}

/// A Q8_0 block: values as 8 dwords, `d` widened to f32 and, for kernels that multiply
/// biased unsigned weights, `-128 · Σ` of each dword's four values (the exact correction,
/// which such a kernel starts its integer sum from).
#[derive(Debug, Clone, Copy, Default)]
pub struct Q80Block {
    pub qs: [i32; 8],
    pub bias: [i32; 8],
    pub d: f32,
}

impl ActBlock for Q80Block {
    fn dwords(&self) -> &[i32; 8] {
        &self.qs
    }
}

/// Rows of Q8_0 blocks (for Q8_0 weights).
pub type Q80Rows = Rows<Q80Block>;

impl Q80Rows {
    /// `rows` rows of `in_dim` values (a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, in_dim: usize) -> Self {
        Self::quantize_with(x, rows, in_dim, |d, q, _| Q80Block {
            qs: dwords(&q),
            bias: std::array::from_fn(|l| {
                -128 * q[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum::<i32>()
            }),
            d: d.to_f32(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlType;
    use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1};

    /// Values around rounding ties, exact ties (d = 1, values `k + 0.5`), zeros (d = 0),
    /// NaN and infinity, and a wide range of magnitudes.
    fn inputs() -> Vec<f32> {
        let mut seed = 11u64;
        let mut v = Vec::new();
        for b in 0..48 {
            for j in 0..32 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                v.push(match (b % 6, j) {
                    (0, _) => r * 10f32.powi(b / 6 - 4),
                    (1, _) => (j as f32 - 16.0) * 0.5 * 127.0 / 16.0,
                    (2, _) => 0.0,
                    (3, 0) => 127.0,
                    (3, _) => j as f32 - 16.5,
                    (4, 3) => f32::NAN,
                    (4, 7) if b % 12 == 4 => f32::INFINITY,
                    _ => r * 1e3,
                });
            }
        }
        v
    }

    /// The vector path (where the CPU has it) and the portable one give the same bits.
    #[test]
    fn every_path_quantizes_alike() {
        let x = inputs();
        let mut fast = vec![(f16::ZERO, [0i8; 32], 0); x.len() / 32];
        quantize_row(&x, &mut fast, &|d, q, s| (d, q, s));
        for (b, got) in x.chunks_exact(32).zip(&fast) {
            let want = quantize_block(b);
            assert_eq!(
                (got.0.to_bits(), got.1, got.2),
                (want.0.to_bits(), want.1, want.2),
                "{b:?}"
            );
        }
    }

    fn bytes_of<T>(v: &[T]) -> &[u8] {
        // SAFETY: reading plain-old-data blocks as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }

    #[test]
    fn q8_1_and_q8_0_match_candle_bitwise() {
        let x = inputs();
        let n = x.len() / 32;
        let (rows, in_dim) = (2, x.len() / 2);
        let mut c1 = vec![BlockQ8_1::zeros(); n];
        BlockQ8_1::from_float(&x, &mut c1);
        let mut c0 = vec![BlockQ8_0::zeros(); n];
        BlockQ8_0::from_float(&x, &mut c0);
        let (q1, q0) = (
            Q81Rows::quantize(&x, rows, in_dim),
            Q80Rows::quantize(&x, rows, in_dim),
        );
        assert_eq!((q1.rows(), q0.rows()), (2, 2));
        for b in 0..n {
            // BlockQ8_1: d f16, s f16, 32 values; BlockQ8_0: d f16, 32 values.
            let b1 = &bytes_of(&c1)[b * 36..(b + 1) * 36];
            let b0 = &bytes_of(&c0)[b * 34..(b + 1) * 34];
            let f = |x: &[u8]| f16::from_le_bytes([x[0], x[1]]).to_f32();
            assert_eq!(
                (q1.blocks[b].d.to_bits(), q1.blocks[b].s.to_bits()),
                (f(&b1[0..2]).to_bits(), f(&b1[2..4]).to_bits()),
                "block {b}"
            );
            assert_eq!(q1.values(b).map(|v| v as u8)[..], b1[4..]);
            assert_eq!(q0.blocks[b].d.to_bits(), f(&b0[0..2]).to_bits());
            assert_eq!(q0.values(b).map(|v| v as u8)[..], b0[2..]);
            let vals = q0.values(b);
            for l in 0..8 {
                let s: i32 = vals[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum();
                assert_eq!(q0.blocks[b].bias[l], -128 * s);
            }
        }
    }
}
