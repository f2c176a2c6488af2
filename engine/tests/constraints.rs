//! Structured outputs and `logit_bias` in the engine, over [`FakeRunner`] with a byte-level
//! tokenizer (token `3 + b` is byte `b`): the mask keeps every sampled token inside the
//! grammar, a complete grammar ends the sequence, a migrated sequence continues where it
//! was in its grammar, and bad constraints are refused per sequence.

use shardline_constraint::testing::{byte_tokenizer_json, bytes};
use shardline_constraint::{json_schema, lark, regex};
use shardline_engine::engine::{EngineConfig, EngineState, ModelFacts};
use shardline_engine::fake::FakeRunner;
use shardline_proto::worker::v1 as pb;

/// The byte tokenizer's 259 tokens.
const VOCAB: usize = 259;
const EOS: u32 = 0;

fn engine() -> EngineState {
    let config = EngineConfig {
        max_num_seqs: 64,
        group_id: "g".into(),
        model: ModelFacts {
            tokenizer_json: byte_tokenizer_json(),
            eos_token_ids: vec![EOS],
            ..ModelFacts::default()
        },
    };
    EngineState::new(Box::new(FakeRunner::new(VOCAB, 512, 16, 1024)), config)
}

fn params(max_new_tokens: u32, constraint: Option<pb::Constraint>) -> pb::SequenceParams {
    pb::SequenceParams {
        max_new_tokens,
        constraint,
        ..Default::default()
    }
}

fn sampled(seed: u64, mut p: pb::SequenceParams) -> pb::SequenceParams {
    p.sampling = Some(pb::SamplingParams {
        temperature: 1.0,
        seed,
        ..Default::default()
    });
    p
}

fn first(id: u64, prompt: Vec<u32>, params: pb::SequenceParams) -> pb::PrefillChunk {
    pb::PrefillChunk {
        seq_id: id,
        prompt,
        params: Some(params),
        max_tokens: 0,
        ..Default::default()
    }
}

/// Runs the given sequences to the end together; each one's tokens and finish reason.
fn run(e: &mut EngineState, seqs: Vec<pb::PrefillChunk>) -> Vec<(Vec<u32>, pb::FinishReason)> {
    let ids: Vec<u64> = seqs.iter().map(|c| c.seq_id).collect();
    let mut out: Vec<(Vec<u32>, pb::FinishReason)> = ids
        .iter()
        .map(|_| (Vec::new(), pb::FinishReason::Unspecified))
        .collect();
    let mut prefill = seqs;
    let mut decode: Vec<u64> = Vec::new();
    for _ in 0..1000 {
        if prefill.is_empty() && decode.is_empty() {
            return out;
        }
        let r = e
            .step(pb::StepRequest {
                prefill: std::mem::take(&mut prefill),
                decode: std::mem::take(&mut decode),
                ..Default::default()
            })
            .expect("step");
        for res in r.results {
            assert_eq!(res.status, pb::SeqStatus::Ok as i32, "{res:?}");
            let i = ids.iter().position(|&id| id == res.seq_id).unwrap();
            if res.has_token {
                out[i].0.push(res.token.unwrap().token_id);
            }
            let finish = pb::FinishReason::try_from(res.finish_reason).unwrap();
            if finish == pb::FinishReason::Unspecified {
                decode.push(res.seq_id);
            } else {
                out[i].1 = finish;
            }
        }
    }
    panic!("sequences did not finish");
}

fn text(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .filter(|&&t| t >= 3)
        .map(|&t| (t - 3) as u8)
        .collect();
    String::from_utf8(bytes).unwrap()
}

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colour": {"enum": ["red", "green", "blue"]},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                      "required": ["ok"], "additionalProperties": false},
        },
        "required": ["age", "colour", "flags", "inner"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false},
    })
}

fn check_document(doc: &str) {
    let v: serde_json::Value =
        serde_json::from_str(doc).unwrap_or_else(|e| panic!("not JSON ({e}): {doc}"));
    let age = v["age"].as_i64().unwrap();
    assert!((0..=120).contains(&age), "{doc}");
    assert!(["red", "green", "blue"].contains(&v["colour"].as_str().unwrap()));
    assert!(v["flags"].as_array().unwrap().len() <= 3);
    assert!(v["inner"]["ok"].is_boolean());
    assert_eq!(v.as_object().unwrap().len(), 4, "{doc}");
}

#[test]
fn greedy_output_follows_a_regex_and_stops_when_it_is_complete() {
    let mut e = engine();
    // Unconstrained, greedy after byte `a` would be `b`, `c`, ...
    let out = run(
        &mut e,
        vec![first(1, bytes("a"), params(50, Some(regex("[0-9]{4}"))))],
    );
    let (tokens, finish) = &out[0];
    assert_eq!(tokens.len(), 4, "{tokens:?}");
    assert!(text(tokens).bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(*finish, pb::FinishReason::Stop);
}

#[test]
fn sampled_json_is_valid_for_every_seed_batched_with_unconstrained_sequences() {
    let mut e = engine();
    let seqs: Vec<pb::PrefillChunk> = (0..16)
        .map(|i| {
            let constraint = (i % 4 != 3).then(|| json_schema(&schema()));
            first(i, bytes("x"), sampled(i, params(200, constraint)))
        })
        .collect();
    let out = run(&mut e, seqs);
    for (i, (tokens, finish)) in out.iter().enumerate() {
        if i % 4 == 3 {
            continue;
        }
        assert_eq!(*finish, pb::FinishReason::Stop, "seq {i}: {}", text(tokens));
        check_document(&text(tokens));
    }
    assert_eq!(e.status().num_running, 0);
}

#[test]
fn a_migrated_sequence_continues_in_its_grammar_with_the_same_tokens() {
    let constraint = json_schema(&schema());
    let p = sampled(42, params(200, Some(constraint)));
    let (whole, _) = run(&mut engine(), vec![first(1, bytes("x"), p.clone())])
        .pop()
        .unwrap();
    assert!(whole.len() > 12, "{}", text(&whole));
    // Cut after 7 tokens; the next group gets the prompt plus those tokens.
    let mut prompt = bytes("x");
    prompt.extend_from_slice(&whole[..7]);
    let moved = pb::SequenceParams {
        num_generated: 7,
        ..p
    };
    let (rest, finish) = run(&mut engine(), vec![first(9, prompt, moved)])
        .pop()
        .unwrap();
    assert_eq!(rest, whole[7..], "the continuation differs");
    assert_eq!(finish, pb::FinishReason::Stop);
    check_document(&text(&whole));
}

#[test]
fn logit_bias_of_100_makes_every_token_that_token() {
    let mut e = engine();
    let target = bytes("q")[0];
    let mut p = sampled(3, params(12, None));
    p.logit_bias = [(target, 100.0)].into();
    p.ignore_eos = true;
    let (tokens, finish) = run(&mut e, vec![first(1, bytes("abc"), p)]).pop().unwrap();
    assert_eq!(tokens, vec![target; 12]);
    assert_eq!(finish, pb::FinishReason::Length);
}

#[test]
fn a_grammar_that_ends_under_min_tokens_still_ends() {
    let mut e = engine();
    let mut p = params(20, Some(lark(r#"start: "ok""#)));
    p.min_tokens = 5;
    let (tokens, finish) = run(&mut e, vec![first(1, bytes("a"), p)]).pop().unwrap();
    assert_eq!(text(&tokens), "ok");
    assert_eq!(finish, pb::FinishReason::Stop);
}

#[test]
fn bad_constraints_and_biases_are_refused_per_sequence() {
    let mut e = engine();
    let mut bias = params(4, None);
    bias.logit_bias = [(VOCAB as u32, 1.0)].into();
    let r = e
        .step(pb::StepRequest {
            prefill: vec![
                first(1, bytes("a"), params(4, Some(regex("(")))),
                first(2, bytes("a"), bias),
                first(3, bytes("a"), params(4, Some(regex("[a-z]")))),
            ],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.results[0].status, pb::SeqStatus::Invalid as i32);
    assert!(!r.results[0].error.is_empty());
    assert_eq!(r.results[1].status, pb::SeqStatus::Invalid as i32);
    assert!(
        r.results[1].error.contains("logit_bias"),
        "{:?}",
        r.results[1]
    );
    assert_eq!(r.results[2].status, pb::SeqStatus::Ok as i32);
    let t = r.results[2].token.as_ref().unwrap().token_id;
    assert!(text(&[t]).chars().all(|c| c.is_ascii_lowercase()));
    // The tokens of a migrated sequence must fit its grammar.
    let mut moved = params(8, Some(regex("[0-9]+")));
    moved.num_generated = 1;
    let r = e
        .step(pb::StepRequest {
            prefill: vec![first(4, bytes("ax"), moved)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.results[0].status, pb::SeqStatus::Invalid as i32);
    assert!(
        r.results[0].error.contains("do not fit"),
        "{:?}",
        r.results[0]
    );
}
