//! shardline's worker protocol (`shardline.worker.v1`), implemented once and model-free.
//!
//! Every worker group — a real model on candle, the simulator of a GPU, the fakes of
//! tests — is a [`runner::ModelRunner`] behind this crate's engine and gRPC service, so
//! the protocol's rules (chunked prefill accounting, KV admission and out-of-blocks
//! answers, `min_tokens` and stop tokens, release, idle release, draining) exist once.
//!
//! - [`runner`]: the [`runner::ModelRunner`] contract between engine and model.
//! - [`engine`]: the engine thread (actor) that turns steps into forwards plus sampling.
//! - [`metrics`]: the group's Prometheus metrics and their endpoint (`--metrics-listen`).
//! - [`sampler`]: penalties, temperature, top-k/p, min-p, seeded draws, logprobs.
//! - [`service`]: the `Worker` gRPC service (the pipelined step stream, `Info`,
//!   `Health`); [`serve`]: a group's whole serving life around a runner (engine, idle
//!   release, registration, drain), shared by `shardline worker` and the simulator;
//!   `trace`: the spans of steps and sequences when traces are exported.
//! - [`fake`] and [`testing`] (feature `testing`, for other crates' tests only): a
//!   deterministic runner without a model, and a worker on a loopback port over it.

pub mod engine;
pub mod metrics;
pub mod runner;
pub mod sampler;
pub mod serve;
pub mod service;
mod trace;

#[cfg(any(test, feature = "testing"))]
pub mod fake;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
