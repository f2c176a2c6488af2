//! Tensor-parallel benchmark on CPU: latency of one shared-memory all-reduce, the
//! LM head's share of a decode step against the cost of gathering vocabulary-wide logits
//! (why the head is vocab-parallel), and SmolLM2 decode/prefill throughput at tp 1 and 3
//! in the same run.
//!
//! `cargo run -p shardline-worker --example tp_bench -- [MODEL] [THREADS]`
//! (defaults: models/SmolLM2-135M-Instruct.Q4_1.gguf, 2).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardline_worker::loader::{LoadOptions, load_llama_runner};
use shardline_worker::runner::{LogitsWanted, ModelRunner, SeqChunk, SeqId};
use shardline_worker::tp::Communicator;
use shardline_worker::tp::cpu::CpuCommunicator;

/// Median microseconds of one all-reduce of `n` floats over `world` rank threads.
fn all_reduce_us(world: usize, n: usize, iters: usize) -> f64 {
    let comms = CpuCommunicator::group(world, Duration::from_secs(30));
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut buf = vec![1.0f32; n];
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t = Instant::now();
                    c.all_reduce_sum(&mut buf).expect("all-reduce");
                    times.push(t.elapsed().as_secs_f64() * 1e6);
                }
                times.sort_by(f64::total_cmp);
                times[times.len() / 2]
            })
        })
        .collect();
    let meds: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    meds.iter().cloned().fold(0.0, f64::max)
}

/// The engine benchmark's prompts, ids in 100..40 100 (inside every Llama vocabulary).
fn prompt(seed: usize, len: usize) -> Vec<u32> {
    shardline_worker::model::bench::prompt(seed, len, 40_100)
}

/// (prefill tokens/s of a 128-token prompt, decode tokens/s at `batch`).
fn throughput(model: &std::path::Path, tp: usize, threads: usize, batch: usize) -> (f64, f64) {
    let mut r = load_llama_runner(
        model,
        &LoadOptions {
            kv_blocks: Some(512),
            threads,
            tp,
            ..Default::default()
        },
    )
    .expect("load");
    let p = prompt(999, 128);
    r.add_sequence(SeqId(999), &p).unwrap();
    let t = Instant::now();
    r.forward(&[SeqChunk {
        id: SeqId(999),
        tokens: p,
        logits: LogitsWanted::Last,
    }])
    .unwrap();
    let prefill = 128.0 / t.elapsed().as_secs_f64();
    r.remove_sequence(SeqId(999));
    let mut chunks: Vec<SeqChunk> = (0..batch)
        .map(|i| {
            let p = prompt(i, 32);
            r.add_sequence(SeqId(i as u64), &p).unwrap();
            SeqChunk {
                id: SeqId(i as u64),
                tokens: p,
                logits: LogitsWanted::Last,
            }
        })
        .collect();
    r.forward(&chunks).unwrap();
    for c in &mut chunks {
        c.tokens = vec![42];
    }
    let steps = 32;
    let t = Instant::now();
    for _ in 0..steps {
        r.forward(&chunks).unwrap();
    }
    let decode = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    (prefill, decode)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    anyhow::ensure!(
        model.exists(),
        "{} is missing: run deploy/fetch-model.sh",
        model.display()
    );
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);

    println!("## All-reduce (shared memory), median µs per call, slowest rank\n");
    println!("| floats | world 2 | world 3 | world 4 |");
    println!("|---:|---:|---:|---:|");
    for n in [576, 3 * 576, 4096, 49_152] {
        let cells: Vec<String> = [2, 3, 4]
            .iter()
            .map(|&w| format!("{:.1}", all_reduce_us(w, n, 2000)))
            .collect();
        println!("| {n} | {} |", cells.join(" | "));
    }

    // The LM head's share of a batch-1 decode step at tp 1.
    let runner = load_llama_runner(
        &model,
        &LoadOptions {
            kv_blocks: Some(64),
            threads,
            ..Default::default()
        },
    )
    .expect("load");
    let m = runner.model();
    let x = vec![0.01f32; m.cfg.hidden_size];
    let team = shardline_worker::kernels::team::Team::new(threads, "tp-bench");
    let head_us = team.install(|| {
        let t = Instant::now();
        for _ in 0..50 {
            std::hint::black_box(m.lm_head.forward(&x, 1));
        }
        t.elapsed().as_secs_f64() * 1e6 / 50.0
    });
    drop(runner);
    let (_, dec1) = throughput(&model, 1, threads, 1);
    let step_us = 1e6 / dec1;
    println!(
        "\nLM head: {head_us:.0} µs of a {step_us:.0} µs batch-1 decode step at tp 1 ({:.0}%).",
        100.0 * head_us / step_us
    );

    println!("\n## SmolLM2 at tp 1 vs 3, {threads} threads in all\n");
    println!("| tp | prefill 128 tok/s | decode b1 tok/s | decode b8 tok/s |");
    println!("|---:|---:|---:|---:|");
    for tp in [1, 3] {
        let (pf, d1) = throughput(&model, tp, threads, 1);
        let (_, d8) = throughput(&model, tp, threads, 8);
        println!("| {tp} | {pf:.1} | {d1:.1} | {d8:.1} |");
    }
    Ok(())
}
