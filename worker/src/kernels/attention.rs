//! Attention of a token's query heads over its paged KV blocks, in candle's order: scores
//! as its decode-step kernel reduces them, softmax as candle's, values as its gemv. Every
//! reduction's order is fixed by the head and position alone, never by the batch.

use super::{CPU, KvElement};

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
/// positions `0..len` in order, elements of the cache's type `T` (f32 unless the cache
/// is 16-bit; see [`KvElement`]).
#[derive(Debug)]
pub struct KvBlocks<'a, T = f32> {
    pub keys: &'a [&'a [T]],
    pub values: &'a [&'a [T]],
    pub block_size: usize,
    pub len: usize,
}

// By hand: a derive would ask `T: Copy`, which the slices do not need.
impl<T> Clone for KvBlocks<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for KvBlocks<'_, T> {}

/// The query heads of one KV head attending over `kv`: for each head `h` (`q` holds them
/// one after the other, `head_dim` values each), `out[h] = softmax(q_h·k · scale) · V`.
///
/// Scores are reduced in the order of candle's decode-step kernel (see `block_scores`),
/// each output element is a fused chain over positions (candle's gemv order), softmax as
/// candle's: a decode step is bitwise candle's. A block's 16 scores are computed side by
/// side — keys are stored dimension-major, so one vector holds a dimension of every slot —
/// and the heads of a KV head share each key and value load; neither changes anything
/// inside a reduction, so results depend neither on the CPU path nor on anything outside
/// this head. `scores` is scratch space.
pub fn attend<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    kv: KvBlocks<'_, T>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if CPU.fma {
        // SAFETY: the CPU supports FMA and AVX2 (checked at runtime).
        return unsafe { attend_fma(q, head_dim, kv, scale, scores, out) };
    }
    attend_impl(q, head_dim, kv, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn attend_fma<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    kv: KvBlocks<'_, T>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_impl(q, head_dim, kv, scale, scores, out)
}

/// Slots a block's score loop handles at once (the KV block size of the worker).
const SLOTS: usize = 16;

/// Most query heads one pass of the vector kernels carries (their accumulators fill the
/// registers); more heads take several passes.
const MAX_HEADS: usize = 3;

/// `scores[p] = (q · k_p) · scale`, every dot product in the order of the kernel
/// candle's attention runs for a decode step (gemm's horizontal f32 kernel, 8 lanes on
/// x86, used while the scores matrix has at most 256 entries): lane `l` a fused chain
/// over dimensions `l, l + 8, …`, then `((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))`.
/// One order for every token whatever its step, so results stay batch- and
/// chunk-invariant; candle itself switches orders with the matrix size (long prompts go
/// through its packed micro-kernel), which the reference test measures.
#[inline(always)]
fn block_scores<T: KvElement>(q: &[f32], kv: KvBlocks<'_, T>, scale: f32, scores: &mut [f32]) {
    let (hd, bs) = (q.len(), kv.block_size);
    for (keys, sc) in kv.keys.iter().zip(scores.chunks_exact_mut(bs)) {
        let keys = &keys[..hd * bs];
        if bs == SLOTS {
            for (y, d) in sc.iter_mut().zip(lane_dots_16(q, keys)) {
                *y = d * scale;
            }
        } else {
            for (s, y) in sc.iter_mut().enumerate() {
                *y = lane_dot(q, |i| keys[i * bs + s].to_f32()) * scale;
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
fn lane_dots_16<T: KvElement>(q: &[f32], keys: &[T]) -> [f32; SLOTS] {
    let mut a = [[0f32; SLOTS]; 8];
    for (i, (qi, k)) in q.iter().zip(keys.chunks_exact(SLOTS)).enumerate() {
        let a = &mut a[i % 8];
        for s in 0..SLOTS {
            a[s] = qi.mul_add(k[s].to_f32(), a[s]);
        }
    }
    std::array::from_fn(|s| {
        ((a[0][s] + a[4][s]) + (a[2][s] + a[6][s])) + ((a[1][s] + a[5][s]) + (a[3][s] + a[7][s]))
    })
}

/// [`block_scores`] of every head in `q` (`head_dim` each) into `scores`, `stride`
/// values a head, on the best path this CPU has.
fn attend_scores<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    kv: KvBlocks<'_, T>,
    scale: f32,
    scores: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if CPU.avx512 && kv.block_size == SLOTS && head_dim.is_multiple_of(8) {
        for (q, sc) in q
            .chunks(MAX_HEADS * head_dim)
            .zip(scores.chunks_mut(MAX_HEADS * stride))
        {
            // SAFETY: the CPU supports AVX-512F and FMA (checked at runtime); 16-slot
            // blocks and a head size of whole lane rounds (checked above).
            unsafe {
                match q.len() / head_dim {
                    1 => block_scores_avx512::<T, 1>(q, kv, scale, sc, stride),
                    2 => block_scores_avx512::<T, 2>(q, kv, scale, sc, stride),
                    _ => block_scores_avx512::<T, 3>(q, kv, scale, sc, stride),
                }
            }
        }
        return;
    }
    for (q, sc) in q.chunks_exact(head_dim).zip(scores.chunks_mut(stride)) {
        block_scores(q, kv, scale, sc);
    }
}

/// [`block_scores`] of `H` heads compiled for AVX-512 (16 slots a register), every key
/// vector loaded once for all of them.
///
/// # Safety
/// The CPU must support AVX-512F; blocks of 16 slots, a head size that is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_scores_avx512<T: KvElement, const H: usize>(
    q: &[f32],
    kv: KvBlocks<'_, T>,
    scale: f32,
    scores: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let hd = q.len() / H;
    assert!(
        q.len() == H * hd
            && hd.is_multiple_of(8)
            && kv.block_size == SLOTS
            && stride >= kv.keys.len() * SLOTS
            && scores.len() >= (H - 1) * stride + kv.keys.len() * SLOTS
            && kv.keys.iter().all(|k| k.len() >= hd * SLOTS),
        "attention score shapes; this is a bug"
    );
    let scale = _mm512_set1_ps(scale);
    // Keys two blocks ahead and this block's values (read after the softmax) are fetched
    // while a block computes: blocks are scattered, so the hardware prefetcher stops at
    // each one. A block run is `hd` lines of 16 floats.
    let fetch = |run: &[T]| {
        for line in run[..hd * SLOTS].chunks_exact(SLOTS) {
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
        }
    };
    if let Some(k1) = kv.keys.get(1) {
        fetch(k1);
    }
    for (b, keys) in kv.keys.iter().enumerate() {
        let k = keys.as_ptr();
        let next_k = kv.keys.get(b + 2).unwrap_or(keys).as_ptr();
        let this_v = kv.values.get(b).unwrap_or(keys).as_ptr();
        // The eight lane chains of `lane_dot` for each head, each across the 16 slots.
        let mut a = [[_mm512_setzero_ps(); 8]; H];
        for i0 in (0..hd).step_by(8) {
            for l in 0..8 {
                let i = i0 + l;
                _mm_prefetch::<_MM_HINT_T0>(next_k.wrapping_add(i * SLOTS).cast());
                _mm_prefetch::<_MM_HINT_T1>(this_v.wrapping_add(i * SLOTS).cast());
                // SAFETY: key row `i < hd` of the block holds 16 elements (asserted
                // above); AVX-512F is enabled here.
                let kv = unsafe { T::load16(k.add(i * SLOTS)) };
                for (h, a) in a.iter_mut().enumerate() {
                    // SAFETY: `h · hd + i < q.len()`.
                    let qi = unsafe { *q.get_unchecked(h * hd + i) };
                    a[l] = _mm512_fmadd_ps(_mm512_set1_ps(qi), kv, a[l]);
                }
            }
        }
        for (h, a) in a.iter().enumerate() {
            let t = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
            );
            // SAFETY: head `h`'s run of `scores` holds 16 floats per key block (asserted).
            unsafe {
                _mm512_storeu_ps(
                    scores.as_mut_ptr().add(h * stride + b * SLOTS),
                    _mm512_mul_ps(t, scale),
                )
            };
        }
    }
}

#[inline(always)]
fn attend_impl<T: KvElement>(
    q: &[f32],
    hd: usize,
    kv: KvBlocks<'_, T>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (bs, n) = (kv.block_size, kv.len);
    let heads = q.len() / hd;
    assert!(q.len() == heads * hd && out.len() == q.len() && n <= kv.keys.len() * bs);
    let stride = kv.keys.len() * bs;
    scores.clear();
    scores.resize(heads * stride, 0.0);
    attend_scores(q, hd, kv, scale, scores, stride);
    // Softmax as candle's: exp of the shifted scores, their sum, then each divided by it
    // (the weights the values are summed with).
    for sc in scores.chunks_exact_mut(stride) {
        let sc = &mut sc[..n];
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in sc.iter_mut() {
            *s -= max;
        }
        super::exp::exp_in_place(sc);
        let sum = sum_lanes(sc);
        for s in sc.iter_mut() {
            *s /= sum;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if hd == 64 && CPU.avx512 {
        for (w, o) in scores
            .chunks(MAX_HEADS * stride)
            .zip(out.chunks_mut(MAX_HEADS * hd))
        {
            // SAFETY: the CPU supports AVX-512F (checked at runtime).
            unsafe {
                match o.len() / hd {
                    1 => weighted_values_avx512::<T, 4, 1>(w, stride, kv, o),
                    2 => weighted_values_avx512::<T, 4, 2>(w, stride, kv, o),
                    _ => weighted_values_avx512::<T, 4, 3>(w, stride, kv, o),
                }
            }
        }
        return;
    }
    for (w, out) in scores.chunks_exact(stride).zip(out.chunks_exact_mut(hd)) {
        out.fill(0.0);
        for (block, ws) in kv.values.iter().zip(w[..n].chunks(bs)) {
            for (w, v) in ws.iter().zip(block.chunks_exact(hd)) {
                for (o, x) in out.iter_mut().zip(v) {
                    *o = w.mul_add(x.to_f32(), *o);
                }
            }
        }
    }
}

/// `out[h] = Σ_p w[h][p] · v_p` in position order, one fused chain per element, for `H`
/// heads of `C × 16` dimensions held in registers, each value vector loaded once for all
/// of them. `w` holds `stride` weights a head.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_avx512<T: KvElement, const C: usize, const H: usize>(
    w: &[f32],
    stride: usize,
    kv: KvBlocks<'_, T>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (hd, bs, n) = (C * 16, kv.block_size, kv.len);
    assert!(
        out.len() == H * hd
            && w.len() >= (H - 1) * stride + n
            && n <= kv.values.len() * bs
            && kv.values.iter().all(|v| v.len() >= bs * hd),
        "attention value shapes; this is a bug"
    );
    let mut acc = [[_mm512_setzero_ps(); C]; H];
    for p in 0..n {
        // SAFETY: block `p / bs` exists and its slot `p % bs` holds `hd` elements (asserted).
        let v = unsafe { kv.values.get_unchecked(p / bs).as_ptr().add((p % bs) * hd) };
        // SAFETY: `c · 16 + 16 ≤ hd` elements from `v` (the slot holds `hd`; C = hd / 16);
        // AVX-512F is enabled here.
        let v: [__m512; C] = std::array::from_fn(|c| unsafe { T::load16(v.add(c * 16)) });
        for (h, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `h · stride + p < w.len()` (asserted above).
            let wp = _mm512_set1_ps(unsafe { *w.get_unchecked(h * stride + p) });
            for (acc, v) in acc.iter_mut().zip(&v) {
                *acc = _mm512_fmadd_ps(wp, *v, *acc);
            }
        }
    }
    for (h, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds `H · hd` floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + c * 16), *acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand;

    /// One head the plain way, in the order `attend` promises: lane-chain scores,
    /// candle's softmax, then one fused chain per output over positions.
    fn one_head(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], n: usize, scale: f32) -> Vec<f32> {
        let hd = q.len();
        let slot = |p: usize| (p / SLOTS, p % SLOTS);
        let mut w: Vec<f32> = (0..n)
            .map(|p| {
                let (b, s) = slot(p);
                lane_dot(q, |i| k[b][i * SLOTS + s]) * scale
            })
            .collect();
        let max = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        w.iter_mut().for_each(|s| *s = (*s - max).exp());
        let sum = sum_lanes(&w);
        let mut out = vec![0f32; hd];
        for (p, w) in w.iter().enumerate() {
            let (b, s) = slot(p);
            for (o, x) in out.iter_mut().zip(&v[b][s * hd..(s + 1) * hd]) {
                *o = (w / sum).mul_add(*x, *o);
            }
        }
        out
    }

    /// Any number of heads per KV head, any length (partial last block): each head's
    /// output is bitwise the one-head computation, on whichever path this CPU takes.
    #[test]
    fn grouped_heads_match_one_head_at_a_time_bitwise() {
        let mut seed = 5;
        let hd = 64;
        let blocks = 5;
        let k: Vec<Vec<f32>> = (0..blocks)
            .map(|_| {
                (0..hd * SLOTS)
                    .map(|_| test_rand(&mut seed) * 4.0)
                    .collect()
            })
            .collect();
        let v: Vec<Vec<f32>> = (0..blocks)
            .map(|_| (0..hd * SLOTS).map(|_| test_rand(&mut seed)).collect())
            .collect();
        let (kr, vr): (Vec<&[f32]>, Vec<&[f32]>) = (
            k.iter().map(|b| b.as_slice()).collect(),
            v.iter().map(|b| b.as_slice()).collect(),
        );
        let mut scores = Vec::new();
        for heads in [1, 2, 3, 4, 7] {
            let q: Vec<f32> = (0..heads * hd).map(|_| test_rand(&mut seed)).collect();
            for n in [1, 15, 16, 17, 50, blocks * SLOTS] {
                let nb = n.div_ceil(SLOTS);
                let kv = KvBlocks {
                    keys: &kr[..nb],
                    values: &vr[..nb],
                    block_size: SLOTS,
                    len: n,
                };
                let mut out = vec![0f32; heads * hd];
                attend(&q, hd, kv, 0.125, &mut scores, &mut out);
                for (h, got) in out.chunks_exact(hd).enumerate() {
                    let want = one_head(&q[h * hd..(h + 1) * hd], &k, &v, n, 0.125);
                    assert_eq!(got, want, "{heads} heads, head {h}, {n} positions");
                }
            }
        }
    }

    /// A 16-bit cache reads as the f32 cache of its widened values, bitwise, on
    /// whichever path this CPU takes (the vector loads widen exactly as `to_f32`).
    #[test]
    fn half_caches_attend_as_their_f32_widening() {
        fn check<T: KvElement>(seed: &mut u64) {
            let hd = 64;
            let blocks = 3;
            let k: Vec<Vec<T>> = (0..blocks)
                .map(|_| {
                    (0..hd * SLOTS)
                        .map(|_| T::from_f32(test_rand(seed) * 4.0))
                        .collect()
                })
                .collect();
            let v: Vec<Vec<T>> = (0..blocks)
                .map(|_| {
                    (0..hd * SLOTS)
                        .map(|_| T::from_f32(test_rand(seed)))
                        .collect()
                })
                .collect();
            let widen = |b: &Vec<Vec<T>>| -> Vec<Vec<f32>> {
                b.iter()
                    .map(|r| r.iter().map(|x| x.to_f32()).collect())
                    .collect()
            };
            let (kw, vw) = (widen(&k), widen(&v));
            let (kr, vr): (Vec<&[T]>, Vec<&[T]>) = (
                k.iter().map(Vec::as_slice).collect(),
                v.iter().map(Vec::as_slice).collect(),
            );
            let (kwr, vwr): (Vec<&[f32]>, Vec<&[f32]>) = (
                kw.iter().map(Vec::as_slice).collect(),
                vw.iter().map(Vec::as_slice).collect(),
            );
            let mut scores = Vec::new();
            for heads in [1, 3] {
                let q: Vec<f32> = (0..heads * hd).map(|_| test_rand(seed)).collect();
                for n in [1, 17, blocks * SLOTS] {
                    let nb = n.div_ceil(SLOTS);
                    let mut got = vec![0f32; heads * hd];
                    let mut want = vec![0f32; heads * hd];
                    let half = KvBlocks {
                        keys: &kr[..nb],
                        values: &vr[..nb],
                        block_size: SLOTS,
                        len: n,
                    };
                    let wide = KvBlocks {
                        keys: &kwr[..nb],
                        values: &vwr[..nb],
                        block_size: SLOTS,
                        len: n,
                    };
                    attend(&q, hd, half, 0.125, &mut scores, &mut got);
                    attend(&q, hd, wide, 0.125, &mut scores, &mut want);
                    assert_eq!(got, want, "{}: {heads} heads, {n} positions", T::NAME);
                }
            }
        }
        let mut seed = 23;
        check::<half::f16>(&mut seed);
        check::<half::bf16>(&mut seed);
    }

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
            attend_scores(&q, hd, kv, 1.0, &mut ours, n);
            let per_slot: Vec<f32> = (0..n).map(|p| lane_dot(&q, |i| k[p * hd + i])).collect();
            assert_eq!(ours, theirs, "head dim {hd}");
            assert_eq!(per_slot, theirs, "head dim {hd}, per slot");
        }
    }
}
