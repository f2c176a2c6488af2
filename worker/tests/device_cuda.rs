//! The device backend on a real GPU (feature `cuda`; run the test binary on the GPU
//! host): the tiny random Llama with bf16 weights and KV cache on CUDA against the f32
//! CPU kernels.
#![cfg(feature = "cuda")]

use shardline_worker::model::device::{DeviceChoice, DeviceModel, DeviceRunner};
use shardline_worker::model::tiny::{TinySpec, TinyWeights};
use shardline_worker::runner::{LogitsWanted, ModelRunner, SeqChunk, SeqId};

/// Needs a GPU (run on the GPU host: the test binary of `--features cuda`). bf16
/// weights and KV against the f32 CPU kernels: logits within 5 % of their range,
/// greedy tokens equal on at least 90 % of the rows.
#[test]
fn cuda_matches_the_cpu_model_on_the_tiny_llama() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        heads: 8,
        kv_heads: 4,
        ..Default::default()
    };
    let vocab = spec.vocab;
    TinyWeights::random(spec).write_hf(dir.path()).unwrap();
    let model = shardline_worker::loader::load_model(dir.path()).unwrap();
    let opts = shardline_worker::loader::LoadOptions {
        kv_blocks: Some(64),
        block_size: 4,
        threads: 2,
        ..Default::default()
    };
    let mut cpu = shardline_worker::loader::load_llama_runner(dir.path(), &opts).unwrap();
    let dev = DeviceModel::from_model(&model, DeviceChoice::Cuda(0)).expect("CUDA device 0");
    let mut gpu = DeviceRunner::new(dev, "tiny".into(), 64, 4).unwrap();
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|s| {
            (0..5 + 4 * s)
                .map(|i| (i * 13 + s * 7) % vocab as u32)
                .collect()
        })
        .collect();
    let mut batch: Vec<SeqChunk> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        cpu.add_sequence(SeqId(i as u64), p).unwrap();
        gpu.add_sequence(SeqId(i as u64), p).unwrap();
        batch.push(SeqChunk {
            id: SeqId(i as u64),
            tokens: p.clone(),
            logits: LogitsWanted::All,
        });
    }
    let (mut rows, mut same, mut worst) = (0, 0, 0f32);
    for _ in 0..8 {
        let a = cpu.forward(&batch).unwrap();
        let b = gpu.forward(&batch).unwrap();
        for ((x, y), c) in a.iter().zip(&b).zip(batch.iter_mut()) {
            for (rx, ry) in x.data.chunks(vocab).zip(y.data.chunks(vocab)) {
                let range = rx.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                let d = rx
                    .iter()
                    .zip(ry)
                    .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                worst = worst.max(d / range);
                let arg = |r: &[f32]| (0..vocab).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
                rows += 1;
                same += usize::from(arg(rx) == arg(ry));
            }
            let last = &x.data[(x.rows - 1) * vocab..];
            let next = (0..vocab)
                .max_by(|&i, &j| last[i].total_cmp(&last[j]))
                .unwrap();
            c.tokens = vec![next as u32];
            c.logits = LogitsWanted::Last;
        }
    }
    eprintln!("cuda vs cpu: {same}/{rows} greedy rows equal, worst |Δ|/range {worst:.4}");
    assert!(worst < 0.05, "worst |Δ|/range {worst}");
    assert!(same * 10 >= rows * 9, "{same}/{rows} greedy rows equal");
}
