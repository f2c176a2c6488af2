//! shardline worker: one process = one worker group.
//!
//! - [`runner`]: the [`runner::ModelRunner`] contract between engine and model.
//! - [`tokenizer`]: the model's tokenizer (GGUF metadata or `tokenizer.json`).
//! - [`sampler`]: penalties, temperature, top-k/p, min-p, seeded draws, logprobs.
//! - [`engine`]: the engine thread (actor) that batches steps over the runner.
//! - [`service`]: the `shardline.worker.v1` gRPC service; [`args`]: `WorkerArgs` + `run`.
//! - [`config`], [`kv`], [`kernels`], [`model`], [`loader`]: the model side — Llama config,
//!   paged KV cache with prefix caching, batch-invariant CPU kernels, the batched Llama
//!   and its [`model::runner::LlamaRunner`], GGUF / safetensors loaders.
//! - [`tp`]: tensor parallelism (rank shards, the all-reduce communicators).
pub mod runner;

// Model side (config, KV cache, kernels, model, loaders).
pub mod config;
pub mod kernels;
pub mod kv;
pub mod loader;
pub mod model;
pub mod tp;

// Serving side (engine, sampler, tokenizer, gRPC service).
pub mod args;
pub mod engine;
pub mod registration;
pub mod sampler;
pub mod service;
pub mod tokenizer;

pub use args::{WorkerArgs, run};
