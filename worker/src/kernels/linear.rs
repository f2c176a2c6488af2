//! [`Linear`]: `y = x · Wᵀ` over rows of activations, with the weights in their storage
//! format ([`WeightData`]: f32 or ggml quantized blocks, tiled for the VNNI kernels).
//! Parallel over output columns only, so every output's reduction order depends on its
//! row and column alone (batch invariance).

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, GgmlType,
};

use super::tiles::TILE;
use super::{act, dot_f32, q4_1, q8_0, team, tiles};

/// Weights of one linear layer, `out_dim` rows of `in_dim` values, in storage format.
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(q4_1::Q41Tiles),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(q8_0::Q80Tiles),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
}

/// Errors building kernel inputs from raw checkpoint data.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("dtype {0:?} is not supported for matmul weights")]
    UnsupportedDType(GgmlDType),
    #[error("{what}: expected {expected} bytes/elements, got {got}")]
    Size {
        what: String,
        expected: usize,
        got: usize,
    },
}

fn blocks_from_bytes<T: GgmlType>(bytes: &[u8], what: &str) -> Result<Vec<T>, KernelError> {
    let sz = std::mem::size_of::<T>();
    if sz != T::DTYPE.type_size() || !bytes.len().is_multiple_of(sz) {
        return Err(KernelError::Size {
            what: what.into(),
            expected: sz,
            got: bytes.len(),
        });
    }
    let n = bytes.len() / sz;
    let mut v = vec![T::zeros(); n];
    // SAFETY: `T` is one of candle's `#[repr(C)]` ggml block types, made only of f16 / u8 /
    // i8 fields, so every bit pattern is a valid value; `v` owns exactly `n * sz` bytes and
    // does not overlap `bytes`.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * sz) };
    Ok(v)
}

/// A linear layer without bias: `y[r][o] = Σ_i x[r][i] · W[o][i]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub w: WeightData,
}

macro_rules! dispatch {
    ($w:expr, $v:ident => $body:expr) => {
        match $w {
            WeightData::F32($v) => $body,
            WeightData::Q4_0($v) => $body,
            WeightData::Q4_1(_) | WeightData::Q8_0(_) => {
                unreachable!("tiled formats are handled before dispatch; this is a bug")
            }
            WeightData::Q5_0($v) => $body,
            WeightData::Q5_1($v) => $body,
            WeightData::Q2K($v) => $body,
            WeightData::Q3K($v) => $body,
            WeightData::Q4K($v) => $body,
            WeightData::Q5K($v) => $body,
            WeightData::Q6K($v) => $body,
        }
    };
}

impl Linear {
    pub fn from_f32(out_dim: usize, in_dim: usize, w: Vec<f32>) -> Result<Self, KernelError> {
        if w.len() != out_dim * in_dim {
            return Err(KernelError::Size {
                what: "f32 weight".into(),
                expected: out_dim * in_dim,
                got: w.len(),
            });
        }
        Ok(Linear {
            out_dim,
            in_dim,
            w: WeightData::F32(w),
        })
    }

    /// Builds a layer from raw ggml bytes (row-major, `out_dim` rows). F16/BF16 are
    /// widened to f32.
    pub fn from_ggml(
        dtype: GgmlDType,
        out_dim: usize,
        in_dim: usize,
        bytes: &[u8],
        what: &str,
    ) -> Result<Self, KernelError> {
        let bs = dtype.block_size();
        if !in_dim.is_multiple_of(bs) {
            return Err(KernelError::Size {
                what: format!("{what}: row length vs block size {bs}"),
                expected: bs,
                got: in_dim,
            });
        }
        let expected = out_dim * in_dim / bs * dtype.type_size();
        if bytes.len() != expected {
            return Err(KernelError::Size {
                what: what.into(),
                expected,
                got: bytes.len(),
            });
        }
        let w = match dtype {
            GgmlDType::F32 => WeightData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            GgmlDType::F16 => WeightData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            GgmlDType::BF16 => WeightData::F32(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            GgmlDType::Q4_0 => WeightData::Q4_0(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q4_1 => WeightData::Q4_1(q4_1::tiles_from_blocks(
                &blocks_from_bytes::<BlockQ4_1>(bytes, what)?,
                out_dim,
            )),
            GgmlDType::Q5_0 => WeightData::Q5_0(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q5_1 => WeightData::Q5_1(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q8_0 => WeightData::Q8_0(q8_0::tiles_from_blocks(
                &blocks_from_bytes::<BlockQ8_0>(bytes, what)?,
                out_dim,
            )),
            GgmlDType::Q2K => WeightData::Q2K(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q3K => WeightData::Q3K(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q4K => WeightData::Q4K(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q5K => WeightData::Q5K(blocks_from_bytes(bytes, what)?),
            GgmlDType::Q6K => WeightData::Q6K(blocks_from_bytes(bytes, what)?),
            other => return Err(KernelError::UnsupportedDType(other)),
        };
        Ok(Linear { out_dim, in_dim, w })
    }

    pub fn dtype_name(&self) -> &'static str {
        match &self.w {
            WeightData::F32(_) => "f32",
            WeightData::Q4_0(_) => "q4_0",
            WeightData::Q4_1(_) => "q4_1",
            WeightData::Q5_0(_) => "q5_0",
            WeightData::Q5_1(_) => "q5_1",
            WeightData::Q8_0(_) => "q8_0",
            WeightData::Q2K(_) => "q2_k",
            WeightData::Q3K(_) => "q3_k",
            WeightData::Q4K(_) => "q4_k",
            WeightData::Q5K(_) => "q5_k",
            WeightData::Q6K(_) => "q6_k",
        }
    }

    /// Stacks layers with the same input width and storage format along the output axis
    /// (q|k|v, gate|up), so one call covers them. `None` if the formats differ.
    pub fn concat(parts: Vec<Linear>) -> Option<Linear> {
        let in_dim = parts.first()?.in_dim;
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        if parts.iter().any(|p| p.in_dim != in_dim) {
            return None;
        }
        // Tiled formats: stack rows through the tile layout.
        macro_rules! tiled {
            ($v:ident) => {
                if parts.iter().all(|p| matches!(p.w, WeightData::$v(_))) {
                    let tiles: Vec<_> = parts
                        .iter()
                        .filter_map(|p| match &p.w {
                            WeightData::$v(t) => Some(t.clone()),
                            _ => None,
                        })
                        .collect();
                    let w = WeightData::$v(tiles::Tiles::concat(&tiles)?);
                    return Some(Linear { out_dim, in_dim, w });
                }
            };
        }
        tiled!(Q4_1);
        tiled!(Q8_0);
        let mut it = parts.into_iter();
        let first = it.next()?;
        let mut w = first.w;
        for p in it {
            match (&mut w, p.w) {
                (WeightData::F32(a), WeightData::F32(b)) => a.extend(b),
                (WeightData::Q4_0(a), WeightData::Q4_0(b)) => a.extend(b),
                (WeightData::Q5_0(a), WeightData::Q5_0(b)) => a.extend(b),
                (WeightData::Q5_1(a), WeightData::Q5_1(b)) => a.extend(b),
                (WeightData::Q2K(a), WeightData::Q2K(b)) => a.extend(b),
                (WeightData::Q3K(a), WeightData::Q3K(b)) => a.extend(b),
                (WeightData::Q4K(a), WeightData::Q4K(b)) => a.extend(b),
                (WeightData::Q5K(a), WeightData::Q5K(b)) => a.extend(b),
                (WeightData::Q6K(a), WeightData::Q6K(b)) => a.extend(b),
                _ => return None,
            }
        }
        Some(Linear { out_dim, in_dim, w })
    }

    /// Row `o` of the weights as f32 (embedding lookups from a tied, quantized table).
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) {
        let n = self.in_dim;
        match &self.w {
            WeightData::Q4_1(t) => return q4_1::dequantize_row(t, o, &mut out[..n]),
            WeightData::Q8_0(t) => return q8_0::dequantize_row(t, o, &mut out[..n]),
            _ => {}
        }
        dispatch!(&self.w, v => {
            let per = v.len() / self.out_dim;
            GgmlType::to_float(&v[o * per..(o + 1) * per], &mut out[..n]);
        })
    }

    /// `x`: `rows × in_dim` → `rows × out_dim`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_segments(x, rows, 1)
    }

    /// The products of `segments` equal slices of the input axis, separately:
    /// `segments × rows × out_dim`, slice `s` covering input columns
    /// `s·in_dim/segments ..`. Summing them in segment order is how a row-parallel layer
    /// reduces, whether the segments sit on one tensor-parallel rank or on several.
    /// Slices must be whole storage blocks (and whole activation blocks).
    pub fn forward_segments(&self, x: &[f32], rows: usize, segments: usize) -> Vec<f32> {
        self.run(x, rows, segments, SegmentOut::Apart)
    }

    /// [`Self::forward_segments`] summed in segment order (`rows × out_dim`): the bits of
    /// [`sum_segments`] over the separate products, without holding them.
    pub fn forward_summed(&self, x: &[f32], rows: usize, segments: usize) -> Vec<f32> {
        self.run(x, rows, segments, SegmentOut::Summed)
    }

    fn run(&self, x: &[f32], rows: usize, segments: usize, out: SegmentOut) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim);
        let seg = Segments {
            n: segments.max(1),
            len: self.in_dim / segments.max(1),
        };
        assert_eq!(seg.n * seg.len, self.in_dim);
        let apart = match &self.w {
            WeightData::Q4_1(w) => {
                let xq = act::Q81Rows::quantize(x, rows, self.in_dim);
                return matmul_tiled(
                    w.tiles(),
                    self.out_dim,
                    rows,
                    seg,
                    out,
                    q4_1::ROWS,
                    |t, b, r0, out| q4_1::tile_dot(w, t, b, &xq, r0, out),
                );
            }
            WeightData::Q8_0(w) => {
                let xq = act::Q80Rows::quantize(x, rows, self.in_dim);
                return matmul_tiled(
                    w.tiles(),
                    self.out_dim,
                    rows,
                    seg,
                    out,
                    q8_0::ROWS,
                    |t, b, r0, out| q8_0::tile_dot(w, t, b, &xq, r0, out),
                );
            }
            WeightData::F32(w) => matmul_f32(w, self.out_dim, self.in_dim, x, rows, seg),
            other => {
                dispatch!(other, v => matmul_q(v, self.out_dim, self.in_dim, x, rows, seg, GgmlType::vec_dot))
            }
        };
        match out {
            SegmentOut::Apart => apart,
            SegmentOut::Summed => sum_segments(&apart, rows * self.out_dim),
        }
    }
}

/// Sums `segments × size` values segment by segment, in order: `((s0 + s1) + s2) …`.
pub fn sum_segments(all: &[f32], size: usize) -> Vec<f32> {
    let mut segs = all.chunks_exact(size);
    let mut out = segs.next().map(<[f32]>::to_vec).unwrap_or_default();
    for s in segs {
        for (a, b) in out.iter_mut().zip(s) {
            *a += b;
        }
    }
    out
}

/// Whether a matmul returns each input segment's product or their ordered sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentOut {
    Apart,
    Summed,
}

/// Equal slices of a matmul's input axis, reduced separately.
#[derive(Debug, Clone, Copy)]
struct Segments {
    n: usize,
    len: usize,
}

/// Output columns per parallel task: small enough to spread over the threads, large
/// enough to amortise task overhead. Does not affect numerics.
fn col_chunk(out_dim: usize) -> usize {
    out_dim.div_ceil(team::threads() * 4).clamp(8, 256)
}

/// Runs `f(o, yt_col)` for every output column in parallel, `yt_col` being the column's
/// `rows` outputs, then lays the result out row-major.
fn per_column(out_dim: usize, rows: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let ch = col_chunk(out_dim);
    let mut yt = vec![0f32; out_dim * rows];
    team::for_each_chunk_mut(&mut yt, ch * rows, |c, chunk| {
        for (j, col) in chunk.chunks_mut(rows).enumerate() {
            f(c * ch + j, col);
        }
    });
    if rows == 1 {
        return yt;
    }
    let mut y = vec![0f32; out_dim * rows];
    for o in 0..out_dim {
        for r in 0..rows {
            y[r * out_dim + o] = yt[o * rows + r];
        }
    }
    y
}

fn matmul_f32(
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    x: &[f32],
    rows: usize,
    seg: Segments,
) -> Vec<f32> {
    per_column(out_dim, seg.n * rows, |o, col| {
        for (i, y) in col.iter_mut().enumerate() {
            let (s, r) = (i / rows, i % rows);
            let w0 = o * in_dim + s * seg.len;
            let x0 = r * in_dim + s * seg.len;
            *y = dot_f32(&w[w0..w0 + seg.len], &x[x0..x0 + seg.len]);
        }
    })
}

fn matmul_q<T: GgmlType>(
    w: &[T],
    out_dim: usize,
    in_dim: usize,
    x: &[f32],
    rows: usize,
    seg: Segments,
    vec_dot: impl Fn(usize, &[T], &[T::VecDotType]) -> f32 + Sync,
) -> Vec<f32> {
    let xb = in_dim / T::VecDotType::BLCK_SIZE;
    let wb = in_dim / T::BLCK_SIZE;
    let (sxb, swb) = (seg.len / T::VecDotType::BLCK_SIZE, seg.len / T::BLCK_SIZE);
    let mut xq = vec![T::VecDotType::zeros(); rows * xb];
    for r in 0..rows {
        T::VecDotType::from_float(
            &x[r * in_dim..(r + 1) * in_dim],
            &mut xq[r * xb..(r + 1) * xb],
        );
    }
    per_column(out_dim, seg.n * rows, |o, col| {
        for (i, y) in col.iter_mut().enumerate() {
            let (s, r) = (i / rows, i % rows);
            let w0 = o * wb + s * swb;
            let x0 = r * xb + s * sxb;
            *y = vec_dot(seg.len, &w[w0..w0 + swb], &xq[x0..x0 + sxb]);
        }
    })
}

/// Most activation rows a tile kernel takes per call.
const MAX_ROWS_PER_CALL: usize = 8;

/// A matmul over weights in [`tiles::Tiles`]: `kernel(tile, blocks, r0, out)` fills
/// `out[r][lane]` for activation rows `r0..r0 + out.len()` (at most `rows_per_call`).
/// Tiles run in parallel, each over all rows and segments while its weights sit in L1,
/// writing its 16 columns of the row-major result directly: `segments × rows × out_dim`,
/// or with [`SegmentOut::Summed`] the segments added in order as they come
/// (`rows × out_dim`, the bits of [`sum_segments`]).
fn matmul_tiled(
    tiles: usize,
    out_dim: usize,
    rows: usize,
    seg: Segments,
    mode: SegmentOut,
    rows_per_call: usize,
    kernel: impl Fn(usize, std::ops::Range<usize>, usize, &mut [[f32; TILE]]) + Sync,
) -> Vec<f32> {
    assert!(
        rows_per_call <= MAX_ROWS_PER_CALL && tiles == out_dim.div_ceil(TILE),
        "tile matmul shape; this is a bug"
    );
    let sb = seg.len / 32;
    let out_segs = match mode {
        SegmentOut::Apart => seg.n,
        SegmentOut::Summed => 1,
    };
    let len = out_segs * rows * out_dim;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // Tasks write disjoint columns; nothing reads `y` before they are all done.
    let dst = team::SendPtr(y.as_mut_ptr());
    let tiles_per_task = tiles.div_ceil(team::threads() * 4).max(1);
    team::for_each(tiles.div_ceil(tiles_per_task), |task| {
        let tiles = task * tiles_per_task..((task + 1) * tiles_per_task).min(tiles);
        let mut part = [[0f32; TILE]; MAX_ROWS_PER_CALL];
        let mut sum = [[0f32; TILE]; MAX_ROWS_PER_CALL];
        for tile in tiles {
            let (col, lanes) = (tile * TILE, (out_dim - tile * TILE).min(TILE));
            let write = |row: usize, v: &[f32; TILE]| {
                debug_assert!(row < out_segs * rows);
                // SAFETY: `row < out_segs · rows` and `col + lanes <= out_dim`, so the
                // run is inside `y`'s `len` reserved elements; this task alone writes
                // columns `col..col + lanes`.
                unsafe {
                    let at = dst.get().add(row * out_dim + col);
                    if lanes == TILE {
                        // A whole tile: one fixed-size store, not a call to memcpy.
                        at.cast::<[f32; TILE]>().write_unaligned(*v);
                    } else {
                        std::ptr::copy_nonoverlapping(v.as_ptr(), at, lanes);
                    }
                };
            };
            for r0 in (0..rows).step_by(rows_per_call) {
                let nr = rows_per_call.min(rows - r0);
                for s in 0..seg.n {
                    // The kernel writes the running sum itself where nothing is to be
                    // added (every segment apart, the first of a sum).
                    let first = mode == SegmentOut::Apart || s == 0;
                    let out = if first {
                        &mut sum[..nr]
                    } else {
                        &mut part[..nr]
                    };
                    kernel(tile, s * sb..(s + 1) * sb, r0, out);
                    if !first {
                        for (acc, v) in sum.iter_mut().zip(&part[..nr]) {
                            for (a, b) in acc.iter_mut().zip(v) {
                                *a += b;
                            }
                        }
                    }
                    if mode == SegmentOut::Apart || s + 1 == seg.n {
                        let row0 = if mode == SegmentOut::Apart {
                            s * rows
                        } else {
                            0
                        };
                        for (r, v) in sum[..nr].iter().enumerate() {
                            write(row0 + r0 + r, v);
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the tasks above wrote every element: each (segment, row) of each tile's
    // `lanes` columns, and the tiles cover `0..out_dim`.
    unsafe { y.set_len(len) };
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;

    #[test]
    fn matmul_rows_are_independent_of_batch() {
        let mut s = 7;
        let (out, inn) = (70, 96);
        let w: Vec<f32> = (0..out * inn).map(|_| test_rand(&mut s)).collect();
        let x: Vec<f32> = (0..5 * inn).map(|_| test_rand(&mut s)).collect();
        let mut q = vec![BlockQ8_0::zeros(); out * inn / 32];
        BlockQ8_0::from_float(&w, &mut q);
        for lin in [
            Linear::from_f32(out, inn, w.clone()).unwrap(),
            Linear {
                out_dim: out,
                in_dim: inn,
                w: WeightData::Q8_0(q8_0::tiles_from_blocks(&q, out)),
            },
        ] {
            let all = lin.forward(&x, 5);
            for r in 0..5 {
                let one = lin.forward(&x[r * inn..(r + 1) * inn], 1);
                assert_eq!(
                    one,
                    all[r * out..(r + 1) * out],
                    "{} row {r}",
                    lin.dtype_name()
                );
            }
        }
    }

    #[test]
    fn concat_stacks_outputs() {
        let a = Linear::from_f32(2, 3, vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let b = Linear::from_f32(1, 3, vec![1., 0., 1.]).unwrap();
        let c = Linear::concat(vec![a, b]).unwrap();
        assert_eq!(c.forward(&[1., 1., 1.], 1), vec![6., 15., 2.]);
    }
}
