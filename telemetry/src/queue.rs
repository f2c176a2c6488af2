//! The bounded export queue: the OpenTelemetry SDK's batch span processor (its own thread
//! exports batches), behind a gate that keeps at most [`QUEUE_SPANS`] spans waiting and
//! counts every span it turns away. The SDK's processor drops spans on a full queue too,
//! but only logs the count at shutdown; the gate makes the count a number a metric can
//! export while the process runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};

/// Most spans waiting for export; more are dropped and counted.
pub const QUEUE_SPANS: usize = 4096;

/// Spans dropped because the export queue was full, since the process started.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans the process dropped because its export queue was full (a slow or absent
/// collector).
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The gate in front of the SDK's batch processor over `exporter`.
pub(crate) fn processor<E: SpanExporter + 'static>(exporter: E) -> Gate {
    gate(exporter, QUEUE_SPANS, Duration::from_millis(500))
}

fn gate<E: SpanExporter + 'static>(exporter: E, limit: usize, delay: Duration) -> Gate {
    let waiting = Arc::new(AtomicUsize::new(0));
    let exporter = Counted {
        inner: exporter,
        waiting: waiting.clone(),
    };
    // Room for every span the gate lets through, so the SDK never drops one itself.
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(limit + 1)
        .with_max_export_batch_size(512.min(limit.max(1)))
        .with_scheduled_delay(delay)
        .build();
    Gate {
        inner: BatchSpanProcessor::builder(exporter)
            .with_batch_config(config)
            .build(),
        waiting,
        limit,
    }
}

/// Lets a span through while fewer than `limit` wait for export.
#[derive(Debug)]
pub(crate) struct Gate {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet exported (or failed).
    waiting: Arc<AtomicUsize>,
    limit: usize,
}

impl SpanProcessor for Gate {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, giving the gate back one place per span it is done with.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.waiting.fetch_sub(n, Ordering::AcqRel);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// An exporter that holds every export until `release` is set (a stuck collector).
    #[derive(Debug, Clone, Default)]
    struct Stuck {
        release: Arc<std::sync::atomic::AtomicBool>,
        exported: Arc<Mutex<usize>>,
    }

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            while !self.release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            *self.exported.lock().unwrap() += batch.len();
            Err(OTelSdkError::InternalFailure("collector gone".into()))
        }
    }

    #[test]
    fn a_stuck_collector_costs_spans_not_time_and_the_drops_are_counted() {
        let stuck = Stuck::default();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(gate(stuck.clone(), 8, Duration::from_millis(1)))
            .build();
        let tracer = provider.tracer("test");
        let before = dropped_spans();
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            tracer.in_span("request", |_| {});
        }
        // 1000 spans against a collector that never answers: ending them never waited
        // on it (generous bound: the export is stuck forever).
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let dropped = dropped_spans() - before;
        assert!(
            (1000 - 8..=1000).contains(&dropped),
            "at most 8 spans wait; the rest are dropped and counted: {dropped}"
        );
        // Once the collector answers (with an error, even), the queue drains and spans
        // get through again.
        stuck.release.store(true, Ordering::Relaxed);
        provider.force_flush().ok();
        let before = dropped_spans();
        tracer.in_span("later", |_| {});
        provider.force_flush().ok();
        assert_eq!(
            dropped_spans(),
            before,
            "a span after the drain is not dropped"
        );
        assert!(*stuck.exported.lock().unwrap() >= 1);
        provider.shutdown().ok();
    }
}
