//! Model tests on a tiny random Llama written to a temp dir through the real loaders:
//! batch invariance (bitwise), safetensors vs GGUF F32, prefix caching, the candle
//! reference on f32 weights, and bad input.

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use shardline_worker::loader::{LoadError, LoadOptions, load_llama_runner};
use shardline_worker::model::tiny::{TinySpec, TinyWeights};
use shardline_worker::runner::{LogitsWanted, ModelRunner, RunnerError, SeqChunk, SeqId};

fn opts() -> LoadOptions {
    LoadOptions {
        kv_blocks: Some(512),
        block_size: 4,
        threads: 2,
        ..Default::default()
    }
}

fn tiny_hf(spec: TinySpec) -> (tempfile::TempDir, TinyWeights) {
    let dir = tempfile::tempdir().unwrap();
    let w = TinyWeights::random(spec);
    w.write_hf(dir.path()).unwrap();
    (dir, w)
}

fn prompt(seed: u32, len: usize, vocab: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7 + seed * 31 + i * i * 3) % vocab)
        .collect()
}

fn chunk(id: u64, tokens: &[u32], logits: LogitsWanted) -> SeqChunk {
    SeqChunk {
        id: SeqId(id),
        tokens: tokens.to_vec(),
        logits,
    }
}

/// Runs `tokens` for `id` alone in a fresh runner, `size` tokens a step; returns the
/// logits of every position.
fn run_alone(path: &std::path::Path, id: u64, tokens: &[u32], size: usize) -> Vec<Vec<f32>> {
    let r = &mut load_llama_runner(path, &opts()).unwrap();
    assert_eq!(r.add_sequence(SeqId(id), tokens).unwrap(), 0);
    let mut out = Vec::new();
    for c in tokens.chunks(size) {
        let l = r.forward(&[chunk(id, c, LogitsWanted::All)]).unwrap();
        assert_eq!(l[0].rows, c.len());
        out.extend(l[0].data.chunks(r.info().vocab_size).map(|x| x.to_vec()));
    }
    r.remove_sequence(SeqId(id));
    out
}

#[test]
fn logits_are_bitwise_batch_and_chunking_invariant() {
    let (dir, w) = tiny_hf(TinySpec::default());
    let vocab = w.spec.vocab as u32;
    let target = prompt(1, 23, vocab);
    let reference = run_alone(dir.path(), 1, &target, target.len());
    for size in [1, 3, 5] {
        assert_eq!(
            run_alone(dir.path(), 1, &target, size),
            reference,
            "chunk size {size}"
        );
    }
    let mut r = load_llama_runner(dir.path(), &opts()).unwrap();
    // In a batch of up to 8 with others joining and leaving at different steps; the
    // target runs chunks of 3 while the others prefill or decode around it.
    r.add_sequence(SeqId(1), &target).unwrap();
    let mut got: Vec<Vec<f32>> = Vec::new();
    let mut others: Vec<(u64, Vec<u32>, usize)> = Vec::new();
    let mut next_id = 100;
    for (step, c) in target.chunks(3).enumerate() {
        if step % 2 == 0 && others.len() < 7 {
            let p = prompt(next_id as u32, 3 + step * 2, vocab);
            r.add_sequence(SeqId(next_id), &p).unwrap();
            others.push((next_id, p, 0));
            next_id += 1;
        }
        if step % 3 == 2 && !others.is_empty() {
            let (id, ..) = others.remove(0);
            r.remove_sequence(SeqId(id));
        }
        let mut batch = Vec::new();
        for (id, p, done) in others.iter_mut() {
            let n = if *done < p.len() {
                (p.len() - *done).min(4)
            } else {
                1
            };
            let toks: Vec<u32> = if *done < p.len() {
                p[*done..*done + n].to_vec()
            } else {
                vec![(*done as u32 * 13) % vocab]
            };
            *done += n;
            batch.push(chunk(*id, &toks, LogitsWanted::Last));
        }
        batch.insert(batch.len() / 2, chunk(1, c, LogitsWanted::All));
        let out = r.forward(&batch).unwrap();
        let mine = out.iter().find(|l| l.id == SeqId(1)).unwrap();
        got.extend(mine.data.chunks(vocab as usize).map(|x| x.to_vec()));
    }
    assert_eq!(got, reference, "batched logits differ from the solo run");
}

#[test]
fn safetensors_and_gguf_f32_give_the_same_logits() {
    let (dir, w) = tiny_hf(TinySpec {
        tied: false,
        ..Default::default()
    });
    let gguf = dir.path().join("tiny-f32.gguf");
    w.write_gguf(&gguf, GgmlDType::F32).unwrap();
    let p = prompt(3, 19, w.spec.vocab as u32);
    let la = run_alone(dir.path(), 1, &p, 5);
    let lb = run_alone(&gguf, 1, &p, 5);
    let diff = la
        .iter()
        .flatten()
        .zip(lb.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "safetensors vs GGUF max |Δ| = {diff}");
}

#[test]
fn tiny_f32_matches_candle_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let w = TinyWeights::random(TinySpec {
        tied: true,
        ..Default::default()
    });
    let gguf = dir.path().join("tiny.gguf");
    w.write_gguf(&gguf, GgmlDType::F32).unwrap();
    let mut ours = load_llama_runner(&gguf, &opts()).unwrap();
    let mut f = std::fs::File::open(&gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let p = prompt(5, 17, w.spec.vocab as u32);
    ours.add_sequence(SeqId(1), &p).unwrap();
    let mut input = p.clone();
    let mut pos = 0;
    let mut max = 0f32;
    for _ in 0..48 {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let r: Vec<f32> = reference
            .forward(&x, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let o = ours
            .forward(&[chunk(1, &input, LogitsWanted::Last)])
            .unwrap()
            .remove(0)
            .data;
        max = o
            .iter()
            .zip(&r)
            .map(|(a, b)| (a - b).abs())
            .fold(max, f32::max);
        pos += input.len();
        input = vec![(pos as u32 * 11) % w.spec.vocab as u32];
    }
    eprintln!("tiny f32 vs candle max |Δ| {max}");
    assert!(max < 1e-3, "tiny f32 model vs candle: max |Δ| = {max}");
}

#[test]
fn prefix_cache_reports_cached_tokens_and_same_logits() {
    let (dir, w) = tiny_hf(TinySpec::default());
    let mut r = load_llama_runner(dir.path(), &opts()).unwrap();
    let p = prompt(9, 18, w.spec.vocab as u32);
    let free0 = r.free_blocks();
    assert_eq!(r.add_sequence(SeqId(1), &p).unwrap(), 0);
    let a = r
        .forward(&[chunk(1, &p, LogitsWanted::Last)])
        .unwrap()
        .remove(0)
        .data;
    // Second request with the same prompt while the first is alive: 4 full blocks of 4.
    let cached = r.add_sequence(SeqId(2), &p).unwrap();
    assert_eq!(cached, 16);
    assert_eq!(r.seq_len(SeqId(2)).unwrap(), 16);
    let b = r
        .forward(&[chunk(2, &p[cached..], LogitsWanted::Last)])
        .unwrap()
        .remove(0)
        .data;
    assert_eq!(a, b, "cached prefix must give identical logits");
    r.remove_sequence(SeqId(1));
    r.remove_sequence(SeqId(2));
    assert_eq!(
        r.free_blocks(),
        free0,
        "every block is free (or evictable) again"
    );
    // After both left, the prefix is still cached.
    assert_eq!(r.add_sequence(SeqId(3), &p).unwrap(), 16);
    r.remove_sequence(SeqId(3));
}

#[test]
fn bad_input_is_a_clear_error() {
    let (dir, w) = tiny_hf(TinySpec {
        context: 32,
        ..Default::default()
    });
    let mut r = load_llama_runner(
        dir.path(),
        &LoadOptions {
            kv_blocks: Some(6),
            block_size: 4,
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let vocab = w.spec.vocab as u32;
    assert!(matches!(
        r.forward(&[chunk(7, &[1], LogitsWanted::Last)]),
        Err(RunnerError::UnknownSequence(_))
    ));
    assert!(matches!(
        r.add_sequence(SeqId(1), &prompt(1, 33, vocab)),
        Err(RunnerError::ContextExceeded { .. })
    ));
    r.add_sequence(SeqId(1), &prompt(1, 20, vocab)).unwrap();
    assert!(matches!(
        r.add_sequence(SeqId(1), &[1]),
        Err(RunnerError::DuplicateSequence(_))
    ));
    assert!(matches!(
        r.forward(&[chunk(1, &[vocab], LogitsWanted::Last)]),
        Err(RunnerError::Model(_))
    ));
    let err = r
        .forward(&[chunk(1, &prompt(1, 25, vocab), LogitsWanted::Last)])
        .unwrap_err();
    assert!(
        matches!(err, RunnerError::OutOfBlocks { needed: 7, free: 6 }),
        "{err}"
    );
    assert_eq!(r.free_blocks(), 6, "a failed step changes nothing");
    assert_eq!(r.seq_len(SeqId(1)).unwrap(), 0);
    // The runner keeps serving.
    r.forward(&[chunk(1, &prompt(1, 20, vocab), LogitsWanted::Last)])
        .unwrap();

    let missing = dir.path().join("nope.gguf");
    assert!(matches!(
        load_llama_runner(&missing, &opts()),
        Err(LoadError::NotFound(_))
    ));
    let corrupt = dir.path().join("bad.gguf");
    std::fs::write(&corrupt, b"GGUF not really").unwrap();
    let e = load_llama_runner(&corrupt, &opts()).unwrap_err();
    assert!(matches!(e, LoadError::Corrupt { .. }), "{e}");
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("config.json"), r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}"#).unwrap();
    let e = load_llama_runner(other.path(), &opts()).unwrap_err();
    assert!(e.to_string().contains("unsupported architecture"), "{e}");
}
