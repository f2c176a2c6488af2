//! Helpers shared by the worker's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;

use shardline_worker::runner::{LogitsWanted, ModelRunner, SeqChunk, SeqId};

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

/// What one greedy run gives: each prompt's first-step logits and its generated tokens.
pub struct Greedy {
    pub first: Vec<Vec<f32>>,
    pub tokens: Vec<Vec<u32>>,
}

/// All prompts prefilled in one step, then `steps - 1` batched greedy decodes.
pub fn greedy(r: &mut dyn ModelRunner, prompts: &[Vec<u32>], steps: usize) -> Greedy {
    let mut first = vec![Vec::new(); prompts.len()];
    let mut tokens = vec![Vec::new(); prompts.len()];
    let mut batch: Vec<SeqChunk> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            r.add_sequence(SeqId(i as u64), p).unwrap();
            SeqChunk {
                id: SeqId(i as u64),
                tokens: p.clone(),
                logits: LogitsWanted::Last,
            }
        })
        .collect();
    for step in 0..steps {
        let out = r.forward(&batch).unwrap();
        batch = out
            .into_iter()
            .map(|c| {
                let i = c.id.0 as usize;
                let t = argmax(&c.data);
                tokens[i].push(t);
                if step == 0 {
                    first[i] = c.data;
                }
                SeqChunk {
                    id: c.id,
                    tokens: vec![t],
                    logits: LogitsWanted::Last,
                }
            })
            .collect();
    }
    for i in 0..prompts.len() {
        r.remove_sequence(SeqId(i as u64));
    }
    Greedy { first, tokens }
}
