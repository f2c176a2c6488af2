//! The worker's spans, when the process exports traces.
//!
//! - A `step` span per step of a stream: a child of the span whose `traceparent` the
//!   coordinator put in the stream's metadata, and linked to the span of every request
//!   the step served — a step serves many requests, so it does not pretend to have one
//!   parent among them. Its fields: the batch, the tokens, the worker's own step time.
//! - A `sequence` span per sequence, a child of its request's span (the `traceparent` on
//!   the sequence's first chunk), from its first chunk to its finish or release: the
//!   request's trace shows the worker's part in it.
//!
//! Without an exporter [`StreamTrace::new`] returns `None` and a step costs nothing more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shardline_proto::worker::v1 as pb;
use shardline_telemetry::SpanContext;
use tracing::Span;
use tracing::field::Empty;

/// A sequence's span and the request span its steps link to.
struct SeqTrace {
    span: Span,
    request: SpanContext,
    tokens: u32,
}

/// The spans of one step stream.
pub(crate) struct StreamTrace {
    /// `traceparent` from the stream's metadata.
    parent: Option<String>,
    /// Sequences this stream started and that are still alive.
    seqs: Mutex<HashMap<u64, SeqTrace>>,
}

impl StreamTrace {
    /// The spans of a stream opened with `metadata`; `None` when nothing is exported.
    pub(crate) fn new(metadata: &tonic::metadata::MetadataMap) -> Option<Arc<StreamTrace>> {
        if !shardline_telemetry::exporting() {
            return None;
        }
        let parent = metadata
            .get(shardline_telemetry::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Some(Arc::new(StreamTrace {
            parent,
            seqs: Mutex::default(),
        }))
    }

    fn seqs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SeqTrace>> {
        self.seqs.lock().expect("lock poisoned; this is a bug")
    }

    /// Opens the span of a step about to be queued on the engine: new sequences get
    /// their spans, released ones end theirs, and the step links to every request it
    /// serves.
    pub(crate) fn step(&self, req: &pb::StepRequest) -> Span {
        let step = tracing::info_span!(
            target: shardline_telemetry::TRACE_ONLY,
            "step",
            prefill = req.prefill.len(),
            decode = req.decode.len(),
            released = req.release.len(),
            batch_tokens = Empty,
            step_time_ms = Empty,
            kv_blocks_free = Empty,
            running = Empty,
        );
        if let Some(parent) = &self.parent {
            shardline_telemetry::set_parent(&step, parent);
        }
        let mut seqs = self.seqs();
        for id in &req.release {
            if let Some(seq) = seqs.remove(id) {
                seq.span.record("outcome", "released");
            }
        }
        for chunk in &req.prefill {
            if chunk.traceparent.is_empty() || seqs.contains_key(&chunk.seq_id) {
                continue;
            }
            let Some(request) = shardline_telemetry::span_context(&chunk.traceparent) else {
                continue;
            };
            let span = tracing::info_span!(
                target: shardline_telemetry::TRACE_ONLY,
                "sequence",
                seq_id = chunk.seq_id,
                prompt_tokens = chunk.prompt.len(),
                cached_tokens = Empty,
                tokens = Empty,
                outcome = Empty,
            );
            shardline_telemetry::set_parent(&span, &chunk.traceparent);
            seqs.insert(
                chunk.seq_id,
                SeqTrace {
                    span,
                    request,
                    tokens: 0,
                },
            );
        }
        let named = req
            .prefill
            .iter()
            .map(|c| c.seq_id)
            .chain(req.decode.iter().copied());
        for id in named {
            if let Some(seq) = seqs.get(&id) {
                shardline_telemetry::add_link(&step, seq.request.clone());
            }
        }
        step
    }

    /// The step's answer: its figures go on its span (which ends), and the sequences it
    /// finished or refused end theirs.
    pub(crate) fn answered(&self, step: Span, resp: &pb::StepResponse) {
        step.record("batch_tokens", resp.batch_tokens);
        step.record("step_time_ms", resp.step_time_ns as f64 / 1e6);
        step.record("kv_blocks_free", resp.kv_blocks_free);
        step.record("running", resp.num_running);
        drop(step);
        let mut seqs = self.seqs();
        for r in &resp.results {
            let Some(seq) = seqs.get_mut(&r.seq_id) else {
                continue;
            };
            seq.tokens += u32::from(r.has_token);
            if r.cached_tokens > 0 {
                seq.span.record("cached_tokens", r.cached_tokens);
            }
            let ended = match pb::SeqStatus::try_from(r.status) {
                Ok(pb::SeqStatus::OutOfBlocks) => Some("out of KV blocks"),
                Ok(pb::SeqStatus::Invalid) => Some("invalid"),
                _ => match pb::FinishReason::try_from(r.finish_reason) {
                    Ok(pb::FinishReason::Stop) => Some("stop"),
                    Ok(pb::FinishReason::Length) => Some("length"),
                    _ => None,
                },
            };
            if let Some(outcome) = ended
                && let Some(seq) = seqs.remove(&r.seq_id)
            {
                seq.span.record("tokens", seq.tokens);
                seq.span.record("outcome", outcome);
            }
        }
    }
}

impl Drop for StreamTrace {
    /// The stream ended (coordinator gone, worker stopping): the sequences' spans end
    /// with it.
    fn drop(&mut self) {
        for (_, seq) in self.seqs().drain() {
            seq.span.record("tokens", seq.tokens);
            seq.span.record("outcome", "stream ended");
        }
    }
}
