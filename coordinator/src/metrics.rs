//! Prometheus metrics of the coordinator, in a [`prometheus::Registry`] this crate owns
//! (no globals), named like vLLM's and labelled by group where that makes sense, and by
//! tenant and priority where users need them (requests, tokens, refusals, TTFT / ITL).
//!
//! Tenant labels are bounded ([`MAX_TENANT_LABELS`]): the first tenants seen get their
//! own value, later ones fold into `other`, requests without a tenant are `none`, so a
//! client inventing tenants cannot blow up the series count.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// Most distinct tenant label values; the rest fold into [`OTHER_TENANT`].
pub const MAX_TENANT_LABELS: usize = 64;
/// Longest tenant name used as a label value; longer ones fold into [`OTHER_TENANT`].
const MAX_TENANT_LABEL_LEN: usize = 64;
/// Label value of tenants beyond [`MAX_TENANT_LABELS`].
pub const OTHER_TENANT: &str = "other";
/// Label value of requests that name no tenant.
pub const NO_TENANT: &str = "none";

/// Why requests are refused (`shardline_requests_rejected_total{reason}`).
pub const REJECT_REASONS: &[&str] = &[
    "invalid",
    "no_group",
    "max_concurrent_requests",
    "queue_full",
    "kv_budget",
    "tenant_concurrency",
    "tenant_rate",
    "tenant_tokens",
    "forbidden",
];

/// Labels of per-tenant series: tenant, priority.
pub const TENANT_LABELS: &[&str] = &["tenant", "priority"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// By tenant and priority ([`TENANT_LABELS`]).
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub e2e_latency: HistogramVec,
    /// By tenant and priority.
    pub tenant_prompt_tokens: IntCounterVec,
    pub tenant_generation_tokens: IntCounterVec,
    /// Tenants that have a label value of their own.
    tenants: Arc<Mutex<HashSet<String>>>,
    pub running: IntGaugeVec,
    pub waiting: IntGaugeVec,
    pub kv_usage: GaugeVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub batch_size: HistogramVec,
    pub step_duration: HistogramVec,
    pub rejected: IntCounterVec,
    pub migrations: IntCounterVec,
    /// Running requests a worker preempted for KV room (vLLM's `num_preemptions`).
    pub preemptions: IntCounterVec,
    /// Prompt tokens whose prefill completed, and those of them the worker's prefix cache
    /// supplied (vLLM's `prefix_cache_queries` / `prefix_cache_hits`).
    pub prefix_cache_queries: IntCounterVec,
    pub prefix_cache_hits: IntCounterVec,
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
    /// This coordinator's totals over its groups, for an inference gateway's endpoint
    /// picker, which routes between coordinators (see [`Metrics::set_totals`]).
    total_waiting: IntGauge,
    total_running: IntGauge,
    total_kv_usage: Gauge,
    cache_config: IntGaugeVec,
}

/// A coordinator's load over all its ready groups, as an endpoint picker reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub waiting: i64,
    pub running: i64,
    pub kv_blocks_used: i64,
    pub kv_blocks_total: i64,
    pub block_size: u32,
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
            time_to_first_token: HistogramVec::new(
                histogram(
                    "shardline_time_to_first_token_seconds",
                    "Time from arrival to the first generated token.",
                    LATENCY_BUCKETS,
                ),
                TENANT_LABELS,
            )
            .expect("static metric definition; this is a bug"),
            inter_token_latency: HistogramVec::new(
                histogram(
                    "shardline_inter_token_latency_seconds",
                    "Time between consecutive tokens of a request.",
                    LATENCY_BUCKETS,
                ),
                TENANT_LABELS,
            )
            .expect("static metric definition; this is a bug"),
            e2e_latency: HistogramVec::new(
                histogram(
                    "shardline_e2e_request_latency_seconds",
                    "Time from arrival to the last token.",
                    LATENCY_BUCKETS,
                ),
                TENANT_LABELS,
            )
            .expect("static metric definition; this is a bug"),
            tenant_prompt_tokens: IntCounterVec::new(
                Opts::new(
                    "shardline_tenant_prompt_tokens_total",
                    "Prompt tokens of finished requests, by tenant and priority.",
                ),
                TENANT_LABELS,
            )
            .expect("static metric definition; this is a bug"),
            tenant_generation_tokens: IntCounterVec::new(
                Opts::new(
                    "shardline_tenant_generation_tokens_total",
                    "Tokens generated, by tenant and priority.",
                ),
                TENANT_LABELS,
            )
            .expect("static metric definition; this is a bug"),
            tenants: Arc::default(),
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
                    "Requests refused, by reason, tenant and priority.",
                ),
                &["reason", "tenant", "priority"],
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
            preemptions: IntCounterVec::new(
                Opts::new(
                    "shardline_num_preemptions_total",
                    "Running requests preempted for KV cache room (continued later by prefilling again).",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            prefix_cache_queries: IntCounterVec::new(
                Opts::new(
                    "shardline_prefix_cache_queries_total",
                    "Prompt tokens prefilled or looked up in the prefix cache (prompts whose prefill completed).",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            prefix_cache_hits: IntCounterVec::new(
                Opts::new(
                    "shardline_prefix_cache_hits_total",
                    "Prompt tokens the worker's prefix cache supplied instead of computing them.",
                ),
                group,
            )
            .expect("static metric definition; this is a bug"),
            requests: IntCounterVec::new(
                Opts::new(
                    "shardline_requests_total",
                    "Finished requests by finish reason, tenant and priority.",
                ),
                &["finish_reason", "tenant", "priority"],
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
            total_waiting: IntGauge::new(
                "shardline_coordinator_num_requests_waiting",
                "Requests queued in this coordinator, all groups together (the Inference Extension's TotalQueuedRequests; vLLM's vllm:num_requests_waiting).",
            )
            .expect("static metric definition; this is a bug"),
            total_running: IntGauge::new(
                "shardline_coordinator_num_requests_running",
                "Requests of this coordinator running on a worker, all groups together (TotalRunningRequests; vllm:num_requests_running).",
            )
            .expect("static metric definition; this is a bug"),
            total_kv_usage: Gauge::new(
                "shardline_coordinator_kv_cache_usage_perc",
                "KV blocks in use over all blocks of this coordinator's groups, 0..1 (KVCacheUtilization; vllm:kv_cache_usage_perc).",
            )
            .expect("static metric definition; this is a bug"),
            cache_config: IntGaugeVec::new(
                Opts::new(
                    "shardline_coordinator_cache_config_info",
                    "KV cache configuration of this coordinator's groups (value 1): block_size in tokens, num_gpu_blocks over all groups (vllm:cache_config_info).",
                ),
                &["block_size", "num_gpu_blocks"],
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
            Box::new(m.tenant_prompt_tokens.clone()),
            Box::new(m.tenant_generation_tokens.clone()),
            Box::new(m.running.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.step_duration.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.migrations.clone()),
            Box::new(m.preemptions.clone()),
            Box::new(m.prefix_cache_queries.clone()),
            Box::new(m.prefix_cache_hits.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.queue_time.clone()),
            Box::new(m.first_token_overhead.clone()),
            Box::new(m.step_overhead.clone()),
            Box::new(m.trace_spans_dropped.clone()),
            Box::new(m.total_waiting.clone()),
            Box::new(m.total_running.clone()),
            Box::new(m.total_kv_usage.clone()),
            Box::new(m.cache_config.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique; this is a bug");
        }
        // Every refusal reason has a series from the start (at zero), so rates and alerts
        // over them work before the first refusal.
        for reason in REJECT_REASONS {
            let _ = m.rejected.with_label_values(&[reason, NO_TENANT, "normal"]);
        }
        m
    }

    /// The label value of `tenant` (see the module docs): its name while fewer than
    /// [`MAX_TENANT_LABELS`] tenants have one, `other` after, `none` without a tenant.
    pub fn tenant_label(&self, tenant: Option<&str>) -> String {
        let tenant = match tenant.map(str::trim) {
            None | Some("") => return NO_TENANT.to_string(),
            Some(t) => t,
        };
        if tenant.len() > MAX_TENANT_LABEL_LEN || tenant == OTHER_TENANT || tenant == NO_TENANT {
            return OTHER_TENANT.to_string();
        }
        let mut known = self.tenants.lock().expect("lock poisoned; this is a bug");
        if known.contains(tenant) {
            return tenant.to_string();
        }
        if known.len() < MAX_TENANT_LABELS {
            known.insert(tenant.to_string());
            return tenant.to_string();
        }
        OTHER_TENANT.to_string()
    }

    /// Sets the coordinator-wide gauges (before a scrape renders them).
    pub fn set_totals(&self, t: Totals) {
        self.total_waiting.set(t.waiting);
        self.total_running.set(t.running);
        self.total_kv_usage
            .set(t.kv_blocks_used as f64 / t.kv_blocks_total.max(1) as f64);
        self.cache_config.reset();
        if t.kv_blocks_total > 0 {
            self.cache_config
                .with_label_values(&[&t.block_size.to_string(), &t.kv_blocks_total.to_string()])
                .set(1);
        }
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
        m.rejected
            .with_label_values(&["queue_full", "t", "high"])
            .inc();
        let text = m.render();
        assert!(text.contains("shardline_batch_size_bucket{group=\"g\",le=\"8\"} 1"));
        assert!(text.contains(
            "shardline_requests_rejected_total{priority=\"high\",reason=\"queue_full\",tenant=\"t\"} 1"
        ));
    }

    #[test]
    fn tenant_labels_are_bounded() {
        let m = super::Metrics::new();
        assert_eq!(m.tenant_label(None), "none");
        assert_eq!(m.tenant_label(Some(" ")), "none");
        for i in 0..super::MAX_TENANT_LABELS {
            assert_eq!(m.tenant_label(Some(&format!("t{i}"))), format!("t{i}"));
        }
        assert_eq!(m.tenant_label(Some("late")), "other", "the set is full");
        assert_eq!(
            m.tenant_label(Some("t3")),
            "t3",
            "known tenants keep theirs"
        );
        assert_eq!(m.tenant_label(Some(&"x".repeat(100))), "other");
        assert_eq!(m.tenant_label(Some("other")), "other");
    }
}
