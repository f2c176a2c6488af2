//! W3C trace context across process boundaries, for the front ends (a client's
//! `traceparent` header), the worker protocol (gRPC metadata and the sequences' first
//! chunks) and the response header that names a request's trace.
//!
//! Every function works on `tracing` spans: through `tracing-opentelemetry` when spans
//! are exported, and as a cheap no-op (or a plain parse of the client's header) when not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
pub use opentelemetry::trace::{SpanContext, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header (and gRPC metadata key) carrying a span's context.
pub const TRACEPARENT: &str = "traceparent";

/// Set once [`crate::init`] installed the OpenTelemetry layer.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether this process exports spans. Work that only feeds traces (per-step spans,
/// per-phase spans of a request) is skipped when it does not.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The remote context in a carrier's `traceparent` (and `tracestate`), if it names a
/// valid span.
fn remote(get: impl Fn(&str) -> Option<String>) -> Option<Context> {
    let map: HashMap<String, String> = [TRACEPARENT, "tracestate"]
        .into_iter()
        .filter_map(|k| get(k).map(|v| (k.to_string(), v)))
        .collect();
    if map.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&map);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` continue the trace in a carrier's `traceparent` (a client's headers, a
/// coordinator's gRPC metadata); returns the trace id the span belongs to — the client's
/// when it sent one, the new trace's when spans are exported — as 32 hex digits.
pub fn continue_trace(
    span: &tracing::Span,
    get: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let parent = remote(get);
    let client_trace = parent
        .as_ref()
        .map(|cx| cx.span().span_context().trace_id());
    if let Some(cx) = parent {
        // Refused only when no OpenTelemetry layer exists (or the span is disabled):
        // then the client's trace id is still what names the request.
        let _ = span.set_parent(cx);
    }
    let own = span.context().span().span_context().trace_id();
    [Some(own), client_trace]
        .into_iter()
        .flatten()
        .find(|id| *id != TraceId::INVALID)
        .map(|id| id.to_string())
}

/// `span`'s context as a `traceparent` value, when spans are exported.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The span context a `traceparent` value names (a sequence's request, on the worker).
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    remote(|k| (k == TRACEPARENT).then(|| traceparent.to_string()))
        .map(|cx| cx.span().span_context().clone())
}

/// Makes `span` a child of the span `traceparent` names (before the span is entered).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(cx) = remote(|k| (k == TRACEPARENT).then(|| traceparent.to_string())) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to another span: a worker step to each request it served.
pub fn add_link(span: &tracing::Span, to: SpanContext) {
    span.add_link(to);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_clients_trace_id_names_the_request_even_without_export() {
        let span = tracing::info_span!("request");
        let id = continue_trace(&span, |k| (k == "traceparent").then(|| PARENT.into()));
        assert_eq!(id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(continue_trace(&span, |_| None), None, "no trace, no id");
        assert_eq!(
            continue_trace(&span, |_| Some("garbage".into())),
            None,
            "a malformed header is ignored"
        );
    }

    #[test]
    fn traceparents_parse_into_span_contexts() {
        let cx = span_context(PARENT).unwrap();
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span_context("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    }
}
