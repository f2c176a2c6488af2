//! Paged KV cache: the block bookkeeping ([`BlockManager`], pure state, no tensors) and the
//! key/value storage those blocks index ([`KvStore`]), in f32 or 16 bits
//! ([`KvCacheDtype`]).
//!
//! A sequence owns a block table (block ids in position order). Blocks hold `block_size`
//! token positions. Full blocks are keyed by a hash chained over every token up to their
//! end, so two sequences whose prompts share a prefix share the same physical blocks
//! (reference counted). A block whose refcount drops to zero while it is in the prefix
//! cache is *evictable*: it keeps its contents for a later hit, counts as free, and is
//! reused least-recently-freed first when the truly free list is empty.

use shardline_proto::worker::chain_hash;
use std::collections::{BTreeMap, HashMap};

use half::{bf16, f16};

use crate::kernels::KvElement;
use crate::runner::{PrefixCache, RunnerError, SeqId};

/// Index of a physical KV block.
pub type BlockId = u32;

#[derive(Debug, Clone)]
struct SeqState {
    /// Physical blocks in position order; may hold reserved, still empty blocks at the end.
    blocks: Vec<BlockId>,
    /// Tokens whose K/V are written (cached prefix included).
    tokens: Vec<u32>,
    /// Chain hash of each full block, `hashes[i]` covers `tokens[..(i + 1) * block_size]`.
    hashes: Vec<u64>,
}

/// Block allocator, block tables and prefix cache.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    refcount: Vec<u32>,
    /// Blocks with no contents worth keeping.
    free: Vec<BlockId>,
    /// Prefix-cache key of a block, if it is registered.
    block_hash: Vec<Option<u64>>,
    cache: HashMap<u64, BlockId>,
    /// Evictable blocks (refcount 0, in the cache) by the tick they were released at.
    lru: BTreeMap<u64, BlockId>,
    lru_tick: Vec<u64>,
    tick: u64,
    seqs: HashMap<SeqId, SeqState>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be > 0; this is a bug");
        BlockManager {
            block_size,
            refcount: vec![0; num_blocks],
            // Popped from the end: hand out low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            block_hash: vec![None; num_blocks],
            cache: HashMap::new(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; num_blocks],
            tick: 0,
            seqs: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Free blocks that still hold a cached prefix (evictable; counted in `free_blocks`).
    pub fn cached_blocks(&self) -> usize {
        self.lru.len()
    }

    /// Exact count of blocks an allocation can get (truly free + evictable).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Registers `id`; attaches cached full blocks of `prompt`, at most `prompt.len() - 1`
    /// tokens' worth, and returns how many tokens that covers.
    pub fn add_sequence(&mut self, id: SeqId, prompt: &[u32]) -> Result<usize, RunnerError> {
        self.add_sequence_with(id, prompt, PrefixCache::Use)
    }

    /// [`Self::add_sequence`]; with [`PrefixCache::Skip`] nothing is attached from the cache.
    pub fn add_sequence_with(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        prefix_cache: PrefixCache,
    ) -> Result<usize, RunnerError> {
        if self.seqs.contains_key(&id) {
            return Err(RunnerError::DuplicateSequence(id));
        }
        let bs = self.block_size;
        let max_blocks = match prefix_cache {
            PrefixCache::Use => prompt.len().saturating_sub(1) / bs,
            PrefixCache::Skip => 0,
        };
        let mut state = SeqState {
            blocks: Vec::new(),
            tokens: Vec::new(),
            hashes: Vec::new(),
        };
        let mut parent = 0u64;
        for b in 0..max_blocks {
            let toks = &prompt[b * bs..(b + 1) * bs];
            let h = chain_hash(parent, toks);
            let Some(&block) = self.cache.get(&h) else {
                break;
            };
            if self.refcount[block as usize] == 0 {
                self.lru.remove(&self.lru_tick[block as usize]);
            }
            self.refcount[block as usize] += 1;
            state.blocks.push(block);
            state.tokens.extend_from_slice(toks);
            state.hashes.push(h);
            parent = h;
        }
        let cached = state.tokens.len();
        self.seqs.insert(id, state);
        Ok(cached)
    }

    /// Tokens with K/V in the cache for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize, RunnerError> {
        self.seqs
            .get(&id)
            .map(|s| s.tokens.len())
            .ok_or(RunnerError::UnknownSequence(id))
    }

    /// Block table of `id` (may include reserved blocks past its length).
    pub fn block_table(&self, id: SeqId) -> Result<&[BlockId], RunnerError> {
        self.seqs
            .get(&id)
            .map(|s| s.blocks.as_slice())
            .ok_or(RunnerError::UnknownSequence(id))
    }

    /// Blocks needed to append `n` tokens to `id`.
    pub fn blocks_needed(&self, id: SeqId, n: usize) -> Result<usize, RunnerError> {
        let s = self.seqs.get(&id).ok_or(RunnerError::UnknownSequence(id))?;
        let want = (s.tokens.len() + n).div_ceil(self.block_size);
        Ok(want.saturating_sub(s.blocks.len()))
    }

    fn alloc_one(&mut self) -> Option<BlockId> {
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        let (&tick, &b) = self.lru.iter().next()?;
        self.lru.remove(&tick);
        if let Some(h) = self.block_hash[b as usize].take() {
            self.cache.remove(&h);
        }
        Some(b)
    }

    /// Reserves blocks so that every `(id, n)` can append `n` tokens. All or nothing:
    /// on error nothing changed. Returns the previous table lengths for [`Self::rollback`].
    pub fn reserve(&mut self, reqs: &[(SeqId, usize)]) -> Result<Vec<usize>, RunnerError> {
        let mut needed = 0;
        for &(id, n) in reqs {
            needed += self.blocks_needed(id, n)?;
        }
        if needed > self.free_blocks() {
            return Err(RunnerError::OutOfBlocks {
                needed,
                free: self.free_blocks(),
            });
        }
        let mut prev = Vec::with_capacity(reqs.len());
        for &(id, n) in reqs {
            let k = self.blocks_needed(id, n)?;
            prev.push(self.seqs[&id].blocks.len());
            for _ in 0..k {
                let b = self
                    .alloc_one()
                    .expect("free count checked above; this is a bug");
                self.refcount[b as usize] = 1;
                self.seqs
                    .get_mut(&id)
                    .expect("checked above")
                    .blocks
                    .push(b);
            }
        }
        Ok(prev)
    }

    /// Undoes a [`Self::reserve`] (same `reqs`, its return value).
    pub fn rollback(&mut self, reqs: &[(SeqId, usize)], prev: &[usize]) {
        for (&(id, _), &len) in reqs.iter().zip(prev) {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            let extra: Vec<BlockId> = s.blocks.drain(len..).collect();
            for b in extra {
                self.release_block(b);
            }
        }
    }

    /// Marks `tokens` as written after `id`'s current length (space must be reserved) and
    /// registers blocks that became full in the prefix cache.
    pub fn commit(&mut self, id: SeqId, tokens: &[u32]) -> Result<(), RunnerError> {
        let bs = self.block_size;
        let s = self
            .seqs
            .get_mut(&id)
            .ok_or(RunnerError::UnknownSequence(id))?;
        if (s.tokens.len() + tokens.len()).div_ceil(bs) > s.blocks.len() {
            return Err(RunnerError::Model(format!(
                "{id}: commit past reserved blocks; this is a bug"
            )));
        }
        s.tokens.extend_from_slice(tokens);
        while s.hashes.len() < s.tokens.len() / bs {
            let b = s.hashes.len();
            let parent = s.hashes.last().copied().unwrap_or(0);
            let h = chain_hash(parent, &s.tokens[b * bs..(b + 1) * bs]);
            s.hashes.push(h);
            let block = s.blocks[b];
            // First writer wins; a duplicate stays private to its sequence.
            if self.block_hash[block as usize].is_none() && !self.cache.contains_key(&h) {
                self.cache.insert(h, block);
                self.block_hash[block as usize] = Some(h);
            }
        }
        Ok(())
    }

    fn release_block(&mut self, b: BlockId) {
        let rc = &mut self.refcount[b as usize];
        assert!(*rc > 0, "double free of block {b}; this is a bug");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            if self.block_hash[b as usize].is_some() {
                self.tick += 1;
                self.lru_tick[b as usize] = self.tick;
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Drops `id` (unknown ids are ignored); its registered blocks become evictable.
    pub fn remove_sequence(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.remove(&id) {
            // Release tail first so that, among one sequence's blocks, the prefix is
            // evicted last.
            for &b in s.blocks.iter().rev() {
                self.release_block(b);
            }
        }
    }

    /// Position → (block, offset in block) for `id`.
    pub fn slot(&self, id: SeqId, pos: usize) -> Result<(BlockId, usize), RunnerError> {
        let s = self.seqs.get(&id).ok_or(RunnerError::UnknownSequence(id))?;
        let b = s.blocks.get(pos / self.block_size).ok_or_else(|| {
            RunnerError::Model(format!("{id}: position {pos} has no block; this is a bug"))
        })?;
        Ok((*b, pos % self.block_size))
    }

    /// Checks internal invariants (tests): refcounts equal table references, every block
    /// is exactly one of used / free / evictable.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.num_blocks();
        let mut refs = vec![0u32; n];
        for s in self.seqs.values() {
            for &b in &s.blocks {
                refs[b as usize] += 1;
            }
        }
        if refs != self.refcount {
            return Err("refcounts differ from block-table references".into());
        }
        let mut seen = vec![0u8; n];
        for &b in &self.free {
            seen[b as usize] += 1;
            if self.block_hash[b as usize].is_some() {
                return Err(format!("free block {b} still registered"));
            }
        }
        for &b in self.lru.values() {
            seen[b as usize] += 1;
            if self.block_hash[b as usize].is_none() {
                return Err(format!("evictable block {b} not registered"));
            }
        }
        for (b, &listed) in seen.iter().enumerate() {
            let expect = u8::from(self.refcount[b] == 0);
            if listed != expect {
                return Err(format!(
                    "block {b}: refcount {} but listed {} times",
                    self.refcount[b], listed
                ));
            }
        }
        for (h, &b) in &self.cache {
            if self.block_hash[b as usize] != Some(*h) {
                return Err(format!("cache entry for block {b} does not match"));
            }
        }
        Ok(())
    }
}

/// How a group's CPU KV cache is sized and stored: the same on every rank (each rank
/// holds its own KV heads of every block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Token positions per block.
    pub block_size: usize,
    /// Element type of the stored keys and values.
    pub dtype: KvCacheDtype,
}

/// Element type of the CPU KV cache (`--kv-cache-dtype`): `F32`, the activations' own
/// precision; `F16`, IEEE half precision (10-bit mantissa, range ±65504); `Bf16`,
/// bfloat16 (7-bit mantissa, the range of f32). A 16-bit cache holds twice the blocks
/// of an f32 one in the same bytes; keys and values are rounded once when written and
/// widened exactly when attention reads them (see [`KvElement`]).
// The variants carry no doc comments: clap would list them in `--help` one per line,
// which turns every flag's help into the long layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum KvCacheDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    /// Bytes of one stored element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvCacheDtype::F32 => std::mem::size_of::<f32>(),
            KvCacheDtype::F16 => std::mem::size_of::<f16>(),
            KvCacheDtype::Bf16 => std::mem::size_of::<bf16>(),
        }
    }

    /// The name `--kv-cache-dtype` takes and `Info` reports.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::F32 => f32::NAME,
            KvCacheDtype::F16 => f16::NAME,
            KvCacheDtype::Bf16 => bf16::NAME,
        }
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `n` zeros with every page faulted in now (about 0.2 s for 512 MiB): the cache is
/// reserved when the worker starts — one that cannot hold it fails while loading, not
/// under load, and its resident memory shows the reservation — and the first requests'
/// steps do not pay the first-touch page faults (steady-state speed is unchanged).
fn reserved<T: KvElement>(n: usize) -> Vec<T> {
    let page = 4096 / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // `black_box`: the stores must not be dropped as redundant on fresh zeroed memory.
    for x in std::hint::black_box(&mut v[..]).iter_mut().step_by(page) {
        *x = T::default();
    }
    v
}

/// Where `(layer, block, head)`'s run starts in a cache of this shape.
#[derive(Debug, Clone, Copy)]
struct KvLayout {
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvLayout {
    #[inline]
    fn run(&self, layer: usize, block: BlockId, head: usize) -> usize {
        ((layer * self.num_blocks + block as usize) * self.kv_heads + head)
            * self.block_size
            * self.head_dim
    }

    #[inline]
    fn run_len(&self) -> usize {
        self.block_size * self.head_dim
    }
}

/// Keys and values of every layer in one element type.
#[derive(Debug)]
struct KvArrays<T> {
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: KvElement> KvArrays<T> {
    fn new(n: usize) -> Self {
        KvArrays {
            k: reserved(n),
            v: reserved(n),
        }
    }

    /// Stores one position's key (dimension-major) and value (position-major), rounded
    /// to `T`.
    fn write(&mut self, at: &KvLayout, run: usize, slot: usize, k: &[f32], v: &[f32]) {
        let (hd, bs) = (at.head_dim, at.block_size);
        for (i, &x) in k[..hd].iter().enumerate() {
            self.k[run + i * bs + slot] = T::from_f32(x);
        }
        for (dst, &x) in self.v[run + slot * hd..run + (slot + 1) * hd]
            .iter_mut()
            .zip(&v[..hd])
        {
            *dst = T::from_f32(x);
        }
    }

    fn runs(&self, layout: KvLayout) -> KvRuns<'_, T> {
        KvRuns {
            k: &self.k,
            v: &self.v,
            layout,
        }
    }
}

/// The cache's arrays in the element type it was built with.
#[derive(Debug)]
enum KvData {
    F32(KvArrays<f32>),
    F16(KvArrays<f16>),
    Bf16(KvArrays<bf16>),
}

/// K and V of every layer, in `num_blocks` blocks of `block_size` positions, stored as
/// the [`KvCacheDtype`] it was built with.
///
/// Per `[layer][block][kv_head]` one run of `block_size × head_dim` values each: keys
/// dimension-major (`[dim][slot]`, so one load holds a dimension of every position and
/// attention scores a whole block at once), values position-major (`[slot][dim]`).
#[derive(Debug)]
pub struct KvStore {
    data: KvData,
    layout: KvLayout,
}

/// A read-only view of a [`KvStore`]'s runs in its element type `T`.
#[derive(Debug, Clone, Copy)]
pub struct KvRuns<'a, T> {
    k: &'a [T],
    v: &'a [T],
    layout: KvLayout,
}

impl<'a, T> KvRuns<'a, T> {
    /// `(layer, block, head)`'s keys, `[dim][slot]`.
    pub fn keys(&self, layer: usize, block: BlockId, head: usize) -> &'a [T] {
        let r = self.layout.run(layer, block, head);
        &self.k[r..r + self.layout.run_len()]
    }

    /// `(layer, block, head)`'s values, `[slot][dim]`.
    pub fn values(&self, layer: usize, block: BlockId, head: usize) -> &'a [T] {
        let r = self.layout.run(layer, block, head);
        &self.v[r..r + self.layout.run_len()]
    }
}

/// A [`KvStore`]'s runs, typed by the element type it holds; attention matches once per
/// layer and runs the kernel built for that type.
#[derive(Debug, Clone, Copy)]
pub enum KvView<'a> {
    F32(KvRuns<'a, f32>),
    F16(KvRuns<'a, f16>),
    Bf16(KvRuns<'a, bf16>),
}

impl KvStore {
    /// An f32 cache (what [`Self::with_dtype`] builds for [`KvCacheDtype::F32`]).
    pub fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self::with_dtype(
            layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            KvCacheDtype::F32,
        )
    }

    /// A cache of `num_blocks` blocks storing elements of `dtype`, reserved now.
    pub fn with_dtype(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvCacheDtype,
    ) -> Self {
        let n = layers * num_blocks * block_size * kv_heads * head_dim;
        let data = match dtype {
            KvCacheDtype::F32 => KvData::F32(KvArrays::new(n)),
            KvCacheDtype::F16 => KvData::F16(KvArrays::new(n)),
            KvCacheDtype::Bf16 => KvData::Bf16(KvArrays::new(n)),
        };
        KvStore {
            data,
            layout: KvLayout {
                num_blocks,
                block_size,
                kv_heads,
                head_dim,
            },
        }
    }

    /// Bytes one block takes over all layers, K and V, each element `elem_bytes` wide
    /// ([`KvCacheDtype::size_in_bytes`]; a device cache holds the device's dtype).
    pub fn bytes_per_block(
        layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        elem_bytes: usize,
    ) -> usize {
        2 * layers * block_size * kv_heads * head_dim * elem_bytes
    }

    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// The element type this cache stores.
    pub fn dtype(&self) -> KvCacheDtype {
        match self.data {
            KvData::F32(_) => KvCacheDtype::F32,
            KvData::F16(_) => KvCacheDtype::F16,
            KvData::Bf16(_) => KvCacheDtype::Bf16,
        }
    }

    /// Stores one position's key and value head vectors (rounded to the cache's type).
    pub fn write(
        &mut self,
        layer: usize,
        block: BlockId,
        head: usize,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let at = self.layout;
        let run = at.run(layer, block, head);
        match &mut self.data {
            KvData::F32(a) => a.write(&at, run, slot, k, v),
            KvData::F16(a) => a.write(&at, run, slot, k, v),
            KvData::Bf16(a) => a.write(&at, run, slot, k, v),
        }
    }

    /// The runs in the cache's own element type.
    pub fn view(&self) -> KvView<'_> {
        match &self.data {
            KvData::F32(a) => KvView::F32(a.runs(self.layout)),
            KvData::F16(a) => KvView::F16(a.runs(self.layout)),
            KvData::Bf16(a) => KvView::Bf16(a.runs(self.layout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fill(m: &mut BlockManager, id: SeqId, toks: &[u32]) {
        let cached = m.seq_len(id).unwrap();
        let rest = &toks[cached..];
        m.reserve(&[(id, rest.len())]).unwrap();
        m.commit(id, rest).unwrap();
    }

    /// Resident bytes of this process (Linux `statm`).
    #[cfg(target_os = "linux")]
    fn resident_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_cache_is_resident_from_the_start() {
        let before = resident_bytes();
        // K and V: 32 layers × 512 blocks × 16 slots × 2 heads × 64 dims × 4 bytes each.
        let kv = KvStore::new(32, 512, 16, 2, 64);
        let bytes = 2 * 32 * 512 * 16 * 2 * 64 * 4;
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown >= bytes * 9 / 10,
            "a new {bytes}-byte cache made only {grown} bytes resident"
        );
        let KvView::F32(runs) = kv.view() else {
            panic!("KvStore::new is f32");
        };
        assert!(runs.keys(31, 511, 1).iter().all(|&x| x == 0.0));
        // A 16-bit cache of the same blocks reserves half the bytes.
        let before = resident_bytes();
        let half = KvStore::with_dtype(32, 512, 16, 2, 64, KvCacheDtype::Bf16);
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown >= bytes / 2 * 9 / 10 && grown <= bytes * 6 / 10,
            "a {}-byte bf16 cache made {grown} bytes resident",
            bytes / 2
        );
        assert_eq!(half.dtype(), KvCacheDtype::Bf16);
    }

    /// A written position reads back rounded to the cache's type, keys dimension-major
    /// and values position-major, whatever the type.
    #[test]
    fn writes_read_back_rounded_to_the_dtype() {
        let (hd, bs) = (4, 2);
        let k = [1.0f32, -2.5, 0.1, 3.0e-3];
        let v = [7.0f32, 1.0 / 3.0, -0.2, 65_000.0];
        for dtype in [KvCacheDtype::F32, KvCacheDtype::F16, KvCacheDtype::Bf16] {
            let mut kv = KvStore::with_dtype(2, 3, bs, 2, hd, dtype);
            kv.write(1, 2, 1, 1, &k, &v);
            let (keys, values): (Vec<f32>, Vec<f32>) = match kv.view() {
                KvView::F32(r) => (r.keys(1, 2, 1).to_vec(), r.values(1, 2, 1).to_vec()),
                KvView::F16(r) => (
                    r.keys(1, 2, 1).iter().map(|x| x.to_f32()).collect(),
                    r.values(1, 2, 1).iter().map(|x| x.to_f32()).collect(),
                ),
                KvView::Bf16(r) => (
                    r.keys(1, 2, 1).iter().map(|x| x.to_f32()).collect(),
                    r.values(1, 2, 1).iter().map(|x| x.to_f32()).collect(),
                ),
            };
            let round = |x: f32| match dtype {
                KvCacheDtype::F32 => x,
                KvCacheDtype::F16 => f16::from_f32(x).to_f32(),
                KvCacheDtype::Bf16 => bf16::from_f32(x).to_f32(),
            };
            for i in 0..hd {
                assert_eq!(keys[i * bs + 1], round(k[i]), "{dtype} key {i}");
                assert_eq!(keys[i * bs], 0.0, "{dtype}: slot 0 untouched");
                assert_eq!(values[hd + i], round(v[i]), "{dtype} value {i}");
            }
            assert_eq!(kv.dtype(), dtype);
        }
    }

    #[test]
    fn allocate_release_and_exhaust() {
        let mut m = BlockManager::new(4, 4);
        assert_eq!(m.add_sequence(SeqId(1), &[1, 2, 3]).unwrap(), 0);
        assert_eq!(m.blocks_needed(SeqId(1), 9).unwrap(), 3);
        m.reserve(&[(SeqId(1), 9)]).unwrap();
        assert_eq!(m.free_blocks(), 1);
        m.add_sequence(SeqId(2), &[7]).unwrap();
        let err = m.reserve(&[(SeqId(2), 5)]).unwrap_err();
        assert!(
            matches!(err, RunnerError::OutOfBlocks { needed: 2, free: 1 }),
            "{err}"
        );
        assert_eq!(
            m.free_blocks(),
            1,
            "failed reserve must not change anything"
        );
        assert!(matches!(
            m.reserve(&[(SeqId(9), 1)]),
            Err(RunnerError::UnknownSequence(_))
        ));
        m.remove_sequence(SeqId(1));
        assert_eq!(m.free_blocks(), 4);
        m.check_invariants().unwrap();
    }

    #[test]
    fn prefix_blocks_are_shared_and_refcounted() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        m.add_sequence(SeqId(1), &prompt).unwrap();
        fill(&mut m, SeqId(1), &prompt);
        // Same prompt: two full blocks (8 tokens) are reused, capped below 10.
        assert_eq!(m.add_sequence(SeqId(2), &prompt).unwrap(), 8);
        assert_eq!(
            m.block_table(SeqId(2)).unwrap(),
            &m.block_table(SeqId(1)).unwrap()[..2]
        );
        // Exactly two blocks long: the cap (len - 1) keeps only the first.
        assert_eq!(m.add_sequence(SeqId(3), &prompt[..8]).unwrap(), 4);
        // Different second block: only the first is shared.
        let mut other = prompt.clone();
        other[5] = 99;
        assert_eq!(m.add_sequence(SeqId(4), &other).unwrap(), 4);
        m.check_invariants().unwrap();
        m.remove_sequence(SeqId(1));
        m.remove_sequence(SeqId(2));
        m.remove_sequence(SeqId(3));
        m.remove_sequence(SeqId(4));
        assert_eq!(m.free_blocks(), 8);
        // Freed prompt blocks stay cached.
        assert_eq!(m.add_sequence(SeqId(5), &prompt).unwrap(), 8);
        m.check_invariants().unwrap();
    }

    #[test]
    fn evictable_blocks_are_reused_when_needed() {
        let mut m = BlockManager::new(3, 2);
        let p = [1, 2, 3, 4, 5];
        m.add_sequence(SeqId(1), &p).unwrap();
        fill(&mut m, SeqId(1), &p);
        m.remove_sequence(SeqId(1));
        assert_eq!(m.free_blocks(), 3);
        m.add_sequence(SeqId(2), &[9]).unwrap();
        m.reserve(&[(SeqId(2), 6)]).unwrap();
        assert_eq!(m.free_blocks(), 0);
        m.check_invariants().unwrap();
        m.remove_sequence(SeqId(2));
        assert_eq!(
            m.add_sequence(SeqId(3), &p).unwrap(),
            0,
            "evicted blocks must not hit"
        );
        m.check_invariants().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join { id: u8, prefix: u8, len: u8 },
        Grow { id: u8, n: u8 },
        Leave { id: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, 0u8..3, 1u8..40).prop_map(|(id, prefix, len)| Op::Join { id, prefix, len }),
            (0u8..16, 1u8..20).prop_map(|(id, n)| Op::Grow { id, n }),
            (0u8..16).prop_map(|id| Op::Leave { id }),
        ]
    }

    proptest! {
        #[test]
        fn random_join_leave_never_leaks(ops in proptest::collection::vec(op(), 1000)) {
            let mut m = BlockManager::new(48, 4);
            for o in ops {
                match o {
                    Op::Join { id, prefix, len } => {
                        let prompt: Vec<u32> = (0..len as u32).map(|i| if i < 12 { prefix as u32 * 100 + i } else { i + id as u32 * 1000 }).collect();
                        let id = SeqId(id as u64);
                        if m.contains(id) { continue; }
                        let free = m.free_blocks();
                        let cached = m.add_sequence(id, &prompt).unwrap();
                        prop_assert!(cached < prompt.len());
                        prop_assert!(m.free_blocks() <= free);
                        let rest = &prompt[cached..];
                        match m.reserve(&[(id, rest.len())]) {
                            Ok(_) => m.commit(id, rest).unwrap(),
                            Err(RunnerError::OutOfBlocks { .. }) => m.remove_sequence(id),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Grow { id, n } => {
                        let id = SeqId(id as u64);
                        if !m.contains(id) { continue; }
                        let toks: Vec<u32> = (0..n as u32).collect();
                        let before = m.free_blocks();
                        let need = m.blocks_needed(id, toks.len()).unwrap();
                        match m.reserve(&[(id, toks.len())]) {
                            Ok(_) => {
                                prop_assert_eq!(m.free_blocks(), before - need);
                                m.commit(id, &toks).unwrap();
                            }
                            Err(RunnerError::OutOfBlocks { .. }) => prop_assert_eq!(m.free_blocks(), before),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Leave { id } => m.remove_sequence(SeqId(id as u64)),
                }
                if let Err(e) = m.check_invariants() { return Err(TestCaseError::fail(e)); }
            }
            for id in 0..16 { m.remove_sequence(SeqId(id)); }
            prop_assert_eq!(m.free_blocks(), 48);
            prop_assert!(m.refcount.iter().all(|&r| r == 0));
            m.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
