//! An in-process fake worker implementing `shardline.worker.v1.Worker`, for tests of the
//! coordinator and of crates built on it. It is deterministic: output token `i` of a
//! sequence is token `(i + shift) % len` of its original prompt (`shift` = seed when
//! sampling, 0 when greedy), so a test controls the generated text through the prompt,
//! and a migrated sequence continues exactly where it stopped. It enforces a KV block
//! budget (OUT_OF_BLOCKS when exceeded), counts admitted sequences and records batch
//! sizes, and can be told to sleep per step or to fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardline_proto::worker::v1::worker_server::{Worker, WorkerServer};
use shardline_proto::worker::v1::*;
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// End-of-text token id of the test tokenizer.
pub const EOS_ID: u32 = 0;

/// A byte-level BPE `tokenizer.json` (no merges: one token per byte, ids 3..259) with
/// `<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2. Multi-byte characters take
/// several tokens, which is what UTF-8 boundary tests need.
pub fn test_tokenizer_json() -> String {
    use tokenizers::AddedToken;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: tokenizers::models::bpe::Vocab = specials
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (specials.len() + i) as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .expect("static vocabulary; this is a bug");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tokenizer.add_special_tokens(&added);
    tokenizer
        .to_string(false)
        .expect("serializable; this is a bug")
}

/// The tokenizer of [`test_tokenizer_json`].
pub fn test_tokenizer() -> Tokenizer {
    test_tokenizer_json()
        .parse()
        .expect("built above; this is a bug")
}

/// ChatML without a default system prompt.
pub const TEST_CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeWorkerConfig {
    pub group_id: String,
    pub model_id: String,
    pub kv_blocks: u32,
    pub block_size: u32,
    pub context_length: u32,
    pub max_num_seqs: u32,
    /// Sleep per Step (a "saturated" group in priority tests).
    pub step_delay: Duration,
    /// Emit EOS as output token number `n` (unless `ignore_eos` / `min_tokens`).
    pub eos_after: Option<u32>,
}

impl Default for FakeWorkerConfig {
    fn default() -> Self {
        FakeWorkerConfig {
            group_id: "fake-0".into(),
            model_id: "fake-model".into(),
            kv_blocks: 1024,
            block_size: 16,
            context_length: 2048,
            max_num_seqs: 256,
            step_delay: Duration::ZERO,
            eos_after: None,
        }
    }
}

#[derive(Debug)]
struct Seq {
    prompt: Vec<u32>,
    params: SequenceParams,
    computed: usize,
    /// Output tokens so far, counting `num_generated` ones from earlier placements.
    generated: u32,
    blocks: u32,
}

/// Counters and switches shared with the test.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Sequences that reached this worker (first chunks).
    pub admitted: AtomicU64,
    pub steps: AtomicU64,
    pub releases: AtomicU64,
    /// Sequences per Step, in order.
    pub batch_sizes: Mutex<Vec<usize>>,
    /// Prompts of first chunks, in arrival order.
    pub admitted_prompts: Mutex<Vec<Vec<u32>>>,
    /// When set, every RPC fails with UNAVAILABLE.
    pub fail: AtomicBool,
    /// When set, the worker acts as one whose engine failed: Info still answers, Health
    /// says not ready, every Step fails with UNAVAILABLE.
    pub engine_failed: AtomicBool,
    /// Steps refused because of `engine_failed`.
    pub failed_steps: AtomicU64,
}

struct Inner {
    seqs: HashMap<u64, Seq>,
    free_blocks: u32,
}

/// The fake worker service.
#[derive(Clone)]
pub struct FakeWorker {
    config: Arc<FakeWorkerConfig>,
    inner: Arc<Mutex<Inner>>,
    pub stats: Arc<FakeStats>,
    tokenizer_json: Arc<String>,
}

/// A fake worker serving on a loopback port.
pub struct FakeWorkerHandle {
    pub addr: SocketAddr,
    pub worker: FakeWorker,
    pub shutdown: CancellationToken,
}

impl FakeWorkerHandle {
    /// `http://…` address to give the coordinator.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> &FakeStats {
        &self.worker.stats
    }

    pub fn free_blocks(&self) -> u32 {
        self.worker.inner.lock().expect("lock poisoned").free_blocks
    }

    pub fn running(&self) -> usize {
        self.worker.inner.lock().expect("lock poisoned").seqs.len()
    }
}

impl Drop for FakeWorkerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl FakeWorker {
    pub fn new(config: FakeWorkerConfig) -> FakeWorker {
        let free_blocks = config.kv_blocks;
        FakeWorker {
            config: Arc::new(config),
            inner: Arc::new(Mutex::new(Inner {
                seqs: HashMap::new(),
                free_blocks,
            })),
            stats: Arc::default(),
            tokenizer_json: Arc::new(test_tokenizer_json()),
        }
    }

    /// Serves on `127.0.0.1:0`.
    pub async fn start(config: FakeWorkerConfig) -> std::io::Result<FakeWorkerHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::start_on(listener, config))
    }

    /// Serves on `listener` until the handle is dropped.
    pub fn start_on(listener: TcpListener, config: FakeWorkerConfig) -> FakeWorkerHandle {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let worker = FakeWorker::new(config);
        let shutdown = CancellationToken::new();
        let service = WorkerServer::new(worker.clone()).max_decoding_message_size(64 << 20);
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
        FakeWorkerHandle {
            addr,
            worker,
            shutdown,
        }
    }

    fn check(&self) -> Result<(), Status> {
        if self.stats.fail.load(Ordering::SeqCst) {
            Err(Status::unavailable("fake worker told to fail"))
        } else {
            Ok(())
        }
    }

    fn blocks_for(&self, tokens: usize) -> u32 {
        tokens.div_ceil(self.config.block_size as usize) as u32
    }

    /// Grows `seq` to `tokens` tokens of KV; false when out of blocks.
    fn grow(&self, inner: &mut Inner, id: u64, tokens: usize) -> bool {
        let need = self.blocks_for(tokens);
        let seq = inner.seqs.get(&id).expect("caller checked; this is a bug");
        let extra = need.saturating_sub(seq.blocks);
        if extra > inner.free_blocks {
            let seq = inner.seqs.remove(&id).expect("present");
            inner.free_blocks += seq.blocks;
            return false;
        }
        inner.free_blocks -= extra;
        inner.seqs.get_mut(&id).expect("present").blocks += extra;
        true
    }

    /// Samples the next output token of `id` into `result`, finishing it when due.
    fn sample(&self, inner: &mut Inner, id: u64, result: &mut SeqResult) {
        let seq = inner
            .seqs
            .get_mut(&id)
            .expect("caller checked; this is a bug");
        let p = &seq.params;
        let original = seq.prompt.len() - p.num_generated as usize;
        let shift = p
            .sampling
            .as_ref()
            .filter(|s| s.temperature > 0.0)
            .map_or(0, |s| s.seed as usize);
        let i = seq.generated;
        let mut token = seq.prompt[(i as usize + shift) % original.max(1)];
        if let Some(n) = self.config.eos_after
            && i >= n
            && i >= p.min_tokens
            && !p.ignore_eos
        {
            token = EOS_ID;
        }
        seq.generated += 1;
        let top = (0..p.top_logprobs)
            .map(|k| TopLogprob {
                token_id: token + k,
                logprob: -0.5 - k as f32,
            })
            .collect();
        result.has_token = true;
        result.token = Some(TokenLogprob {
            token_id: token,
            logprob: -0.5,
            top,
        });
        let len = seq.prompt.len() + (seq.generated - p.num_generated) as usize;
        let finish = if token == EOS_ID && !p.ignore_eos && i >= p.min_tokens {
            FinishReason::Stop
        } else if (p.max_new_tokens > 0 && seq.generated >= p.max_new_tokens)
            || len >= self.config.context_length as usize
        {
            FinishReason::Length
        } else {
            FinishReason::Unspecified
        };
        result.finish_reason = finish as i32;
        if finish != FinishReason::Unspecified {
            let seq = inner.seqs.remove(&id).expect("present");
            inner.free_blocks += seq.blocks;
        }
    }

    fn prefill(&self, inner: &mut Inner, chunk: PrefillChunk) -> SeqResult {
        let id = chunk.seq_id;
        let mut result = SeqResult {
            seq_id: id,
            status: SeqStatus::Ok as i32,
            ..Default::default()
        };
        if let Some(params) = chunk.params {
            if inner.seqs.contains_key(&id) || chunk.prompt.is_empty() {
                result.status = SeqStatus::Invalid as i32;
                result.error = "duplicate sequence id or empty prompt".into();
                return result;
            }
            self.stats.admitted.fetch_add(1, Ordering::SeqCst);
            self.stats
                .admitted_prompts
                .lock()
                .expect("lock poisoned")
                .push(chunk.prompt.clone());
            let generated = params.num_generated;
            inner.seqs.insert(
                id,
                Seq {
                    prompt: chunk.prompt,
                    params,
                    computed: 0,
                    generated,
                    blocks: 0,
                },
            );
        }
        let Some(seq) = inner.seqs.get(&id) else {
            result.status = SeqStatus::Invalid as i32;
            result.error = format!("unknown sequence {id}");
            return result;
        };
        let remaining = seq.prompt.len() - seq.computed;
        let n = if chunk.max_tokens == 0 {
            remaining
        } else {
            remaining.min(chunk.max_tokens as usize)
        };
        let target = seq.computed + n;
        if !self.grow(inner, id, target) {
            result.status = SeqStatus::OutOfBlocks as i32;
            return result;
        }
        let seq = inner.seqs.get_mut(&id).expect("grown above");
        seq.computed = target;
        result.prompt_computed = target as u32;
        if target < seq.prompt.len() {
            return result;
        }
        if seq.params.prompt_logprobs {
            let k = seq.params.top_logprobs;
            result.prompt_logprobs = seq.prompt[1..]
                .iter()
                .map(|&t| TokenLogprob {
                    token_id: t,
                    logprob: -1.0,
                    top: (0..k)
                        .map(|j| TopLogprob {
                            token_id: t + j,
                            logprob: -1.0 - j as f32,
                        })
                        .collect(),
                })
                .collect();
        }
        if seq.params.max_new_tokens > 0 && seq.generated >= seq.params.max_new_tokens {
            result.finish_reason = FinishReason::Length as i32;
            let seq = inner.seqs.remove(&id).expect("present");
            inner.free_blocks += seq.blocks;
            return result;
        }
        self.sample(inner, id, &mut result);
        result
    }

    fn decode(&self, inner: &mut Inner, id: u64) -> SeqResult {
        let mut result = SeqResult {
            seq_id: id,
            status: SeqStatus::Ok as i32,
            ..Default::default()
        };
        let Some(seq) = inner.seqs.get(&id) else {
            result.status = SeqStatus::Invalid as i32;
            result.error = format!("unknown sequence {id}");
            return result;
        };
        let tokens = seq.prompt.len() + (seq.generated - seq.params.num_generated) as usize;
        result.prompt_computed = seq.prompt.len() as u32;
        if !self.grow(inner, id, tokens) {
            result.status = SeqStatus::OutOfBlocks as i32;
            return result;
        }
        self.sample(inner, id, &mut result);
        result
    }
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.check()?;
        let c = &self.config;
        Ok(Response::new(InfoResponse {
            model_id: c.model_id.clone(),
            dtype: "f32".into(),
            tp: 1,
            context_length: c.context_length,
            kv_block_size: c.block_size,
            kv_blocks_total: c.kv_blocks,
            kv_blocks_free: self.inner.lock().expect("lock poisoned").free_blocks,
            tokenizer_json: self.tokenizer_json.to_string(),
            chat_template: TEST_CHAT_TEMPLATE.into(),
            eos_token_ids: vec![EOS_ID],
            bos_token: String::new(),
            eos_token: "<|endoftext|>".into(),
            vocab_size: 259,
            max_num_seqs: c.max_num_seqs,
            group_id: c.group_id.clone(),
            add_bos: false,
        }))
    }

    async fn prefill(&self, r: Request<PrefillRequest>) -> Result<Response<StepResponse>, Status> {
        self.step(Request::new(StepRequest {
            prefill: r.into_inner().chunks,
            decode: vec![],
        }))
        .await
    }

    async fn decode(&self, r: Request<DecodeRequest>) -> Result<Response<StepResponse>, Status> {
        self.step(Request::new(StepRequest {
            prefill: vec![],
            decode: r.into_inner().seq_ids,
        }))
        .await
    }

    async fn step(&self, r: Request<StepRequest>) -> Result<Response<StepResponse>, Status> {
        self.check()?;
        if self.stats.engine_failed.load(Ordering::SeqCst) {
            self.stats.failed_steps.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("the engine failed and refuses work"));
        }
        if !self.config.step_delay.is_zero() {
            tokio::time::sleep(self.config.step_delay).await;
        }
        self.check()?;
        let step = r.into_inner();
        self.stats.steps.fetch_add(1, Ordering::SeqCst);
        self.stats
            .batch_sizes
            .lock()
            .expect("lock poisoned")
            .push(step.prefill.len() + step.decode.len());
        let mut inner = self.inner.lock().expect("lock poisoned");
        let mut results = Vec::new();
        let mut batch_tokens = step.decode.len() as u32;
        for chunk in step.prefill {
            batch_tokens += chunk.max_tokens;
            results.push(self.prefill(&mut inner, chunk));
        }
        for id in step.decode {
            results.push(self.decode(&mut inner, id));
        }
        Ok(Response::new(StepResponse {
            results,
            kv_blocks_free: inner.free_blocks,
            num_running: inner.seqs.len() as u32,
            step_time_ns: self.config.step_delay.as_nanos() as u64,
            batch_tokens,
        }))
    }

    async fn release(
        &self,
        r: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        self.check()?;
        let mut inner = self.inner.lock().expect("lock poisoned");
        for id in r.into_inner().seq_ids {
            if let Some(seq) = inner.seqs.remove(&id) {
                inner.free_blocks += seq.blocks;
                self.stats.releases.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(Response::new(ReleaseResponse {
            kv_blocks_free: inner.free_blocks,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        self.check()?;
        let inner = self.inner.lock().expect("lock poisoned");
        let failed = self.stats.engine_failed.load(Ordering::SeqCst);
        Ok(Response::new(HealthResponse {
            ready: !failed,
            draining: false,
            message: if failed { "the engine failed" } else { "ok" }.into(),
            kv_blocks_free: inner.free_blocks,
            num_running: inner.seqs.len() as u32,
            sequences_started: self.stats.admitted.load(Ordering::SeqCst),
        }))
    }
}
