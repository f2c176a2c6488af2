//! Engine benchmark: ours vs stock candle `quantized_llama`, same model, same run.
//!
//! `cargo run -p shardline-worker --example engine_bench -- [MODEL] [THREADS] [NEW_TOKENS] [BATCHES]`
//! (defaults: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2, 128, `1,4,8,16,32`). Runs in the dev profile,
//! which builds the worker and its dependencies at opt-level 3.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use shardline_worker::model::bench::{BenchOptions, BenchRow, format_table, run_engine_bench};

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

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run deploy/fetch-model.sh",
        path.display()
    );
    let mut opts = BenchOptions::default();
    if let Some(t) = args.next() {
        opts.threads = t.parse()?;
    }
    if let Some(n) = args.next() {
        opts.new_tokens = n.parse()?;
    }
    if let Some(b) = args.next() {
        opts.batches = b.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    // candle's own kernels use its global pool; give it the same thread count.
    rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build_global()
        .ok();
    let mut rows = run_engine_bench(&path, &opts)?;
    if path.extension().is_some_and(|e| e == "gguf") {
        rows.extend(baseline(&path, &opts)?);
    }
    print!("{}", format_table(&path, opts.threads, &rows));
    Ok(())
}
