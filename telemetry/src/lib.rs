//! Logs and traces of every shardline process (coordinator, worker, `shardline up`).
//!
//! [`init`] installs the one `tracing` subscriber a process has: logs on stderr as text or
//! JSON (`--log-format`), filtered by `RUST_LOG`; and, when an OTLP endpoint is configured
//! (`--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), every span exported
//! to it through `tracing-opentelemetry` and the OpenTelemetry SDK's batch processor, with
//! W3C `traceparent` as the propagation format. Without an endpoint no OpenTelemetry layer
//! exists at all, so tracing costs what it cost before.
//!
//! The export never blocks or fails a request: spans wait in a bounded queue
//! ([`QUEUE_SPANS`]) exported in the background, and a span that finds the queue full is
//! dropped and counted ([`dropped_spans`], which the metrics endpoints export) — an absent
//! or slow collector costs spans, not latency. The standard `OTEL_SERVICE_NAME` and
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` variables are honoured by the SDK.

mod propagation;
mod queue;

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

pub use propagation::{
    SpanContext, TRACEPARENT, TraceId, add_link, continue_trace, exporting, set_parent,
    span_context, traceparent,
};
pub use queue::{QUEUE_SPANS, dropped_spans};

/// Target of spans and events that exist for traces only (a request's phases, worker
/// steps): the log layer skips them, so they cost no formatting when nothing is logged
/// from inside them, and they are created only when spans are exported.
pub const TRACE_ONLY: &str = "shardline_trace";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    // (Plain comments: doc comments on the variants would switch `--help` to its long
    // form.) Human-readable lines, colours on a terminal.
    #[default]
    Text,
    // One JSON object per line with the fields of the enclosing span (the trace id among
    // them), for log shippers.
    Json,
}

/// Telemetry flags every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// OTLP/gRPC endpoint to export traces to, e.g. `http://otel-collector:4317` (default:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; neither set: no traces). `OTEL_SERVICE_NAME` and
    /// `OTEL_TRACES_SAMPLER`(`_ARG`) apply too.
    #[arg(long, env = "SHARDLINE_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Log line format on stderr: `text`, or `json` (one object per line with the current
    /// span's fields, for log shippers); the level is `RUST_LOG`'s.
    #[arg(
        long,
        env = "SHARDLINE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

impl TelemetryArgs {
    /// The endpoint traces go to: the flag, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> Option<String> {
        self.otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] exports what is still queued.
#[must_use = "dropping it stops the trace export; call shutdown() at exit"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the queued spans (for at most a few seconds) and stops the exporter.
    pub fn shutdown(mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("telemetry: trace export did not shut down cleanly: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
        }
    }
}

/// The tracer provider exporting to `endpoint` (OTLP over gRPC) as `service`, unless
/// `OTEL_SERVICE_NAME` names the service. Needs a Tokio runtime (the gRPC channel's
/// tasks run on it).
pub fn provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("the OTLP exporter to {endpoint}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(queue::processor(exporter))
        .with_resource(resource.build())
        .build())
}

/// Installs the process's subscriber (see the crate docs). `service` names the process in
/// traces (`shardline-coordinator`, `shardline-worker`, …). Call it inside the Tokio
/// runtime when traces may be exported.
pub fn init(args: &TelemetryArgs, service: &str) -> anyhow::Result<Telemetry> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log_filter = || {
        filter().add_directive(
            format!("{TRACE_ONLY}=off")
                .parse()
                .expect("a static directive; this is a bug"),
        )
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(log_filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(log_filter())
            .boxed(),
    };
    let Some(endpoint) = args.endpoint() else {
        Registry::default()
            .with(fmt)
            .try_init()
            .context("installing the log subscriber")?;
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(&endpoint, service)?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // Traces take every info-level span whatever `RUST_LOG` says of logs: what a trace
    // holds is the sampler's business (`OTEL_TRACES_SAMPLER`), not the log level's.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("shardline"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    Registry::default()
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the log and trace subscriber")?;
    propagation::set_exporting();
    tracing::info!(%endpoint, service, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}
