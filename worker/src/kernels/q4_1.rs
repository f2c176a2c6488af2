//! Q4_1 weights × Q8_1 activations (ggml block formats, 32 values a block) on
//! [`Tiles`]: for each block the exact integer sum `Σ q4·q8`, then
//! `acc += (sumi·dw·dx + mw·sx)` block after block — ggml's and candle's order for every
//! output, so results are bitwise candle's `vec_dot` whatever the tile, the number of
//! activation rows sharing the unpacked weights, or the CPU path.

use std::ops::Range;

use super::act::Q81Rows;
use super::tiles::{TILE, Tiles};

use candle_core::quantized::k_quants::BlockQ4_1;
use half::f16;

/// Activation rows computed against one unpacked weight block: their accumulators, the
/// unpacked block and the scales fill most of the 32 vector registers, and the rows'
/// independent chains keep the VNNI port busy.
pub const ROWS: usize = 8;

/// Layout mirror of candle's `BlockQ4_1` (whose fields are crate-private).
#[repr(C)]
struct Q41 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<Q41>() == std::mem::size_of::<BlockQ4_1>());
const _: () = assert!(std::mem::align_of::<Q41>() == std::mem::align_of::<BlockQ4_1>());

/// Which implementation the matmul runs on this machine.
pub fn kernel_name() -> &'static str {
    if super::CPU.vnni {
        "avx512-vnni"
    } else {
        "portable"
    }
}

/// Q4_1 weights in tiles: 16 bytes of nibbles and scales `(d, m)` per row block.
/// Chunk `k` of a block holds bytes `4k..4k+4`, whose low nibbles are values
/// `4k..4k+4` and high nibbles `16+4k..16+4k+4`.
pub type Q41Tiles = Tiles<16, 2>;

/// `out_dim` rows of whole blocks, row-major (the GGUF layout), as tiles.
pub fn tiles_from_blocks(blocks: &[BlockQ4_1], out_dim: usize) -> Q41Tiles {
    let x = view(blocks);
    let nb = x.len().checked_div(out_dim).unwrap_or(0);
    Tiles::from_fn(out_dim, nb, |o, b| {
        let q = &x[o * nb + b];
        ([q.d.to_f32(), q.m.to_f32()], q.qs)
    })
}

/// Row `o` as f32 (`blocks_per_row · 32` values).
pub fn dequantize_row(w: &Q41Tiles, o: usize, out: &mut [f32]) {
    for b in 0..w.blocks_per_row() {
        let ([d, m], q) = w.block(o, b);
        for j in 0..16 {
            out[b * 32 + j] = (q[j] & 0x0F) as f32 * d + m;
            out[b * 32 + j + 16] = (q[j] >> 4) as f32 * d + m;
        }
    }
}

/// Dot products of tile `tile`'s 16 rows with activation rows `r0..r0 + out.len()` over
/// blocks `blocks`: `out[r][lane]` (lanes past the weights' last row are zero).
/// At most [`ROWS`] activation rows per call.
pub fn tile_dot(
    w: &Q41Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q81Rows,
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
                2 => tile_vnni::<2>(w, tile, blocks, a, r0, out),
                3 => tile_vnni::<3>(w, tile, blocks, a, r0, out),
                4 => tile_vnni::<4>(w, tile, blocks, a, r0, out),
                5 => tile_vnni::<5>(w, tile, blocks, a, r0, out),
                6 => tile_vnni::<6>(w, tile, blocks, a, r0, out),
                7 => tile_vnni::<7>(w, tile, blocks, a, r0, out),
                _ => tile_vnni::<8>(w, tile, blocks, a, r0, out),
            }
        }
        return;
    }
    tile_portable(w, tile, blocks, a, r0, out)
}

fn tile_portable(
    w: &Q41Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q81Rows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    for (r, row) in out.iter_mut().enumerate() {
        for (lane, y) in row.iter_mut().enumerate() {
            let o = tile * TILE + lane;
            let mut acc = 0f32;
            for b in blocks.clone() {
                // Padding rows are zero blocks.
                let ([d, m], q4) = w.block(o, b);
                let ab = (r0 + r) * a.nb + b;
                let q8 = a.values(ab);
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (q4[j] & 0x0F) as i32 * q8[j] as i32
                        + (q4[j] >> 4) as i32 * q8[j + 16] as i32;
                }
                acc += sumi as f32 * d * a.blocks[ab].d + m * a.blocks[ab].s;
            }
            *y = acc;
        }
    }
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `tile`, `blocks` and rows `r0..r0 + R` must be
/// in bounds of `w` and `a` (as [`tile_dot`] asserts); `R <= 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(
    w: &Q41Tiles,
    tile: usize,
    blocks: Range<usize>,
    a: &Q81Rows,
    r0: usize,
    out: &mut [[f32; TILE]],
) {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(0x0F);
    // Eight accumulators whatever R, indexed by constants only, so they live in registers.
    let mut acc = [_mm512_setzero_ps(); 8];
    for b in blocks {
        let i = tile * w.blocks_per_row() + b;
        let (q, wd, wm) = (w.tile_lines(i), w.tile_scales(0, i), w.tile_scales(1, i));
        // SAFETY: `q` holds 4 aligned lines, `wd`/`wm` are aligned 16-float lanes.
        let (v, wd, wm) = unsafe {
            let q = q.as_ptr().cast::<__m512i>();
            (
                [*q, *q.add(1), *q.add(2), *q.add(3)],
                _mm512_load_ps(wd.0.as_ptr()),
                _mm512_load_ps(wm.0.as_ptr()),
            )
        };
        let lo = v.map(|v| _mm512_and_si512(v, mask));
        let hi = v.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask));
        macro_rules! row {
            ($r:literal) => {
                if $r < R {
                    let ab = (r0 + $r) * a.nb + b;
                    // SAFETY: block `ab` of `a` is in bounds per the caller's contract:
                    // 8 dwords of values and one scale pair.
                    let blk = unsafe { a.blocks.get_unchecked(ab) };
                    let (x, xd, xs) = (blk.qs.as_ptr(), blk.d, blk.s);
                    // Two chains of exact integer sums (half the dependency depth).
                    let (mut sl, mut sh) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for k in 0..4 {
                        // SAFETY: as above.
                        let (xl, xh) = unsafe { (*x.add(k), *x.add(4 + k)) };
                        sl = _mm512_dpbusd_epi32(sl, lo[k], _mm512_set1_epi32(xl));
                        sh = _mm512_dpbusd_epi32(sh, hi[k], _mm512_set1_epi32(xh));
                    }
                    let s = _mm512_add_epi32(sl, sh);
                    // ggml's per-block expression, unfused, then the running sum.
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), wd);
                    let t = _mm512_mul_ps(t, _mm512_set1_ps(xd));
                    let t = _mm512_add_ps(t, _mm512_mul_ps(wm, _mm512_set1_ps(xs)));
                    acc[$r] = _mm512_add_ps(acc[$r], t);
                }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        row!(6);
        row!(7);
    }
    for (o, acc) in out.iter_mut().zip(acc).take(R) {
        // SAFETY: `o` holds 16 floats.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc) };
    }
}

fn view(xs: &[BlockQ4_1]) -> &[Q41] {
    // SAFETY: `Q41` is a `#[repr(C)]` mirror of candle's `#[repr(C)]` block with the same
    // field order, size and alignment (asserted above); the slice keeps its length.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<Q41>(), xs.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;
    use candle_core::quantized::GgmlType;
    use candle_core::quantized::k_quants::BlockQ8_1;

    /// 37 rows (two full tiles and a padded one) × 26 blocks, 10 activation rows (calls
    /// of every size up to `ROWS`).
    #[test]
    fn tiles_match_candle_bitwise_on_every_path() {
        let (out_dim, nb, rows) = (37, 26, 10);
        let n = nb * 32;
        let mut seed = 3u64;
        let w: Vec<f32> = (0..out_dim * n).map(|_| test_rand(&mut seed)).collect();
        let x: Vec<f32> = (0..rows * n).map(|_| test_rand(&mut seed) * 3.0).collect();
        let mut wq = vec![BlockQ4_1::zeros(); out_dim * nb];
        BlockQ4_1::from_float(&w, &mut wq);
        let mut xq = vec![BlockQ8_1::zeros(); rows * nb];
        BlockQ8_1::from_float(&x, &mut xq);
        let wp = tiles_from_blocks(&wq, out_dim);
        let ap = Q81Rows::quantize(&x, rows, n);
        crate::kernels::tiles::check::kernels_agree(
            wp.tiles(),
            out_dim,
            rows,
            ROWS,
            &[0..nb, 8..20],
            (
                &|t, b, r0, out| tile_dot(&wp, t, b, &ap, r0, out),
                &|t, b, r0, out| tile_portable(&wp, t, b, &ap, r0, out),
            ),
            &|o, r, b| {
                let row = &wq[o * nb + b.start..o * nb + b.end];
                let act = &xq[r * nb + b.start..][..b.len()];
                (BlockQ4_1::vec_dot(b.len() * 32, row, act), true)
            },
        );
    }

    #[test]
    fn rows_dequantize_as_candle_does() {
        let (out_dim, nb) = (21, 3);
        let mut seed = 9u64;
        let w: Vec<f32> = (0..out_dim * nb * 32)
            .map(|_| test_rand(&mut seed))
            .collect();
        let mut wq = vec![BlockQ4_1::zeros(); out_dim * nb];
        BlockQ4_1::from_float(&w, &mut wq);
        let t = tiles_from_blocks(&wq, out_dim);
        let mut candle = vec![0f32; out_dim * nb * 32];
        BlockQ4_1::to_float(&wq, &mut candle);
        let mut row = vec![0f32; nb * 32];
        for o in 0..out_dim {
            dequantize_row(&t, o, &mut row);
            assert_eq!(row, candle[o * nb * 32..(o + 1) * nb * 32]);
        }
    }
}
