//! A worker group's Prometheus metrics, served on its own HTTP port
//! (`--metrics-listen`, `GET /metrics`, no API key): its steps (time, tokens, batch),
//! its KV cache (used / free / cached blocks, prefix-cache hits), its sequences (running,
//! prefilling, released, idle-released), its tensor-parallel collectives, and the gauges
//! Kubernetes-native inference routers read — the Gateway API Inference Extension's
//! model-server protocol, named like vLLM's (`shardline_num_requests_waiting`,
//! `shardline_num_requests_running`, `shardline_kv_cache_usage_perc`,
//! `shardline_cache_config_info`). Every series carries the group's id as `group`.
//!
//! Step figures are observed from each step's answer as it goes back; the rest is read
//! from the engine at scrape time, so a scrape costs one engine status call.

use std::net::SocketAddr;

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use shardline_proto::worker::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, EngineStatus};

/// Step times, from a small model on a fast GPU to a big one on a CPU.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The metrics of one worker group; clones share them.
#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    step_duration: Histogram,
    step_tokens: Histogram,
    batch_size: Histogram,
    kv_blocks: IntGaugeVec,
    kv_usage: Gauge,
    running: IntGauge,
    waiting: IntGauge,
    prompt_tokens: IntCounter,
    prefix_hit_tokens: IntCounter,
    generation_tokens: IntCounter,
    steps: IntCounter,
    released: IntCounter,
    released_idle: IntCounter,
    collectives: IntCounter,
    collective_seconds: Counter,
    collective_failures: IntCounter,
    spans_dropped: IntCounter,
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique; this is a bug");
    c
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static metric definition; this is a bug");
    registered(registry, h)
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c =
        IntCounter::with_opts(opts(name, help)).expect("static metric definition; this is a bug");
    registered(registry, c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::with_opts(opts(name, help)).expect("static metric definition; this is a bug");
    registered(registry, g)
}

/// Brings a counter up to a total the engine keeps.
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

impl WorkerMetrics {
    /// The metrics of group `group`, whose KV cache has `num_blocks` blocks of
    /// `block_size` tokens, each value stored as `cache_dtype` (`f32`, `f16`, `bf16`).
    pub fn new(
        group: &str,
        block_size: usize,
        num_blocks: usize,
        cache_dtype: &str,
    ) -> WorkerMetrics {
        let labels = [("group".to_string(), group.to_string())].into();
        let registry = Registry::new_custom(None, Some(labels))
            .expect("a valid constant label; this is a bug");
        let r = &registry;
        let kv_blocks = registered(
            r,
            IntGaugeVec::new(
                opts(
                    "shardline_worker_kv_blocks",
                    "KV cache blocks by state: used (held by a sequence), free (evictable ones included), cached (free, holding a prefix for later hits).",
                ),
                &["state"],
            )
            .expect("static metric definition; this is a bug"),
        );
        let cache_config = registered(
            r,
            IntGaugeVec::new(
                opts(
                    "shardline_worker_cache_config_info",
                    "KV cache configuration (value 1), like vLLM's vllm:cache_config_info: block_size in tokens, num_gpu_blocks, cache_dtype (the element type of the cached keys and values).",
                ),
                &["block_size", "num_gpu_blocks", "cache_dtype"],
            )
            .expect("static metric definition; this is a bug"),
        );
        cache_config
            .with_label_values(&[
                &block_size.to_string(),
                &num_blocks.to_string(),
                cache_dtype,
            ])
            .set(1);
        let kv_usage = registered(
            r,
            Gauge::with_opts(opts(
                "shardline_worker_kv_cache_usage_perc",
                "Fraction of the KV cache in use (0..1), like vLLM's vllm:kv_cache_usage_perc.",
            ))
            .expect("static metric definition; this is a bug"),
        );
        let collective_seconds = registered(
            r,
            Counter::with_opts(opts(
                "shardline_worker_tp_collective_seconds_total",
                "Time rank 0 spent in tensor-parallel collectives (all-reduce, broadcast, barrier).",
            ))
            .expect("static metric definition; this is a bug"),
        );
        WorkerMetrics {
            step_duration: histogram(
                r,
                "shardline_worker_step_duration_seconds",
                "The worker's own time for one step (forward and sampling).",
                STEP_BUCKETS,
            ),
            step_tokens: histogram(
                r,
                "shardline_worker_step_tokens",
                "Tokens run in one step (prefill chunks and decodes).",
                TOKEN_BUCKETS,
            ),
            batch_size: histogram(
                r,
                "shardline_worker_batch_size",
                "Sequences in one step.",
                BATCH_BUCKETS,
            ),
            kv_blocks,
            kv_usage,
            running: gauge(
                r,
                "shardline_worker_num_requests_running",
                "Sequences on the worker, like vLLM's vllm:num_requests_running.",
            ),
            waiting: gauge(
                r,
                "shardline_worker_num_requests_waiting",
                "Sequences whose prompt is still being prefilled, like vLLM's vllm:num_requests_waiting (the coordinator queues the rest).",
            ),
            prompt_tokens: counter(
                r,
                "shardline_worker_prompt_tokens_total",
                "Prompt tokens computed (prefix-cache hits excluded).",
            ),
            prefix_hit_tokens: counter(
                r,
                "shardline_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache instead of computed.",
            ),
            generation_tokens: counter(
                r,
                "shardline_worker_generation_tokens_total",
                "Tokens sampled.",
            ),
            steps: counter(r, "shardline_worker_steps_total", "Steps run."),
            released: counter(
                r,
                "shardline_worker_sequences_released_total",
                "Sequences released while running (client gone, deadline, group removed).",
            ),
            released_idle: counter(
                r,
                "shardline_worker_sequences_released_idle_total",
                "Sequences released because no step named them for the idle timeout (their coordinator is gone).",
            ),
            collectives: counter(
                r,
                "shardline_worker_tp_collectives_total",
                "Tensor-parallel collectives run by rank 0.",
            ),
            collective_seconds,
            collective_failures: counter(
                r,
                "shardline_worker_tp_collective_failures_total",
                "Tensor-parallel collectives that failed (timeout, a rank gone, a backend error).",
            ),
            spans_dropped: counter(
                r,
                "shardline_trace_spans_dropped_total",
                "Spans dropped because the trace export queue was full (a slow or absent OTLP collector).",
            ),
            registry,
        }
    }

    /// A step's answer on its way back to the coordinator.
    pub fn observe_step(&self, resp: &pb::StepResponse) {
        self.step_duration.observe(resp.step_time_ns as f64 / 1e9);
        self.step_tokens.observe(f64::from(resp.batch_tokens));
        self.batch_size.observe(resp.results.len() as f64);
    }

    /// Brings the gauges and the engine's counters up to date from `status`.
    pub fn update(&self, status: &EngineStatus, total_blocks: usize) {
        let free = status.kv_blocks_free;
        let used = total_blocks.saturating_sub(free);
        let cached = status.runner.kv_blocks_cached;
        self.kv_blocks.with_label_values(&["used"]).set(used as i64);
        self.kv_blocks.with_label_values(&["free"]).set(free as i64);
        self.kv_blocks
            .with_label_values(&["cached"])
            .set(cached as i64);
        self.kv_usage.set(used as f64 / total_blocks.max(1) as f64);
        self.running.set(status.num_running as i64);
        self.waiting.set(status.num_prefilling as i64);
        let c = &status.counters;
        catch_up(&self.prompt_tokens, c.prompt_tokens_computed);
        catch_up(&self.prefix_hit_tokens, c.prompt_tokens_cached);
        catch_up(&self.generation_tokens, c.tokens_generated);
        catch_up(&self.steps, c.steps);
        catch_up(&self.released, c.seqs_released);
        catch_up(&self.released_idle, c.seqs_released_idle);
        catch_up(&self.collectives, status.runner.collectives);
        catch_up(&self.collective_failures, status.runner.collective_failures);
        let seconds = status.runner.collective_seconds - self.collective_seconds.get();
        if seconds > 0.0 {
            self.collective_seconds.inc_by(seconds);
        }
        catch_up(&self.spans_dropped, shardline_telemetry::dropped_spans());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`, reading the engine at each scrape.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: WorkerMetrics,
    engine: EngineHandle,
    total_blocks: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let addr: SocketAddr = listener.local_addr()?;
    let scrape = move || {
        let (metrics, engine) = (metrics.clone(), engine.clone());
        async move {
            match engine.status().await {
                Ok(status) => {
                    metrics.update(&status, total_blocks);
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                        .into_response()
                }
                Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    tracing::info!(%addr, "worker metrics listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
