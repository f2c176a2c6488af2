//! What travels between the front ends and the schedulers: the validated request
//! ([`ValidRequest`]), the queue entry a scheduler owns ([`Entry`]) and the events a
//! scheduler sends back to the request's owner ([`SeqEvent`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shardline_proto::worker::kv_blocks_demand;
use shardline_proto::worker::v1::{SequenceParams, TokenLogprob};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::trace::Phases;

/// Scheduling class; lower value runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    High = 0,
    #[default]
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Priority::High),
            "normal" | "" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A request that passed validation and admission: tokenized, bounded, ready to queue.
/// With `n` > 1 each choice runs as its own copy (its own seed).
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// Public id (`cmpl-…`), also used in logs.
    pub id: String,
    pub prompt: Vec<u32>,
    /// Sampling and limits as the worker takes them (`num_generated` = 0 here).
    pub params: SequenceParams,
    pub stop: Vec<String>,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    /// `Some(k)`: return logprobs with `k` alternatives.
    pub logprobs: Option<u32>,
    /// Completions `echo`: prepend the prompt (and its logprobs).
    pub echo: bool,
    /// `max_tokens` as the client asked (0 = score the prompt only).
    pub max_tokens: u32,
    pub arrival: Instant,
    /// Choices to generate (`n`).
    pub n: u32,
    /// Set when the output may hold tool calls to read back.
    pub tool_calling: Option<crate::tools::ToolCalling>,
    /// The request's span (see [`crate::trace`]): its phases, its worker steps and its
    /// log lines hang off it. Lives as long as the request does.
    pub span: tracing::Span,
    /// The tenant's metric label (bounded, see [`crate::metrics::Metrics::tenant_label`]).
    pub tenant_label: String,
}

/// What a scheduler tells a request's owner.
#[derive(Debug)]
pub enum SeqEvent {
    /// The prompt is computed (sent once per group the request ran on; the owner keeps
    /// the first).
    Prefilled {
        cached_tokens: u32,
        prompt_logprobs: Vec<TokenLogprob>,
    },
    /// Generated tokens in order, handed over together (see [`Outbox`]); `finish` set
    /// when the last of them ends the sequence. The first token of a placement comes
    /// alone and carries where its wait went (`first`).
    Tokens {
        tokens: Vec<Generated>,
        finish: Option<Finish>,
        first: Option<Timing>,
    },
    /// The sequence ended without a further token (e.g. `max_tokens: 0`).
    Finished(Finish),
    Error(ApiError),
}

/// One generated token and when its step's answer reached the coordinator (the
/// inter-token latency is measured between these, not between hand-overs).
#[derive(Debug, Clone)]
pub struct Generated {
    pub token: TokenLogprob,
    pub received: Instant,
}

/// The scheduler's end of the channel to a request's owner
/// ([`crate::generation::Generation`]). Generated tokens are held and handed over
/// together, one hand-over per `--stream-interval` tokens, so the owner's task (and the
/// front end's connection under it) is woken once per event the client gets rather than
/// once per token. The first token of each placement goes at once, and so does the last;
/// any other event first hands over what is held, and so does [`Outbox::flush`], called
/// whenever the request leaves its group's running batch (finished, preempted, failed
/// over, expired). Dropping the outbox flushes it too: nothing generated is kept back.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<SeqEvent>,
    held: Vec<Generated>,
    /// Tokens per hand-over (`--stream-interval`, at least 1).
    every: usize,
}

impl Outbox {
    pub fn new(tx: mpsc::UnboundedSender<SeqEvent>, every: u32) -> Outbox {
        Outbox {
            tx,
            held: Vec::new(),
            every: every.max(1) as usize,
        }
    }

    /// Sends `event` after the tokens held.
    pub fn send(&mut self, event: SeqEvent) {
        self.flush();
        let _ = self.tx.send(event);
    }

    /// Adds a generated token; hands the held ones over when this is the first of a
    /// placement (`first`), the last (`finish`) or the `every`-th held.
    pub fn token(&mut self, token: Generated, finish: Option<Finish>, first: Option<Timing>) {
        self.held.push(token);
        if finish.is_some() || first.is_some() || self.held.len() >= self.every {
            self.hand_over(finish, first);
        }
    }

    /// Hands over the tokens held.
    pub fn flush(&mut self) {
        if !self.held.is_empty() {
            self.hand_over(None, None);
        }
    }

    fn hand_over(&mut self, finish: Option<Finish>, first: Option<Timing>) {
        let _ = self.tx.send(SeqEvent::Tokens {
            tokens: std::mem::take(&mut self.held),
            finish,
            first,
        });
    }

    /// A sender for events outside the scheduler (a failed migration's error).
    pub fn sender(&self) -> mpsc::UnboundedSender<SeqEvent> {
        self.tx.clone()
    }

    /// The owner is gone (client disconnected, or the output ended).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Where a request's time to its first token went, stamped by its group's scheduler, so
/// the coordinator's own share can be told apart from waiting and from the worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Handed to a scheduler (validation, tokenization, admission and routing are done).
    pub submitted: Option<Instant>,
    /// First sent to the worker in a step: the wait before it is for the step in flight,
    /// the per-step token budget or a sequence slot.
    pub scheduled: Option<Instant>,
    /// The worker's own time (its `step_time_ns`) for the steps that carried the
    /// sequence up to its first token.
    pub worker: std::time::Duration,
    /// The step response with the first token arrived.
    pub received: Option<Instant>,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// A worker-side sequence id: random high bits per process so coordinators sharing a
/// group do not collide, a counter below.
pub fn next_seq_id() -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| rand::random::<u64>() & 0xffff_ff00_0000_0000);
    base | (NEXT_SEQ.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff_ffff_ffff)
}

/// A request as a scheduler queues and runs it. Survives migration between groups:
/// `generated` holds every token already sent to the client.
#[derive(Debug)]
pub struct Entry {
    pub request: Arc<ValidRequest>,
    /// Worker sequence id for the current placement.
    pub seq_id: u64,
    /// Events to the request's owner.
    pub out: Outbox,
    pub generated: Vec<u32>,
    /// How many times this request moved to another group.
    pub migrations: u32,
    /// Stamps for the time-to-first-token breakdown (current placement).
    pub timing: Timing,
    /// Spans of the phase the request is in on its current group.
    pub phases: Phases,
    /// The arithmetic of the group it was first placed on ([`crate::groups::ModelInfo`]'s
    /// `numerics`): where it continues after a migration.
    pub numerics: Option<Arc<str>>,
}

impl Entry {
    /// A queue entry handing tokens over one by one (see [`Entry::stream_interval`]).
    pub fn new(request: Arc<ValidRequest>, tx: mpsc::UnboundedSender<SeqEvent>) -> Entry {
        Entry {
            request,
            seq_id: next_seq_id(),
            out: Outbox::new(tx, 1),
            generated: Vec::new(),
            migrations: 0,
            timing: Timing::default(),
            phases: Phases::default(),
            numerics: None,
        }
    }

    /// Hands generated tokens over `tokens` at a time (`--stream-interval`); see
    /// [`Outbox`].
    pub fn stream_interval(mut self, tokens: u32) -> Entry {
        self.out.every = tokens.max(1) as usize;
        self
    }

    /// Prompt to send to a worker: the original prompt plus what was already generated.
    pub fn worker_prompt(&self) -> Vec<u32> {
        let mut p = self.request.prompt.clone();
        p.extend_from_slice(&self.generated);
        p
    }

    pub fn worker_params(&self) -> SequenceParams {
        let mut params = self.request.params.clone();
        params.num_generated = self.generated.len() as u32;
        if !self.generated.is_empty() {
            // Prompt logprobs were already delivered on the first placement.
            params.prompt_logprobs = false;
        }
        params
    }

    /// Prompt length on the worker.
    pub fn prompt_len(&self) -> usize {
        self.request.prompt.len() + self.generated.len()
    }

    /// KV blocks the sequence needs at most on a group with `limits` (the rule the
    /// worker reserves by, `kv_blocks_demand`).
    pub fn blocks_needed(&self, limits: &crate::queue::Limits) -> u32 {
        let params = SequenceParams {
            max_new_tokens: self.request.params.max_new_tokens,
            num_generated: self.generated.len() as u32,
            ..Default::default()
        };
        kv_blocks_demand(
            self.prompt_len(),
            &params,
            limits.context_length,
            limits.block_size as usize,
        ) as u32
    }

    /// KV blocks the sequence fills when it starts: its prompt (generated tokens of an
    /// earlier placement included) and the first token it samples.
    pub fn prompt_blocks(&self, limits: &crate::queue::Limits) -> u32 {
        (self.prompt_len() + 1).div_ceil(limits.block_size.max(1) as usize) as u32
    }

    /// Blocks the sequence needs to start under `limits.kv_admission`: its worst case,
    /// or on demand its prompt (and the first generated token).
    pub fn start_blocks(&self, limits: &crate::queue::Limits) -> u32 {
        match limits.kv_admission {
            crate::config::KvAdmission::WorstCase => self.blocks_needed(limits),
            crate::config::KvAdmission::OnDemand => self.prompt_blocks(limits),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.out.is_closed()
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.request.deadline.is_some_and(|d| now >= d)
    }
}
