//! The request owner's side of a generation: receives the scheduler's [`SeqEvent`]s,
//! detokenizes incrementally, applies stop strings, tracks usage and latency metrics,
//! and yields [`Chunk`]s to a front end. Dropping a [`Generation`] (client gone) closes
//! its channel, which the scheduler sees within one iteration and releases the sequence.
//!
//! With `n` > 1 every choice is a generation of its own. The first is queued at once; the
//! others wait ([`Generation::follow`]) until its prompt is computed, so the worker finds
//! the prompt's full KV blocks in its prefix cache and the choices share them instead of
//! each computing and holding its own copy.

use std::sync::Arc;

use shardline_proto::worker::v1::TokenLogprob;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::admission::Permit;
use crate::detok::{Detokenizer, StopMatcher};
use crate::error::ApiError;
use crate::groups::{GroupSet, ModelInfo};
use crate::metrics::Metrics;
use crate::request::{Entry, Finish, Generated, SeqEvent, Timing, ValidRequest};

/// One token as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: u32,
    pub text: String,
    /// `None` for the first prompt token (it has no logprob).
    pub logprob: Option<f32>,
    pub top: Vec<(String, f32)>,
}

/// A piece of output.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

impl Usage {
    pub fn total(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A running request, seen from its front end.
pub struct Generation {
    pub request: Arc<ValidRequest>,
    rx: mpsc::UnboundedReceiver<SeqEvent>,
    model: Arc<ModelInfo>,
    metrics: Metrics,
    detok: Detokenizer,
    stop: StopMatcher,
    usage: Usage,
    prefilled: bool,
    done: bool,
    last_token_at: Option<Instant>,
    /// Tokens received while their text is still held back.
    pending_tokens: Vec<TokenOut>,
    /// Final text not handed out yet (the rest of a hand-over, or an `echo`ed prompt).
    held: String,
    /// An error that ended the output, given out after the held text that preceded it.
    failed: Option<ApiError>,
    /// A stop string ended the output.
    stop_hit: bool,
    /// Set to `true` once the prompt is computed (followers of an `n` > 1 request wait
    /// for it); dropped with the generation, which releases the followers too.
    prefilled_tx: Option<watch::Sender<bool>>,
    /// A follower not queued yet: queued once the first choice's prompt is computed.
    pending: Option<Pending>,
    /// This request's series of the per-tenant metrics (looked up once, not per token).
    series: Series,
    /// Admission slot and tenant budget, charged for generated tokens.
    permit: Permit,
}

/// A choice waiting for the first choice's prompt to be in the prefix cache.
struct Pending {
    entry: Entry,
    groups: GroupSet,
    leader: watch::Receiver<bool>,
}

/// The request's tenant and priority series.
struct Series {
    ttft: prometheus::Histogram,
    itl: prometheus::Histogram,
    generated: prometheus::IntCounter,
}

/// Everything a non-streaming response needs.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub prompt_tokens: Vec<TokenOut>,
    pub finish: Option<Finish>,
    pub usage: Usage,
}

impl Generation {
    pub fn new(
        request: Arc<ValidRequest>,
        rx: mpsc::UnboundedReceiver<SeqEvent>,
        model: Arc<ModelInfo>,
        metrics: Metrics,
        permit: Permit,
    ) -> Generation {
        let stop = StopMatcher::new(request.stop.clone());
        let usage = Usage {
            prompt_tokens: request.prompt.len() as u32,
            ..Default::default()
        };
        let labels = [request.tenant_label.as_str(), request.priority.as_str()];
        let series = Series {
            ttft: metrics.time_to_first_token.with_label_values(&labels),
            itl: metrics.inter_token_latency.with_label_values(&labels),
            generated: metrics.tenant_generation_tokens.with_label_values(&labels),
        };
        Generation {
            series,
            request,
            rx,
            model,
            metrics,
            detok: Detokenizer::default(),
            stop,
            usage,
            prefilled: false,
            done: false,
            last_token_at: None,
            pending_tokens: Vec::new(),
            held: String::new(),
            failed: None,
            stop_hit: false,
            prefilled_tx: None,
            pending: None,
            permit,
        }
    }

    /// A receiver that turns `true` once this generation's prompt is computed (or
    /// closes when the generation ends or is dropped).
    pub fn prefilled(&mut self) -> watch::Receiver<bool> {
        self.prefilled_tx
            .get_or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    /// Makes this generation a follower: `entry` (its own queue entry, sending to this
    /// generation) is queued on `groups` once `leader` turns `true` or closes.
    pub fn follow(&mut self, entry: Entry, groups: GroupSet, leader: watch::Receiver<bool>) {
        self.pending = Some(Pending {
            entry,
            groups,
            leader,
        });
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn token_text(&self, id: u32) -> String {
        self.model
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
    }

    fn token_out(&self, t: &TokenLogprob, with_logprob: bool) -> TokenOut {
        TokenOut {
            id: t.token_id,
            text: self.token_text(t.token_id),
            logprob: with_logprob.then_some(t.logprob),
            top: t
                .top
                .iter()
                .map(|a| (self.token_text(a.token_id), a.logprob))
                .collect(),
        }
    }

    /// Prompt tokens with their logprobs, for `echo` (the first has none).
    fn prompt_tokens(&self, logprobs: &[TokenLogprob]) -> Vec<TokenOut> {
        let prompt = &self.request.prompt;
        prompt
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let lp = i.checked_sub(1).and_then(|j| logprobs.get(j));
                TokenOut {
                    id,
                    text: self.token_text(id),
                    logprob: lp.map(|l| l.logprob),
                    top: lp
                        .map(|l| {
                            l.top
                                .iter()
                                .map(|a| (self.token_text(a.token_id), a.logprob))
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The held text and tokens, handed out now.
    fn held_chunk(&mut self) -> Chunk {
        Chunk {
            text: std::mem::take(&mut self.held),
            tokens: std::mem::take(&mut self.pending_tokens),
            finish: None,
        }
    }

    /// Ends the output with the held text; unless a stop string ended it, text the
    /// detokenizer and the stop matcher held back is final now too.
    fn finish(&mut self, mut finish: Finish) -> Chunk {
        let mut text = std::mem::take(&mut self.held);
        self.done = true;
        self.rx.close();
        if !self.stop_hit {
            let (rest, matched) = self.stop.push(&self.detok.flush(&self.model.tokenizer));
            text.push_str(&rest);
            if matched {
                finish = Finish::Stop;
            } else {
                text.push_str(&self.stop.finish());
            }
        }
        let (tenant, priority) = (
            self.request.tenant_label.as_str(),
            self.request.priority.as_str(),
        );
        self.metrics
            .e2e_latency
            .with_label_values(&[tenant, priority])
            .observe(self.request.arrival.elapsed().as_secs_f64());
        self.metrics
            .requests
            .with_label_values(&[finish.as_str(), tenant, priority])
            .inc();
        self.metrics
            .tenant_prompt_tokens
            .with_label_values(&[tenant, priority])
            .inc_by(u64::from(self.usage.prompt_tokens));
        let span = &self.request.span;
        span.record("finish_reason", finish.as_str());
        span.record("completion_tokens", self.usage.completion_tokens);
        span.record("cached_tokens", self.usage.cached_tokens);
        Chunk {
            text,
            tokens: std::mem::take(&mut self.pending_tokens),
            finish: Some(finish),
        }
    }

    /// Ends the output with an error.
    fn fail(&mut self, e: ApiError) -> ApiError {
        self.done = true;
        self.request.span.record("otel.status_code", "ERROR");
        self.request
            .span
            .record("error", tracing::field::display(&e));
        e
    }

    /// Records the time to first token and, from the scheduler's stamps, how much of it
    /// was queueing, the worker, and the coordinator itself (with the gRPC hop).
    fn first_token(&self, now: Instant, timing: Option<Timing>) {
        let ttft = now - self.request.arrival;
        self.series.ttft.observe(ttft.as_secs_f64());
        let Some(t) = timing else { return };
        let (Some(submitted), Some(scheduled)) = (t.submitted, t.scheduled) else {
            return;
        };
        let queue = scheduled.saturating_duration_since(submitted);
        let own = ttft.saturating_sub(queue).saturating_sub(t.worker);
        self.metrics.queue_time.observe(queue.as_secs_f64());
        self.metrics.first_token_overhead.observe(own.as_secs_f64());
        tracing::debug!(
            request = %self.request.id,
            ttft_us = ttft.as_micros() as u64,
            before_queue_us = submitted.saturating_duration_since(self.request.arrival).as_micros() as u64,
            queue_us = queue.as_micros() as u64,
            worker_us = t.worker.as_micros() as u64,
            step_rpc_us = t.received.map_or(0, |r| r.saturating_duration_since(scheduled).as_micros() as u64),
            fanout_us = t.received.map_or(0, |r| now.saturating_duration_since(r).as_micros() as u64),
            "first token"
        );
    }

    /// Counts a generated token and adds its text to the held text; `true` when a stop
    /// string ended the output there.
    fn take_token(
        &mut self,
        Generated { token, received }: Generated,
        first: Option<Timing>,
    ) -> bool {
        match self.last_token_at {
            None => self.first_token(Instant::now(), first),
            Some(last) => self
                .series
                .itl
                .observe(received.saturating_duration_since(last).as_secs_f64()),
        }
        self.last_token_at = Some(received);
        self.series.generated.inc();
        self.usage.completion_tokens += 1;
        self.permit.generated(1);
        if self.request.logprobs.is_some() {
            let out = self.token_out(&token, true);
            self.pending_tokens.push(out);
        }
        let delta = self.detok.push(&self.model.tokenizer, token.token_id);
        let (text, matched) = self.stop.push(&delta);
        self.held.push_str(&text);
        matched
    }

    /// The next piece of output; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Chunk, ApiError>> {
        if let Some(e) = self.failed.take() {
            return Some(Err(self.fail(e)));
        }
        if self.done {
            return None;
        }
        if let Some(Pending {
            entry,
            groups,
            mut leader,
        }) = self.pending.take()
        {
            // Err: the first choice ended or failed without a computed prompt; go anyway.
            let _ = leader.wait_for(|&prefilled| prefilled).await;
            if let Err(e) = groups.submit(entry) {
                self.done = true;
                return Some(Err(e));
            }
        }
        loop {
            let Some(event) = self.rx.recv().await else {
                self.done = true;
                return Some(Err(ApiError::Internal(
                    "the scheduler dropped the request".into(),
                )));
            };
            match event {
                SeqEvent::Prefilled {
                    cached_tokens,
                    prompt_logprobs,
                } => {
                    if !self.prefilled {
                        self.prefilled = true;
                        if let Some(tx) = self.prefilled_tx.take() {
                            let _ = tx.send(true);
                        }
                        self.usage.cached_tokens = cached_tokens;
                        if self.request.echo {
                            let tokens = if self.request.logprobs.is_some() {
                                self.prompt_tokens(&prompt_logprobs)
                            } else {
                                Vec::new()
                            };
                            self.held = self
                                .model
                                .tokenizer
                                .decode(&self.request.prompt, true)
                                .unwrap_or_default();
                            self.pending_tokens = tokens;
                            if self.request.max_tokens == 0 {
                                return Some(Ok(self.finish(Finish::Length)));
                            }
                            return Some(Ok(self.held_chunk()));
                        }
                    }
                }
                SeqEvent::Tokens {
                    tokens,
                    finish,
                    first,
                } => {
                    // One chunk per hand-over: the scheduler's outbox decides how many
                    // tokens that is (`--stream-interval`).
                    for token in tokens {
                        if self.take_token(token, first) {
                            self.stop_hit = true;
                            return Some(Ok(self.finish(Finish::Stop)));
                        }
                    }
                    if let Some(finish) = finish {
                        return Some(Ok(self.finish(finish)));
                    }
                    if !self.held.is_empty() {
                        return Some(Ok(self.held_chunk()));
                    }
                }
                SeqEvent::Finished(finish) => return Some(Ok(self.finish(finish))),
                SeqEvent::Error(e) if !self.held.is_empty() => {
                    // Text already generated goes out before the error that ends it.
                    self.failed = Some(e);
                    return Some(Ok(self.held_chunk()));
                }
                SeqEvent::Error(e) => return Some(Err(self.fail(e))),
            }
        }
    }

    /// Runs to the end (non-streaming responses).
    pub async fn collect(mut self) -> Result<Collected, ApiError> {
        let mut out = Collected::default();
        let mut first = true;
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            if first && self.request.echo {
                out.prompt_tokens = chunk
                    .tokens
                    .iter()
                    .take(self.request.prompt.len())
                    .cloned()
                    .collect();
                out.tokens
                    .extend(chunk.tokens.into_iter().skip(self.request.prompt.len()));
            } else {
                out.tokens.extend(chunk.tokens);
            }
            first = false;
            out.text.push_str(&chunk.text);
            if chunk.finish.is_some() {
                out.finish = chunk.finish;
            }
        }
        out.usage = self.usage;
        Ok(out)
    }
}
