//! The pure state of one group's scheduler: the priority queues of waiting requests and
//! the running batch. [`State::next_step`] decides one iteration (which decodes, which
//! prefill chunks, which new admissions) and [`State::apply`] folds the worker's answer
//! back in. No I/O and no runtime, so it is unit-tested directly.
//!
//! KV budget (`--kv-admission`). **On demand** (the default): a request starts when the
//! blocks of its prompt fit in what the worker last reported free, less the prompt
//! blocks the running sequences still have to fill, keeping a watermark free for the
//! running ones to grow into; `max_tokens` limits length and reserves nothing. When a
//! step runs out of blocks anyway the worker preempts (PREEMPTED: the least important,
//! most recently started sequence of the step) or refuses a new sequence
//! (OUT_OF_BLOCKS); either way the sequence goes back to the *front* of its queue with
//! the tokens it already has and is prefilled again later, prompt + generated — the
//! migration path, byte-identical thanks to batch-invariant numerics. **Worst case**: a
//! request starts only when its prompt + `max_tokens` (capped by the context) fits next
//! to the reservations of the running batch, so this coordinator never makes a worker
//! run out; the same requeue covers other coordinators sharing the group.
//!
//! Head-of-line blocking: a request that does not fit is skipped so smaller ones behind
//! it can run, but only [`MAX_HEAD_SKIPS`] times; then admission pauses until it fits.
//!
//! Pipelining: the scheduler plans step N+1 before step N's answer is back, so planning
//! runs ahead of the worker's answers. A sequence's next prefill chunk starts where the
//! chunks already sent end (`planned`), a sequence whose last prompt chunk was sent
//! decodes in the next plan, and a sequence gets no more decodes than it can still
//! generate (`max_tokens` minus tokens received minus tokens in flight). What a plan
//! cannot know (an EOS sampled in step N, cached prefix blocks that completed a prompt
//! early, a sequence refused for KV room) the worker and [`State::apply`] sort out: a
//! result for a sequence that is no longer running is ignored.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::KvAdmission;

use shardline_proto::worker::v1::{
    FinishReason, PrefillChunk, SeqStatus, StepRequest, StepResponse,
};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::request::{Entry, Finish, Generated, SeqEvent, Timing};

/// Times the oldest highest-priority request may be overtaken before admission waits for it.
pub const MAX_HEAD_SKIPS: u32 = 32;
/// Waiting requests looked at per iteration.
const MAX_SCAN: usize = 256;

/// Limits of one group.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub block_size: u32,
    pub total_blocks: u32,
    /// The worker's context length (caps a sequence's KV demand; 0 = unknown).
    pub context_length: usize,
    pub kv_admission: KvAdmission,
    /// Blocks kept free for running sequences when admitting on demand.
    pub watermark_blocks: u32,
}

/// How long after the worker refused a new sequence for KV room an otherwise idle
/// scheduler waits before trying again without fresher figures (another coordinator
/// holds the blocks; only its sequences ending frees them).
const REFUSED_BACKOFF: Duration = Duration::from_millis(50);

/// A sequence placed on the worker.
#[derive(Debug)]
pub struct Running {
    pub entry: Entry,
    /// Prompt tokens the worker reports computed (cached included).
    pub computed: usize,
    /// The first chunk (with prompt and params) was sent.
    pub started: bool,
    /// Prompt length on the worker for this placement (the request's prompt plus the
    /// tokens generated before it; fixed while `entry.generated` grows).
    pub prompt_len: usize,
    /// Prompt tokens in the chunks sent so far (ahead of `computed` while in flight).
    pub planned: usize,
    /// Tokens the steps in flight will sample for it.
    pub in_flight: usize,
    /// The prompt is done and a token was sampled: the sequence decodes now.
    pub decoding: bool,
    pub reserved: u32,
    /// `Prefilled` was sent on this placement.
    pub announced: bool,
}

/// What an iteration removed without running it.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Running sequences to `Release` on the worker (client gone or deadline passed).
    pub release: Vec<u64>,
    /// Requests that left the queue (cancelled or expired) without reaching the worker.
    pub dropped_waiting: usize,
    pub expired_waiting: usize,
}

/// A finished or failed sequence, for metrics.
#[derive(Debug, Default)]
pub struct Applied {
    pub tokens: usize,
    pub finished: Vec<Entry>,
    pub requeued: usize,
    /// Running sequences the worker preempted (also counted in `requeued`).
    pub preempted: usize,
    /// Prompts whose prefill completed: their tokens, and how many of those the worker
    /// took from its prefix cache.
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Debug)]
pub struct State {
    pub limits: Limits,
    waiting: [VecDeque<Entry>; 3],
    pub running: Vec<Running>,
    reserved: u32,
    head_skips: u32,
    /// Free blocks in the worker's last answer.
    reported_free: u32,
    /// When the worker last refused a new sequence for KV room.
    refused_at: Option<Instant>,
}

impl Running {
    /// Whether another decode may still produce a token: the request's `max_tokens`
    /// minus the tokens received and the ones the steps in flight will bring.
    fn can_sample_more(&self) -> bool {
        let max = self.entry.request.params.max_new_tokens as usize;
        max == 0 || self.entry.generated.len() + self.in_flight < max
    }
}

impl State {
    pub fn new(limits: Limits) -> State {
        State {
            limits,
            waiting: Default::default(),
            running: Vec::new(),
            reserved: 0,
            head_skips: 0,
            reported_free: limits.total_blocks,
            refused_at: None,
        }
    }

    pub fn push(&mut self, entry: Entry) {
        self.waiting[entry.request.priority as usize].push_back(entry);
    }

    fn push_front(&mut self, entry: Entry) {
        self.waiting[entry.request.priority as usize].push_front(entry);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    /// Blocks the running sequences hold or are sure to take: their reservations under
    /// worst-case admission; on demand, what the worker does not report free plus the
    /// prompt blocks still to fill.
    pub fn reserved_blocks(&self) -> u32 {
        match self.limits.kv_admission {
            KvAdmission::WorstCase => self.reserved,
            KvAdmission::OnDemand => {
                let free = self.free_estimate().max(0) as u32;
                self.limits.total_blocks.saturating_sub(free)
            }
        }
    }

    /// Blocks the waiting requests will need to start.
    pub fn waiting_blocks(&self) -> u32 {
        self.waiting
            .iter()
            .flatten()
            .map(|e| e.start_blocks(&self.limits))
            .sum()
    }

    /// On demand: the blocks the worker last reported free, less the prompt blocks the
    /// running sequences still have to fill (those started since that report included).
    pub fn free_estimate(&self) -> i64 {
        let bs = self.limits.block_size.max(1) as usize;
        let pending: usize = self
            .running
            .iter()
            .map(|r| {
                let at_start = (r.prompt_len + 1).div_ceil(bs);
                at_start.saturating_sub(r.computed.div_ceil(bs))
            })
            .sum();
        i64::from(self.reported_free) - pending as i64
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.num_waiting() == 0
    }

    /// Earliest deadline among waiting requests (to wake up for it).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .flatten()
            .filter_map(|e| e.request.deadline)
            .min()
    }

    /// Removes cancelled and expired requests. Expired ones get DEADLINE_EXCEEDED.
    pub fn sweep(&mut self, now: Instant) -> Sweep {
        let mut sweep = Sweep::default();
        for queue in &mut self.waiting {
            queue.retain_mut(|e| {
                if e.is_cancelled() {
                    sweep.dropped_waiting += 1;
                    false
                } else if e.expired(now) {
                    e.out
                        .send(SeqEvent::Error(ApiError::DeadlineExceeded(" while queued")));
                    sweep.dropped_waiting += 1;
                    sweep.expired_waiting += 1;
                    false
                } else {
                    true
                }
            });
        }
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            let gone = r.entry.is_cancelled();
            if gone || r.entry.expired(now) {
                if !gone {
                    r.entry
                        .out
                        .send(SeqEvent::Error(ApiError::DeadlineExceeded("")));
                }
                let r = self.remove_running(i);
                if r.started {
                    sweep.release.push(r.entry.seq_id);
                }
            } else {
                i += 1;
            }
        }
        sweep
    }

    /// Plans one iteration; `None` when there is nothing to run. It may run while earlier
    /// steps are in flight (see the module docs).
    pub fn next_step(&mut self) -> Option<StepRequest> {
        let mut budget = self.limits.max_batched_tokens;
        let mut step = StepRequest::default();
        for r in &mut self.running {
            if r.started && r.planned >= r.prompt_len && budget > 0 && r.can_sample_more() {
                step.decode.push(r.entry.seq_id);
                r.in_flight += 1;
                budget -= 1;
            }
        }
        for r in &mut self.running {
            let prompt_len = r.prompt_len;
            if r.started && r.planned < prompt_len && budget > 0 {
                let chunk = (prompt_len - r.planned).min(budget);
                r.entry.phases.chunk();
                step.prefill.push(PrefillChunk {
                    seq_id: r.entry.seq_id,
                    max_tokens: chunk as u32,
                    ..Default::default()
                });
                r.planned += chunk;
                if r.planned >= prompt_len {
                    r.in_flight += 1; // the last chunk samples the first token
                }
                budget -= chunk;
            }
        }
        self.admit(&mut budget, &mut step);
        (!step.decode.is_empty() || !step.prefill.is_empty()).then_some(step)
    }

    fn admit(&mut self, budget: &mut usize, step: &mut StepRequest) {
        let mut scanned = 0;
        let mut is_head = true;
        let mut free = self.free_estimate();
        let watermark = i64::from(self.limits.watermark_blocks);
        // With nothing running, the worker's figures may be stale (another coordinator's
        // sequences ended): try the head anyway, unless it was just refused.
        let may_probe = self.running.is_empty()
            && self
                .refused_at
                .is_none_or(|t| t.elapsed() >= REFUSED_BACKOFF);
        'classes: for class in 0..self.waiting.len() {
            let mut i = 0;
            while i < self.waiting[class].len() {
                if *budget == 0
                    || self.running.len() >= self.limits.max_num_seqs
                    || scanned >= MAX_SCAN
                {
                    break 'classes;
                }
                scanned += 1;
                let need = self.waiting[class][i].start_blocks(&self.limits);
                let fits = match self.limits.kv_admission {
                    KvAdmission::WorstCase => self.reserved + need <= self.limits.total_blocks,
                    KvAdmission::OnDemand => {
                        free - i64::from(need) >= watermark
                            || (may_probe && self.running.is_empty())
                    }
                };
                if !fits {
                    if is_head {
                        self.head_skips += 1;
                        if self.head_skips > MAX_HEAD_SKIPS {
                            break 'classes;
                        }
                    }
                    is_head = false;
                    i += 1;
                    continue;
                }
                if is_head {
                    self.head_skips = 0;
                }
                is_head = false;
                let mut entry = self.waiting[class]
                    .remove(i)
                    .expect("index checked above; this is a bug");
                entry.timing.scheduled = Some(Instant::now());
                let prompt_len = entry.prompt_len();
                let chunk = prompt_len.clamp(1, *budget);
                *budget -= chunk;
                entry.phases.scheduled(&entry.request.span, prompt_len);
                entry.phases.chunk();
                step.prefill.push(PrefillChunk {
                    seq_id: entry.seq_id,
                    prompt: entry.worker_prompt(),
                    params: Some(entry.worker_params()),
                    max_tokens: chunk as u32,
                    traceparent: shardline_telemetry::traceparent(&entry.request.span)
                        .unwrap_or_default(),
                });
                self.reserved += need;
                free -= i64::from(need);
                self.running.push(Running {
                    entry,
                    computed: 0,
                    started: true,
                    prompt_len,
                    planned: chunk,
                    in_flight: usize::from(chunk >= prompt_len),
                    decoding: false,
                    reserved: need,
                    announced: false,
                });
            }
        }
    }

    /// Steps in flight name no sequence any more: after a failed stream, nothing that was
    /// planned will be answered.
    pub fn forget_in_flight(&mut self) {
        for r in &mut self.running {
            r.in_flight = 0;
            r.planned = r.computed;
        }
    }

    /// Takes a sequence out of the running batch; the tokens its outbox held go to the
    /// client now.
    fn remove_running(&mut self, index: usize) -> Running {
        let mut r = self.running.swap_remove(index);
        r.entry.out.flush();
        self.reserved -= r.reserved;
        r
    }

    /// Folds a step's results in: sends tokens to their requests, drops finished ones.
    pub fn apply(&mut self, response: &StepResponse) -> Applied {
        let received = Instant::now();
        let mut applied = Applied::default();
        self.reported_free = response.kv_blocks_free;
        for result in &response.results {
            let Some(index) = self
                .running
                .iter()
                .position(|r| r.entry.seq_id == result.seq_id)
            else {
                continue; // released meanwhile
            };
            match SeqStatus::try_from(result.status).unwrap_or(SeqStatus::Unspecified) {
                status @ (SeqStatus::OutOfBlocks | SeqStatus::Preempted) => {
                    let mut r = self.remove_running(index);
                    if status == SeqStatus::Preempted {
                        applied.preempted += 1;
                        tracing::info!(
                            id = %r.entry.request.id,
                            tokens_kept = r.entry.generated.len(),
                            reason = %result.error,
                            "request preempted; it goes back to the front of its queue"
                        );
                    } else {
                        self.refused_at = Some(received);
                    }
                    let why = if status == SeqStatus::Preempted {
                        "the worker preempted it for KV blocks"
                    } else {
                        "the worker had no KV blocks for it"
                    };
                    r.entry.phases.end(Some(why));
                    // Continued later as prompt + generated tokens, under a new id (steps
                    // still in flight name the old one; their answers are ignored).
                    r.entry.seq_id = crate::request::next_seq_id();
                    self.push_front(r.entry);
                    applied.requeued += 1;
                    continue;
                }
                SeqStatus::Invalid => {
                    let mut r = self.remove_running(index);
                    r.entry.phases.end(Some("the worker rejected it"));
                    r.entry.out.send(SeqEvent::Error(ApiError::Invalid {
                        param: None,
                        message: format!("worker rejected the sequence: {}", result.error),
                    }));
                    applied.finished.push(r.entry);
                    continue;
                }
                SeqStatus::Ok | SeqStatus::Unspecified => {}
            }
            let finish = match FinishReason::try_from(result.finish_reason)
                .unwrap_or(FinishReason::Unspecified)
            {
                FinishReason::Stop => Some(Finish::Stop),
                FinishReason::Length => Some(Finish::Length),
                FinishReason::Unspecified => None,
            };
            let r = &mut self.running[index];
            if !r.decoding {
                r.entry.timing.worker += Duration::from_nanos(response.step_time_ns);
            }
            r.computed = r.computed.max(result.prompt_computed as usize);
            // Cached prefix blocks may complete a prompt before the chunks planned for it.
            r.planned = r.planned.max(r.computed);
            if result.has_token {
                r.in_flight = r.in_flight.saturating_sub(1);
            }
            let prompt_done = result.has_token || finish.is_some() || r.computed >= r.prompt_len;
            if prompt_done && !r.announced {
                r.announced = true;
                applied.prompt_tokens += r.prompt_len;
                applied.cached_tokens += result.cached_tokens as usize;
                r.entry
                    .phases
                    .prefilled(&r.entry.request.span, result.cached_tokens);
                r.entry.out.send(SeqEvent::Prefilled {
                    cached_tokens: result.cached_tokens,
                    prompt_logprobs: result.prompt_logprobs.clone(),
                });
            }
            if result.has_token {
                let token = result.token.clone().unwrap_or_default();
                r.entry.generated.push(token.token_id);
                let first = (!r.decoding).then_some(Timing {
                    received: Some(received),
                    ..r.entry.timing
                });
                r.decoding = true;
                r.entry.phases.token(response.results.len());
                applied.tokens += 1;
                r.entry
                    .out
                    .token(Generated { token, received }, finish, first);
            } else if let Some(finish) = finish {
                r.entry.out.send(SeqEvent::Finished(finish));
            }
            if finish.is_some() {
                let mut entry = self.remove_running(index).entry;
                entry.phases.end(None);
                applied.finished.push(entry);
            }
        }
        applied
    }

    /// Takes every request out (the group failed): they keep their generated tokens so
    /// another group can continue them.
    pub fn drain(&mut self) -> Vec<Entry> {
        self.reserved = 0;
        let mut out: Vec<Entry> = self
            .running
            .drain(..)
            .map(|mut r| {
                r.entry.out.flush();
                r.entry
            })
            .collect();
        for queue in &mut self.waiting {
            out.extend(queue.drain(..));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shardline_proto::worker::v1::{SeqResult, SequenceParams, TokenLogprob};
    use tokio::sync::mpsc;

    use super::*;
    use crate::request::{Priority, ValidRequest};

    fn entry(
        prompt: usize,
        max_tokens: u32,
        priority: Priority,
    ) -> (Entry, mpsc::UnboundedReceiver<SeqEvent>) {
        let request = ValidRequest {
            id: "t".into(),
            prompt: vec![7; prompt],
            params: SequenceParams {
                max_new_tokens: max_tokens,
                ..Default::default()
            },
            stop: vec![],
            priority,
            deadline: None,
            logprobs: None,
            echo: false,
            max_tokens,
            arrival: Instant::now(),
            n: 1,
            tool_calling: None,
            span: tracing::Span::none(),
            tenant_label: String::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        (Entry::new(Arc::new(request), tx), rx)
    }

    fn limits() -> Limits {
        Limits {
            max_num_seqs: 4,
            max_batched_tokens: 16,
            block_size: 4,
            total_blocks: 100,
            context_length: 0,
            kv_admission: KvAdmission::WorstCase,
            watermark_blocks: 0,
        }
    }

    /// A result that is only a status (preempted, out of blocks, rejected).
    pub(super) fn status(seq_id: u64, status: SeqStatus) -> SeqResult {
        SeqResult {
            seq_id,
            status: status as i32,
            ..Default::default()
        }
    }

    fn ok(seq_id: u64, computed: u32, token: Option<u32>, finish: FinishReason) -> SeqResult {
        SeqResult {
            seq_id,
            status: SeqStatus::Ok as i32,
            prompt_computed: computed,
            has_token: token.is_some(),
            token: token.map(|t| TokenLogprob {
                token_id: t,
                ..Default::default()
            }),
            finish_reason: finish as i32,
            ..Default::default()
        }
    }

    #[test]
    fn first_token_carries_the_ttft_breakdown_and_later_tokens_do_not() {
        let mut s = State::new(limits());
        // A 20-token prompt takes two steps (budget 16); each reports 3 ms of worker time.
        let (mut e, mut rx) = entry(20, 10, Priority::Normal);
        e.timing.submitted = Some(Instant::now());
        let id = e.seq_id;
        s.push(e);
        let step_ns = 3_000_000;
        for (computed, token) in [(16, None), (20, Some(5)), (21, Some(6))] {
            s.next_step().unwrap();
            s.apply(&StepResponse {
                results: vec![ok(id, computed, token, FinishReason::Unspecified)],
                step_time_ns: step_ns,
                ..Default::default()
            });
        }
        let mut firsts = vec![];
        while let Ok(ev) = rx.try_recv() {
            if let SeqEvent::Tokens { first, .. } = ev {
                firsts.push(first);
            }
        }
        assert_eq!(firsts.len(), 2);
        let t = firsts[0].expect("the first token has its timing");
        assert!(t.submitted.is_some() && t.scheduled >= t.submitted);
        assert!(t.received >= t.scheduled);
        // Both prefill steps count as the worker's time; the decode step after does not.
        assert_eq!(t.worker, Duration::from_nanos(2 * step_ns));
        assert!(firsts[1].is_none());
    }

    /// The tokens each event to the request's owner carries, `None` for other events.
    fn handed_over(rx: &mut mpsc::UnboundedReceiver<SeqEvent>) -> Vec<Option<Vec<u32>>> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|ev| match ev {
                SeqEvent::Tokens { tokens, .. } => {
                    Some(tokens.iter().map(|t| t.token.token_id).collect())
                }
                _ => None,
            })
            .collect()
    }

    /// With a stream interval of 3 the owner is woken once per three tokens: the first
    /// token alone, then three at a time, and whatever is held goes before the request
    /// leaves the batch (here a preemption) and with the last token.
    #[test]
    fn tokens_are_handed_over_once_per_stream_interval() {
        let mut s = State::new(limits());
        let (e, mut rx) = entry(2, 20, Priority::Normal);
        let mut e = e.stream_interval(3);
        e.timing.submitted = Some(Instant::now());
        let mut id = e.seq_id;
        s.push(e);
        let step = |s: &mut State, id: u64, computed: u32, token: u32, finish: FinishReason| {
            s.next_step().unwrap();
            s.apply(&StepResponse {
                results: vec![ok(id, computed, Some(token), finish)],
                kv_blocks_free: 100,
                ..Default::default()
            })
        };
        for t in 1..=6 {
            step(&mut s, id, 2 + t - 1, t, FinishReason::Unspecified);
        }
        // Prefilled, [1], [2, 3, 4]; 5 and 6 held.
        assert_eq!(
            handed_over(&mut rx),
            [None, Some(vec![1]), Some(vec![2, 3, 4])]
        );
        s.next_step().unwrap();
        s.apply(&StepResponse {
            results: vec![status(id, SeqStatus::Preempted)],
            kv_blocks_free: 100,
            ..Default::default()
        });
        assert_eq!(handed_over(&mut rx), [Some(vec![5, 6])]);
        // Continued: the new placement's first token goes at once, the last with the rest.
        id = s.waiting[Priority::Normal as usize][0].seq_id;
        step(&mut s, id, 8, 7, FinishReason::Unspecified);
        step(&mut s, id, 9, 8, FinishReason::Unspecified);
        let applied = step(&mut s, id, 10, 9, FinishReason::Length);
        assert_eq!(applied.finished.len(), 1);
        assert_eq!(
            handed_over(&mut rx),
            [None, Some(vec![7]), Some(vec![8, 9])]
        );
    }

    fn on_demand(total_blocks: u32, watermark_blocks: u32) -> Limits {
        Limits {
            max_num_seqs: 64,
            max_batched_tokens: 10_000,
            block_size: 4,
            total_blocks,
            context_length: 4096,
            kv_admission: KvAdmission::OnDemand,
            watermark_blocks,
        }
    }

    /// Requests without `max_tokens` (worst case: the whole 4096-token context, 1024
    /// blocks) all start at once on demand: each needs only its prompt's blocks.
    #[test]
    fn on_demand_starts_requests_by_their_prompt_blocks() {
        let mut s = State::new(on_demand(100, 1));
        let mut rx = vec![];
        for _ in 0..8 {
            let (e, r) = entry(7, 0, Priority::Normal); // 2 blocks with the first token
            s.push(e);
            rx.push(r);
        }
        let step = s.next_step().unwrap();
        assert_eq!(step.prefill.len(), 8);
        assert_eq!(s.free_estimate(), 100 - 16);
        assert_eq!(s.reserved_blocks(), 16);
        // The same requests under worst-case admission: not even one fits next to another.
        let mut w = State::new(Limits {
            kv_admission: KvAdmission::WorstCase,
            total_blocks: 2000,
            ..on_demand(100, 1)
        });
        for _ in 0..8 {
            let (e, r) = entry(7, 0, Priority::Normal);
            w.push(e);
            rx.push(r);
        }
        assert_eq!(w.next_step().unwrap().prefill.len(), 1);
    }

    /// Admission keeps the watermark free, counting what the worker reported and the
    /// prompt blocks the running sequences still have to fill.
    #[test]
    fn on_demand_keeps_the_watermark_free() {
        let mut s = State::new(on_demand(10, 2));
        let (a, _ra) = entry(11, 0, Priority::Normal); // 3 blocks
        let a_id = a.seq_id;
        s.push(a);
        assert_eq!(s.next_step().unwrap().prefill.len(), 1);
        let (b, _rb) = entry(11, 0, Priority::Normal);
        s.push(b);
        // 10 reported free - 3 pending for a - 3 for b = 4 >= 2: b starts.
        assert_eq!(s.next_step().unwrap().prefill.len(), 1);
        // The worker says 4 are free after both prompts: a third does not start (4-3 < 2).
        s.apply(&StepResponse {
            results: vec![ok(a_id, 11, Some(1), FinishReason::Unspecified)],
            kv_blocks_free: 4,
            ..Default::default()
        });
        let (c, _rc) = entry(11, 0, Priority::Normal);
        s.push(c);
        let step = s.next_step().unwrap();
        assert!(step.prefill.iter().all(|p| p.prompt.is_empty()), "{step:?}");
        assert_eq!(s.num_waiting(), 1);
    }

    /// A preempted request goes back to the front of its class with the tokens it has,
    /// under a new id, and starts again as prompt + generated tokens.
    #[test]
    fn a_preempted_request_is_requeued_at_the_front_with_its_tokens() {
        let mut s = State::new(on_demand(100, 0));
        let (a, mut rx) = entry(3, 0, Priority::Normal);
        let a_id = a.seq_id;
        s.push(a);
        s.next_step().unwrap();
        s.apply(&StepResponse {
            results: vec![ok(a_id, 3, Some(40), FinishReason::Unspecified)],
            kv_blocks_free: 99,
            ..Default::default()
        });
        let (newer, _rn) = entry(2, 0, Priority::Normal);
        s.push(newer);
        let applied = s.apply(&StepResponse {
            results: vec![SeqResult {
                error: "preempted: KV cache out of blocks".into(),
                ..status(a_id, SeqStatus::Preempted)
            }],
            kv_blocks_free: 0,
            ..Default::default()
        });
        assert_eq!((applied.preempted, applied.requeued), (1, 1));
        assert!(s.running.is_empty());
        assert_eq!(s.num_waiting(), 2);
        // The worker reports free blocks again: the preempted one starts first.
        s.apply(&StepResponse {
            kv_blocks_free: 100,
            ..Default::default()
        });
        let step = s.next_step().unwrap();
        let again = &step.prefill[0];
        assert_ne!(again.seq_id, a_id);
        assert_eq!(again.prompt, vec![7, 7, 7, 40]);
        assert_eq!(again.params.as_ref().unwrap().num_generated, 1);
        // The client saw its first token once and no error.
        let mut events = 0;
        while let Ok(ev) = rx.try_recv() {
            assert!(!matches!(ev, SeqEvent::Error(_)), "{ev:?}");
            events += 1;
        }
        assert_eq!(events, 2, "Prefilled + one token");
    }

    /// With nothing running the worker's figures may be stale: the head is tried anyway,
    /// but not again right after the worker refused it.
    #[test]
    fn an_idle_scheduler_probes_but_backs_off_after_a_refusal() {
        let mut s = State::new(on_demand(10, 0));
        s.apply(&StepResponse {
            kv_blocks_free: 0,
            ..Default::default()
        });
        let (a, _ra) = entry(3, 0, Priority::Normal);
        s.push(a);
        let step = s.next_step().unwrap();
        let id = step.prefill[0].seq_id;
        s.apply(&StepResponse {
            results: vec![status(id, SeqStatus::OutOfBlocks)],
            kv_blocks_free: 0,
            ..Default::default()
        });
        assert!(s.next_step().is_none(), "backs off");
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn long_prompt_is_chunked_and_decodes_keep_running() {
        let mut s = State::new(limits());
        let (short, _rx1) = entry(2, 10, Priority::Normal);
        let short_id = short.seq_id;
        s.push(short);
        let step = s.next_step().unwrap();
        assert_eq!(step.prefill.len(), 1);
        s.apply(&StepResponse {
            results: vec![ok(short_id, 2, Some(5), FinishReason::Unspecified)],
            ..Default::default()
        });
        let (long, _rx2) = entry(40, 10, Priority::Normal);
        let long_id = long.seq_id;
        s.push(long);
        let step = s.next_step().unwrap();
        assert_eq!(step.decode, vec![short_id]);
        assert_eq!(
            step.prefill[0].max_tokens, 15,
            "chunk fits the budget left after the decode"
        );
        s.apply(&StepResponse {
            results: vec![ok(long_id, 15, None, FinishReason::Unspecified)],
            ..Default::default()
        });
        let step = s.next_step().unwrap();
        assert_eq!(step.decode, vec![short_id]);
        assert_eq!(step.prefill[0].max_tokens, 15);
        assert!(
            step.prefill[0].prompt.is_empty(),
            "later chunks carry only the id"
        );
    }

    #[test]
    fn higher_priority_is_admitted_first() {
        let mut s = State::new(Limits {
            max_num_seqs: 1,
            ..limits()
        });
        let (low, _a) = entry(2, 2, Priority::Low);
        let (high, _b) = entry(2, 2, Priority::High);
        let high_id = high.seq_id;
        s.push(low);
        s.push(high);
        let step = s.next_step().unwrap();
        assert_eq!(step.prefill.len(), 1);
        assert_eq!(step.prefill[0].seq_id, high_id);
    }

    #[test]
    fn kv_reservation_skips_big_request_but_not_forever() {
        let mut s = State::new(Limits {
            total_blocks: 10,
            max_num_seqs: 64,
            max_batched_tokens: 10_000,
            ..limits()
        });
        let (first, _a) = entry(4, 20, Priority::Normal); // 6 blocks
        let first_id = first.seq_id;
        s.push(first);
        s.next_step().unwrap();
        s.apply(&StepResponse {
            results: vec![ok(first_id, 4, Some(1), FinishReason::Unspecified)],
            ..Default::default()
        });
        let (big, _b) = entry(4, 20, Priority::Normal); // 6 blocks: does not fit now
        s.push(big);
        for _ in 0..MAX_HEAD_SKIPS {
            let (small, _c) = entry(1, 1, Priority::Normal);
            s.push(small);
            let step = s.next_step().unwrap();
            assert_eq!(step.prefill.len(), 1, "the small one overtakes");
            let id = step.prefill[0].seq_id;
            s.apply(&StepResponse {
                results: vec![ok(id, 1, Some(1), FinishReason::Length)],
                ..Default::default()
            });
        }
        let (small, _d) = entry(1, 1, Priority::Normal);
        s.push(small);
        // (The running one's decodes were never answered here, so it may have none left.)
        let step = s.next_step().unwrap_or_default();
        assert!(
            step.prefill.is_empty(),
            "admission now waits for the starved head"
        );
    }

    #[test]
    fn cancelled_running_sequence_is_released_and_unreserved() {
        let mut s = State::new(limits());
        let (e, rx) = entry(3, 5, Priority::Normal);
        let id = e.seq_id;
        s.push(e);
        s.next_step().unwrap();
        assert!(s.reserved_blocks() > 0);
        drop(rx);
        let sweep = s.sweep(Instant::now());
        assert_eq!(sweep.release, vec![id]);
        assert_eq!(s.reserved_blocks(), 0);
        assert!(s.next_step().is_none());
    }

    #[test]
    fn expired_waiting_request_never_reaches_the_step() {
        let mut s = State::new(limits());
        let (mut e, mut rx) = entry(3, 5, Priority::Normal);
        Arc::get_mut(&mut e.request).unwrap().deadline = Some(Instant::now());
        s.push(e);
        let sweep = s.sweep(Instant::now());
        assert_eq!(sweep.expired_waiting, 1);
        assert!(s.next_step().is_none());
        assert!(matches!(
            rx.try_recv(),
            Ok(SeqEvent::Error(ApiError::DeadlineExceeded(_)))
        ));
    }

    #[test]
    fn out_of_blocks_requeues_at_the_front() {
        let mut s = State::new(limits());
        let (e, _rx) = entry(3, 5, Priority::Normal);
        let id = e.seq_id;
        s.push(e);
        s.next_step().unwrap();
        let result = status(id, SeqStatus::OutOfBlocks);
        let applied = s.apply(&StepResponse {
            results: vec![result],
            ..Default::default()
        });
        assert_eq!(applied.requeued, 1);
        assert_eq!(s.num_waiting(), 1);
        let step = s.next_step().unwrap();
        assert_eq!(step.prefill[0].prompt.len(), 3, "re-prefilled from scratch");
    }

    #[test]
    fn drain_keeps_generated_tokens_for_migration() {
        let mut s = State::new(limits());
        let (e, _rx) = entry(3, 5, Priority::Normal);
        let id = e.seq_id;
        s.push(e);
        s.next_step().unwrap();
        s.apply(&StepResponse {
            results: vec![ok(id, 3, Some(9), FinishReason::Unspecified)],
            ..Default::default()
        });
        let drained = s.drain();
        assert_eq!(drained[0].generated, vec![9]);
        assert_eq!(drained[0].worker_prompt(), vec![7, 7, 7, 9]);
        assert_eq!(drained[0].worker_params().num_generated, 1);
    }
}

#[cfg(test)]
mod pipelining_tests {
    use std::sync::Arc;

    use shardline_proto::worker::v1::{SeqResult, SequenceParams, TokenLogprob};
    use tokio::sync::mpsc;

    use super::tests::status;
    use super::*;
    use crate::request::{Priority, ValidRequest};

    fn entry(prompt: usize, max_tokens: u32) -> (Entry, mpsc::UnboundedReceiver<SeqEvent>) {
        let request = ValidRequest {
            id: "t".into(),
            prompt: vec![7; prompt],
            params: SequenceParams {
                max_new_tokens: max_tokens,
                ..Default::default()
            },
            stop: vec![],
            priority: Priority::Normal,
            deadline: None,
            logprobs: None,
            echo: false,
            max_tokens,
            n: 1,
            tool_calling: None,
            arrival: Instant::now(),
            span: tracing::Span::none(),
            tenant_label: String::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        (Entry::new(Arc::new(request), tx), rx)
    }

    fn token(seq_id: u64, computed: u32, finish: FinishReason) -> SeqResult {
        SeqResult {
            seq_id,
            status: SeqStatus::Ok as i32,
            prompt_computed: computed,
            has_token: true,
            token: Some(TokenLogprob::default()),
            finish_reason: finish as i32,
            ..Default::default()
        }
    }

    fn limits(max_batched_tokens: usize) -> Limits {
        Limits {
            max_num_seqs: 8,
            max_batched_tokens,
            block_size: 4,
            total_blocks: 100,
            context_length: 0,
            kv_admission: KvAdmission::WorstCase,
            watermark_blocks: 0,
        }
    }

    /// Steps planned before the previous answers: the next chunk follows the chunks sent,
    /// a prompt whose last chunk was sent decodes in the next plan, and no sequence gets
    /// more decodes than its `max_tokens` leaves.
    #[test]
    fn planning_runs_ahead_of_the_answers() {
        let mut s = State::new(limits(8));
        let (e, _rx) = entry(12, 3);
        let id = e.seq_id;
        s.push(e);
        let n1 = s.next_step().unwrap();
        assert_eq!(n1.prefill[0].max_tokens, 8);
        let n2 = s.next_step().unwrap();
        assert_eq!((n2.prefill[0].max_tokens, n2.decode.len()), (4, 0));
        assert!(n2.prefill[0].prompt.is_empty());
        let n3 = s.next_step().unwrap();
        assert_eq!(
            n3.decode,
            vec![id],
            "decodes right after its last chunk was sent"
        );
        let n4 = s.next_step().unwrap();
        assert_eq!(n4.decode, vec![id]);
        // Tokens in flight: the last chunk's and two decodes = max_tokens 3.
        assert!(s.next_step().is_none());
        s.apply(&StepResponse::default());
        s.apply(&StepResponse {
            results: vec![token(id, 12, FinishReason::Unspecified)],
            ..Default::default()
        });
        assert!(s.next_step().is_none(), "still 2 in flight for the 2 left");
    }

    /// A plan for a sequence that the answer before it ended (EOS) or sent back (no KV
    /// room) is answered "unknown" by the worker; that answer changes nothing.
    #[test]
    fn answers_for_sequences_no_longer_running_are_ignored() {
        let mut s = State::new(limits(64));
        let (e, mut rx) = entry(2, 10);
        let id = e.seq_id;
        s.push(e);
        s.next_step().unwrap();
        let n2 = s.next_step().unwrap();
        assert_eq!(n2.decode, vec![id]);
        let applied = s.apply(&StepResponse {
            results: vec![token(id, 2, FinishReason::Stop)],
            ..Default::default()
        });
        assert_eq!(applied.finished.len(), 1);
        let late = SeqResult {
            error: "unknown".into(),
            ..status(id, SeqStatus::Invalid)
        };
        let applied = s.apply(&StepResponse {
            results: vec![late],
            ..Default::default()
        });
        assert!(applied.finished.is_empty());
        let mut errors = 0;
        while let Ok(ev) = rx.try_recv() {
            errors += usize::from(matches!(ev, SeqEvent::Error(_)));
        }
        assert_eq!(errors, 0, "the finished request saw no error");
    }
}
