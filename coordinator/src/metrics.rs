//! Prometheus metrics of the coordinator, in a [`prometheus::Registry`] this crate owns
//! (no globals), named like vLLM's and labelled by group where that makes sense.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub kv_usage: GaugeVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub batch_size: HistogramVec,
    pub step_duration: HistogramVec,
    pub rejected: IntCounterVec,
    pub migrations: IntCounterVec,
    pub requests: IntCounterVec,
    /// Time to first token, split: waiting in the group's queue (for the step in flight,
    /// the token budget or a slot) ...
    pub queue_time: Histogram,
    /// ... and what is left after the queue wait and the worker's own step time: the
    /// coordinator (validation, scheduling, fan-out, detokenization) and the gRPC hop.
    pub first_token_overhead: Histogram,
    /// Step RPC round trip minus the worker's reported step time (hop + service).
    pub step_overhead: HistogramVec,
    /// Spans the trace exporter dropped (a slow or absent collector); brought up to date
    /// from `shardline_telemetry::dropped_spans` on every scrape.
    trace_spans_dropped: IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    60.0,
];

/// Fine buckets for the coordinator's own share (sub-millisecond to tens of ms).
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0,
];

fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let group = &["group"];
        let m = Metrics {
            time_to_first_token: Histogram::with_opts(histogram(
                "shardline_time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
                LATENCY_BUCKETS,
            ))
            .expect("static metric definition; this is a bug"),
            inter_token_latency: Histogram::with_opts(histogram(
                "shardline_inter_token_latency_seconds",
                "Time between consecutive tokens of a request.",
                LATENCY_BUCKETS,
            ))
            .expect("static metric definition; this is a bug"),
            e2e_latency: Histogram::with_opts(histogram(
                "shardline_e2e_request_latency_seconds",
                "Time from arrival to the last token.",
                LATENCY_BUCKETS,
            ))
            .expect("static metric definition; this is a bug"),
            running: IntGaugeVec::new(
                Opts::new("shardline_num_requests_running", "Sequences on the worker."),
                group,
            )
            .expect("static metric definition; this is a bug"),
            waiting: IntGaugeVec::new(
                Opts::new(
                    "shardline_num_requests_waiting",
                    "Requests queued for a group.",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            kv_usage: GaugeVec::new(
                Opts::new(
                    "shardline_kv_cache_usage_perc",
                    "Fraction of the group's KV blocks in use (0..1).",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            prompt_tokens: IntCounterVec::new(
                Opts::new("shardline_prompt_tokens_total", "Prompt tokens prefilled."),
                group,
            )
            .expect("static metric definition; this is a bug"),
            generation_tokens: IntCounterVec::new(
                Opts::new("shardline_generation_tokens_total", "Tokens generated."),
                group,
            )
            .expect("static metric definition; this is a bug"),
            batch_size: HistogramVec::new(
                histogram(
                    "shardline_batch_size",
                    "Sequences per Step RPC.",
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            step_duration: HistogramVec::new(
                histogram(
                    "shardline_step_duration_seconds",
                    "Step RPC round trip.",
                    LATENCY_BUCKETS,
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "shardline_requests_rejected_total",
                    "Requests refused, by reason.",
                ),
                &["reason"],
            )
            .expect("static metric definition; this is a bug"),
            migrations: IntCounterVec::new(
                Opts::new(
                    "shardline_request_migrations_total",
                    "Requests moved off a failed group.",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            requests: IntCounterVec::new(
                Opts::new(
                    "shardline_requests_total",
                    "Finished requests by finish reason.",
                ),
                &["finish_reason"],
            )
            .expect("static metric definition; this is a bug"),
            queue_time: Histogram::with_opts(histogram(
                "shardline_request_queue_time_seconds",
                "Time from handing a request to its group's scheduler to its first step.",
                OVERHEAD_BUCKETS,
            ))
            .expect("static metric definition; this is a bug"),
            first_token_overhead: Histogram::with_opts(histogram(
                "shardline_first_token_overhead_seconds",
                "Time to first token minus queue time minus the worker's step time: the coordinator's own share plus the gRPC hop.",
                OVERHEAD_BUCKETS,
            ))
            .expect("static metric definition; this is a bug"),
            step_overhead: HistogramVec::new(
                histogram(
                    "shardline_step_overhead_seconds",
                    "Step RPC round trip minus the worker's reported step time.",
                    OVERHEAD_BUCKETS,
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            trace_spans_dropped: IntCounter::new(
                "shardline_trace_spans_dropped_total",
                "Spans dropped because the trace export queue was full (a slow or absent OTLP collector).",
            )
            .expect("static metric definition; this is a bug"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.inter_token_latency.clone()),
            Box::new(m.e2e_latency.clone()),
            Box::new(m.running.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.step_duration.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.migrations.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.queue_time.clone()),
            Box::new(m.first_token_overhead.clone()),
            Box::new(m.step_overhead.clone()),
            Box::new(m.trace_spans_dropped.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique; this is a bug");
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let dropped = shardline_telemetry::dropped_spans();
        self.trace_spans_dropped
            .inc_by(dropped.saturating_sub(self.trace_spans_dropped.get()));
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_named_metrics() {
        let m = super::Metrics::new();
        m.batch_size.with_label_values(&["g"]).observe(8.0);
        m.rejected.with_label_values(&["queue_full"]).inc();
        let text = m.render();
        assert!(text.contains("shardline_batch_size_bucket{group=\"g\",le=\"8\"} 1"));
        assert!(text.contains("shardline_requests_rejected_total{reason=\"queue_full\"} 1"));
    }
}
