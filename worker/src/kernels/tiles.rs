//! Quantized weights laid out in tiles of [`TILE`] output rows, the layout of the
//! AVX-512 matmul kernels ([`super::q4_1`], [`super::q8_0`]).
//!
//! Within a tile, each block's bytes are interleaved four at a time across the 16 rows:
//! one 64-byte load holds the same four values of every row, so one `vpdpbusd` against a
//! broadcast activation dword advances all 16 dot products. SIMD lanes run across rows,
//! never along one, which is what keeps each row's reduction order that of the scalar
//! ggml kernel (see [`super`]).

use std::ops::Range;

/// Output rows per tile: the f32 lanes of one AVX-512 register.
pub const TILE: usize = 16;

/// 64 bytes on a cache line: one AVX-512 load, aligned so kernels load it directly.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// One f32 per row of a tile, aligned like [`Line`].
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Lanes(pub [f32; TILE]);

/// `out_dim` rows of `nb` blocks of one ggml format, in tiles. A row block is `B` bytes
/// of values and `S` f32 scales (widened from f16 at load, which is exact). The last
/// tile is padded with zero rows, whose outputs callers drop.
#[derive(Debug, Clone)]
pub struct Tiles<const B: usize, const S: usize> {
    out_dim: usize,
    nb: usize,
    /// `[tile][block][chunk: B/4][lane: 16][4 bytes]`, a chunk a line.
    qs: Vec<Line>,
    /// Scale `s` of every row block: `[tile][block][lane]`.
    scales: [Vec<Lanes>; S],
}

impl<const B: usize, const S: usize> Default for Tiles<B, S> {
    fn default() -> Self {
        Tiles {
            out_dim: 0,
            nb: 0,
            qs: Vec::new(),
            scales: std::array::from_fn(|_| Vec::new()),
        }
    }
}

impl<const B: usize, const S: usize> Tiles<B, S> {
    /// Lines of one tile block (a chunk of four values per row is one line).
    pub const LINES: usize = B / 4;

    /// Builds the tiles from `(scales, bytes)` of row `o`, block `b`.
    pub fn from_fn(
        out_dim: usize,
        nb: usize,
        f: impl Fn(usize, usize) -> ([f32; S], [u8; B]),
    ) -> Self {
        let n = out_dim.div_ceil(TILE) * nb;
        let mut t = Tiles {
            out_dim,
            nb,
            qs: vec![Line([0; 64]); n * Self::LINES],
            scales: std::array::from_fn(|_| vec![Lanes([0.0; TILE]); n]),
        };
        for o in 0..out_dim {
            for b in 0..nb {
                let (scales, bytes) = f(o, b);
                let (i, lane) = t.index(o, b);
                for (dst, v) in t.scales.iter_mut().zip(scales) {
                    dst[i].0[lane] = v;
                }
                for (k, chunk) in bytes.chunks_exact(4).enumerate() {
                    t.qs[i * Self::LINES + k].0[lane * 4..lane * 4 + 4].copy_from_slice(chunk);
                }
            }
        }
        t
    }

    /// (tile block index, lane) of row `o`, block `b`.
    fn index(&self, o: usize, b: usize) -> (usize, usize) {
        ((o / TILE) * self.nb + b, o % TILE)
    }

    /// `(scales, bytes)` of row `o`, block `b`.
    pub fn block(&self, o: usize, b: usize) -> ([f32; S], [u8; B]) {
        let (i, lane) = self.index(o, b);
        let mut bytes = [0u8; B];
        for (k, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&self.qs[i * Self::LINES + k].0[lane * 4..lane * 4 + 4]);
        }
        (std::array::from_fn(|s| self.scales[s][i].0[lane]), bytes)
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn blocks_per_row(&self) -> usize {
        self.nb
    }

    pub fn tiles(&self) -> usize {
        self.out_dim.div_ceil(TILE)
    }

    /// The interleaved chunks of tile block `i` (`tile · blocks_per_row + block`).
    pub fn tile_lines(&self, i: usize) -> &[Line] {
        &self.qs[i * Self::LINES..(i + 1) * Self::LINES]
    }

    /// Scale `s` of the 16 rows of tile block `i`.
    pub fn tile_scales(&self, s: usize, i: usize) -> &Lanes {
        &self.scales[s][i]
    }

    /// Rows `rows` (in order), blocks `blocks` of each (a tensor-parallel shard).
    pub fn select(&self, rows: &[usize], blocks: Range<usize>) -> Self {
        Self::from_fn(rows.len(), blocks.len(), |o, b| {
            self.block(rows[o], blocks.start + b)
        })
    }

    /// Stacks weights with the same row length along the output axis.
    pub fn concat(parts: &[Self]) -> Option<Self> {
        let nb = parts.first()?.nb;
        if parts.iter().any(|p| p.nb != nb) {
            return None;
        }
        let owner: Vec<(usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| (0..p.out_dim).map(move |o| (pi, o)))
            .collect();
        Some(Self::from_fn(owner.len(), nb, |o, b| {
            let (pi, po) = owner[o];
            parts[pi].block(po, b)
        }))
    }
}

/// The check every tile kernel's test runs.
#[cfg(test)]
pub(crate) mod check {
    use super::TILE;
    use std::ops::Range;

    /// A tile kernel: `(tile, blocks, first activation row, out)`.
    pub type Kernel<'a> = &'a dyn Fn(usize, Range<usize>, usize, &mut [[f32; TILE]]);

    /// Runs `fast` and `slow` (the portable path) over every tile, starting row and block
    /// range: they agree bitwise, padding lanes are zero, and real outputs equal
    /// `reference(output, row, blocks)` bitwise when it says `exact`, within 1e-4 otherwise.
    pub fn kernels_agree(
        tiles: usize,
        out_dim: usize,
        rows: usize,
        rows_per_call: usize,
        ranges: &[Range<usize>],
        (fast, slow): (Kernel<'_>, Kernel<'_>),
        reference: &dyn Fn(usize, usize, Range<usize>) -> (f32, bool),
    ) {
        for blocks in ranges {
            for t in 0..tiles {
                for r0 in 0..rows {
                    let take = (rows - r0).min(rows_per_call);
                    let mut f = vec![[0f32; TILE]; take];
                    let mut s = vec![[0f32; TILE]; take];
                    fast(t, blocks.clone(), r0, &mut f);
                    slow(t, blocks.clone(), r0, &mut s);
                    for r in 0..take {
                        for lane in 0..TILE {
                            let o = t * TILE + lane;
                            let (f, s) = (f[r][lane], s[r][lane]);
                            assert_eq!(f.to_bits(), s.to_bits(), "fast vs portable, o {o}");
                            if o >= out_dim {
                                assert_eq!(f, 0.0, "padding lane {o}");
                                continue;
                            }
                            let (theirs, exact) = reference(o, r0 + r, blocks.clone());
                            if exact {
                                assert_eq!(f.to_bits(), theirs.to_bits(), "o {o} row {}", r0 + r);
                            } else {
                                assert!((f - theirs).abs() <= 1e-4 * theirs.abs().max(1.0));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_survive_tiling_select_and_concat() {
        let f = |o: usize, b: usize| {
            (
                [o as f32, b as f32],
                std::array::from_fn(|j| (o * 7 + b * 3 + j) as u8),
            )
        };
        let t = Tiles::<16, 2>::from_fn(21, 3, f);
        assert_eq!((t.tiles(), t.out_dim(), t.blocks_per_row()), (2, 21, 3));
        for o in 0..21 {
            for b in 0..3 {
                assert_eq!(t.block(o, b), f(o, b));
            }
        }
        let a = t.select(&[3, 0, 20], 1..3);
        let c = Tiles::concat(&[a, t.select(&[7], 1..3)]).unwrap();
        for (o, src) in [3, 0, 20, 7].into_iter().enumerate() {
            for b in 0..2 {
                assert_eq!(c.block(o, b), f(src, b + 1));
            }
        }
        assert!(Tiles::concat(&[t.clone(), t.select(&[0], 0..1)]).is_none());
        // Padding rows of the last tile are zero.
        assert_eq!(t.tile_scales(0, t.blocks_per_row()).0[5..], [0.0; 11]);
    }
}
