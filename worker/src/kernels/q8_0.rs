//! Q8_0 weights × Q8_0 activations (ggml block formats, 32 values a block) on [`Tiles`].
//!
//! Every output is reduced in the order of candle's x86 kernel (`vec_dot_q8_0_q8_0`,
//! AVX2 + FMA, what candle runs on any x86 CPU with those): eight lane accumulators, lane
//! `l` taking the exact integer sum of values `4l..4l+4` of each block through
//! `acc[l] = fma(dw·dx, sum, acc[l])`, then a fixed tree over the eight lanes. So results
//! are bitwise candle's there — the tied SmolLM2 head included — and never depend on the
//! tile, the rows sharing a weight load, or the CPU path.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so weights are stored biased
//! (`w + 128`, as `u8`) and the sum starts from `-128 · Σ x` of the same four values: the
//! integer sum stays exact.

use std::ops::Range;

use candle_core::quantized::k_quants::BlockQ8_0;

use super::act::Q80Rows;
use super::tiles::{TILE, Tiles};

/// Activation rows computed against one weight load (each row keeps eight accumulator
/// registers per tile).
pub const ROWS: usize = 2;

/// Q8_0 weights in tiles: 32 biased bytes (`w + 128`) and the scale `d` per row block.
pub type Q80Tiles = Tiles<32, 1>;

/// Layout mirror of candle's `BlockQ8_0` (whose fields are crate-private).
#[repr(C)]
struct Q80 {
    d: half::f16,
    qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<Q80>() == std::mem::size_of::<BlockQ8_0>());
const _: () = assert!(std::mem::align_of::<Q80>() == std::mem::align_of::<BlockQ8_0>());

fn view(xs: &[BlockQ8_0]) -> &[Q80] {
    // SAFETY: `Q80` is a `#[repr(C)]` mirror of candle's `#[repr(C)]` block with the same
    // field order, size and alignment (asserted above); the slice keeps its length.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<Q80>(), xs.len()) }
}

/// `out_dim` rows of whole blocks, row-major (the GGUF layout), as tiles.
pub fn tiles_from_blocks(blocks: &[BlockQ8_0], out_dim: usize) -> Q80Tiles {
    let x = view(blocks);
    let nb = x.len().checked_div(out_dim).unwrap_or(0);
    Tiles::from_fn(out_dim, nb, |o, b| {
        let q = &x[o * nb + b];
        ([q.d.to_f32()], q.qs.map(|v| (v as u8) ^ 0x80))
    })
}

/// Row `o` as f32 (`blocks_per_row · 32` values).
pub fn dequantize_row(w: &Q80Tiles, o: usize, out: &mut [f32]) {
    for b in 0..w.blocks_per_row() {
        let ([d], q) = w.block(o, b);
        for (y, v) in out[b * 32..(b + 1) * 32].iter_mut().zip(q) {
            *y = ((v ^ 0x80) as i8) as f32 * d;
        }
    }
}

/// Which implementation the matmul runs on this machine.
pub fn kernel_name() -> &'static str {
    if super::CPU.vnni {
        "avx512-vnni"
    } else {
        "portable"
    }
}

/// Dot products of tile `tile`'s 16 rows with activation rows `r0..r0 + out.len()` over
/// blocks `blocks`: `out[r][lane]`. At most [`ROWS`] activation rows per call.
pub fn tile_dot(
    w: &Q80Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q80Rows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    assert!(
        tile < w.tiles()
            && blocks.end <= w.blocks_per_row()
            && a.nb == w.blocks_per_row()
            && r0 + out.len() <= a.rows()
            && out.len() <= ROWS,
        "tile_dot out of bounds; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if super::CPU.vnni {
        // SAFETY: the CPU supports the enabled target features (checked at runtime), and
        // every index the kernel forms is within the bounds asserted above.
        unsafe {
            match out.len() {
                1 => tile_vnni::<1>(w, tile, blocks, a, r0, out),
                _ => tile_vnni::<2>(w, tile, blocks, a, r0, out),
            }
        }
        return;
    }
    tile_portable(w, tile, blocks, a, r0, out)
}

/// candle's final reduction of the eight lanes (`hsum_float_8`).
#[inline(always)]
fn hsum8(x: [f32; 8]) -> f32 {
    ((x[4] + x[0]) + (x[6] + x[2])) + ((x[5] + x[1]) + (x[7] + x[3]))
}

fn tile_portable(
    w: &Q80Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q80Rows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    for (r, row) in out.iter_mut().enumerate() {
        for (lane, y) in row.iter_mut().enumerate() {
            let mut acc = [0f32; 8];
            for b in blocks.clone() {
                // Padding rows are zero blocks.
                let ([d], q) = w.block(tile * TILE + lane, b);
                let ab = (r0 + r) * a.nb + b;
                let x = a.values(ab);
                let scale = d * a.blocks[ab].d;
                for (l, acc) in acc.iter_mut().enumerate() {
                    let sum: i32 = (4 * l..4 * l + 4)
                        .map(|j| ((q[j] ^ 0x80) as i8) as i32 * x[j] as i32)
                        .sum();
                    *acc = scale.mul_add(sum as f32, *acc);
                }
            }
            *y = hsum8(acc);
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/VNNI; `tile`, `blocks` and rows `r0..r0 + R` must be in
/// bounds of `w` and `a` (as [`tile_dot`] asserts); `R <= 2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(
    w: &Q80Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q80Rows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    // Eight lane accumulators per row, indexed by constants only, so they live in registers.
    let mut acc = [[_mm512_setzero_ps(); 8]; 2];
    for b in blocks {
        let i = tile * w.blocks_per_row() + b;
        let (q, wd) = (w.tile_lines(i), w.tile_scales(0, i));
        // SAFETY: `q` holds 8 aligned lines, `wd` is an aligned 16-float lane.
        let (q, wd) = unsafe { (q.as_ptr().cast::<__m512i>(), _mm512_load_ps(wd.0.as_ptr())) };
        let ab = [(r0 * a.nb + b), (r0 + 1) * a.nb + b];
        let scale = [0, 1].map(|r| {
            if r < R {
                // SAFETY: block `ab[r]` of `a` is in bounds for r < R per the caller's
                // contract.
                let d = unsafe { a.blocks.get_unchecked(ab[r]).d };
                _mm512_mul_ps(wd, _mm512_set1_ps(d))
            } else {
                wd
            }
        });
        macro_rules! lane {
            ($l:literal) => {
                // SAFETY: line `$l` of the 8.
                let wl = unsafe { *q.add($l) };
                for r in 0..R {
                    // SAFETY: dword `$l` and correction `$l` of block `ab[r]`, in bounds.
                    let blk = unsafe { a.blocks.get_unchecked(ab[r]) };
                    let (x, bias) = (blk.qs[$l], blk.bias[$l]);
                    // Starting from the bias makes the exact signed sum in one step.
                    let s = _mm512_dpbusd_epi32(_mm512_set1_epi32(bias), wl, _mm512_set1_epi32(x));
                    acc[r][$l] = _mm512_fmadd_ps(scale[r], _mm512_cvtepi32_ps(s), acc[r][$l]);
                }
            };
        }
        lane!(0);
        lane!(1);
        lane!(2);
        lane!(3);
        lane!(4);
        lane!(5);
        lane!(6);
        lane!(7);
    }
    for (o, x) in out.iter_mut().zip(acc).take(R) {
        let t = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(x[4], x[0]), _mm512_add_ps(x[6], x[2])),
            _mm512_add_ps(_mm512_add_ps(x[5], x[1]), _mm512_add_ps(x[7], x[3])),
        );
        // SAFETY: `o` holds 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), t) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;
    use candle_core::quantized::GgmlType;

    /// 37 rows (two full tiles and a padded one) × 18 blocks, 3 activation rows.
    #[test]
    fn tiles_match_candle_bitwise_on_every_path() {
        let (out_dim, nb, rows) = (37, 18, 3);
        let n = nb * 32;
        let mut seed = 5u64;
        let w: Vec<f32> = (0..out_dim * n).map(|_| test_rand(&mut seed)).collect();
        let x: Vec<f32> = (0..rows * n).map(|_| test_rand(&mut seed) * 3.0).collect();
        let mut wq = vec![BlockQ8_0::zeros(); out_dim * nb];
        BlockQ8_0::from_float(&w, &mut wq);
        let mut xq = vec![BlockQ8_0::zeros(); rows * nb];
        BlockQ8_0::from_float(&x, &mut xq);
        let wt = tiles_from_blocks(&wq, out_dim);
        let ap = Q80Rows::quantize(&x, rows, n);
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        // candle runs its AVX2 kernel (our order) where the CPU has it, scalar code else.
        crate::kernels::tiles::check::kernels_agree(
            wt.tiles(),
            out_dim,
            rows,
            ROWS,
            &[0..nb, 4..11],
            (
                &|t, b, r0, out| tile_dot(&wt, t, b, &ap, r0, out),
                &|t, b, r0, out| tile_portable(&wt, t, b, &ap, r0, out),
            ),
            &|o, r, b| {
                let row = &wq[o * nb + b.start..o * nb + b.end];
                let act = &xq[r * nb + b.start..][..b.len()];
                (BlockQ8_0::vec_dot(b.len() * 32, row, act), avx2)
            },
        );
    }

    #[test]
    fn rows_dequantize_as_candle_does() {
        let (out_dim, nb) = (19, 2);
        let mut seed = 1u64;
        let w: Vec<f32> = (0..out_dim * nb * 32)
            .map(|_| test_rand(&mut seed))
            .collect();
        let mut wq = vec![BlockQ8_0::zeros(); out_dim * nb];
        BlockQ8_0::from_float(&w, &mut wq);
        let t = tiles_from_blocks(&wq, out_dim);
        let mut candle = vec![0f32; out_dim * nb * 32];
        BlockQ8_0::to_float(&wq, &mut candle);
        let mut row = vec![0f32; nb * 32];
        for o in 0..out_dim {
            dequantize_row(&t, o, &mut row);
            assert_eq!(row, candle[o * nb * 32..(o + 1) * nb * 32]);
        }
    }
}
