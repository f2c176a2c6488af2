//! A request's trace. The front end opens one span per request ([`request_span`]),
//! continuing the client's W3C `traceparent` when it sent one; validation and admission
//! are its children, and the group's scheduler opens and closes the spans of the phases
//! the request goes through on a group ([`Phases`]: queue wait, prefill, decode). A
//! migration is an event on the request span, the finish reason and token counts are its
//! fields, and every worker step that served the request links to it (the request's
//! `traceparent` travels with the sequence's first chunk).
//!
//! Phase spans exist only when the process exports traces
//! ([`shardline_telemetry::exporting`]): without an exporter a request costs the one span
//! its logs are written in.

use tracing::Span;
use tracing::field::Empty;

/// The response header (and gRPC response metadata key) naming the request's trace.
pub const TRACE_ID_HEADER: &str = "x-trace-id";

/// The span of one request, named `otel_name` in traces (`POST /v1/completions`,
/// `shardline.v1.Inference/Generate`) and served over `api` (`http`, `grpc`); its fields
/// are filled in as the request goes.
pub fn request_span(otel_name: &str, api: &'static str) -> Span {
    tracing::info_span!(
        "request",
        otel.name = otel_name,
        otel.kind = "server",
        otel.status_code = Empty,
        api,
        http.response.status_code = Empty,
        trace_id = Empty,
        request_id = Empty,
        tenant = Empty,
        priority = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
        cached_tokens = Empty,
        migrations = Empty,
        finish_reason = Empty,
        error = Empty,
    )
}

/// Makes `span` continue a client's trace (a `traceparent` among `get`'s headers) and
/// records the trace id on it, so every log line inside carries it; returns the id for
/// the response header.
pub fn continue_trace(span: &Span, get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let id = shardline_telemetry::continue_trace(span, get);
    if let Some(id) = &id {
        span.record("trace_id", id.as_str());
    }
    id
}

/// The spans of the phase a request is in on its current group; dropping one ends it.
/// Empty (no allocation) unless traces are exported.
#[derive(Debug, Default)]
pub struct Phases(Option<Box<Spans>>);

#[derive(Debug, Default)]
struct Spans {
    queue: Option<Span>,
    prefill: Option<Span>,
    decode: Option<Span>,
    prefill_chunks: u32,
    decode_steps: u32,
    batch_min: u32,
    batch_max: u32,
    batch_sum: u64,
}

impl Phases {
    /// Handed to `group`'s scheduler: the queue wait starts.
    pub fn queued(&mut self, request: &Span, group: &str) {
        self.0 = shardline_telemetry::exporting().then(|| {
            Box::new(Spans {
                queue: Some(tracing::info_span!(target: shardline_telemetry::TRACE_ONLY, parent: request, "queue", group)),
                ..Default::default()
            })
        });
    }

    /// First sent to the worker: the queue wait ends, the prefill starts.
    pub fn scheduled(&mut self, request: &Span, prompt_tokens: usize) {
        let Some(s) = &mut self.0 else { return };
        s.queue = None;
        s.prefill = Some(tracing::info_span!(
            target: shardline_telemetry::TRACE_ONLY,
            parent: request,
            "prefill",
            prompt_tokens,
            chunks = Empty,
            cached_tokens = Empty
        ));
    }

    /// One prefill chunk sent.
    pub fn chunk(&mut self) {
        if let Some(s) = &mut self.0 {
            s.prefill_chunks += 1;
        }
    }

    /// The prompt is computed: the prefill ends, the decode starts.
    pub fn prefilled(&mut self, request: &Span, cached_tokens: u32) {
        let Some(s) = &mut self.0 else { return };
        if let Some(prefill) = s.prefill.take() {
            prefill.record("chunks", s.prefill_chunks);
            prefill.record("cached_tokens", cached_tokens);
        }
        if s.decode.is_none() {
            s.decode = Some(tracing::info_span!(
                target: shardline_telemetry::TRACE_ONLY,
                parent: request,
                "decode",
                tokens = Empty,
                steps = Empty,
                batch_min = Empty,
                batch_max = Empty,
                batch_mean = Empty
            ));
        }
    }

    /// A token came back from a step that served `batch` sequences.
    pub fn token(&mut self, batch: usize) {
        let Some(s) = &mut self.0 else { return };
        let batch = batch as u32;
        s.batch_min = if s.decode_steps == 0 {
            batch
        } else {
            s.batch_min.min(batch)
        };
        s.batch_max = s.batch_max.max(batch);
        s.batch_sum += u64::from(batch);
        s.decode_steps += 1;
    }

    /// The sequence ended on this group (finished, or `why` it was taken off).
    pub fn end(&mut self, why: Option<&str>) {
        let Some(s) = self.0.take() else { return };
        if let Some(decode) = &s.decode {
            decode.record("tokens", s.decode_steps);
            decode.record("steps", s.decode_steps);
            if s.decode_steps > 0 {
                decode.record("batch_min", s.batch_min);
                decode.record("batch_max", s.batch_max);
                decode.record("batch_mean", s.batch_sum as f64 / f64::from(s.decode_steps));
            }
            if let Some(why) = why {
                tracing::info!(target: shardline_telemetry::TRACE_ONLY, parent: decode, reason = why, "interrupted");
            }
        }
        if let (Some(prefill), Some(why)) = (&s.prefill, why) {
            tracing::info!(target: shardline_telemetry::TRACE_ONLY, parent: prefill, reason = why, "interrupted");
        }
    }
}
