//! [`SimRunner`]: the simulated model behind the real engine and worker service. It runs
//! no model: a forward lasts the profile's modelled step time, its logits peak on a token
//! that is a pure function of the sequence's tokens so far (a rolling hash), and the KV
//! cache is counted exactly in blocks, with a prefix cache like the real worker's: full
//! prompt blocks are shared by chained hash, kept after their sequences end and evicted
//! least recently used first when blocks run out (evictable blocks count as free).
//! Everything else a worker does (admission, chunked prefill, preemption, stop rules,
//! sampling, release) is the real engine's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shardline_engine::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerInfo, SeqChunk, SeqId,
};

use super::profile::Profile;

/// The last stretch of a modelled step is spun rather than slept: even without timer
/// slack ([`precise_timers`]) a sleeping thread takes some µs to be woken and scheduled.
const SPIN: Duration = Duration::from_micros(80);

/// What the runner keeps per sequence.
#[derive(Debug, Clone)]
struct Seq {
    /// Rolling hash of every token in the KV cache.
    hash: u64,
    /// Tokens in the KV cache.
    len: usize,
    /// Chained hashes of the prompt's full blocks (the prefix cache's keys).
    prompt_blocks: Vec<u64>,
    /// Leading prompt blocks whose cache entries this sequence holds a reference on.
    shared: usize,
    /// Blocks only this sequence holds.
    private: usize,
}

/// A full prompt block in the prefix cache.
#[derive(Debug, Clone, Copy)]
struct Cached {
    refs: usize,
    last_used: u64,
}

pub struct SimRunner {
    info: RunnerInfo,
    profile: Profile,
    /// Multiplies every modelled step time (0 = no waiting, for tests).
    time_scale: f64,
    /// Token ids outputs are drawn from (ordinary tokens: no EOS, no specials).
    outputs: Vec<u32>,
    seqs: HashMap<SeqId, Seq>,
    /// Blocks held by one sequence only.
    private_blocks: usize,
    /// Prefix cache: full prompt blocks by chained hash (held or evictable).
    cache: HashMap<u64, Cached>,
    /// Cache entries some sequence holds.
    held_cached: usize,
    tick: u64,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: a cheap, well-spread hash of one word.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

const EMPTY: u64 = 0xcbf2_9ce4_8422_2325;

impl SimRunner {
    /// `outputs`: the ids generated tokens are drawn from (none empty).
    pub fn new(profile: Profile, vocab_size: usize, outputs: Vec<u32>, time_scale: f64) -> Self {
        assert!(
            !outputs.is_empty(),
            "the simulator needs output tokens; this is a bug"
        );
        Self {
            info: RunnerInfo {
                model_id: format!("sim:{}", profile.name),
                dtype: "bf16".into(),
                tp: profile.tp as usize,
                context_length: profile.context_length as usize,
                vocab_size,
                kv_block_size: profile.kv_block_size as usize,
                kv_blocks_total: profile.kv_blocks as usize,
                kv_cache_dtype: "bf16".into(),
            },
            profile,
            time_scale: time_scale.max(0.0),
            outputs,
            seqs: HashMap::new(),
            private_blocks: 0,
            cache: HashMap::new(),
            held_cached: 0,
            tick: 0,
        }
    }

    /// Chained hashes of the full blocks of `prompt`.
    fn chain(&self, prompt: &[u32]) -> Vec<u64> {
        shardline_proto::worker::block_hashes(prompt, self.info.kv_block_size).collect()
    }

    /// Drops least recently used unheld cache entries until the blocks in use (held or
    /// not) fit the cache.
    fn evict(&mut self) {
        let total = self.info.kv_blocks_total;
        let over = (self.private_blocks + self.cache.len()).saturating_sub(total);
        if over == 0 {
            return;
        }
        let mut idle: Vec<(u64, u64)> = self
            .cache
            .iter()
            .filter(|(_, c)| c.refs == 0)
            .map(|(&h, c)| (c.last_used, h))
            .collect();
        idle.sort_unstable();
        for (_, h) in idle.into_iter().take(over) {
            self.cache.remove(&h);
        }
    }

    /// Full prompt blocks `seq` computed become cache entries (shared from now on),
    /// unless another sequence put the same block there first.
    fn publish(&mut self, id: SeqId) {
        let bs = self.info.kv_block_size.max(1);
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let full = (seq.len / bs).min(seq.prompt_blocks.len());
        let start = seq.shared;
        if full <= start {
            return;
        }
        let hashes = seq.prompt_blocks[start..full].to_vec();
        let mut shared = start;
        self.tick += 1;
        for &h in &hashes {
            if self.cache.contains_key(&h) {
                break; // computed twice: this copy stays private
            }
            self.cache.insert(
                h,
                Cached {
                    refs: 1,
                    last_used: self.tick,
                },
            );
            self.held_cached += 1;
            self.private_blocks -= 1;
            shared += 1;
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.private -= shared - start;
            seq.shared = shared;
        }
    }

    /// The token the model predicts after a sequence whose tokens hash to `hash`.
    pub fn token_after(&self, hash: u64) -> u32 {
        self.outputs[(mix(hash) % self.outputs.len() as u64) as usize]
    }

    /// The rolling hash of `tokens` (what the runner keeps per sequence).
    pub fn hash(tokens: &[u32]) -> u64 {
        tokens.iter().fold(EMPTY, |h, &t| mix(h ^ u64::from(t)))
    }

    fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.info.kv_block_size.max(1))
    }

    fn row(&self, hash: u64, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + self.info.vocab_size, -12.0);
        out[start + self.token_after(hash) as usize] = 0.0;
    }

    fn seq(&self, id: SeqId) -> Result<&Seq, RunnerError> {
        self.seqs.get(&id).ok_or(RunnerError::UnknownSequence(id))
    }
}

impl ModelRunner for SimRunner {
    fn info(&self) -> &RunnerInfo {
        &self.info
    }

    fn add_sequence_with(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        prefix_cache: PrefixCache,
    ) -> Result<usize, RunnerError> {
        if self.seqs.contains_key(&id) {
            return Err(RunnerError::DuplicateSequence(id));
        }
        let max = self.info.context_length;
        if prompt.len() > max {
            return Err(RunnerError::ContextExceeded {
                id,
                len: prompt.len(),
                max,
            });
        }
        let bs = self.info.kv_block_size.max(1);
        let prompt_blocks = self.chain(prompt);
        // The last prompt token always runs (it yields the first token's logits).
        let usable = (prompt.len().saturating_sub(1) / bs).min(prompt_blocks.len());
        let shared = match prefix_cache {
            PrefixCache::Use => prompt_blocks[..usable]
                .iter()
                .take_while(|h| self.cache.contains_key(h))
                .count(),
            PrefixCache::Skip => 0,
        };
        self.tick += 1;
        for h in &prompt_blocks[..shared] {
            let c = self.cache.get_mut(h).expect("matched above");
            if c.refs == 0 {
                self.held_cached += 1;
            }
            c.refs += 1;
            c.last_used = self.tick;
        }
        let cached = shared * bs;
        self.seqs.insert(
            id,
            Seq {
                hash: Self::hash(&prompt[..cached]),
                len: cached,
                prompt_blocks,
                shared,
                private: 0,
            },
        );
        Ok(cached)
    }

    fn blocks_needed(&self, id: SeqId, n: usize) -> Result<usize, RunnerError> {
        let len = self.seq(id)?.len;
        Ok(self.blocks_for(len + n) - self.blocks_for(len))
    }

    fn seq_len(&self, id: SeqId) -> Result<usize, RunnerError> {
        Ok(self.seq(id)?.len)
    }

    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<ChunkLogits>, RunnerError> {
        let started = Instant::now();
        let (mut tokens, mut ctx, mut needed) = (0u64, 0u64, 0usize);
        for c in batch {
            let seq = self.seq(c.id)?;
            let len = seq.len + c.tokens.len();
            if len > self.info.context_length {
                return Err(RunnerError::ContextExceeded {
                    id: c.id,
                    len,
                    max: self.info.context_length,
                });
            }
            needed += self.blocks_for(len) - self.blocks_for(seq.len);
            tokens += c.tokens.len() as u64;
            ctx += len as u64;
        }
        let free = self.free_blocks();
        if needed > free {
            return Err(RunnerError::OutOfBlocks { needed, free });
        }
        self.private_blocks += needed;
        self.evict();
        let mut out = Vec::with_capacity(batch.len());
        for c in batch {
            let (mut hash, len) = {
                let seq = self.seq(c.id)?;
                (seq.hash, seq.len)
            };
            let mut data = Vec::new();
            for (j, &t) in c.tokens.iter().enumerate() {
                hash = mix(hash ^ u64::from(t));
                let wanted = match c.logits {
                    LogitsWanted::None => false,
                    LogitsWanted::Last => j + 1 == c.tokens.len(),
                    LogitsWanted::All => true,
                };
                if wanted {
                    self.row(hash, &mut data);
                }
            }
            let grown = self.blocks_for(len + c.tokens.len()) - self.blocks_for(len);
            let seq = self.seqs.get_mut(&c.id).expect("checked above");
            seq.private += grown;
            seq.hash = hash;
            seq.len += c.tokens.len();
            self.publish(c.id);
            let rows = data.len() / self.info.vocab_size.max(1);
            out.push(ChunkLogits {
                id: c.id,
                data,
                rows,
            });
        }
        let cost = self.profile.step_time(tokens, ctx).mul_f64(self.time_scale);
        wait_until(started + cost);
        Ok(out)
    }

    fn remove_sequence(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.private_blocks -= seq.private;
            self.tick += 1;
            for h in &seq.prompt_blocks[..seq.shared] {
                if let Some(c) = self.cache.get_mut(h) {
                    c.refs -= 1;
                    c.last_used = self.tick;
                    if c.refs == 0 {
                        self.held_cached -= 1;
                    }
                }
            }
        }
    }

    /// Blocks not held by any sequence (evictable cache entries count as free).
    fn free_blocks(&self) -> usize {
        self.info.kv_blocks_total - self.private_blocks - self.held_cached
    }
}

/// Makes this thread's sleeps end when asked: Linux lets a sleeping thread wake up to its
/// timer slack late (50 µs by default) to batch wake-ups, and on a 1.5 ms step those
/// late wake-ups (measured on the 2-core dev machine: 107 µs a step on average with the
/// default slack, 1.5–4.7 µs with 1 ns when quiet) would be time a study wrongly puts on
/// the coordinator. A GPU does not round its kernels up either.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only changes the calling
    // thread's timer slack; the unused arguments are zero as prctl(2) asks.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("cannot lower the timer slack; modelled steps may run long");
    }
}

/// Sleeps, then spins the last [`SPIN`], until `deadline`.
fn wait_until(deadline: Instant) {
    thread_local!(static PRECISE_TIMERS: () = precise_timers());
    PRECISE_TIMERS.with(|_| ());
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    let left = deadline - now;
    if left > SPIN {
        std::thread::sleep(left - SPIN);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> SimRunner {
        // 64 blocks of 4 tokens, 256-token context.
        SimRunner::new(
            Profile::by_name("tiny").unwrap(),
            16,
            (1..16).collect(),
            0.0,
        )
    }

    fn chunk(id: u64, tokens: &[u32], logits: LogitsWanted) -> SeqChunk {
        SeqChunk {
            id: SeqId(id),
            tokens: tokens.to_vec(),
            logits,
        }
    }

    fn peak(l: &ChunkLogits, row: usize, vocab: usize) -> usize {
        let r = &l.data[row * vocab..(row + 1) * vocab];
        r.iter().position(|&x| x == 0.0).unwrap()
    }

    #[test]
    fn blocks_are_counted_exactly_and_returned() {
        let mut r = tiny();
        r.add_sequence(SeqId(1), &[1; 10]).unwrap();
        assert_eq!(r.blocks_needed(SeqId(1), 10).unwrap(), 3);
        r.forward(&[chunk(1, &[1; 6], LogitsWanted::None)]).unwrap();
        assert_eq!(r.free_blocks(), 62);
        r.forward(&[chunk(1, &[1; 4], LogitsWanted::Last)]).unwrap();
        assert_eq!(r.free_blocks(), 61);
        assert_eq!(r.blocks_needed(SeqId(1), 2).unwrap(), 0);
        r.remove_sequence(SeqId(1));
        assert_eq!(r.free_blocks(), 64);
        // A step that does not fit changes nothing.
        r.add_sequence(SeqId(2), &[2; 255]).unwrap();
        let err = r.forward(&[chunk(2, &[2; 257], LogitsWanted::Last)]);
        assert!(matches!(err, Err(RunnerError::ContextExceeded { .. })));
        assert_eq!(r.free_blocks(), 64);
    }

    #[test]
    fn full_prompt_blocks_are_shared_kept_and_evicted_least_recently_used_first() {
        let mut r = tiny(); // 64 blocks of 4
        let prompt: Vec<u32> = (1..=10).collect(); // 2 full blocks + 2 tokens
        r.add_sequence(SeqId(1), &prompt).unwrap();
        r.forward(&[chunk(1, &prompt, LogitsWanted::Last)]).unwrap();
        assert_eq!(r.free_blocks(), 61);
        // The same prompt: its 2 full blocks come from the cache, only the rest runs.
        assert_eq!(r.add_sequence(SeqId(2), &prompt).unwrap(), 8);
        r.forward(&[chunk(2, &prompt[8..], LogitsWanted::Last)])
            .unwrap();
        assert_eq!(r.free_blocks(), 60, "2 shared + 1 + 1 private");
        let a = r.forward(&[chunk(1, &[5], LogitsWanted::Last)]).unwrap();
        let b = r.forward(&[chunk(2, &[5], LogitsWanted::Last)]).unwrap();
        assert_eq!(
            peak(&a[0], 0, 16),
            peak(&b[0], 0, 16),
            "same tokens, same logits"
        );
        r.remove_sequence(SeqId(1));
        r.remove_sequence(SeqId(2));
        assert_eq!(r.free_blocks(), 64, "cached blocks are evictable, so free");
        // Still cached after both ended...
        assert_eq!(r.add_sequence(SeqId(3), &prompt).unwrap(), 8);
        r.remove_sequence(SeqId(3));
        // ...until other sequences need every block.
        r.add_sequence(SeqId(4), &[9; 200]).unwrap();
        r.forward(&[chunk(4, &[9; 200], LogitsWanted::Last)])
            .unwrap();
        r.add_sequence(SeqId(5), &[7; 56]).unwrap();
        r.forward(&[chunk(5, &[7; 56], LogitsWanted::Last)])
            .unwrap();
        assert_eq!(r.free_blocks(), 0);
        r.remove_sequence(SeqId(5));
        r.remove_sequence(SeqId(4));
        assert_eq!(r.free_blocks(), 64);
        assert_eq!(r.add_sequence(SeqId(6), &prompt).unwrap(), 0, "evicted");
    }

    #[test]
    fn logits_depend_on_the_tokens_only() {
        // One sequence prefilled in one chunk, another in two: same prediction.
        let mut r = tiny();
        r.add_sequence(SeqId(1), &[3, 4, 5]).unwrap();
        r.add_sequence(SeqId(2), &[3, 4, 5]).unwrap();
        let a = r
            .forward(&[chunk(1, &[3, 4, 5], LogitsWanted::Last)])
            .unwrap();
        r.forward(&[chunk(2, &[3, 4], LogitsWanted::None)]).unwrap();
        let b = r.forward(&[chunk(2, &[5], LogitsWanted::Last)]).unwrap();
        assert_eq!(peak(&a[0], 0, 16), peak(&b[0], 0, 16));
        assert_eq!(
            peak(&a[0], 0, 16) as u32,
            r.token_after(SimRunner::hash(&[3, 4, 5]))
        );
        assert!(peak(&a[0], 0, 16) > 0, "outputs never draw token 0 here");
    }

    #[test]
    fn a_step_takes_the_modelled_time() {
        let mut r = SimRunner::new(Profile::by_name("tiny").unwrap(), 16, vec![1], 1.0);
        r.add_sequence(SeqId(1), &[1]).unwrap();
        let t = Instant::now();
        r.forward(&[chunk(1, &[1], LogitsWanted::Last)]).unwrap();
        // The tiny profile: 1 ms per step.
        assert!(t.elapsed() >= Duration::from_millis(1));
    }
}
