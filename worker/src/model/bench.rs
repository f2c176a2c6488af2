//! Engine benchmark (not a test): prompt processing, decode at batch 1, aggregate decode
//! at larger batches, the prefix-cache saving, and stock candle `quantized_llama` as the
//! baseline in the same run (added by `examples/engine_bench.rs`, since candle-transformers
//! is only a dev-dependency).
//!
//! With [`BenchOptions::device`] the same runs go through the device backend
//! ([`crate::model::device`], e.g. CUDA), and [`BenchReport`] adds the memory-bandwidth
//! ratio of each decode batch: weight bytes × decode steps per second ÷ [`HBM_BYTES_PER_S`].

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::loader::{LoadOptions, load_llama_runner, load_model};
use crate::model::device::{DeviceChoice, DeviceModel, DeviceRunner};
use crate::runner::{LogitsWanted, ModelRunner, RunnerError, SeqChunk, SeqId};

/// The default model of the benchmark examples.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The positional arguments of a benchmark example (`MODEL THREADS … BATCHES …`), each
/// optional, with its default when absent.
#[derive(Debug, Clone)]
pub struct PositionalArgs(Vec<String>);

impl PositionalArgs {
    /// The process's arguments after the program name.
    pub fn from_env() -> Self {
        PositionalArgs(std::env::args().skip(1).collect())
    }

    /// Argument `i` as a path, [`DEFAULT_MODEL`] when absent.
    pub fn model(&self, i: usize) -> std::path::PathBuf {
        std::path::PathBuf::from(self.0.get(i).map_or(DEFAULT_MODEL, String::as_str))
    }

    /// Argument `i` (called `name` in errors) as a number, `default` when absent.
    pub fn number(&self, i: usize, name: &str, default: usize) -> anyhow::Result<usize> {
        use anyhow::Context as _;
        match self.0.get(i) {
            None => Ok(default),
            Some(v) => v.parse().with_context(|| format!("{name}: {v:?}")),
        }
    }

    /// Argument `i` as a comma-separated list of batch sizes, `[1, 32]` when absent.
    pub fn batches(&self, i: usize) -> anyhow::Result<Vec<usize>> {
        use anyhow::Context as _;
        match self.0.get(i) {
            None => Ok(vec![1, 32]),
            Some(list) => list
                .split(',')
                .map(|b| b.parse().with_context(|| format!("BATCHES: {b:?}")))
                .collect(),
        }
    }
}

/// Peak memory bandwidth the ratio is taken against: an H200's HBM3e, 4.8 TB/s.
pub const HBM_BYTES_PER_S: f64 = 4.8e12;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub threads: usize,
    /// Prompt length for the prompt-processing figure.
    pub pp_tokens: usize,
    /// Prompt length of each sequence in the decode runs.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence in the decode runs.
    pub new_tokens: usize,
    /// Batch sizes for aggregate decode (1 included for the batch-1 figure).
    pub batches: Vec<usize>,
    /// Run on this candle device through the device backend; `None`: the CPU engine's
    /// own kernels.
    pub device: Option<DeviceChoice>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            threads: 2,
            pp_tokens: 512,
            prompt_tokens: 128,
            new_tokens: 128,
            batches: vec![1, 4, 8, 16, 32],
            device: None,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub name: String,
    pub tokens: usize,
    pub seconds: f64,
}

impl BenchRow {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// A prompt distinct per `seed` (so the prefix cache never hits by accident), avoiding
/// the control ids.
pub fn prompt(seed: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (seed * 7919 + i * 104_729) % (vocab - 100)) as u32)
        .collect()
}

/// The greedy token of a logits row (0 when no logit is finite).
pub fn argmax(x: &[f32]) -> u32 {
    shardline_engine::sampler::greedy(x).unwrap_or(0)
}

fn progress(rows: &[BenchRow]) {
    if let Some(r) = rows.last() {
        eprintln!(
            "{:<58} {:>8} {:>9.2} {:>10.1}",
            r.name,
            r.tokens,
            r.seconds,
            r.tokens_per_s()
        );
    }
}

/// Peak resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// One decode batch's throughput.
#[derive(Debug, Clone)]
pub struct DecodeFigure {
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Decode steps per second (each step reads every weight once).
    pub steps_per_s: f64,
    /// Time per step inside the runner's forward (logits on the host included); the rest
    /// of a step is the benchmark's greedy argmax and batch building.
    pub forward_ms_per_step: f64,
}

/// Everything one benchmark run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// `cpu-kernels`, or the candle device.
    pub device: String,
    /// Weight dtype on the device (`bf16`, `f32`) or the checkpoint's formats.
    pub dtype: String,
    pub load_seconds: f64,
    pub rows: Vec<BenchRow>,
    pub decode: Vec<DecodeFigure>,
    /// Weight bytes a decode step reads (device backend only).
    pub weight_bytes: Option<usize>,
}

impl BenchReport {
    /// Weight bytes read per second at `fig` ÷ [`HBM_BYTES_PER_S`].
    pub fn bandwidth_ratio(&self, fig: &DecodeFigure) -> Option<f64> {
        self.weight_bytes
            .map(|b| b as f64 * fig.steps_per_s / HBM_BYTES_PER_S)
    }

    /// The decode figures, one line each, with the bandwidth ratio where known.
    pub fn format_decode(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "device: {}  weights: {}  weight bytes/step: {}  load: {:.1} s",
            self.device,
            self.dtype,
            self.weight_bytes
                .map_or("n/a".into(), |b| format!("{b} ({:.2} GB)", b as f64 / 1e9)),
            self.load_seconds
        );
        for f in &self.decode {
            let ratio = self.bandwidth_ratio(f).map_or("n/a".into(), |r| {
                format!("{r:.5} ({:.2}% of 4.8 TB/s)", r * 100.0)
            });
            let _ = writeln!(
                out,
                "decode batch {:>3}: {:>10.1} tokens/s {:>8.1} steps/s ({:.2} ms/step in forward)  bandwidth ratio {ratio} (weight bytes × steps/s ÷ 4.8e12)",
                f.batch, f.tokens_per_s, f.steps_per_s, f.forward_ms_per_step
            );
        }
        out
    }
}

/// Runs our engine's benchmark on the model at `path` (see [`format_table`]).
pub fn run_engine_bench(path: &Path, opts: &BenchOptions) -> Result<Vec<BenchRow>, RunnerError> {
    Ok(run_bench(path, opts)?.rows)
}

/// [`run_engine_bench`] with the decode figures and, on the device backend, the
/// memory-bandwidth ratio.
pub fn run_bench(path: &Path, opts: &BenchOptions) -> Result<BenchReport, RunnerError> {
    if opts.batches.contains(&0) || opts.new_tokens == 0 || opts.prompt_tokens == 0 {
        return Err(RunnerError::Model(
            "batches, new tokens and prompt tokens must be > 0".into(),
        ));
    }
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1);
    let per_seq = opts.prompt_tokens + opts.new_tokens;
    let load = LoadOptions {
        threads: opts.threads,
        kv_blocks: Some(
            (max_batch * per_seq.div_ceil(16) + 2 * opts.pp_tokens.div_ceil(16) + 8).max(64),
        ),
        ..Default::default()
    };
    let err = |e: crate::loader::LoadError| RunnerError::Model(e.to_string());
    let t = Instant::now();
    match opts.device {
        None => {
            let mut r = load_llama_runner(path, &load).map_err(err)?;
            let dtype = r.info().dtype.clone();
            let load_seconds = t.elapsed().as_secs_f64();
            let (rows, decode) = bench_runner(&mut r, opts)?;
            Ok(BenchReport {
                device: "cpu-kernels".into(),
                dtype,
                load_seconds,
                rows,
                decode,
                weight_bytes: None,
            })
        }
        Some(dev) => {
            let model = load_model(path).map_err(err)?;
            let model = DeviceModel::from_model(&model, dev)?;
            let weight_bytes = model.weight_bytes();
            let id = path.display().to_string();
            let blocks = load.kv_blocks.unwrap_or(64);
            let mut r = DeviceRunner::new(model, id, blocks, load.block_size)?;
            let dtype = r.info().dtype.clone();
            // First kernel launches load the device modules: keep them out of the timings.
            warm_up(&mut r)?;
            let load_seconds = t.elapsed().as_secs_f64();
            let (rows, decode) = bench_runner(&mut r, opts)?;
            Ok(BenchReport {
                device: dev.to_string(),
                dtype,
                load_seconds,
                rows,
                decode,
                weight_bytes: Some(weight_bytes),
            })
        }
    }
}

fn warm_up(r: &mut dyn ModelRunner) -> Result<(), RunnerError> {
    let vocab = r.info().vocab_size;
    let ids = [SeqId(u64::MAX), SeqId(u64::MAX - 1)];
    for (i, &id) in ids.iter().enumerate() {
        r.add_sequence(id, &prompt(i + 999, 9, vocab))?;
    }
    let chunk = |id, tokens: &[u32]| SeqChunk {
        id,
        tokens: tokens.to_vec(),
        logits: LogitsWanted::Last,
    };
    let p = prompt(999, 9, vocab);
    r.forward(&[chunk(ids[0], &p)])?;
    r.forward(&[chunk(ids[1], &p[..4])])?;
    r.forward(&[chunk(ids[0], &[7]), chunk(ids[1], &p[4..])])?;
    for id in ids {
        r.remove_sequence(id);
    }
    Ok(())
}

fn bench_runner(
    r: &mut dyn ModelRunner,
    opts: &BenchOptions,
) -> Result<(Vec<BenchRow>, Vec<DecodeFigure>), RunnerError> {
    let vocab = r.info().vocab_size;
    let mut rows = Vec::new();
    let mut decode = Vec::new();
    let mut next = 0u64;

    // Prompt processing, one chunk, plus the same prompt again to show the prefix cache.
    let p = prompt(1, opts.pp_tokens, vocab);
    for (name, id) in [
        ("ours: prompt processing", 1_000_000u64),
        ("ours: same prompt again (prefix cache)", 1_000_001),
    ] {
        let cached = r.add_sequence(SeqId(id), &p)?;
        let t = Instant::now();
        r.forward(&[SeqChunk {
            id: SeqId(id),
            tokens: p[cached..].to_vec(),
            logits: LogitsWanted::Last,
        }])?;
        rows.push(BenchRow {
            name: format!("{name} ({} tokens, {cached} cached)", p.len()),
            tokens: p.len(),
            seconds: t.elapsed().as_secs_f64(),
        });
        progress(&rows);
    }
    r.remove_sequence(SeqId(1_000_000));
    r.remove_sequence(SeqId(1_000_001));

    for &b in &opts.batches {
        let ids: Vec<SeqId> = (0..b)
            .map(|_| {
                next += 1;
                SeqId(next)
            })
            .collect();
        let mut last = Vec::with_capacity(b);
        for &id in &ids {
            let p = prompt(id.0 as usize + 10, opts.prompt_tokens, vocab);
            r.add_sequence(id, &p)?;
            let out = r.forward(&[SeqChunk {
                id,
                tokens: p,
                logits: LogitsWanted::Last,
            }])?;
            last.push(argmax(&out[0].data));
        }
        let t = Instant::now();
        let mut in_forward = 0f64;
        for _ in 0..opts.new_tokens {
            let batch: Vec<SeqChunk> = ids
                .iter()
                .zip(&last)
                .map(|(&id, &tok)| SeqChunk {
                    id,
                    tokens: vec![tok],
                    logits: LogitsWanted::Last,
                })
                .collect();
            let tf = Instant::now();
            let out = r.forward(&batch)?;
            in_forward += tf.elapsed().as_secs_f64();
            for (l, o) in last.iter_mut().zip(&out) {
                *l = argmax(&o.data);
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        rows.push(BenchRow {
            name: format!("ours: decode batch {b} (aggregate)"),
            tokens: b * opts.new_tokens,
            seconds,
        });
        decode.push(DecodeFigure {
            batch: b,
            tokens_per_s: (b * opts.new_tokens) as f64 / seconds.max(1e-9),
            steps_per_s: opts.new_tokens as f64 / seconds.max(1e-9),
            forward_ms_per_step: in_forward * 1e3 / opts.new_tokens as f64,
        });
        progress(&rows);
        for id in ids {
            r.remove_sequence(id);
        }
    }
    Ok((rows, decode))
}

/// Formats rows (ours and any baseline the caller adds) as a table with the peak RSS.
pub fn format_table(path: &Path, threads: usize, rows: &[BenchRow]) -> String {
    let mut table = String::new();
    let _ = writeln!(table, "model: {}  threads: {threads}", path.display());
    let _ = writeln!(
        table,
        "{:<58} {:>8} {:>9} {:>10}",
        "run", "tokens", "seconds", "tokens/s"
    );
    for row in rows {
        let _ = writeln!(
            table,
            "{:<58} {:>8} {:>9.2} {:>10.1}",
            row.name,
            row.tokens,
            row.seconds,
            row.tokens_per_s()
        );
    }
    let _ = writeln!(
        table,
        "peak RSS: {:.0} MiB",
        peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    table
}
