//! KV cache element type: decode tokens/s with an f32, f16 and bf16 KV cache in the same
//! run (ratios against f32), the blocks each holds in the default budget, and how far the
//! 16-bit caches' greedy output moves from the f32 cache's.
//!
//! `cargo run -p shardline-worker --example kv_dtype_bench -- [MODEL] [THREADS] [CONTEXT] [BATCHES] [ROUNDS] [STEPS]`
//! (defaults: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2, 512, `1,32`, 3, 32).
//!
//! Per batch size, three runners (one per dtype) prefill the same distinct prompts of
//! CONTEXT tokens (not timed), then decode greedily in ROUNDS rounds of STEPS steps; in
//! each round every dtype decodes its STEPS steps back to back, in an order that rotates
//! between rounds, so a shared machine's drift hits them alike and all three sit at the
//! same context lengths. Figures are medians over rounds; a ratio is the median of each
//! round's 16-bit / f32 tokens/s. Agreement: on the first step (the prompt's last
//! position), the sequences whose greedy token is f32's and the largest |Δlogit|; over the
//! whole decode, the generated tokens before a sequence first differs from f32's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use shardline_worker::kv::KvCacheDtype;
use shardline_worker::loader::{LoadOptions, load_llama_runner};
use shardline_worker::model::bench::{PositionalArgs, argmax, prompt};
use shardline_worker::model::runner::LlamaRunner;
use shardline_worker::runner::{LogitsWanted, ModelRunner, SeqChunk, SeqId};

const DTYPES: [KvCacheDtype; 3] = [KvCacheDtype::F32, KvCacheDtype::F16, KvCacheDtype::Bf16];

struct Cli {
    path: PathBuf,
    threads: usize,
    context: usize,
    batches: Vec<usize>,
    rounds: usize,
    steps: usize,
}

fn parse_cli() -> anyhow::Result<Cli> {
    let args = PositionalArgs::from_env();
    Ok(Cli {
        path: args.model(0),
        threads: args.number(1, "THREADS", 2)?,
        context: args.number(2, "CONTEXT", 512)?.max(1),
        batches: args.batches(3)?,
        rounds: args.number(4, "ROUNDS", 3)?.max(1),
        steps: args.number(5, "STEPS", 32)?.max(1),
    })
}

/// One dtype's runner and its sequences' state.
struct Lane {
    dtype: KvCacheDtype,
    runner: LlamaRunner,
    /// Each sequence's next input token.
    next: Vec<u32>,
    /// Each sequence's generated tokens.
    generated: Vec<Vec<u32>>,
    first_logits: Vec<Vec<f32>>,
    tokens_per_s: Vec<f64>,
}

impl Lane {
    fn new(cli: &Cli, dtype: KvCacheDtype, kv_blocks: usize) -> anyhow::Result<Self> {
        let runner = load_llama_runner(
            &cli.path,
            &LoadOptions {
                kv_blocks: Some(kv_blocks),
                kv_cache_dtype: dtype,
                threads: cli.threads,
                ..Default::default()
            },
        )
        .with_context(|| format!("loading {}", cli.path.display()))?;
        Ok(Lane {
            dtype,
            runner,
            next: Vec::new(),
            generated: Vec::new(),
            first_logits: Vec::new(),
            tokens_per_s: Vec::new(),
        })
    }

    /// Prefills `prompts` (sequence `i` is `prompts[i]`), one step per 8 sequences.
    fn prefill(&mut self, prompts: &[Vec<u32>]) -> anyhow::Result<()> {
        for (i, p) in prompts.iter().enumerate() {
            self.runner.add_sequence(SeqId(i as u64), p)?;
        }
        self.next = vec![0; prompts.len()];
        self.generated = vec![Vec::new(); prompts.len()];
        self.first_logits = vec![Vec::new(); prompts.len()];
        for group in (0..prompts.len()).collect::<Vec<_>>().chunks(8) {
            let batch: Vec<SeqChunk> = group
                .iter()
                .map(|&i| SeqChunk {
                    id: SeqId(i as u64),
                    tokens: prompts[i].clone(),
                    logits: LogitsWanted::Last,
                })
                .collect();
            for c in self.runner.forward(&batch)? {
                let i = c.id.0 as usize;
                self.next[i] = argmax(&c.data);
                self.generated[i].push(self.next[i]);
                self.first_logits[i] = c.data;
            }
        }
        Ok(())
    }

    /// `steps` greedy decode steps of every sequence; records their tokens/s.
    fn decode(&mut self, steps: usize) -> anyhow::Result<()> {
        let t = Instant::now();
        for _ in 0..steps {
            let batch: Vec<SeqChunk> = self
                .next
                .iter()
                .enumerate()
                .map(|(i, &t)| SeqChunk {
                    id: SeqId(i as u64),
                    tokens: vec![t],
                    logits: LogitsWanted::Last,
                })
                .collect();
            for c in self.runner.forward(&batch)? {
                let i = c.id.0 as usize;
                self.next[i] = argmax(&c.data);
                self.generated[i].push(self.next[i]);
            }
        }
        let tokens = steps * self.next.len();
        self.tokens_per_s
            .push(tokens as f64 / t.elapsed().as_secs_f64());
        Ok(())
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli()?;
    println!(
        "kv_dtype_bench: {} threads, {}-token prompts, {} rounds of {} decode steps",
        cli.threads, cli.context, cli.rounds, cli.steps
    );
    // The blocks the default budget gives each dtype (what `--kv-cache-dtype` buys).
    for dtype in DTYPES {
        let r = load_llama_runner(
            &cli.path,
            &LoadOptions {
                kv_cache_dtype: dtype,
                threads: cli.threads,
                ..Default::default()
            },
        )?;
        println!(
            "{dtype}: {} KV blocks of {} positions in the default --kv-cache-bytes",
            r.info().kv_blocks_total,
            r.info().kv_block_size
        );
    }
    for &batch in &cli.batches {
        let positions = cli.context + cli.rounds * cli.steps + 1;
        let kv_blocks = batch * positions.div_ceil(16) + 1;
        let mut lanes = DTYPES
            .iter()
            .map(|&d| Lane::new(&cli, d, kv_blocks))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let vocab = lanes[0].runner.info().vocab_size;
        let prompts: Vec<Vec<u32>> = (0..batch).map(|s| prompt(s, cli.context, vocab)).collect();
        for lane in &mut lanes {
            lane.prefill(&prompts)?;
        }
        for round in 0..cli.rounds {
            for k in 0..lanes.len() {
                let lane = (round + k) % lanes.len();
                lanes[lane].decode(cli.steps)?;
            }
        }
        println!("\nbatch {batch}:");
        println!(
            "| KV dtype | decode tok/s (median) | / f32 (median of rounds) | first-step top-1 = f32 | first-step max abs Δlogit | tokens before first difference |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let (reference, rest) = lanes.split_first().expect("three lanes");
        for lane in std::iter::once(reference).chain(rest) {
            let ratios: Vec<f64> = lane
                .tokens_per_s
                .iter()
                .zip(&reference.tokens_per_s)
                .map(|(a, b)| a / b)
                .collect();
            let top1 = lane
                .first_logits
                .iter()
                .zip(&reference.first_logits)
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count();
            let diff = lane
                .first_logits
                .iter()
                .zip(&reference.first_logits)
                .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                .fold(0f32, f32::max);
            let same: usize = lane
                .generated
                .iter()
                .zip(&reference.generated)
                .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count())
                .sum();
            let total: usize = reference.generated.iter().map(Vec::len).sum();
            println!(
                "| {} | {:.1} | {:.3} | {top1}/{batch} | {diff:.4} | {same}/{total} |",
                lane.dtype,
                median(lane.tokens_per_s.clone()),
                median(ratios),
            );
        }
        println!(
            "(per round tok/s: {})",
            lanes
                .iter()
                .map(|l| format!(
                    "{} {}",
                    l.dtype,
                    l.tokens_per_s
                        .iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join("/")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
