//! Attention of a token's query heads over its paged KV blocks, in candle's order: scores
//! as its decode-step kernel reduces them, softmax as candle's, values as its gemv. Every
//! reduction's order is fixed by the head and position alone, never by the batch.

use super::CPU;

/// Sum in a fixed order: 32 lane accumulators, a fixed tree, then the tail in sequence
/// (the order of candle's vectorised `vec_sum`, which its softmax uses).
#[inline]
pub fn sum_lanes(xs: &[f32]) -> f32 {
    let np = xs.len() & !31;
    let mut acc = [0f32; 32];
    for c in xs[..np].chunks_exact(32) {
        for l in 0..32 {
            acc[l] += c[l];
        }
    }
    let mut a = [0f32; 8];
    for l in 0..8 {
        a[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    }
    let t = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let mut total = (t[0] + t[1]) + (t[2] + t[3]);
    for x in &xs[np..] {
        total += x;
    }
    total
}

/// One KV head's cache of a sequence, as attention reads it: `keys[j]` and `values[j]`
/// are block `j`'s runs (keys `[dim][slot]`, values `[slot][dim]`, `block_size` slots),
/// positions `0..len` in order.
#[derive(Debug, Clone, Copy)]
pub struct KvBlocks<'a> {
    pub keys: &'a [&'a [f32]],
    pub values: &'a [&'a [f32]],
    pub block_size: usize,
    pub len: usize,
}

/// One query head attending over `kv`: `out = softmax(q·k · scale) · V`.
///
/// Scores are reduced in the order of candle's decode-step kernel (see `block_scores`),
/// each output element is a fused chain over positions (candle's gemv order), softmax as
/// candle's: a decode step is bitwise candle's. A block's 16 scores are computed side by
/// side — keys are stored dimension-major, so one vector holds a dimension of every slot —
/// which changes nothing inside a reduction, so results depend neither on the CPU path
/// nor on anything outside this head.
pub fn attend(q: &[f32], kv: KvBlocks<'_>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if CPU.fma {
        // SAFETY: the CPU supports FMA and AVX2 (checked at runtime).
        return unsafe { attend_fma(q, kv, scale, scores, out) };
    }
    attend_impl(q, kv, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn attend_fma(
    q: &[f32],
    kv: KvBlocks<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_impl(q, kv, scale, scores, out)
}

/// Slots a block's score loop handles at once (the KV block size of the worker).
const SLOTS: usize = 16;

/// `scores[p] = (q · k_p) · scale`, every dot product in the order of the kernel
/// candle's attention runs for a decode step (gemm's horizontal f32 kernel, 8 lanes on
/// x86, used while the scores matrix has at most 256 entries): lane `l` a fused chain
/// over dimensions `l, l + 8, …`, then `((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))`.
/// One order for every token whatever its step, so results stay batch- and
/// chunk-invariant; candle itself switches orders with the matrix size (long prompts go
/// through its packed micro-kernel), which the reference test measures.
#[inline(always)]
fn block_scores(q: &[f32], kv: KvBlocks<'_>, scale: f32, scores: &mut [f32]) {
    let (hd, bs) = (q.len(), kv.block_size);
    for (keys, sc) in kv.keys.iter().zip(scores.chunks_exact_mut(bs)) {
        let keys = &keys[..hd * bs];
        if bs == SLOTS {
            for (y, d) in sc.iter_mut().zip(lane_dots_16(q, keys)) {
                *y = d * scale;
            }
        } else {
            for (s, y) in sc.iter_mut().enumerate() {
                *y = lane_dot(q, |i| keys[i * bs + s]) * scale;
            }
        }
    }
}

/// One dot product `q · k` in the order of [`block_scores`].
#[inline(always)]
fn lane_dot(q: &[f32], k: impl Fn(usize) -> f32) -> f32 {
    let mut a = [0f32; 8];
    for (i, qi) in q.iter().enumerate() {
        a[i % 8] = qi.mul_add(k(i), a[i % 8]);
    }
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// [`lane_dot`] for the 16 slots of a block at once (keys `[dim][slot]`): the same
/// operations, each across the 16 slots.
#[inline(always)]
fn lane_dots_16(q: &[f32], keys: &[f32]) -> [f32; SLOTS] {
    let mut a = [[0f32; SLOTS]; 8];
    for (i, (qi, k)) in q.iter().zip(keys.chunks_exact(SLOTS)).enumerate() {
        let a = &mut a[i % 8];
        for s in 0..SLOTS {
            a[s] = qi.mul_add(k[s], a[s]);
        }
    }
    std::array::from_fn(|s| {
        ((a[0][s] + a[4][s]) + (a[2][s] + a[6][s])) + ((a[1][s] + a[5][s]) + (a[3][s] + a[7][s]))
    })
}

/// [`block_scores`] on the best path this CPU has.
fn attend_scores(q: &[f32], kv: KvBlocks<'_>, scale: f32, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if CPU.avx512 {
        // SAFETY: the CPU supports AVX-512F and FMA (checked at runtime).
        return unsafe { block_scores_avx512(q, kv, scale, scores) };
    }
    block_scores(q, kv, scale, scores)
}

/// [`block_scores`] compiled for AVX-512 (16 slots a register).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_scores_avx512(q: &[f32], kv: KvBlocks<'_>, scale: f32, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = q.len();
    if kv.block_size != SLOTS || !hd.is_multiple_of(8) {
        return block_scores(q, kv, scale, scores);
    }
    assert!(scores.len() >= kv.keys.len() * SLOTS && kv.keys.iter().all(|k| k.len() >= hd * SLOTS));
    let scale = _mm512_set1_ps(scale);
    for (b, keys) in kv.keys.iter().enumerate() {
        let k = keys.as_ptr();
        // The eight lane chains of `lane_dot`, each across the 16 slots.
        let mut a = [_mm512_setzero_ps(); 8];
        for i0 in (0..hd).step_by(8) {
            for (l, a) in a.iter_mut().enumerate() {
                let i = i0 + l;
                // SAFETY: key row `i < hd` of the block holds 16 floats (asserted above).
                let kv = unsafe { _mm512_loadu_ps(k.add(i * SLOTS)) };
                *a = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), kv, *a);
            }
        }
        let t = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
            _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
        );
        // SAFETY: `scores` holds 16 floats per key block (asserted above).
        unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(b * SLOTS), _mm512_mul_ps(t, scale)) };
    }
}

#[inline(always)]
fn attend_impl(q: &[f32], kv: KvBlocks<'_>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let (hd, bs, n) = (q.len(), kv.block_size, kv.len);
    scores.clear();
    scores.resize(kv.keys.len() * bs, 0.0);
    attend_scores(q, kv, scale, scores);
    scores.truncate(n);
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
    }
    let sum = sum_lanes(scores);
    #[cfg(target_arch = "x86_64")]
    if hd == 64 && CPU.avx512 {
        // SAFETY: the CPU supports AVX-512F (checked at runtime).
        return unsafe { weighted_values_avx512::<4>(scores, sum, kv, out) };
    }
    out.fill(0.0);
    for (block, sc) in kv.values.iter().zip(scores.chunks(bs)) {
        for (s, v) in sc.iter().zip(block.chunks_exact(hd)) {
            let w = s / sum;
            for (o, x) in out.iter_mut().zip(v) {
                *o = w.mul_add(*x, *o);
            }
        }
    }
}

/// `out = Σ_p (scores[p] / sum) · v_p` in position order, one fused chain per element,
/// for a head of `C × 16` dimensions held in registers.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_avx512<const C: usize>(
    scores: &[f32],
    sum: f32,
    kv: KvBlocks<'_>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (hd, bs) = (C * 16, kv.block_size);
    assert!(out.len() == hd && kv.values.iter().all(|v| v.len() >= bs * hd));
    let mut acc = [_mm512_setzero_ps(); C];
    for (block, sc) in kv.values.iter().zip(scores.chunks(bs)) {
        for (slot, s) in sc.iter().enumerate() {
            let w = _mm512_set1_ps(s / sum);
            let v = block.as_ptr().wrapping_add(slot * hd);
            for (c, acc) in acc.iter_mut().enumerate() {
                // SAFETY: slot `slot` of the block holds `hd` floats (asserted above).
                *acc = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(v.add(c * 16)) }, *acc);
            }
        }
    }
    for (c, acc) in acc.iter().enumerate() {
        // SAFETY: `out` holds `hd` floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), *acc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;

    /// One query row against 16-slot key blocks: bitwise what candle computes for
    /// `q.matmul(k.t())` (a decode step's attention scores), for head sizes that exercise
    /// every stage of the order, on both the vector and the per-slot path.
    #[test]
    fn scores_match_candle_single_row_matmul_bitwise() {
        use candle_core::{Device, Tensor};
        let mut seed = 17;
        for hd in [64, 72, 100, 128] {
            let n = 2 * SLOTS; // 32 scores: candle's horizontal kernel (≤ 256 entries)
            let q: Vec<f32> = (0..hd).map(|_| test_rand(&mut seed)).collect();
            let k: Vec<f32> = (0..n * hd).map(|_| test_rand(&mut seed) * 4.0).collect();
            let qt = Tensor::from_vec(q.clone(), (1, hd), &Device::Cpu).unwrap();
            let kt = Tensor::from_vec(k.clone(), (n, hd), &Device::Cpu).unwrap();
            let theirs: Vec<f32> = qt
                .matmul(&kt.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // Our cache layout: per block, keys dimension-major.
            let blocks: Vec<Vec<f32>> = (0..2)
                .map(|b| {
                    let mut t = vec![0f32; hd * SLOTS];
                    for s in 0..SLOTS {
                        for i in 0..hd {
                            t[i * SLOTS + s] = k[(b * SLOTS + s) * hd + i];
                        }
                    }
                    t
                })
                .collect();
            let keys: Vec<&[f32]> = blocks.iter().map(Vec::as_slice).collect();
            let kv = KvBlocks {
                keys: &keys,
                values: &keys,
                block_size: SLOTS,
                len: n,
            };
            let mut ours = vec![0f32; n];
            attend_scores(&q, kv, 1.0, &mut ours);
            let per_slot: Vec<f32> = (0..n).map(|p| lane_dot(&q, |i| k[p * hd + i])).collect();
            assert_eq!(ours, theirs, "head dim {hd}");
            assert_eq!(per_slot, theirs, "head dim {hd}, per slot");
        }
    }
}
