//! [`EngineState`]: the synchronous heart of the engine. It owns the [`ModelRunner`] and
//! every live [`Sequence`], and turns one `StepRequest` into one forward plus sampling.
//!
//! Per step:
//! 0. drop the sequences the step releases;
//! 1. register new sequences (first chunk: prompt + params), validating them; a bad one
//!    gets `SEQ_STATUS_INVALID` and the others go on;
//! 2. plan one chunk per sequence and find the KV blocks they fill. Blocks are taken as
//!    sequences grow, never reserved for what they may generate; when the step needs more
//!    than are free, the sequence that ranks last (highest `priority` number, then the
//!    most recently started) gives its blocks back until the rest fit — a sequence new in
//!    this step is refused (`SEQ_STATUS_OUT_OF_BLOCKS`), a running one is preempted
//!    (`SEQ_STATUS_PREEMPTED`; its owner re-prefills prompt + generated tokens later,
//!    which batch-invariant numerics make byte-identical);
//! 3. run one forward (the constrained sequences' token masks are computed beside it);
//!    sample the sequences whose logits came back; finished sequences are freed here, so
//!    the coordinator need not release them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shardline_proto::worker::v1 as pb;

use super::constraint::{self, Constraints};
use super::seq::{SeqConfig, Sequence};
use super::{EngineError, ModelFacts};
use crate::runner::{
    ChunkLogits, LogitsWanted, ModelRunner, PrefixCache, RunnerError, RunnerStats, SeqChunk, SeqId,
};
use crate::sampler;

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Sequences ever registered with the runner (a request that never reached the
    /// worker does not count).
    pub seqs_admitted: u64,
    pub steps: u64,
    pub tokens_generated: u64,
    pub prompt_tokens_computed: u64,
    pub prompt_tokens_cached: u64,
    /// Sequences dropped by a release while still running (client gone, deadline).
    pub seqs_released: u64,
    /// Sequences released because no step named them for the idle timeout.
    pub seqs_released_idle: u64,
    /// Running sequences dropped to give their KV blocks to sequences that rank before
    /// them (`SEQ_STATUS_PREEMPTED`).
    pub seqs_preempted: u64,
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Sequences that were alive and are gone now (unknown ids do not count).
    pub sequences: usize,
    pub kv_blocks_free: usize,
}

/// A point-in-time view for `Health`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStatus {
    /// `Err` once the model failed (a panic, a dead rank): the engine refuses steps.
    pub healthy: Result<(), String>,
    pub kv_blocks_free: usize,
    pub num_running: usize,
    /// Sequences whose prompt is not computed yet (chunked prefill in progress).
    pub num_prefilling: usize,
    pub counters: EngineCounters,
    /// The runner's own figures (prefix cache, tensor-parallel collectives).
    pub runner: RunnerStats,
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences alive at once; more are refused with `SEQ_STATUS_OUT_OF_BLOCKS`.
    pub max_num_seqs: usize,
    pub group_id: String,
    pub model: ModelFacts,
}

pub struct EngineState {
    runner: Box<dyn ModelRunner>,
    config: EngineConfig,
    seqs: HashMap<SeqId, Sequence>,
    counters: EngineCounters,
    /// Sequences ever registered: a sequence's start order, for choosing preemption victims.
    started: u64,
    /// Set when a forward panicked: the runner's state is unknown from then on.
    poisoned: Option<String>,
    /// Compiles the constraints of structured-output sequences.
    constraints: Constraints,
}

/// One sequence's part of the step being planned.
struct Planned {
    id: SeqId,
    result: usize,
    tokens: Vec<u32>,
    logits: LogitsWanted,
    /// Whether this chunk finishes the prompt (or is a decode token): sample after it.
    samples: bool,
    /// Registered in this step (undone if the forward fails).
    new: bool,
}

impl EngineState {
    pub fn new(runner: Box<dyn ModelRunner>, config: EngineConfig) -> Self {
        let constraints = Constraints::new(
            &config.model.tokenizer_json,
            &config.model.eos_token_ids,
            runner.info().vocab_size,
        );
        Self {
            runner,
            config,
            seqs: HashMap::new(),
            counters: EngineCounters::default(),
            started: 0,
            poisoned: None,
            constraints,
        }
    }

    pub fn info(&self) -> pb::InfoResponse {
        let i = self.runner.info();
        let m = &self.config.model;
        pb::InfoResponse {
            model_id: i.model_id.clone(),
            dtype: i.dtype.clone(),
            tp: i.tp as u32,
            context_length: i.context_length as u32,
            kv_block_size: i.kv_block_size as u32,
            kv_blocks_total: i.kv_blocks_total as u32,
            kv_blocks_free: self.runner.free_blocks() as u32,
            tokenizer_json: m.tokenizer_json.clone(),
            chat_template: m.chat_template.clone(),
            eos_token_ids: m.eos_token_ids.clone(),
            bos_token: m.bos_token.clone(),
            eos_token: m.eos_token.clone(),
            vocab_size: i.vocab_size as u32,
            max_num_seqs: self.config.max_num_seqs as u32,
            group_id: self.config.group_id.clone(),
            kv_cache_dtype: i.kv_cache_dtype.clone(),
            add_bos: m.add_bos,
        }
    }

    /// `Err(why)` once the engine cannot serve any more (a panic in the model, a failed
    /// tensor-parallel group); it does not recover.
    pub fn healthy(&self) -> Result<(), String> {
        match &self.poisoned {
            Some(msg) => Err(msg.clone()),
            None => self.runner.healthy().map_err(|e| e.to_string()),
        }
    }

    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            healthy: self.healthy(),
            kv_blocks_free: self.runner.free_blocks(),
            num_running: self.seqs.len(),
            num_prefilling: self.seqs.values().filter(|s| !s.prefilled()).count(),
            counters: self.counters,
            runner: self.runner.stats(),
        }
    }

    /// Drops sequences (unknown ids ignored).
    pub fn release(&mut self, ids: &[u64]) -> Released {
        let mut sequences = 0;
        for &id in ids {
            if self.seqs.remove(&SeqId(id)).is_some() {
                self.counters.seqs_released += 1;
                sequences += 1;
            }
            self.runner.remove_sequence(SeqId(id));
        }
        Released {
            sequences,
            kv_blocks_free: self.runner.free_blocks(),
        }
    }

    /// Releases the sequences no `Step` has named for `idle` (their coordinator crashed
    /// or lost them) and returns their ids. A live coordinator names each of its
    /// sequences in every step, so only abandoned ones are idle for long; without this
    /// their KV blocks would stay taken until the worker restarts.
    pub fn release_idle(&mut self, now: Instant, idle: Duration) -> Vec<u64> {
        let ids: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.touched) > idle)
            .map(|(id, _)| id.0)
            .collect();
        for &id in &ids {
            self.drop_seq(SeqId(id));
        }
        self.counters.seqs_released_idle += ids.len() as u64;
        ids
    }

    /// Marks the engine failed (after a panic inside the model).
    pub fn poison(&mut self, message: String) {
        self.poisoned = Some(message);
    }

    pub fn step(&mut self, req: pb::StepRequest) -> Result<pb::StepResponse, EngineError> {
        if let Some(msg) = &self.poisoned {
            return Err(EngineError::Failed(msg.clone()));
        }
        let started = Instant::now();
        self.release(&req.release);
        let n = req.prefill.len() + req.decode.len();
        let mut results: Vec<pb::SeqResult> = Vec::with_capacity(n);
        let mut seen: HashMap<u64, ()> = HashMap::with_capacity(n);
        let mut decode_plans = Vec::new();
        let mut prefill_plans = Vec::new();

        // 1. Registration + per-sequence checks, results in request order.
        for chunk in req.prefill {
            let idx = results.len();
            results.push(ok_result(chunk.seq_id));
            if seen.insert(chunk.seq_id, ()).is_some() {
                invalid(&mut results[idx], "sequence appears twice in one step");
                continue;
            }
            let prefilled = chunk.prompt.is_empty()
                && self
                    .seqs
                    .get(&SeqId(chunk.seq_id))
                    .is_some_and(Sequence::prefilled);
            if prefilled {
                // A pipelined plan cannot know that cached prefix blocks completed this
                // prompt early: the sequence simply decodes.
                match self.plan_decode(SeqId(chunk.seq_id), idx) {
                    Ok(plan) => decode_plans.push(plan),
                    Err(msg) => invalid(&mut results[idx], msg),
                }
                continue;
            }
            match self.plan_prefill(&chunk, idx) {
                Ok(plan) => prefill_plans.push(plan),
                Err(Reject::Invalid(msg)) => invalid(&mut results[idx], msg),
                Err(Reject::NoRoom(msg)) => no_room(&mut results[idx], msg),
            }
        }
        for id in req.decode {
            let idx = results.len();
            results.push(ok_result(id));
            if seen.insert(id, ()).is_some() {
                invalid(&mut results[idx], "sequence appears twice in one step");
                continue;
            }
            match self.plan_decode(SeqId(id), idx) {
                Ok(plan) => decode_plans.push(plan),
                Err(msg) => invalid(&mut results[idx], msg),
            }
        }

        // 2. KV blocks: what each chunk fills; preempt from the last-ranked until it fits.
        let mut batch = Vec::with_capacity(decode_plans.len() + prefill_plans.len());
        let mut blocks = Vec::with_capacity(batch.capacity());
        for plan in decode_plans.into_iter().chain(prefill_plans) {
            match self.runner.blocks_needed(plan.id, plan.tokens.len()) {
                Ok(n) => {
                    batch.push(plan);
                    blocks.push(n);
                }
                Err(e) => {
                    self.drop_seq(plan.id);
                    invalid(&mut results[plan.result], e.to_string());
                }
            }
        }
        let mut needed: usize = blocks.iter().sum();
        while needed > self.runner.free_blocks() {
            let Some(victim) = (0..batch.len()).max_by_key(|&i| self.rank(batch[i].id)) else {
                break;
            };
            let plan = batch.remove(victim);
            let n = blocks.remove(victim);
            let why = format!(
                "KV cache out of blocks: the step needs {needed}, {} free",
                self.runner.free_blocks()
            );
            needed -= n;
            let priority = self.seqs.get(&plan.id).map_or(0, |s| s.cfg.priority);
            self.drop_seq(plan.id);
            let result = &mut results[plan.result];
            if plan.new {
                no_room(result, why);
            } else {
                self.counters.seqs_preempted += 1;
                tracing::info!(seq = plan.id.0, priority, reason = %why, "preempting a sequence");
                result.status = pb::SeqStatus::Preempted as i32;
                result.error = format!("preempted: {why}");
            }
        }

        // 3. One forward.
        let chunks: Vec<SeqChunk> = batch
            .iter()
            .map(|p| SeqChunk {
                id: p.id,
                tokens: p.tokens.clone(),
                logits: p.logits,
            })
            .collect();
        let batch_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let sampling: Vec<SeqId> = batch.iter().filter(|p| p.samples).map(|p| p.id).collect();
        let masks = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| sampling.contains(id))
            .filter_map(|(_, seq)| seq.constraint.as_mut())
            .collect();
        let runner = &mut self.runner;
        let forward = constraint::beside_forward(masks, || {
            (!chunks.is_empty()).then(|| runner.forward(&chunks))
        });
        let logits = match forward {
            None => Vec::new(),
            Some(forward) => match forward {
                Ok(l) => l,
                Err(e) => {
                    for p in batch.iter().filter(|p| p.new) {
                        self.drop_seq(p.id);
                    }
                    return Err(EngineError::Runner(e));
                }
            },
        };
        let mut by_id: HashMap<SeqId, ChunkLogits> =
            logits.into_iter().map(|l| (l.id, l)).collect();

        // 4. Advance, sample, finish.
        for plan in batch {
            let row_logits = by_id.remove(&plan.id);
            let result = &mut results[plan.result];
            if let Err(msg) = self.advance(&plan, row_logits, result) {
                self.drop_seq(plan.id);
                let result = &mut results[plan.result];
                result.has_token = false;
                result.token = None;
                invalid(result, msg);
            }
        }
        for r in &results {
            if let Some(seq) = self.seqs.get_mut(&SeqId(r.seq_id)) {
                seq.touched = started;
            }
        }
        if n > 0 {
            self.counters.steps += 1;
        }
        Ok(pb::StepResponse {
            results,
            kv_blocks_free: self.runner.free_blocks() as u32,
            num_running: self.seqs.len() as u32,
            step_time_ns: started.elapsed().as_nanos() as u64,
            batch_tokens: batch_tokens as u32,
        })
    }

    fn plan_prefill(&mut self, chunk: &pb::PrefillChunk, result: usize) -> Result<Planned, Reject> {
        let id = SeqId(chunk.seq_id);
        let mut new = false;
        if self.seqs.contains_key(&id) {
            if !chunk.prompt.is_empty() {
                return Err(Reject::Invalid(format!(
                    "{id} already exists; only its first chunk carries the prompt"
                )));
            }
        } else {
            self.register(chunk)?;
            new = true;
        }
        let seq = self.seqs.get(&id).expect("registered above; this is a bug");
        let remaining = seq.prompt.len() - seq.computed;
        let n = match chunk.max_tokens as usize {
            0 => remaining,
            max => remaining.min(max),
        };
        let samples = seq.computed + n == seq.prompt.len();
        let logits = if seq.cfg.prompt_logprobs {
            LogitsWanted::All
        } else if samples {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        Ok(Planned {
            id,
            result,
            tokens: seq.prompt[seq.computed..seq.computed + n].to_vec(),
            logits,
            samples,
            new,
        })
    }

    fn register(&mut self, chunk: &pb::PrefillChunk) -> Result<(), Reject> {
        let id = SeqId(chunk.seq_id);
        let info = self.runner.info();
        let (ctx, vocab) = (info.context_length, info.vocab_size);
        let prompt = &chunk.prompt;
        if prompt.is_empty() {
            return Err(Reject::Invalid(format!(
                "{id} is unknown; its first chunk must carry the prompt"
            )));
        }
        let Some(params) = &chunk.params else {
            return Err(Reject::Invalid(format!(
                "{id}: the first chunk must carry params"
            )));
        };
        if prompt.len() > ctx {
            return Err(Reject::Invalid(format!(
                "prompt of {} tokens exceeds the context length {ctx}",
                prompt.len()
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Reject::Invalid(format!(
                "prompt token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let cfg = SeqConfig::from_proto(params, prompt.len(), vocab).map_err(Reject::Invalid)?;
        let constraint = match &cfg.constraint {
            Some(c) => Some(
                self.constraints
                    .start(c, &prompt[prompt.len() - cfg.num_generated..])
                    .map_err(Reject::Invalid)?,
            ),
            None => None,
        };
        if self.seqs.len() >= self.config.max_num_seqs {
            return Err(Reject::NoRoom(format!(
                "the worker already holds max_num_seqs = {} sequences",
                self.config.max_num_seqs
            )));
        }
        // No KV blocks are reserved here: a sequence takes blocks as its chunks fill them,
        // and the step's KV budget refuses or preempts when they run out.
        // Prompt logprobs need the logits of every prompt position: no cached prefix.
        let prefix_cache = if cfg.prompt_logprobs {
            PrefixCache::Skip
        } else {
            PrefixCache::Use
        };
        let cached = match self.runner.add_sequence_with(id, prompt, prefix_cache) {
            Ok(c) => c,
            Err(e @ RunnerError::OutOfBlocks { .. }) => return Err(Reject::NoRoom(e.to_string())),
            Err(e) => return Err(Reject::Invalid(e.to_string())),
        };
        self.counters.seqs_admitted += 1;
        self.counters.prompt_tokens_cached += cached as u64;
        self.started += 1;
        let seq = Sequence::new(prompt.clone(), cfg, cached, self.started, constraint);
        self.seqs.insert(id, seq);
        Ok(())
    }

    fn plan_decode(&self, id: SeqId, result: usize) -> Result<Planned, String> {
        let seq = self
            .seqs
            .get(&id)
            .ok_or_else(|| format!("{id} is unknown (finished, released or never prefilled)"))?;
        let Some(&last) = seq.generated.last() else {
            return Err(format!(
                "{id} has {} of {} prompt tokens computed; finish its prefill first",
                seq.computed,
                seq.prompt.len()
            ));
        };
        Ok(Planned {
            id,
            result,
            tokens: vec![last],
            logits: LogitsWanted::Last,
            samples: true,
            new: false,
        })
    }

    /// Preemption order: the greater ranks later (preempted first) — a less important
    /// class, then a later start.
    fn rank(&self, id: SeqId) -> (u32, u64) {
        self.seqs
            .get(&id)
            .map_or((u32::MAX, u64::MAX), |s| (s.cfg.priority, s.started))
    }

    fn drop_seq(&mut self, id: SeqId) {
        self.seqs.remove(&id);
        self.runner.remove_sequence(id);
    }

    /// Applies a computed chunk to its sequence; samples when it ends the prompt.
    fn advance(
        &mut self,
        plan: &Planned,
        logits: Option<ChunkLogits>,
        result: &mut pb::SeqResult,
    ) -> Result<(), String> {
        let vocab = self.runner.info().vocab_size;
        let ctx = self.runner.info().context_length;
        let eos = &self.config.model.eos_token_ids;
        let seq = self
            .seqs
            .get_mut(&plan.id)
            .expect("planned sequences are live; this is a bug");
        let decoding = seq.prefilled();
        if !decoding {
            let start = seq.computed;
            seq.computed += plan.tokens.len();
            self.counters.prompt_tokens_computed += plan.tokens.len() as u64;
            if seq.cfg.prompt_logprobs {
                let l = check_rows(logits.as_ref(), plan.tokens.len(), vocab)?;
                prompt_logprobs(seq, start, l, vocab);
            }
        }
        result.prompt_computed = seq.computed as u32;
        result.cached_tokens = seq.cached as u32;
        if !plan.samples {
            return Ok(());
        }
        let rows = if plan.logits == LogitsWanted::All {
            plan.tokens.len()
        } else {
            1
        };
        let l = check_rows(logits.as_ref(), rows, vocab)?;
        let row = &l.data[(rows - 1) * vocab..rows * vocab];
        let index = seq.total_generated() as u64;
        let banned = seq.banned(eos);
        let allowed = match &mut seq.constraint {
            Some(c) => Some(c.allowed_tokens().map_err(|e| e.to_string())?.words()),
            None => None,
        };
        let filter = sampler::TokenFilter {
            banned: &banned,
            allowed,
        };
        let s = match sampler::sample(
            row,
            &seq.cfg.sampling,
            &seq.penalties,
            &filter,
            index,
            seq.cfg.logprobs,
        ) {
            Ok(s) => s,
            // The grammar admits only tokens that are banned now (its end, under
            // `min_tokens`): the constrained output is complete as it is.
            Err(sampler::SamplerError::NoCandidate) if allowed.is_some() => {
                result.finish_reason = pb::FinishReason::Stop as i32;
                self.drop_seq(plan.id);
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        result.has_token = true;
        result.token = Some(token_logprob(s.token, s.logprob, &s.top));
        if !seq.prompt_logprobs.is_empty() {
            result.prompt_logprobs = std::mem::take(&mut seq.prompt_logprobs);
        }
        self.counters.tokens_generated += 1;
        if let Some(reason) = seq.push(s.token, eos, ctx)? {
            result.finish_reason = reason as i32;
            self.drop_seq(plan.id);
        }
        Ok(())
    }
}

enum Reject {
    Invalid(String),
    NoRoom(String),
}

fn ok_result(id: u64) -> pb::SeqResult {
    pb::SeqResult {
        seq_id: id,
        status: pb::SeqStatus::Ok as i32,
        ..Default::default()
    }
}

fn invalid(r: &mut pb::SeqResult, msg: impl Into<String>) {
    r.status = pb::SeqStatus::Invalid as i32;
    r.error = msg.into();
}

fn no_room(r: &mut pb::SeqResult, msg: impl Into<String>) {
    r.status = pb::SeqStatus::OutOfBlocks as i32;
    r.error = msg.into();
}

fn check_rows(l: Option<&ChunkLogits>, rows: usize, vocab: usize) -> Result<&ChunkLogits, String> {
    let l = l.ok_or("the model returned no logits for this sequence")?;
    if l.rows != rows || l.data.len() != rows * vocab {
        return Err(format!(
            "the model returned {} logits rows ({} floats), expected {rows} x {vocab}",
            l.rows,
            l.data.len()
        ));
    }
    Ok(l)
}

fn token_logprob(token: u32, logprob: f32, top: &[(u32, f32)]) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token_id: token,
        logprob,
        top: top
            .iter()
            .map(|&(token_id, logprob)| pb::TopLogprob { token_id, logprob })
            .collect(),
    }
}

/// Logprobs of the prompt tokens this chunk's rows predict. Row `j` (position
/// `start + j`) predicts prompt token `start + j + 1`. Sequences that want prompt
/// logprobs never take a cached prefix, so every position has its row.
fn prompt_logprobs(seq: &mut Sequence, start: usize, l: &ChunkLogits, vocab: usize) {
    for j in 0..l.rows {
        let Some(&next) = seq.prompt.get(start + j + 1) else {
            break;
        };
        let row = &l.data[j * vocab..(j + 1) * vocab];
        let (logprob, top) = sampler::logprobs(row, next, seq.cfg.logprobs.unwrap_or(0));
        seq.prompt_logprobs.push(token_logprob(next, logprob, &top));
    }
}
