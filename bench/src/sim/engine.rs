//! The simulated worker's state: sequences, exact KV block accounting and the tokens a
//! step produces. Plain synchronous code; the service adds the sleeping and gRPC.
//!
//! KV convention (as in a real paged-attention engine): after a prefill chunk the KV holds
//! the prompt tokens computed so far; the last prompt token's step samples output 1, which
//! enters the KV in the next decode step. A sequence holds ceil(kv_tokens / block_size)
//! blocks; a step that would need more blocks than are free refuses that sequence with
//! OUT_OF_BLOCKS and drops it, computing nothing for it.

use std::collections::HashMap;
use std::time::Duration;

use shardline_proto::worker::v1::{
    FinishReason, PrefillChunk, SeqResult, SeqStatus, SequenceParams, StepResponse, TokenLogprob,
    TopLogprob,
};

use super::profile::Profile;

/// One live sequence.
#[derive(Debug)]
struct Seq {
    prompt: Vec<u32>,
    params: SequenceParams,
    /// Hash of the original prompt (without migrated generated tokens): tokens are a pure
    /// function of it and the output position, so a migrated sequence continues the same.
    origin: u64,
    /// Prompt tokens in the KV.
    computed: u32,
    /// Output tokens sampled, counting `num_generated` carried over.
    generated: u32,
    /// Tokens in the KV (prompt + fed-back outputs).
    kv_tokens: u32,
    blocks: u32,
}

/// All sequences of a simulated group.
pub struct SimState {
    profile: Profile,
    /// Token ids outputs are drawn from (plain-text tokens of the tokenizer).
    vocab: Vec<u32>,
    eos: Vec<u32>,
    seqs: HashMap<u64, Seq>,
    free_blocks: u32,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: a cheap, well-spread hash of one word.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn prompt_hash(tokens: &[u32]) -> u64 {
    tokens
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &t| mix(h ^ u64::from(t)))
}

impl SimState {
    /// `vocab`: ids to draw outputs from (empty = 0..profile.vocab_size without `eos`).
    pub fn new(profile: Profile, mut vocab: Vec<u32>, eos: Vec<u32>) -> Self {
        if vocab.is_empty() {
            vocab = (0..profile.vocab_size)
                .filter(|t| !eos.contains(t))
                .collect();
        }
        let free_blocks = profile.kv_blocks;
        Self {
            profile,
            vocab,
            eos,
            seqs: HashMap::new(),
            free_blocks,
        }
    }

    pub fn free_blocks(&self) -> u32 {
        self.free_blocks
    }

    pub fn num_running(&self) -> u32 {
        self.seqs.len() as u32
    }

    /// The token at output position `pos` of a sequence whose original prompt hashes to
    /// `origin`.
    pub fn token_at(&self, origin: u64, pos: u32) -> u32 {
        self.vocab[(mix(origin ^ mix(u64::from(pos))) % self.vocab.len() as u64) as usize]
    }

    fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.profile.kv_block_size)
    }

    /// Grow `seq` to `kv_tokens`; false (nothing changed) when the blocks are not free.
    fn grow(&mut self, id: u64, kv_tokens: u32) -> bool {
        let need = self.blocks_for(kv_tokens);
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        let extra = need.saturating_sub(seq.blocks);
        if extra > self.free_blocks {
            return false;
        }
        self.free_blocks -= extra;
        let seq = self.seqs.get_mut(&id).expect("checked above");
        seq.blocks += extra;
        seq.kv_tokens = kv_tokens;
        true
    }

    fn drop_seq(&mut self, id: u64) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.free_blocks += seq.blocks;
        }
    }

    /// Drop sequences, returning their blocks. Unknown ids are ignored.
    pub fn release(&mut self, ids: &[u64]) {
        for &id in ids {
            self.drop_seq(id);
        }
    }

    /// Sample the next output token of `id` and finish it if it is done.
    fn sample(&mut self, id: u64, r: &mut SeqResult) {
        let seq = self
            .seqs
            .get(&id)
            .expect("caller checked the sequence exists");
        let token = self.token_at(seq.origin, seq.generated);
        let generated = seq.generated + 1;
        let p = &seq.params;
        let stop = !p.ignore_eos
            && generated > p.min_tokens
            && (self.eos.contains(&token) || p.stop_token_ids.contains(&token));
        let length = (p.max_new_tokens > 0 && generated >= p.max_new_tokens)
            || seq.prompt.len() as u32 - p.num_generated.min(seq.prompt.len() as u32) + generated
                >= self.profile.context_length;
        let top = (0..p.top_logprobs)
            .map(|i| TopLogprob {
                token_id: self.token_at(seq.origin ^ 0x5eed, seq.generated + i),
                logprob: -1.0 - i as f32,
            })
            .collect();
        r.has_token = true;
        r.token = Some(TokenLogprob {
            token_id: token,
            logprob: -0.5,
            top,
        });
        self.seqs.get_mut(&id).expect("exists").generated = generated;
        if stop || length {
            r.finish_reason = if stop {
                FinishReason::Stop
            } else {
                FinishReason::Length
            } as i32;
            self.drop_seq(id);
        }
    }

    fn refuse(r: &mut SeqResult, status: SeqStatus, error: impl Into<String>) {
        r.status = status as i32;
        r.error = error.into();
    }

    /// One prefill chunk; returns the tokens it computed and the sequence's context after.
    fn prefill(&mut self, c: &PrefillChunk, r: &mut SeqResult) -> (u64, u64) {
        let id = c.seq_id;
        if !c.prompt.is_empty() {
            if self.seqs.contains_key(&id) {
                Self::refuse(
                    r,
                    SeqStatus::Invalid,
                    format!("sequence {id} already exists"),
                );
                return (0, 0);
            }
            let Some(params) = c.params.clone() else {
                Self::refuse(r, SeqStatus::Invalid, "the first chunk needs params");
                return (0, 0);
            };
            if c.prompt.len() as u32 >= self.profile.context_length {
                Self::refuse(
                    r,
                    SeqStatus::Invalid,
                    format!(
                        "prompt of {} tokens exceeds the context length {}",
                        c.prompt.len(),
                        self.profile.context_length
                    ),
                );
                return (0, 0);
            }
            if params.num_generated as usize > c.prompt.len() {
                Self::refuse(r, SeqStatus::Invalid, "num_generated exceeds the prompt");
                return (0, 0);
            }
            if self.seqs.len() as u32 >= self.profile.max_num_seqs {
                Self::refuse(
                    r,
                    SeqStatus::OutOfBlocks,
                    "max_num_seqs sequences are running",
                );
                return (0, 0);
            }
            let origin = prompt_hash(&c.prompt[..c.prompt.len() - params.num_generated as usize]);
            let generated = params.num_generated;
            self.seqs.insert(
                id,
                Seq {
                    prompt: c.prompt.clone(),
                    params,
                    origin,
                    computed: 0,
                    generated,
                    kv_tokens: 0,
                    blocks: 0,
                },
            );
        }
        let Some(seq) = self.seqs.get(&id) else {
            Self::refuse(
                r,
                SeqStatus::Invalid,
                format!("unknown sequence {id} (the first chunk carries the prompt)"),
            );
            return (0, 0);
        };
        let total = seq.prompt.len() as u32;
        if seq.computed >= total {
            Self::refuse(
                r,
                SeqStatus::Invalid,
                format!("sequence {id} has no prompt left to prefill"),
            );
            return (0, 0);
        }
        let n = match c.max_tokens {
            0 => total - seq.computed,
            m => m.min(total - seq.computed),
        };
        let (computed, kv) = (seq.computed + n, seq.kv_tokens + n);
        if !self.grow(id, kv) {
            self.drop_seq(id);
            Self::refuse(r, SeqStatus::OutOfBlocks, "no free KV blocks");
            return (0, 0);
        }
        let seq = self.seqs.get_mut(&id).expect("grown above");
        seq.computed = computed;
        r.prompt_computed = computed;
        if computed == total {
            if seq.params.prompt_logprobs {
                r.prompt_logprobs = seq.prompt[1..]
                    .iter()
                    .map(|&t| TokenLogprob {
                        token_id: t,
                        logprob: -1.0,
                        top: vec![],
                    })
                    .collect();
            }
            self.sample(id, r);
        }
        (u64::from(n), u64::from(kv))
    }

    /// One decode: feed the last output token back, sample the next.
    fn decode(&mut self, id: u64, r: &mut SeqResult) -> (u64, u64) {
        let Some(seq) = self.seqs.get(&id) else {
            Self::refuse(r, SeqStatus::Invalid, format!("unknown sequence {id}"));
            return (0, 0);
        };
        if seq.computed < seq.prompt.len() as u32 {
            Self::refuse(
                r,
                SeqStatus::Invalid,
                format!("sequence {id} is still in prefill"),
            );
            return (0, 0);
        }
        let kv = seq.kv_tokens + 1;
        if !self.grow(id, kv) {
            self.drop_seq(id);
            Self::refuse(r, SeqStatus::OutOfBlocks, "no free KV blocks");
            return (0, 0);
        }
        r.prompt_computed = self.seqs[&id].computed;
        self.sample(id, r);
        (1, u64::from(kv))
    }

    /// Run one mixed step; returns the response and the simulated time it costs.
    pub fn step(&mut self, prefill: &[PrefillChunk], decode: &[u64]) -> (StepResponse, Duration) {
        let (mut tokens, mut ctx) = (0u64, 0u64);
        let mut results = Vec::with_capacity(prefill.len() + decode.len());
        for c in prefill {
            let mut r = SeqResult {
                seq_id: c.seq_id,
                status: SeqStatus::Ok as i32,
                ..Default::default()
            };
            let (t, x) = self.prefill(c, &mut r);
            (tokens, ctx) = (tokens + t, ctx + x);
            results.push(r);
        }
        for &id in decode {
            let mut r = SeqResult {
                seq_id: id,
                status: SeqStatus::Ok as i32,
                ..Default::default()
            };
            let (t, x) = self.decode(id, &mut r);
            (tokens, ctx) = (tokens + t, ctx + x);
            results.push(r);
        }
        let cost = self.profile.step_time(tokens, ctx);
        let resp = StepResponse {
            results,
            kv_blocks_free: self.free_blocks,
            num_running: self.num_running(),
            step_time_ns: cost.as_nanos() as u64,
            batch_tokens: tokens as u32,
        };
        (resp, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> SimState {
        // 64 blocks of 4 tokens, 256-token context, 16 sequences at most.
        SimState::new(Profile::by_name("tiny").unwrap(), vec![], vec![0])
    }

    fn first(id: u64, prompt_len: u32, max_new: u32, max_tokens: u32) -> PrefillChunk {
        PrefillChunk {
            seq_id: id,
            prompt: (1..=prompt_len).collect(),
            params: Some(SequenceParams {
                max_new_tokens: max_new,
                ignore_eos: true,
                ..Default::default()
            }),
            max_tokens,
        }
    }

    fn status(r: &SeqResult) -> SeqStatus {
        SeqStatus::try_from(r.status).unwrap()
    }

    #[test]
    fn chunked_prefill_then_decode_counts_blocks_exactly() {
        let mut s = tiny();
        // 10 prompt tokens in chunks of 6 and 4: 2 blocks, then 3 blocks.
        let (resp, _) = s.step(&[first(1, 10, 3, 6)], &[]);
        assert_eq!(
            (resp.results[0].prompt_computed, resp.results[0].has_token),
            (6, false)
        );
        assert_eq!(s.free_blocks(), 62);
        let chunk = PrefillChunk {
            seq_id: 1,
            max_tokens: 6,
            ..Default::default()
        };
        let (resp, cost) = s.step(&[chunk], &[]);
        let r = &resp.results[0];
        assert_eq!(
            (r.prompt_computed, r.has_token, resp.batch_tokens),
            (10, true, 4)
        );
        assert_eq!(cost, Duration::from_millis(1));
        assert_eq!(s.free_blocks(), 61);
        // Decode: KV 11 tokens → still 3 blocks; output 2 of 3.
        let (resp, _) = s.step(&[], &[1]);
        assert_eq!(
            resp.results[0].finish_reason,
            FinishReason::Unspecified as i32
        );
        assert_eq!(s.free_blocks(), 61);
        // Output 3 = max_new_tokens: finished, blocks back.
        let (resp, _) = s.step(&[], &[1]);
        assert_eq!(resp.results[0].finish_reason, FinishReason::Length as i32);
        assert_eq!((s.free_blocks(), resp.num_running), (64, 0));
    }

    #[test]
    fn tokens_are_deterministic_and_migration_continues_the_stream() {
        let run = |s: &mut SimState, chunk: PrefillChunk, n: usize| {
            let id = chunk.seq_id;
            let mut out = vec![
                s.step(&[chunk], &[]).0.results[0]
                    .token
                    .as_ref()
                    .unwrap()
                    .token_id,
            ];
            for _ in 1..n {
                out.push(
                    s.step(&[], &[id]).0.results[0]
                        .token
                        .as_ref()
                        .unwrap()
                        .token_id,
                );
            }
            out
        };
        let mut s = tiny();
        let a = run(&mut s, first(1, 5, 0, 0), 6);
        assert_eq!(a, run(&mut s, first(2, 5, 0, 0), 6));
        assert!(!a.contains(&0), "EOS drawn");
        // Migrated: the prompt plus the first 2 outputs, num_generated = 2.
        let mut prompt: Vec<u32> = (1..=5).collect();
        prompt.extend(&a[..2]);
        let params = SequenceParams {
            num_generated: 2,
            max_new_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        let moved = PrefillChunk {
            seq_id: 3,
            prompt,
            params: Some(params),
            max_tokens: 0,
        };
        assert_eq!(run(&mut s, moved, 4), a[2..].to_vec());
    }

    #[test]
    fn full_cache_refuses_per_sequence_with_out_of_blocks() {
        let mut s = tiny();
        // 60 tokens = 15 blocks each: four fit (60 blocks), the fifth does not.
        let chunks: Vec<_> = (1..=5).map(|i| first(i, 60, 10, 0)).collect();
        let (resp, _) = s.step(&chunks, &[]);
        let st: Vec<_> = resp.results.iter().map(status).collect();
        assert_eq!(st[..4], [SeqStatus::Ok; 4]);
        assert_eq!(st[4], SeqStatus::OutOfBlocks);
        assert_eq!((resp.kv_blocks_free, resp.num_running), (4, 4));
        // Decoding token 61 needs a 16th block per sequence: 4 free blocks serve all four.
        let (resp, _) = s.step(&[], &[1, 2, 3, 4]);
        assert!(resp.results.iter().all(|r| status(r) == SeqStatus::Ok));
        assert_eq!(resp.kv_blocks_free, 0);
        // Tokens 62..64 fit in the 16th block; token 65 needs a 17th and none is free:
        // sequence 1 is refused and dropped, and its 16 blocks let 2, 3 and 4 go on.
        for _ in 0..3 {
            s.step(&[], &[1, 2, 3, 4]);
        }
        let (resp, _) = s.step(&[], &[1, 2, 3, 4]);
        let st: Vec<_> = resp.results.iter().map(status).collect();
        assert_eq!(
            st,
            [
                SeqStatus::OutOfBlocks,
                SeqStatus::Ok,
                SeqStatus::Ok,
                SeqStatus::Ok
            ]
        );
        assert_eq!((resp.kv_blocks_free, resp.num_running), (13, 3));
        s.release(&[2, 3, 4]);
        assert_eq!(s.free_blocks(), 64);
    }

    #[test]
    fn bad_chunks_are_invalid_and_release_is_idempotent() {
        let mut s = tiny();
        let no_params = PrefillChunk {
            seq_id: 1,
            prompt: vec![1],
            params: None,
            max_tokens: 0,
        };
        let unknown = PrefillChunk {
            seq_id: 9,
            ..Default::default()
        };
        let too_long = first(2, 300, 1, 0);
        let (resp, _) = s.step(&[no_params, unknown, too_long], &[42]);
        assert!(
            resp.results
                .iter()
                .all(|r| status(r) == SeqStatus::Invalid && !r.error.is_empty())
        );
        s.step(&[first(3, 8, 5, 4)], &[]);
        // Still in prefill: decode is invalid.
        assert_eq!(status(&s.step(&[], &[3]).0.results[0]), SeqStatus::Invalid);
        s.release(&[3, 3, 77]);
        assert_eq!((s.free_blocks(), s.num_running()), (64, 0));
    }

    #[test]
    fn stop_tokens_end_a_sequence_after_min_tokens() {
        let mut s = tiny();
        let probe = s.token_at(prompt_hash(&[1, 2, 3]), 1);
        let params = SequenceParams {
            stop_token_ids: vec![probe],
            min_tokens: 0,
            max_new_tokens: 50,
            ..Default::default()
        };
        let c = PrefillChunk {
            seq_id: 1,
            prompt: vec![1, 2, 3],
            params: Some(params),
            max_tokens: 0,
        };
        s.step(&[c], &[]);
        let (resp, _) = s.step(&[], &[1]);
        assert_eq!(resp.results[0].finish_reason, FinishReason::Stop as i32);
    }
}
