//! Splitting a loaded [`LlamaModel`] into tensor-parallel rank shards (Megatron-style).
//!
//! Rank `r` of `world` owns query heads `r·nh/world ..`, the KV heads those query heads
//! read, and an FFN slice. q/k/v and gate/up are column-parallel (the rank keeps its
//! output rows), o_proj and down are row-parallel (the rank keeps its input columns, and
//! the ranks' partial outputs are summed by an all-reduce). Embeddings and the LM head are
//! vocab-parallel (a slice of the vocabulary's rows per rank; lookups and logits are
//! gathered by an all-reduce), the final norm replicated; rank 0 samples. Vocab-parallel
//! was chosen by measurement (`examples/tp_bench.rs`): the head is ~17 % of a SmolLM2
//! decode step, gathering a vocabulary-wide row costs ~0.1 ms.
//!
//! Weights are split in their storage format, on quantization-block boundaries, so a
//! quantized GGUF stays quantized: the FFN is split in whole blocks of the `down`
//! weight, heads are whole rows. If a head boundary falls inside a block of o_proj (a
//! head narrower than the block), that weight alone is dequantized to f32 and split —
//! correct, at some memory cost.
//!
//! **Segments.** o_proj and down reduce over their input axis; the order of that
//! reduction decides the last bits of the result. Both are computed as `S` segment
//! products summed in segment order, with `S` the number of KV heads (a segment of o_proj
//! is one KV head's query heads, a segment of down an equal FFN slice) and each rank
//! owning whole segments. The all-reduce carries every segment's product apart and every
//! rank sums them in the same order, so the logits at any tp dividing the KV heads are
//! **bitwise** those of tp 1 — greedy output does not change with tp, even on a quantized
//! model whose int8 activation rounding would amplify a last-bit difference. When the
//! KV heads cannot be segments (replicated KV heads, an FFN or head width that is not a
//! whole number of blocks per segment) each rank is one segment: the sum order then
//! depends on tp and logits agree with tp 1 to rounding only.
//!
//! KV heads: `world` must divide the query heads; if it also divides the KV heads each
//! rank owns `nkv/world` of them, and if the KV heads divide `world` each KV head is
//! replicated on `world/nkv` ranks (as vLLM does). Anything else is refused.

use std::ops::Range;

use crate::config::LlamaConfig;
use crate::kernels::{Linear, WeightData};
use crate::model::{Embeddings, LayerWeights, LlamaModel, Projection};
use crate::tp::RankPart;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("tensor parallelism {world} does not divide the {heads} query heads")]
    QueryHeads { world: usize, heads: usize },
    #[error(
        "tensor parallelism {world} and the {kv_heads} KV heads: neither divides the other, \
         so the KV heads can be neither split nor replicated evenly"
    )]
    KvHeads { world: usize, kv_heads: usize },
    #[error("tensor parallelism {world} exceeds the {units} FFN blocks of {block} columns")]
    Ffn {
        world: usize,
        units: usize,
        block: usize,
    },
    #[error("tensor parallelism must be at least 1")]
    Zero,
}

/// Storage block length along a weight's input axis.
pub fn block_len(w: &WeightData) -> usize {
    match w {
        WeightData::F32(_) => 1,
        WeightData::Q4_0(_)
        | WeightData::Q4_1(_)
        | WeightData::Q5_0(_)
        | WeightData::Q5_1(_)
        | WeightData::Q8_0(_) => 32,
        WeightData::Q2K(_)
        | WeightData::Q3K(_)
        | WeightData::Q4K(_)
        | WeightData::Q5K(_)
        | WeightData::Q6K(_) => 256,
    }
}

/// The parts of `world` ranks; `o_block` and `ffn_block` are the block lengths of the
/// o_proj and down weights.
pub fn plan(
    cfg: &LlamaConfig,
    world: usize,
    o_block: usize,
    ffn_block: usize,
) -> Result<Vec<RankPart>, ShardError> {
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    if world == 0 {
        return Err(ShardError::Zero);
    }
    if !nh.is_multiple_of(world) {
        return Err(ShardError::QueryHeads { world, heads: nh });
    }
    if !(nkv.is_multiple_of(world) || world.is_multiple_of(nkv)) {
        return Err(ShardError::KvHeads {
            world,
            kv_heads: nkv,
        });
    }
    let block = ffn_block.max(1);
    let units = cfg.intermediate_size / block;
    if units < world {
        return Err(ShardError::Ffn {
            world,
            units,
            block,
        });
    }
    // One segment per KV head when every segment is whole blocks of o_proj and down.
    let group_width = nh / nkv * cfg.head_dim;
    let by_kv_head = nkv.is_multiple_of(world)
        && units.is_multiple_of(nkv)
        && group_width.is_multiple_of(o_block.max(1));
    let num_segments = if by_kv_head { nkv } else { world };
    let per_rank = num_segments / world;
    Ok((0..world)
        .map(|r| {
            let kv_heads = if nkv >= world {
                r * nkv / world..(r + 1) * nkv / world
            } else {
                let k = r / (world / nkv);
                k..k + 1
            };
            let ffn = if by_kv_head {
                let seg = units / nkv * block;
                r * per_rank * seg..(r + 1) * per_rank * seg
            } else {
                r * units / world * block..(r + 1) * units / world * block
            };
            RankPart {
                rank: r,
                world,
                q_heads: r * nh / world..(r + 1) * nh / world,
                kv_heads,
                ffn,
                vocab: r * cfg.vocab_size / world..(r + 1) * cfg.vocab_size / world,
                segments: r * per_rank..(r + 1) * per_rank,
                num_segments,
            }
        })
        .collect())
}

/// Rows `rows` (in order), blocks `blocks` of each row.
fn pick<T: Clone>(v: &[T], per_row: usize, rows: &[usize], blocks: Range<usize>) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * blocks.len());
    for &r in rows {
        out.extend_from_slice(&v[r * per_row + blocks.start..r * per_row + blocks.end]);
    }
    out
}

/// The sub-matrix of `l` with output rows `rows` and input columns `cols`, which must
/// lie on block boundaries of `l`'s format.
fn select(l: &Linear, rows: &[usize], cols: Range<usize>) -> Linear {
    let bl = block_len(&l.w);
    assert!(cols.start.is_multiple_of(bl) && cols.end.is_multiple_of(bl));
    let per = l.in_dim / bl;
    let blocks = cols.start / bl..cols.end / bl;
    macro_rules! each {
        ($($v:ident),*) => {
            match &l.w {
                WeightData::Q4_1(t) => WeightData::Q4_1(t.select(rows, blocks.clone())),
                WeightData::Q8_0(t) => WeightData::Q8_0(t.select(rows, blocks.clone())),
                $(WeightData::$v(v) => WeightData::$v(pick(v, per, rows, blocks.clone())),)*
            }
        };
    }
    let w = each!(F32, Q4_0, Q5_0, Q5_1, Q2K, Q3K, Q4K, Q5K, Q6K);
    Linear {
        out_dim: rows.len(),
        in_dim: cols.len(),
        w,
    }
}

fn to_f32(l: &Linear) -> Linear {
    let mut w = vec![0f32; l.out_dim * l.in_dim];
    for (o, row) in w.chunks_exact_mut(l.in_dim).enumerate() {
        l.dequantize_row(o, row);
    }
    Linear {
        out_dim: l.out_dim,
        in_dim: l.in_dim,
        w: WeightData::F32(w),
    }
}

/// Output rows in `ranges`, all input columns (column-parallel).
pub fn rows(l: &Linear, ranges: &[Range<usize>]) -> Linear {
    let rows: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
    select(l, &rows, 0..l.in_dim)
}

/// All output rows, input columns `cols` (row-parallel). Dequantizes when `cols` cuts
/// through a block.
pub fn cols(l: &Linear, cols: Range<usize>) -> Linear {
    let bl = block_len(&l.w);
    let all: Vec<usize> = (0..l.out_dim).collect();
    if cols.start.is_multiple_of(bl) && cols.end.is_multiple_of(bl) {
        select(l, &all, cols)
    } else {
        tracing::warn!(
            dtype = l.dtype_name(),
            "tensor-parallel split inside a quantization block: dequantizing this weight"
        );
        select(&to_f32(l), &all, cols)
    }
}

/// Column-parallel shard of a projection made of parts (q|k|v or gate|up); `wanted[i]`
/// are the rows to keep of part `i`, in part-local numbering.
fn projection(p: &Projection, part_dims: &[usize], wanted: &[Range<usize>]) -> Projection {
    match p {
        Projection::Fused(l) => {
            let mut off = 0;
            let ranges: Vec<Range<usize>> = part_dims
                .iter()
                .zip(wanted)
                .map(|(d, w)| {
                    let r = off + w.start..off + w.end;
                    off += d;
                    r
                })
                .collect();
            Projection::Fused(rows(l, &ranges))
        }
        Projection::Split(parts) => Projection::new(
            parts
                .iter()
                .zip(wanted)
                .map(|(l, w)| rows(l, std::slice::from_ref(w)))
                .collect(),
        ),
    }
}

/// Rank `part`'s shard of `model`.
pub fn shard(model: &LlamaModel, part: &RankPart) -> LlamaModel {
    let cfg = &model.cfg;
    let (hd, nh, nkv, ffn) = (
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
    );
    let q = part.q_heads.start * hd..part.q_heads.end * hd;
    let kv = part.kv_heads.start * hd..part.kv_heads.end * hd;
    let layers = model
        .layers
        .iter()
        .map(|l| LayerWeights {
            attn_norm: l.attn_norm.clone(),
            qkv: projection(
                &l.qkv,
                &[nh * hd, nkv * hd, nkv * hd],
                &[q.clone(), kv.clone(), kv.clone()],
            ),
            o_proj: cols(&l.o_proj, q.clone()),
            ffn_norm: l.ffn_norm.clone(),
            gate_up: projection(
                &l.gate_up,
                &[ffn, ffn],
                &[part.ffn.clone(), part.ffn.clone()],
            ),
            down: cols(&l.down, part.ffn.clone()),
        })
        .collect();
    let h = cfg.hidden_size;
    let embed = match &model.embed {
        Embeddings::Dense(e) => {
            Embeddings::Dense(e[part.vocab.start * h..part.vocab.end * h].to_vec())
        }
        Embeddings::FromLmHead => Embeddings::FromLmHead,
    };
    LlamaModel::new(
        cfg.clone(),
        embed,
        layers,
        model.norm.clone(),
        rows(&model.lm_head, std::slice::from_ref(&part.vocab)),
    )
    .with_part(part.clone())
}

/// All `world` shards of `model` (at `world == 1`, the model itself with its segments).
pub fn shard_all(model: LlamaModel, world: usize) -> Result<Vec<LlamaModel>, ShardError> {
    let (o_block, ffn_block) = model
        .layers
        .first()
        .map(|l| (block_len(&l.o_proj.w), block_len(&l.down.w)))
        .unwrap_or((1, 1));
    let parts = plan(&model.cfg, world, o_block, ffn_block)?;
    if world == 1 {
        return Ok(vec![model.with_part(parts[0].clone())]);
    }
    Ok(parts.iter().map(|p| shard(&model, p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nh: usize, nkv: usize, ffn: usize) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 64 * nh,
            num_layers: 1,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: 64,
            intermediate_size: ffn,
            vocab_size: 256,
            rope_theta: 1e4,
            rope_scaling: crate::config::RopeScaling::None,
            rope_style: crate::config::RopeStyle::Half,
            rms_norm_eps: 1e-5,
            context_length: 512,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn plans_split_replicate_or_refuse() {
        let p = plan(&cfg(8, 4, 128), 2, 32, 32).unwrap();
        assert_eq!(p[1].q_heads, 4..8);
        assert_eq!(p[1].kv_heads, 2..4);
        assert_eq!(p[1].ffn, 64..128);
        assert_eq!((p[1].segments.clone(), p[1].num_segments), (2..4, 4));
        // tp 1 computes the same four segments.
        assert_eq!(plan(&cfg(8, 4, 128), 1, 32, 32).unwrap()[0].num_segments, 4);
        // 9 query heads / 3 KV heads at tp 3: one KV head each.
        let p = plan(&cfg(9, 3, 1536), 3, 32, 32).unwrap();
        assert_eq!(p[2].kv_heads, 2..3);
        assert_eq!(p[2].ffn, 1024..1536);
        assert_eq!(p[2].segments, 2..3);
        // 8 query heads / 2 KV heads at tp 4: each KV head on two ranks, a segment a rank.
        let p = plan(&cfg(8, 2, 128), 4, 32, 32).unwrap();
        let kv: Vec<_> = p.iter().map(|r| r.kv_heads.clone()).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!((p[3].segments.clone(), p[3].num_segments), (3..4, 4));
        assert!(matches!(
            plan(&cfg(9, 3, 1536), 2, 32, 32),
            Err(ShardError::QueryHeads { .. })
        ));
        assert!(matches!(
            plan(&cfg(12, 3, 1536), 4, 32, 32),
            Err(ShardError::KvHeads { .. })
        ));
        assert!(matches!(
            plan(&cfg(8, 4, 64), 4, 32, 32),
            Err(ShardError::Ffn { .. })
        ));
        // Uneven FFN (3 blocks over 4 KV heads): a segment per rank, whole blocks, every
        // column owned once.
        let p = plan(&cfg(8, 4, 96), 2, 32, 32).unwrap();
        assert_eq!((p[0].ffn.clone(), p[1].ffn.clone()), (0..32, 32..96));
        assert_eq!(p[1].num_segments, 2);
    }

    #[test]
    fn quantized_split_equals_dequantized_split() {
        use candle_core::quantized::GgmlDType;
        use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_0, GgmlType};
        let (out_dim, in_dim) = (6, 128);
        let w: Vec<f32> = (0..out_dim * in_dim)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        fn quant<T: GgmlType>(w: &[f32]) -> Vec<u8> {
            let mut b = vec![T::zeros(); w.len() / T::BLCK_SIZE];
            T::from_float(w, &mut b);
            let bytes = std::mem::size_of_val(b.as_slice());
            // SAFETY: ggml blocks are plain `#[repr(C)]` data; we read exactly their bytes.
            unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), bytes) }.to_vec()
        }
        for (dtype, bytes) in [
            (GgmlDType::Q4_1, quant::<BlockQ4_1>(&w)),
            (GgmlDType::Q8_0, quant::<BlockQ8_0>(&w)),
        ] {
            let l = Linear::from_ggml(dtype, out_dim, in_dim, &bytes, "w").unwrap();
            let dense = to_f32(&l);
            let r = rows(&l, &[1..3, 4..6]);
            let c = cols(&l, 32..96);
            let cut = cols(&l, 16..48); // inside a block: falls back to f32
            assert!(matches!(cut.w, WeightData::F32(_)));
            let row = |m: &Linear, o: usize| {
                let mut v = vec![0f32; m.in_dim];
                m.dequantize_row(o, &mut v);
                v
            };
            let full = |o: usize| row(&dense, o);
            assert_eq!(row(&r, 0), full(1));
            assert_eq!(row(&r, 3), full(5));
            assert_eq!(row(&c, 2), full(2)[32..96].to_vec());
            assert_eq!(row(&cut, 4), full(4)[16..48].to_vec());
        }
    }
}
