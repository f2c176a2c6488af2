//! Per-row elementwise and reduction ops of the model: [`rms_norm`], [`rope`],
//! [`dot_f32`], [`silu_mul`], and [`per_row`], which spreads rows over the kernel team.

use super::{exp, team};

/// Dot product with a fixed reduction order (16 lanes, then a fixed tree), whatever the
/// caller: the compiler vectorises the lanes without reassociating.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let n16 = a.len() / 16 * 16;
    for (ca, cb) in a[..n16].chunks_exact(16).zip(b[..n16].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0f32;
    for i in n16..a.len() {
        tail += a[i] * b[i];
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

/// Rows from which the per-row ops split rows over the thread pool (below it, the
/// fork-join costs more than the work).
const PAR_ROWS: usize = 8;

/// Runs `f(input_row, output_row)` over rows of `in_len` inputs and `out_len` outputs, in
/// parallel when there are many.
pub(crate) fn per_row<T: Clone + Default + Send>(
    x: &[f32],
    in_len: usize,
    out_len: usize,
    f: impl Fn(&[f32], &mut [T]) + Sync,
) -> Vec<T> {
    let rows = x.len() / in_len;
    let mut y = vec![T::default(); rows * out_len];
    if rows >= PAR_ROWS {
        team::for_each_chunk_mut(&mut y, out_len, |r, y| {
            f(&x[r * in_len..(r + 1) * in_len], y)
        });
    } else {
        for (y, x) in y.chunks_mut(out_len).zip(x.chunks(in_len)) {
            f(x, y);
        }
    }
    y
}

/// `y = x / rms(x) · w` for each row of `x` (`rows × w.len()`). Sequential sum and a
/// division, the order candle's `rms_norm` uses, so we track the reference closely.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    per_row(x, n, n, |xr, yr| {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for i in 0..n {
            yr[i] = xr[i] / m * w[i];
        }
    })
}

/// Rotates one head vector in place; `cos`/`sin` hold one value per pair.
#[inline]
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/// SwiGLU on rows of `gu` = `[gate | up]` (each `ffn` wide) → `rows × ffn`:
/// `g / (1 + exp(-g)) · u`, each operation as written.
pub fn silu_mul(gu: &[f32], ffn: usize) -> Vec<f32> {
    per_row(gu, 2 * ffn, ffn, |gu, out| {
        let (g, u) = gu.split_at(ffn);
        for (o, g) in out.iter_mut().zip(g) {
            *o = -g;
        }
        exp::exp_in_place(out);
        for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + *o) * u;
        }
    })
}
