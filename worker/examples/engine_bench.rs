//! Engine benchmark: ours vs stock candle `quantized_llama`, same model, same run.
//!
//! `cargo run -p shardline-worker --example engine_bench -- [MODEL] [THREADS] [NEW_TOKENS] [BATCHES] [FLAGS]`
//! (defaults: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2, 128, `1,4,8,16,32`). Runs in the dev profile,
//! which builds the worker and its dependencies at opt-level 3.
//!
//! Flags:
//! - `--pp-tokens N`: prompt length of the prompt-processing figure (default 512);
//! - `--prompt-tokens N`: prompt length of each sequence in the decode runs (default 128);
//! - `--prefill-runs R`: also time R warm prefills of one `--prompt-tokens` prompt alone
//!   (after an untimed one), reported as their median — what a server's time to first
//!   token is compared with (default 0);
//! - `--serve`: instead of the decode-only runs and the candle baseline, run each batch the
//!   way the coordinator schedules a closed loop of that many streams: every step decodes
//!   every sequence that has a token and packs prompt chunks into what is left of a
//!   `--budget` tokens-per-step budget (default 512, the coordinator's
//!   `--max-num-batched-tokens`), until every sequence has NEW_TOKENS tokens. Its aggregate
//!   (generated tokens over the whole run, prefill included) is the engine-side number for
//!   a closed-loop `shardline bench` at the same concurrency.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use shardline_worker::loader::{LoadOptions, load_llama_runner};
use shardline_worker::model::bench::{
    BenchOptions, BenchRow, argmax, format_table, prompt, run_engine_bench,
};
use shardline_worker::runner::{LogitsWanted, ModelRunner, SeqChunk, SeqId};

/// The `shardline` binary's allocator, so the engine is measured as it serves.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn baseline(path: &PathBuf, opts: &BenchOptions) -> anyhow::Result<Vec<BenchRow>> {
    let mut f = std::fs::File::open(path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut m = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)?;
    let mut rows = Vec::new();
    let p: Vec<u32> = (0..opts.pp_tokens as u32)
        .map(|i| 100 + (i * 104_729) % 40_000)
        .collect();
    let t = Instant::now();
    let x = Tensor::new(p.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    m.forward(&x, 0)?;
    rows.push(BenchRow {
        name: format!("candle quantized_llama: prompt ({} tokens)", p.len()),
        tokens: p.len(),
        seconds: t.elapsed().as_secs_f64(),
    });
    m.clear_kv_cache();
    let p = &p[..opts.prompt_tokens.min(p.len())];
    let x = Tensor::new(p, &Device::Cpu)?.unsqueeze(0)?;
    let mut tok = m
        .forward(&x, 0)?
        .squeeze(0)?
        .argmax(0)?
        .to_scalar::<u32>()?;
    let t = Instant::now();
    for i in 0..opts.new_tokens {
        let x = Tensor::new(&[tok], &Device::Cpu)?.unsqueeze(0)?;
        tok = m
            .forward(&x, p.len() + i)?
            .squeeze(0)?
            .argmax(0)?
            .to_scalar::<u32>()?;
    }
    rows.push(BenchRow {
        name: "candle quantized_llama: decode batch 1".into(),
        tokens: opts.new_tokens,
        seconds: t.elapsed().as_secs_f64(),
    });
    Ok(rows)
}

/// Command line: the positional arguments of old plus the flags in the module docs.
struct Cli {
    path: PathBuf,
    opts: BenchOptions,
    prefill_runs: usize,
    serve: bool,
    budget: usize,
}

fn parse_cli() -> anyhow::Result<Cli> {
    let mut opts = BenchOptions::default();
    let (mut prefill_runs, mut serve, mut budget) = (0usize, false, 512usize);
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--pp-tokens" => opts.pp_tokens = value("--pp-tokens")?,
            "--prompt-tokens" => opts.prompt_tokens = value("--prompt-tokens")?,
            "--prefill-runs" => prefill_runs = value("--prefill-runs")?,
            "--budget" => budget = value("--budget")?,
            "--serve" => serve = true,
            f if f.starts_with("--") => anyhow::bail!(
                "unknown flag {f}: use --pp-tokens, --prompt-tokens, --prefill-runs, --budget, --serve"
            ),
            _ => positional.push(a),
        }
    }
    let mut positional = positional.into_iter();
    let path = PathBuf::from(
        positional
            .next()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    if let Some(t) = positional.next() {
        opts.threads = t.parse().context("THREADS")?;
    }
    if let Some(n) = positional.next() {
        opts.new_tokens = n.parse().context("NEW_TOKENS")?;
    }
    if let Some(b) = positional.next() {
        opts.batches = b
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("BATCHES: a comma list of numbers")?;
    }
    anyhow::ensure!(
        opts.pp_tokens > 0 && opts.prompt_tokens > 0 && opts.new_tokens > 0 && budget > 0,
        "token counts and --budget must be > 0"
    );
    anyhow::ensure!(
        opts.batches.iter().all(|&b| b > 0),
        "batch sizes must be > 0"
    );
    Ok(Cli {
        path,
        opts,
        prefill_runs,
        serve,
        budget,
    })
}

fn show(row: &BenchRow) {
    eprintln!(
        "{:<58} {:>8} {:>9.2} {:>10.1}",
        row.name,
        row.tokens,
        row.seconds,
        row.tokens_per_s()
    );
}

/// The engine's own runner, with room for the largest batch.
fn runner(cli: &Cli) -> anyhow::Result<impl ModelRunner> {
    let max_batch = cli.opts.batches.iter().copied().max().unwrap_or(1);
    let per_seq = cli.opts.prompt_tokens + cli.opts.new_tokens;
    let load = LoadOptions {
        threads: cli.opts.threads,
        kv_blocks: Some((max_batch.max(2) * per_seq.div_ceil(16) + 8).max(64)),
        ..Default::default()
    };
    load_llama_runner(&cli.path, &load).map_err(|e| anyhow::anyhow!("loading the model: {e}"))
}

/// `--prefill-runs`: one prompt alone, warm, R times (distinct prompts); the median.
fn timed_prefills(
    r: &mut impl ModelRunner,
    cli: &Cli,
    seed: &mut usize,
) -> anyhow::Result<BenchRow> {
    let vocab = r.info().vocab_size;
    let n = cli.opts.prompt_tokens;
    let mut times = Vec::new();
    for i in 0..=cli.prefill_runs {
        *seed += 1;
        let id = SeqId(*seed as u64);
        let p = prompt(*seed, n, vocab);
        r.add_sequence(id, &p)?;
        let t = Instant::now();
        r.forward(&[SeqChunk {
            id,
            tokens: p,
            logits: LogitsWanted::Last,
        }])?;
        let dt = t.elapsed().as_secs_f64();
        r.remove_sequence(id);
        if i > 0 {
            times.push(dt); // the first run only warms caches up
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let row = BenchRow {
        name: format!(
            "ours: prefill {n} tokens alone, warm (median of {})",
            times.len()
        ),
        tokens: n,
        seconds: median,
    };
    show(&row);
    Ok(row)
}

/// `--serve`: a batch scheduled as the coordinator does (see the module docs).
fn served_batch(
    r: &mut impl ModelRunner,
    cli: &Cli,
    b: usize,
    seed: &mut usize,
) -> anyhow::Result<BenchRow> {
    let vocab = r.info().vocab_size;
    struct Seq {
        id: SeqId,
        prompt: Vec<u32>,
        done: usize,
        last: Option<u32>,
        generated: usize,
    }
    let mut seqs: Vec<Seq> = (0..b)
        .map(|_| {
            *seed += 1;
            Seq {
                id: SeqId(*seed as u64),
                prompt: prompt(*seed, cli.opts.prompt_tokens, vocab),
                done: 0,
                last: None,
                generated: 0,
            }
        })
        .collect();
    let t = Instant::now();
    let mut started = 0;
    while seqs.iter().any(|s| s.generated < cli.opts.new_tokens) {
        let mut budget = cli.budget;
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if let Some(tok) = s.last.filter(|_| s.generated < cli.opts.new_tokens)
                && budget > 0
            {
                batch.push(SeqChunk {
                    id: s.id,
                    tokens: vec![tok],
                    logits: LogitsWanted::Last,
                });
                who.push(i);
                budget -= 1;
            }
        }
        // Prompts in order: continue a chunked one, then start new ones while they fit.
        for (i, s) in seqs.iter_mut().enumerate() {
            if budget == 0 || s.last.is_some() {
                continue;
            }
            if s.done == 0 {
                if i > started {
                    break; // in order, as the queue admits them
                }
                r.add_sequence(s.id, &s.prompt)?;
                started += 1;
            }
            let take = (s.prompt.len() - s.done).min(budget);
            batch.push(SeqChunk {
                id: s.id,
                tokens: s.prompt[s.done..s.done + take].to_vec(),
                logits: if s.done + take == s.prompt.len() {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            });
            who.push(i);
            s.done += take;
            budget -= take;
        }
        let out = r.forward(&batch)?;
        for (&i, o) in who.iter().zip(&out) {
            let s = &mut seqs[i];
            if s.done == s.prompt.len() && !o.data.is_empty() {
                s.last = Some(argmax(&o.data));
                s.generated += 1;
            }
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    for s in &seqs {
        r.remove_sequence(s.id);
    }
    let row = BenchRow {
        name: format!(
            "ours: serve batch {b} (prefill+decode, budget {}) (aggregate)",
            cli.budget
        ),
        tokens: b * cli.opts.new_tokens,
        seconds,
    };
    show(&row);
    Ok(row)
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli()?;
    let path = &cli.path;
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run deploy/fetch-model.sh",
        path.display()
    );
    let opts = &cli.opts;
    // candle's own kernels use its global pool; give it the same thread count.
    rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build_global()
        .ok();
    let mut rows = Vec::new();
    if cli.serve || cli.prefill_runs > 0 {
        let mut r = runner(&cli)?;
        let mut seed = 1000;
        if cli.prefill_runs > 0 {
            rows.push(timed_prefills(&mut r, &cli, &mut seed)?);
        }
        if cli.serve {
            for &b in &opts.batches {
                rows.push(served_batch(&mut r, &cli, b, &mut seed)?);
            }
        }
    }
    if !cli.serve {
        rows.extend(run_engine_bench(path, opts)?);
        if path.extension().is_some_and(|e| e == "gguf") {
            rows.extend(baseline(path, opts)?);
        }
    }
    print!("{}", format_table(path, opts.threads, &rows));
    Ok(())
}
