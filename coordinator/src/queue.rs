//! The pure state of one group's scheduler: the priority queues of waiting requests and
//! the running batch. [`State::next_step`] decides one iteration (which decodes, which
//! prefill chunks, which new admissions) and [`State::apply`] folds the worker's answer
//! back in. No I/O and no runtime, so it is unit-tested directly.
//!
//! KV budget policy: **reservation**. A request is admitted only when the blocks its
//! prompt plus `max_tokens` can occupy fit next to the reservations of the running batch,
//! so a worker never runs out of blocks mid-generation because of this coordinator. Should
//! the worker still answer OUT_OF_BLOCKS (another coordinator shares the group), the
//! sequence goes back to the front of its queue and is re-prefilled later.
//!
//! Head-of-line blocking: a request that does not fit is skipped so smaller ones behind
//! it can run, but only [`MAX_HEAD_SKIPS`] times; then admission pauses until it fits.

use std::collections::VecDeque;
use std::time::Duration;

use shardline_proto::worker::v1::{
    FinishReason, PrefillChunk, SeqStatus, StepRequest, StepResponse,
};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::request::{Entry, Finish, SeqEvent, Timing};

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
}

/// A sequence placed on the worker.
#[derive(Debug)]
pub struct Running {
    pub entry: Entry,
    /// Prompt tokens the worker reports computed (cached included).
    pub computed: usize,
    /// The first chunk (with prompt and params) was sent.
    pub started: bool,
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
}

#[derive(Debug)]
pub struct State {
    pub limits: Limits,
    waiting: [VecDeque<Entry>; 3],
    pub running: Vec<Running>,
    reserved: u32,
    head_skips: u32,
}

impl State {
    pub fn new(limits: Limits) -> State {
        State {
            limits,
            waiting: Default::default(),
            running: Vec::new(),
            reserved: 0,
            head_skips: 0,
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

    pub fn reserved_blocks(&self) -> u32 {
        self.reserved
    }

    /// Blocks the waiting requests will need.
    pub fn waiting_blocks(&self) -> u32 {
        self.waiting
            .iter()
            .flatten()
            .map(|e| e.blocks_needed(self.limits.block_size))
            .sum()
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
            queue.retain(|e| {
                if e.is_cancelled() {
                    sweep.dropped_waiting += 1;
                    false
                } else if e.expired(now) {
                    let _ =
                        e.tx.send(SeqEvent::Error(ApiError::DeadlineExceeded(" while queued")));
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
            let r = &self.running[i];
            let gone = r.entry.is_cancelled();
            if gone || r.entry.expired(now) {
                if !gone {
                    let _ = r
                        .entry
                        .tx
                        .send(SeqEvent::Error(ApiError::DeadlineExceeded("")));
                }
                let r = self.running.swap_remove(i);
                self.reserved -= r.reserved;
                if r.started {
                    sweep.release.push(r.entry.seq_id);
                }
            } else {
                i += 1;
            }
        }
        sweep
    }

    /// Plans one iteration; `None` when there is nothing to run.
    pub fn next_step(&mut self) -> Option<StepRequest> {
        let mut budget = self.limits.max_batched_tokens;
        let mut step = StepRequest::default();
        for r in &self.running {
            if r.decoding && budget > 0 {
                step.decode.push(r.entry.seq_id);
                budget -= 1;
            }
        }
        for r in &self.running {
            if r.started && !r.decoding && budget > 0 {
                let chunk = r
                    .entry
                    .prompt_len()
                    .saturating_sub(r.computed)
                    .clamp(1, budget);
                step.prefill.push(PrefillChunk {
                    seq_id: r.entry.seq_id,
                    max_tokens: chunk as u32,
                    ..Default::default()
                });
                budget -= chunk;
            }
        }
        self.admit(&mut budget, &mut step);
        (!step.decode.is_empty() || !step.prefill.is_empty()).then_some(step)
    }

    fn admit(&mut self, budget: &mut usize, step: &mut StepRequest) {
        let mut scanned = 0;
        let mut is_head = true;
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
                let need = self.waiting[class][i].blocks_needed(self.limits.block_size);
                if self.reserved + need > self.limits.total_blocks {
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
                let chunk = entry.prompt_len().clamp(1, *budget);
                *budget -= chunk;
                step.prefill.push(PrefillChunk {
                    seq_id: entry.seq_id,
                    prompt: entry.worker_prompt(),
                    params: Some(entry.worker_params()),
                    max_tokens: chunk as u32,
                });
                self.reserved += need;
                self.running.push(Running {
                    entry,
                    computed: 0,
                    started: true,
                    decoding: false,
                    reserved: need,
                    announced: false,
                });
            }
        }
    }

    fn remove_running(&mut self, index: usize) -> Running {
        let r = self.running.swap_remove(index);
        self.reserved -= r.reserved;
        r
    }

    /// Folds a step's results in: sends tokens to their requests, drops finished ones.
    pub fn apply(&mut self, response: &StepResponse) -> Applied {
        let received = Instant::now();
        let mut applied = Applied::default();
        for result in &response.results {
            let Some(index) = self
                .running
                .iter()
                .position(|r| r.entry.seq_id == result.seq_id)
            else {
                continue; // released meanwhile
            };
            match SeqStatus::try_from(result.status).unwrap_or(SeqStatus::Unspecified) {
                SeqStatus::OutOfBlocks => {
                    let mut r = self.remove_running(index);
                    r.entry.seq_id = crate::request::next_seq_id();
                    self.push_front(r.entry);
                    applied.requeued += 1;
                    continue;
                }
                SeqStatus::Invalid => {
                    let r = self.remove_running(index);
                    let _ = r.entry.tx.send(SeqEvent::Error(ApiError::Invalid {
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
            let prompt_done =
                result.has_token || finish.is_some() || r.computed >= r.entry.prompt_len();
            if prompt_done && !r.announced {
                r.announced = true;
                let _ = r.entry.tx.send(SeqEvent::Prefilled {
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
                applied.tokens += 1;
                let _ = r.entry.tx.send(SeqEvent::Token {
                    token,
                    finish,
                    first,
                });
            } else if let Some(finish) = finish {
                let _ = r.entry.tx.send(SeqEvent::Finished(finish));
            }
            if finish.is_some() {
                applied.finished.push(self.remove_running(index).entry);
            }
        }
        applied
    }

    /// Takes every request out (the group failed): they keep their generated tokens so
    /// another group can continue them.
    pub fn drain(&mut self) -> Vec<Entry> {
        self.reserved = 0;
        let mut out: Vec<Entry> = self.running.drain(..).map(|r| r.entry).collect();
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
            if let SeqEvent::Token { first, .. } = ev {
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
        let step = s.next_step().unwrap();
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
        let result = SeqResult {
            seq_id: id,
            status: SeqStatus::OutOfBlocks as i32,
            ..Default::default()
        };
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
