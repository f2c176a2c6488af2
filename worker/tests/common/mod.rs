//! Helpers shared by the worker's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, or a panic that says how to get it.
pub fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run deploy/fetch-model.sh",
        p.display()
    );
    p
}

/// The id of the largest logit (the sampler's greedy choice).
pub fn argmax(x: &[f32]) -> u32 {
    shardline_engine::sampler::greedy(x).expect("a row with a finite logit")
}
