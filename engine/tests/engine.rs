//! The serving engine over [`FakeRunner`] (deterministic logits: greedy after token `t` is
//! `t + 1`): chunked prefill, mixed steps, stop reasons, KV exhaustion, bad input, release,
//! and seeded sampling that does not depend on the batch or on migration.

use std::sync::{Arc, Mutex};

use shardline_engine::engine::{EngineConfig, EngineHandle, EngineState, ModelFacts};
use shardline_engine::fake::{FakeLog, FakeRunner};
use shardline_engine::runner::{LogitsWanted, SeqId};
use shardline_proto::worker::v1 as pb;

const VOCAB: usize = 32;
const EOS: u32 = 31;

fn engine(ctx: usize, block_size: usize, blocks: usize) -> (EngineState, Arc<Mutex<FakeLog>>) {
    engine_with(FakeRunner::new(VOCAB, ctx, block_size, blocks), 16)
}

fn engine_with(runner: FakeRunner, max_num_seqs: usize) -> (EngineState, Arc<Mutex<FakeLog>>) {
    let log = runner.log();
    let config = EngineConfig {
        max_num_seqs,
        group_id: "g".into(),
        model: ModelFacts {
            eos_token_ids: vec![EOS],
            ..ModelFacts::default()
        },
    };
    (EngineState::new(Box::new(runner), config), log)
}

fn params(max_new_tokens: u32) -> pb::SequenceParams {
    pb::SequenceParams {
        max_new_tokens,
        ..Default::default()
    }
}

fn first(
    id: u64,
    prompt: Vec<u32>,
    params: pb::SequenceParams,
    max_tokens: u32,
) -> pb::PrefillChunk {
    pb::PrefillChunk {
        seq_id: id,
        prompt,
        params: Some(params),
        max_tokens,
        ..Default::default()
    }
}

fn more(id: u64, max_tokens: u32) -> pb::PrefillChunk {
    pb::PrefillChunk {
        seq_id: id,
        max_tokens,
        ..Default::default()
    }
}

fn step(e: &mut EngineState, prefill: Vec<pb::PrefillChunk>, decode: Vec<u64>) -> pb::StepResponse {
    e.step(pb::StepRequest {
        prefill,
        decode,
        ..Default::default()
    })
    .expect("step")
}

fn decode(e: &mut EngineState, ids: &[u64]) -> pb::StepResponse {
    step(e, vec![], ids.to_vec())
}

fn token(r: &pb::SeqResult) -> u32 {
    assert_eq!(r.status, pb::SeqStatus::Ok as i32, "{r:?}");
    assert!(r.has_token, "{r:?}");
    r.token.as_ref().unwrap().token_id
}

fn status(r: &pb::SeqResult) -> pb::SeqStatus {
    pb::SeqStatus::try_from(r.status).unwrap()
}

fn finish(r: &pb::SeqResult) -> pb::FinishReason {
    pb::FinishReason::try_from(r.finish_reason).unwrap()
}

#[test]
fn chunked_prefill_then_decode() {
    let (mut e, log) = engine(64, 4, 64);
    let prompt: Vec<u32> = (1..=10).collect();
    let r = step(&mut e, vec![first(7, prompt, params(3), 4)], vec![]);
    assert_eq!(r.results[0].prompt_computed, 4);
    assert!(!r.results[0].has_token);
    assert_eq!(r.batch_tokens, 4);
    assert_eq!(r.num_running, 1);
    let r = step(&mut e, vec![more(7, 4)], vec![]);
    assert_eq!(r.results[0].prompt_computed, 8);
    assert!(!r.results[0].has_token);
    let r = step(&mut e, vec![more(7, 4)], vec![]);
    assert_eq!(r.results[0].prompt_computed, 10);
    assert_eq!(token(&r.results[0]), 11, "greedy after 10 is 11");
    assert_eq!(r.batch_tokens, 2);
    let r = decode(&mut e, &[7]);
    assert_eq!(token(&r.results[0]), 12);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Unspecified);
    let r = decode(&mut e, &[7]);
    assert_eq!(token(&r.results[0]), 13);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Length);
    assert_eq!(
        r.num_running, 0,
        "finished sequences are freed by the worker"
    );
    assert_eq!(r.kv_blocks_free, 64);

    let forwards = &log.lock().unwrap().forwards;
    let wanted: Vec<LogitsWanted> = forwards.iter().map(|f| f[0].2).collect();
    assert_eq!(
        wanted,
        [
            LogitsWanted::None,
            LogitsWanted::None,
            LogitsWanted::Last,
            LogitsWanted::Last,
            LogitsWanted::Last
        ]
    );
    let sizes: Vec<usize> = forwards.iter().map(|f| f[0].1).collect();
    assert_eq!(sizes, [4, 4, 2, 1, 1]);
}

#[test]
fn mixed_step_runs_prefill_and_decode_in_one_forward() {
    let (mut e, log) = engine(64, 4, 64);
    let r = step(&mut e, vec![first(1, vec![3, 4], params(10), 0)], vec![]);
    assert_eq!(token(&r.results[0]), 5);
    let r = step(
        &mut e,
        vec![first(2, vec![20, 21, 22], params(10), 0)],
        vec![1],
    );
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[0].seq_id, 2);
    assert_eq!(token(&r.results[0]), 23);
    assert_eq!(r.results[1].seq_id, 1);
    assert_eq!(token(&r.results[1]), 6);
    assert_eq!(r.batch_tokens, 4);
    assert_eq!(r.num_running, 2);
    assert_eq!(log.lock().unwrap().forwards.len(), 2);
}

#[test]
fn eos_stops_unless_ignored_and_min_tokens_suppresses_it() {
    let (mut e, _) = engine(64, 4, 64);
    // 29 -> 30 -> 31 (EOS)
    let r = step(&mut e, vec![first(1, vec![28, 29], params(10), 0)], vec![]);
    assert_eq!(token(&r.results[0]), 30);
    let r = decode(&mut e, &[1]);
    assert_eq!(token(&r.results[0]), EOS);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Stop);
    assert_eq!(r.num_running, 0);

    let mut p = params(3);
    p.ignore_eos = true;
    let r = step(&mut e, vec![first(2, vec![29], p, 0)], vec![]);
    assert_eq!(token(&r.results[0]), 30);
    let r = decode(&mut e, &[2]);
    assert_eq!(token(&r.results[0]), EOS);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Unspecified);
    let r = decode(&mut e, &[2]);
    assert_eq!(token(&r.results[0]), 0, "wraps past EOS");
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Length);

    // Greedy wants EOS right away, but min_tokens = 2 bans it for the first two tokens.
    let mut p = params(10);
    p.min_tokens = 2;
    let r = step(&mut e, vec![first(3, vec![30], p, 0)], vec![]);
    let t = token(&r.results[0]);
    assert_ne!(t, EOS);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Unspecified);

    // Extra stop ids end the sequence even with ignore_eos.
    let mut p = params(10);
    p.ignore_eos = true;
    p.stop_token_ids = vec![5];
    let r = step(&mut e, vec![first(4, vec![4], p, 0)], vec![]);
    assert_eq!(token(&r.results[0]), 5);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Stop);
}

#[test]
fn context_length_ends_with_length() {
    let (mut e, _) = engine(8, 4, 64);
    let r = step(
        &mut e,
        vec![first(1, vec![1, 2, 3, 4, 5, 6], params(0), 0)],
        vec![],
    );
    assert_eq!(token(&r.results[0]), 7);
    assert_eq!(finish(&r.results[0]), pb::FinishReason::Unspecified);
    let r = decode(&mut e, &[1]);
    assert_eq!(token(&r.results[0]), 8);
    assert_eq!(
        finish(&r.results[0]),
        pb::FinishReason::Length,
        "6 + 2 = context 8"
    );
}

#[test]
fn out_of_blocks_drops_only_that_sequence() {
    // 4 blocks of 4 positions.
    let (mut e, _) = engine(64, 4, 4);
    let a: Vec<u32> = (1..=12).collect(); // 3 blocks
    let b: Vec<u32> = (1..=8).collect(); // 2 blocks
    let r = step(
        &mut e,
        vec![first(1, a, params(10), 0), first(2, b, params(10), 0)],
        vec![],
    );
    assert_eq!(token(&r.results[0]), 13);
    assert_eq!(status(&r.results[1]), pb::SeqStatus::OutOfBlocks);
    assert!(
        r.results[1].error.contains("out of blocks"),
        "{}",
        r.results[1].error
    );
    assert_eq!(r.num_running, 1);
    assert_eq!(r.kv_blocks_free, 1);
    // The dropped sequence is gone; the other one goes on.
    let r = decode(&mut e, &[2, 1]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::Invalid);
    assert_eq!(token(&r.results[1]), 14);
}

#[test]
fn decode_sequences_get_blocks_before_new_prefills() {
    let (mut e, _) = engine(64, 4, 2);
    // Seq 1 fills block 1 exactly; its next decode token needs block 2.
    let r = step(&mut e, vec![first(1, vec![1, 2, 3], params(10), 0)], vec![]);
    assert_eq!(token(&r.results[0]), 4);
    let r = decode(&mut e, &[1]);
    assert_eq!(token(&r.results[0]), 5);
    assert_eq!(r.kv_blocks_free, 1);
    // Both want the last block: the running sequence wins although it comes second.
    let r = step(&mut e, vec![first(2, vec![9, 9], params(10), 0)], vec![1]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::OutOfBlocks);
    assert_eq!(token(&r.results[1]), 6);
}

/// Blocks are taken as sequences grow, not reserved for `max_new_tokens`: two sequences
/// that could each generate far more than the cache holds both start.
#[test]
fn blocks_are_not_reserved_for_max_new_tokens() {
    let (mut e, _) = engine(64, 4, 4);
    let r = step(
        &mut e,
        vec![
            first(1, vec![1, 2], params(60), 0),
            first(2, vec![5, 6], params(60), 0),
        ],
        vec![],
    );
    assert_eq!(token(&r.results[0]), 3);
    assert_eq!(token(&r.results[1]), 7);
    assert_eq!(r.kv_blocks_free, 2);
}

/// When a step needs more blocks than are free, the sequence that started last gives its
/// blocks back (PREEMPTED, counted) and the earlier one goes on.
#[test]
fn the_latest_started_sequence_is_preempted_when_blocks_run_out() {
    // 4 blocks of 4 positions; each sequence holds 2 blocks after its prompt of 5.
    let (mut e, log) = engine(64, 4, 4);
    let r = step(
        &mut e,
        vec![
            first(1, vec![1, 2, 3, 4, 5], params(20), 0),
            first(2, vec![9, 10, 11, 12, 13], params(20), 0),
        ],
        vec![],
    );
    assert_eq!(r.kv_blocks_free, 0);
    // Positions 6..8 fit in the second blocks.
    for _ in 0..3 {
        let r = decode(&mut e, &[1, 2]);
        assert!(r.results.iter().all(|r| r.has_token), "{r:?}");
    }
    // Writing position 8 needs a third block for each: only one of them can have one.
    let r = decode(&mut e, &[2, 1]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::Preempted);
    assert!(
        r.results[0].error.contains("out of blocks"),
        "{}",
        r.results[0].error
    );
    assert!(!r.results[0].has_token);
    assert_eq!(token(&r.results[1]), 10);
    assert_eq!(r.num_running, 1);
    assert_eq!(r.kv_blocks_free, 1, "seq 2's blocks are free again");
    assert_eq!(e.status().counters.seqs_preempted, 1);
    assert_eq!(log.lock().unwrap().live, 1);
    // Seq 2 is gone: a step that still names it (pipelined) gets INVALID.
    let r = decode(&mut e, &[2, 1]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::Invalid);
    assert_eq!(token(&r.results[1]), 11);
}

/// A less important class is preempted first, even when it started earlier; a sequence new
/// in this step that does not fit is refused, not counted as preempted.
#[test]
fn preemption_takes_the_least_important_class_first() {
    let (mut e, _) = engine(64, 4, 3);
    let mut low = params(20);
    low.priority = 2;
    let r = step(&mut e, vec![first(1, vec![1, 2, 3, 4, 5], low, 0)], vec![]);
    assert_eq!(token(&r.results[0]), 6);
    let mut high = params(20);
    high.priority = 0;
    let r = step(
        &mut e,
        vec![first(2, vec![9, 10, 11, 12, 13], high, 0)],
        vec![1],
    );
    assert_eq!(status(&r.results[0]), pb::SeqStatus::Ok);
    assert_eq!(token(&r.results[0]), 14);
    assert_eq!(status(&r.results[1]), pb::SeqStatus::Preempted);
    assert_eq!(e.status().counters.seqs_preempted, 1);
    // Same class: the new one is the one refused.
    let r = step(&mut e, vec![first(3, vec![20; 9], params(4), 0)], vec![2]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::OutOfBlocks);
    assert_eq!(token(&r.results[1]), 15);
    assert_eq!(e.status().counters.seqs_preempted, 1);
}

#[test]
fn bad_input_is_a_per_sequence_error() {
    let (mut e, _) = engine(16, 4, 64);
    let r = step(
        &mut e,
        vec![
            first(1, (0..17).map(|i| i % 30).collect(), params(4), 0),
            first(2, vec![40], params(4), 0),
            more(3, 0),
            pb::PrefillChunk {
                seq_id: 4,
                prompt: vec![1],
                params: None,
                max_tokens: 0,
                ..Default::default()
            },
            first(5, vec![1, 2], params(4), 0),
        ],
        vec![99, 5],
    );
    let errors: Vec<(pb::SeqStatus, &str)> = r
        .results
        .iter()
        .map(|r| (status(r), r.error.as_str()))
        .collect();
    assert_eq!(errors[0].0, pb::SeqStatus::Invalid);
    assert!(
        errors[0].1.contains("exceeds the context length 16"),
        "{}",
        errors[0].1
    );
    assert!(
        errors[1].1.contains("outside the vocabulary"),
        "{}",
        errors[1].1
    );
    assert!(errors[2].1.contains("unknown"), "{}", errors[2].1);
    assert!(errors[3].1.contains("params"), "{}", errors[3].1);
    assert_eq!(token(&r.results[4]), 3, "the good sequence still ran");
    assert_eq!(errors[5].0, pb::SeqStatus::Invalid);
    assert!(errors[5].1.contains("seq 99 is unknown"), "{}", errors[5].1);
    assert!(errors[6].1.contains("twice"), "{}", errors[6].1);
    assert_eq!(r.num_running, 1);

    // A sequence still in prefill cannot decode; a registered one cannot resend its prompt.
    let r = step(
        &mut e,
        vec![first(6, vec![1, 2, 3, 4], params(4), 2)],
        vec![],
    );
    assert!(!r.results[0].has_token);
    let r = step(&mut e, vec![first(6, vec![1], params(4), 0)], vec![6]);
    assert!(
        r.results[0].error.contains("already exists"),
        "{}",
        r.results[0].error
    );
    assert!(
        r.results[1].error.contains("twice"),
        "{}",
        r.results[1].error
    );
    let r = decode(&mut e, &[6]);
    assert!(
        r.results[0].error.contains("prefill"),
        "{}",
        r.results[0].error
    );
    // Bad sampling parameters name the field.
    let mut p = params(4);
    p.sampling = Some(pb::SamplingParams {
        top_p: 2.0,
        ..Default::default()
    });
    let r = step(&mut e, vec![first(8, vec![1], p, 0)], vec![]);
    assert!(
        r.results[0].error.contains("top_p"),
        "{}",
        r.results[0].error
    );
}

#[test]
fn release_returns_blocks_and_ignores_unknown_ids() {
    let (mut e, _) = engine(64, 4, 16);
    step(
        &mut e,
        vec![first(1, (1..=9).collect(), params(10), 0)],
        vec![],
    );
    step(
        &mut e,
        vec![first(2, (1..=4).collect(), params(10), 0)],
        vec![],
    );
    assert_eq!(e.status().kv_blocks_free, 16 - 3 - 1);
    let r = e.release(&[1, 12345]);
    assert_eq!(
        (r.sequences, r.kv_blocks_free),
        (1, 15),
        "the unknown id does not count"
    );
    let r = e.release(&[2]);
    assert_eq!((r.sequences, r.kv_blocks_free), (1, 16));
    assert_eq!(e.status().num_running, 0);
    let r = decode(&mut e, &[1]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::Invalid);
}

#[test]
fn sequences_no_step_names_are_released_after_the_idle_timeout() {
    let (mut e, _) = engine(64, 4, 16);
    step(
        &mut e,
        vec![
            first(1, (1..=9).collect(), params(10), 0),
            first(2, (1..=4).collect(), params(10), 0),
        ],
        vec![],
    );
    assert_eq!(e.status().num_running, 2);
    let idle = std::time::Duration::from_millis(100);
    assert!(e.release_idle(std::time::Instant::now(), idle).is_empty());
    std::thread::sleep(idle * 3);
    // Only 1 is still being stepped (2's coordinator is gone).
    decode(&mut e, &[1]);
    let released = e.release_idle(std::time::Instant::now(), idle);
    assert_eq!(released, vec![2]);
    assert_eq!(e.status().num_running, 1);
    assert_eq!(e.status().counters.seqs_released_idle, 1);
    token(&decode(&mut e, &[1]).results[0]);
    assert_eq!(
        status(&decode(&mut e, &[2]).results[0]),
        pb::SeqStatus::Invalid
    );
    // 1, stepped just now, stays.
    assert!(e.release_idle(std::time::Instant::now(), idle).is_empty());
    e.release(&[1]);
    assert_eq!(e.status().kv_blocks_free, 16);
}

#[test]
fn forward_failure_fails_the_step_and_undoes_new_sequences() {
    let (mut e, log) = engine(64, 4, 16);
    step(&mut e, vec![first(1, vec![1, 2], params(10), 0)], vec![]);
    log.lock().unwrap().fail_next_forward = Some("boom".into());
    let err = e
        .step(pb::StepRequest {
            prefill: vec![first(2, vec![5], params(10), 0)],
            decode: vec![1],
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(e.status().num_running, 1, "the new sequence was undone");
    // Both can go on: the old one decodes, the new one can be sent again.
    let r = step(&mut e, vec![first(2, vec![5], params(10), 0)], vec![1]);
    assert_eq!(token(&r.results[0]), 6);
    assert_eq!(token(&r.results[1]), 4);
}

#[test]
fn max_num_seqs_refuses_more_sequences() {
    let (mut e, _) = engine_with(FakeRunner::new(VOCAB, 64, 4, 64), 1);
    step(&mut e, vec![first(1, vec![1], params(10), 0)], vec![]);
    let r = step(&mut e, vec![first(2, vec![1], params(10), 0)], vec![]);
    assert_eq!(status(&r.results[0]), pb::SeqStatus::OutOfBlocks);
    assert!(r.results[0].error.contains("max_num_seqs"));
}

#[test]
fn counters_count_admitted_sequences_and_cached_tokens() {
    let (mut e, _) = engine_with(FakeRunner::new(VOCAB, 64, 4, 64).with_prefix_cache(), 16);
    let prompt: Vec<u32> = (1..=10).collect();
    step(
        &mut e,
        vec![first(1, prompt.clone(), params(10), 0)],
        vec![],
    );
    let r = step(&mut e, vec![first(2, prompt, params(10), 0)], vec![]);
    assert_eq!(r.results[0].cached_tokens, 8);
    assert_eq!(r.results[0].prompt_computed, 10);
    assert_eq!(r.batch_tokens, 2);
    assert_eq!(token(&r.results[0]), 11);
    step(&mut e, vec![first(3, vec![99], params(10), 0)], vec![]); // rejected
    let c = e.status().counters;
    assert_eq!(c.seqs_admitted, 2);
    assert_eq!(c.prompt_tokens_cached, 8);
    assert_eq!(c.prompt_tokens_computed, 12);
    assert_eq!(c.tokens_generated, 2);
}

fn seeded(seed: u64) -> pb::SequenceParams {
    pb::SequenceParams {
        max_new_tokens: 12,
        ignore_eos: true,
        top_logprobs: 2,
        sampling: Some(pb::SamplingParams {
            temperature: 1.5,
            top_p: 0.95,
            repetition_penalty: 1.1,
            frequency_penalty: 0.2,
            seed,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs seq 1 to completion, with `noise` other sequences joining and leaving around it.
fn run_seeded(prompt: Vec<u32>, params: pb::SequenceParams, noise: bool) -> Vec<u32> {
    let (mut e, _) = engine(128, 4, 256);
    let mut out = Vec::new();
    let mut prefill = vec![first(1, prompt, params, 3)];
    let mut decode_ids = Vec::new();
    for i in 0..40u64 {
        if noise && i % 3 == 0 {
            prefill.push(first(
                100 + i,
                vec![(i % 30) as u32; 1 + i as usize % 5],
                seeded(i),
                2,
            ));
        }
        let r = step(
            &mut e,
            std::mem::take(&mut prefill),
            std::mem::take(&mut decode_ids),
        );
        for res in &r.results {
            if res.seq_id == 1 && res.has_token {
                out.push(token(res));
            }
            let alive = res.status == pb::SeqStatus::Ok as i32
                && res.finish_reason == pb::FinishReason::Unspecified as i32;
            if alive && res.has_token {
                decode_ids.push(res.seq_id);
            } else if alive {
                prefill.push(more(res.seq_id, 2));
            }
        }
        if r.results
            .iter()
            .any(|x| x.seq_id == 1 && x.finish_reason != 0)
        {
            break;
        }
    }
    out
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let prompt: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let alone = run_seeded(prompt.clone(), seeded(42), false);
    assert_eq!(alone.len(), 12);
    let crowded = run_seeded(prompt.clone(), seeded(42), true);
    assert_eq!(alone, crowded);
    let other_seed = run_seeded(prompt, seeded(43), false);
    assert_ne!(alone, other_seed);
}

#[test]
fn a_migrated_sequence_continues_exactly() {
    let prompt: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let full = run_seeded(prompt.clone(), seeded(7), false);
    // Another worker gets the prompt plus the 5 tokens already sent to the client.
    let mut moved_prompt = prompt;
    moved_prompt.extend_from_slice(&full[..5]);
    let mut p = seeded(7);
    p.num_generated = 5;
    let rest = run_seeded(moved_prompt, p, true);
    assert_eq!(rest, full[5..]);
}

#[test]
fn prompt_logprobs_cover_every_prompt_token_after_the_first() {
    let (mut e, log) = engine(64, 4, 64);
    let mut p = params(1);
    p.prompt_logprobs = true;
    p.top_logprobs = 1;
    let prompt = vec![5, 6, 20, 21, 3];
    let r = step(&mut e, vec![first(1, prompt.clone(), p, 3)], vec![]);
    assert!(
        r.results[0].prompt_logprobs.is_empty(),
        "only on the last chunk"
    );
    let r = step(&mut e, vec![more(1, 3)], vec![]);
    let lps = &r.results[0].prompt_logprobs;
    assert_eq!(lps.len(), 4);
    for (k, lp) in lps.iter().enumerate() {
        assert_eq!(lp.token_id, prompt[k + 1]);
        let row = FakeRunner::logits_row(prompt[k], k, VOCAB);
        let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln() as f32;
        assert!((lp.logprob - (row[prompt[k + 1] as usize] - lse)).abs() < 1e-5);
        assert_eq!(lp.top[0].token_id, prompt[k] + 1, "the peak is token + 1");
    }
    assert_eq!(token(&r.results[0]), 4);
    let wanted: Vec<LogitsWanted> = log
        .lock()
        .unwrap()
        .forwards
        .iter()
        .map(|f| f[0].2)
        .collect();
    assert_eq!(wanted, [LogitsWanted::All, LogitsWanted::All]);
}

#[test]
fn prompt_logprobs_are_computed_even_for_a_cached_prefix() {
    let (mut e, _) = engine_with(FakeRunner::new(VOCAB, 64, 4, 64).with_prefix_cache(), 16);
    let prompt: Vec<u32> = (1..=10).collect();
    step(
        &mut e,
        vec![first(1, prompt.clone(), params(10), 0)],
        vec![],
    );
    let mut p = params(1);
    p.prompt_logprobs = true;
    let r = step(&mut e, vec![first(2, prompt.clone(), p, 0)], vec![]);
    assert_eq!(
        r.results[0].cached_tokens, 0,
        "prompt logprobs skip the prefix cache"
    );
    let lps = &r.results[0].prompt_logprobs;
    assert_eq!(lps.len(), prompt.len() - 1);
    assert!(
        lps.iter()
            .all(|lp| lp.logprob.is_finite() && lp.logprob <= 0.0),
        "{lps:?}"
    );
    // A later plain sequence still finds the prefix in the cache.
    let r = step(&mut e, vec![first(3, prompt, params(10), 0)], vec![]);
    assert_eq!(r.results[0].cached_tokens, 8);
}

#[test]
fn engine_handle_serves_from_its_own_thread() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (handle, thread) = EngineHandle::spawn(
        Box::new(FakeRunner::new(VOCAB, 64, 4, 8)),
        EngineConfig {
            max_num_seqs: 4,
            group_id: "g".into(),
            model: ModelFacts::default(),
        },
    )
    .unwrap();
    rt.block_on(async {
        let info = handle.info().await.unwrap();
        assert_eq!(info.kv_blocks_total, 8);
        assert_eq!(info.max_num_seqs, 4);
        let r = handle
            .step(pb::StepRequest {
                prefill: vec![first(1, vec![1, 2], params(5), 0)],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(token(&r.results[0]), 3);
        let released = handle.release(vec![1, 99]).await.unwrap();
        assert_eq!((released.sequences, released.kv_blocks_free), (1, 8));
        assert_eq!(handle.status().await.unwrap().counters.seqs_admitted, 1);
    });
    drop(handle);
    thread.join().unwrap();
    let _ = SeqId(0);
}

/// A sequence whose client asked for no logprobs samples the same tokens without them
/// (the logprob reads 0, no alternatives); one that asked gets the log-softmax value.
#[test]
fn the_sampled_tokens_logprob_is_computed_only_when_asked_for() {
    let run = |skip_logprob: bool| {
        let (mut e, _) = engine(64, 4, 64);
        let mut p = seeded(3);
        p.top_logprobs = 0;
        p.skip_logprob = skip_logprob;
        let r = step(&mut e, vec![first(1, vec![5, 6, 7], p, 3)], vec![]);
        r.results[0].token.clone().unwrap()
    };
    let (without, with) = (run(true), run(false));
    assert_eq!(without.token_id, with.token_id);
    assert_eq!(without.logprob, 0.0);
    assert!(without.top.is_empty());
    assert!(with.logprob < 0.0, "{with:?}");
    // Alternatives asked for bring the logprob with them.
    let (mut e, _) = engine(64, 4, 64);
    let mut p = seeded(3);
    p.skip_logprob = true;
    let r = step(&mut e, vec![first(1, vec![5, 6, 7], p, 3)], vec![]);
    let t = r.results[0].token.clone().unwrap();
    assert_eq!(t.logprob, with.logprob);
    assert_eq!(t.top.len(), 2);
}
