//! shardline worker: one process = one worker group.
//!
//! The worker protocol itself (engine, sampler, gRPC service, serving lifecycle) is
//! `shardline-engine`'s, model-free; this crate is the model behind it:
//! - [`tokenizer`]: the model's tokenizer (GGUF metadata or `tokenizer.json`), from
//!   `shardline-tokenizer`.
//! - [`args`]: `WorkerArgs` + `run`: load the model, then serve it through
//!   `shardline_engine::serve`.
//! - [`config`], [`kv`], [`kernels`], [`model`], [`loader`]: the model side — Llama config,
//!   paged KV cache with prefix caching, batch-invariant CPU kernels, the batched Llama
//!   and its [`model::runner::LlamaRunner`], GGUF / safetensors loaders.
//! - [`tp`]: tensor parallelism (rank shards, the all-reduce communicators).

/// The contract this crate's runners implement (re-exported from `shardline-engine`).
pub use shardline_engine::runner;

// Model side (config, KV cache, kernels, model, loaders).
pub mod config;
pub mod kernels;
pub mod kv;
pub mod loader;
pub mod model;
pub mod tp;

// Serving side (flags, tokenizer).
pub mod args;
/// The model's tokenizer (re-exported from `shardline-tokenizer`).
pub use shardline_tokenizer as tokenizer;

pub use args::{WorkerArgs, run};
