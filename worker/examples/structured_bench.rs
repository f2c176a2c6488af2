//! Structured-output overhead: decode tokens/s of the serving engine with every sequence
//! constrained to a JSON schema vs. unconstrained, same model, same run.
//!
//! `cargo run -p shardline-worker --example structured_bench -- [MODEL] [THREADS] [NEW_TOKENS] [BATCHES] [ROUNDS]`
//! (defaults: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2, 96, `1,32`, 3).
//!
//! Each round runs the unconstrained and the constrained batch back to back (the order
//! alternates between rounds, so drift on a shared machine hits both alike) through
//! [`EngineState::step`] — the path a worker serves: masks computed beside the forward,
//! applied before sampling, the sampled token advancing each sequence's grammar. Prompts
//! are prefilled first and not timed; then every sequence decodes NEW_TOKENS tokens
//! (greedy). The schema — an array of at least 100 objects with an integer, a bounded
//! string and an array of enums — cannot end before NEW_TOKENS, so both runs decode the
//! same number of tokens. The figures per batch are medians over the rounds; the ratio is
//! the median of each round's constrained / unconstrained tokens/s (a round's two runs
//! are seconds apart, so a shared machine's load changes less within a pair than across
//! the whole run).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use shardline_constraint as constraint;
use shardline_engine::engine::{EngineConfig, EngineState};
use shardline_proto::worker::v1 as pb;
use shardline_worker::args::model_facts;
use shardline_worker::loader::{LoadOptions, load_llama_runner};
use shardline_worker::model::bench::PositionalArgs;
use shardline_worker::tokenizer::ModelTokenizer;

struct Cli {
    path: PathBuf,
    threads: usize,
    new_tokens: usize,
    batches: Vec<usize>,
    rounds: usize,
}

fn parse_cli() -> anyhow::Result<Cli> {
    let args = PositionalArgs::from_env();
    Ok(Cli {
        path: args.model(0),
        threads: args.number(1, "THREADS", 2)?,
        new_tokens: args.number(2, "NEW_TOKENS", 96)?,
        batches: args.batches(3)?,
        rounds: args.number(4, "ROUNDS", 3)?.max(1),
    })
}

fn schema() -> pb::Constraint {
    constraint::json_schema(&serde_json::json!({
        "type": "array",
        "minItems": 100,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "name": {"type": "string", "maxLength": 12},
                "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                         "maxItems": 3},
            },
            "required": ["id", "name", "tags"],
            "additionalProperties": false,
        },
        // What the coordinator adds by default (its JSON_WHITESPACE).
        "x-guidance": {"whitespace_flexible": false,
                       "whitespace_pattern": "\\r?\\n[\\x20\\x09]{0,20}|[\\x20\\x09]{1,20}"},
    }))
}

/// Decodes `b` sequences for `new_tokens` tokens; tokens/s of the decode steps.
fn run(
    engine: &mut EngineState,
    prompt: &[u32],
    b: usize,
    new_tokens: usize,
    constrained: bool,
    next_id: &mut u64,
) -> anyhow::Result<f64> {
    let params = pb::SequenceParams {
        max_new_tokens: new_tokens as u32,
        ignore_eos: true,
        constraint: constrained.then(schema),
        ..Default::default()
    };
    let ids: Vec<u64> = (0..b)
        .map(|_| {
            *next_id += 1;
            *next_id
        })
        .collect();
    // Distinct prompts (a different last token) so no sequence shares blocks.
    let prefill = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let mut p = prompt.to_vec();
            p.push(100 + i as u32);
            pb::PrefillChunk {
                seq_id: id,
                prompt: p,
                params: Some(params.clone()),
                max_tokens: 0,
                ..Default::default()
            }
        })
        .collect();
    let r = engine.step(pb::StepRequest {
        prefill,
        ..Default::default()
    })?;
    for res in &r.results {
        anyhow::ensure!(
            res.status == pb::SeqStatus::Ok as i32 && res.has_token,
            "prefill failed: {res:?}"
        );
    }
    let t = Instant::now();
    let mut decoded = 0;
    let mut live = ids.clone();
    while !live.is_empty() {
        let r = engine.step(pb::StepRequest {
            decode: live.clone(),
            ..Default::default()
        })?;
        live.clear();
        for res in &r.results {
            anyhow::ensure!(
                res.status == pb::SeqStatus::Ok as i32,
                "decode failed: {res:?}"
            );
            decoded += usize::from(res.has_token);
            if res.finish_reason == pb::FinishReason::Unspecified as i32 {
                live.push(res.seq_id);
            }
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        decoded == b * (new_tokens - 1),
        "decoded {decoded} tokens, expected {}: a constrained sequence ended early",
        b * (new_tokens - 1)
    );
    Ok(decoded as f64 / seconds)
}

/// Width of the model's logits rows (the masks' width).
fn engine_vocab(cli: &Cli) -> anyhow::Result<usize> {
    let md = {
        let mut f = std::fs::File::open(&cli.path)?;
        candle_core::quantized::gguf_file::Content::read(&mut f)?
    };
    let n = md
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(0, |v| v.len());
    Ok(n)
}

/// The constraint's own cost, alone on this thread: mask + advance per token, walking the
/// schema by always taking the allowed token that keeps the document going (the lowest
/// id that is not EOS).
fn mask_cost(tokenizer: &ModelTokenizer, vocab: usize) -> anyhow::Result<()> {
    let compiler =
        constraint::ConstraintCompiler::new(&tokenizer.json, &tokenizer.eos_token_ids, vocab)?;
    let mut state = compiler.compile(&schema())?;
    let (mut mask_s, mut advance_s, mut n) = (0.0, 0.0, 0);
    for _ in 0..400 {
        let t = Instant::now();
        let mask = state.allowed_tokens()?;
        mask_s += t.elapsed().as_secs_f64();
        let token = (0..vocab as u32)
            .find(|&t| mask.allows(t) && !tokenizer.eos_token_ids.contains(&t))
            .context("the schema allows only EOS")?;
        let t = Instant::now();
        state.advance(&[token])?;
        advance_s += t.elapsed().as_secs_f64();
        n += 1;
    }
    println!(
        "constraint alone: {:.0} us mask + {:.0} us advance per token (mean of {n})",
        mask_s / n as f64 * 1e6,
        advance_s / n as f64 * 1e6
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli()?;
    anyhow::ensure!(
        cli.path.exists(),
        "{} is missing: run deploy/fetch-model.sh",
        cli.path.display()
    );
    let tokenizer = ModelTokenizer::load(&cli.path)?;
    let prompt = tokenizer.encode(
        "<|im_start|>user\nList the parts in stock as a JSON array.<|im_end|>\n<|im_start|>assistant\n",
    )?;
    let max_batch = cli.batches.iter().copied().max().unwrap_or(1);
    let per_seq = prompt.len() + 1 + cli.new_tokens;
    let load = LoadOptions {
        threads: cli.threads,
        kv_blocks: Some(max_batch * per_seq.div_ceil(16) + 16),
        ..Default::default()
    };
    let runner = load_llama_runner(&cli.path, &load)
        .map_err(|e| anyhow::anyhow!("loading the model: {e}"))?;
    let started = Instant::now();
    let mut engine = EngineState::new(
        Box::new(runner),
        EngineConfig {
            max_num_seqs: max_batch.max(1),
            group_id: "bench".into(),
            model: model_facts(&tokenizer),
        },
    );
    println!(
        "engine with constraint compiler ready in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    mask_cost(&tokenizer, engine_vocab(&cli)?)?;
    let mut next_id = 0;
    // One untimed warm-up of each kind.
    run(&mut engine, &prompt, 1, 8, false, &mut next_id)?;
    run(&mut engine, &prompt, 1, 8, true, &mut next_id)?;
    println!(
        "model {} | {} threads | {} new tokens | {} rounds | median decode tokens/s",
        cli.path.display(),
        cli.threads,
        cli.new_tokens,
        cli.rounds
    );
    println!(
        "| batch | unconstrained tok/s | JSON schema tok/s | schema / plain (median of pairs) |"
    );
    println!("|---:|---:|---:|---:|");
    for &b in &cli.batches {
        let (mut plain, mut json, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..cli.rounds {
            let mut pair = [0.0; 2];
            for constrained in [round % 2 == 1, round % 2 == 0] {
                let tps = run(
                    &mut engine,
                    &prompt,
                    b,
                    cli.new_tokens,
                    constrained,
                    &mut next_id,
                )?;
                pair[usize::from(constrained)] = tps;
            }
            plain.push(pair[0]);
            json.push(pair[1]);
            ratios.push(pair[1] / pair[0]);
        }
        let (p, j, r) = (
            median(plain.clone()),
            median(json.clone()),
            median(ratios.clone()),
        );
        println!("| {b} | {p:.1} | {j:.1} | {r:.3} |");
        eprintln!("batch {b}: plain {plain:.1?}, json {json:.1?}, ratios {ratios:.3?}");
    }
    Ok(())
}
