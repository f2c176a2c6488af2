//! A worker for other crates' tests: the real engine and gRPC service over a
//! [`FakeRunner`] with the [`echo_next`] model, on a loopback port, with the knobs tests
//! need (step time, KV size, a switch that fails the group) and what they check (free
//! blocks, admitted prompts, batch sizes). Also the byte-level test tokenizer and chat
//! template its `Info` serves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineConfig, EngineHandle, EngineStatus, ModelFacts};
use crate::fake::{FakeLog, FakeRunner, NextToken, echo_next};
use crate::service::{WorkerService, serve_service};

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

/// Vocabulary of the test tokenizer: 3 specials and 256 bytes.
pub const TEST_VOCAB: usize = 259;

/// How a test worker behaves.
#[derive(Debug, Clone)]
pub struct TestWorkerConfig {
    pub group_id: String,
    pub model_id: String,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub context_length: usize,
    pub max_num_seqs: usize,
    /// Time each forward takes (a "saturated" group in priority tests).
    pub step_delay: Duration,
    /// Mutual TLS of the worker API (`None`: plaintext).
    pub tls: Option<shardline_net::tls::Tls>,
    /// Reuse the full prompt blocks of earlier prompts (`FakeRunner::with_prefix_cache`).
    pub prefix_cache: bool,
    /// The fake model's next-token rule ([`echo_next`] unless a test scripts its output).
    pub model: NextToken,
    /// The KV cache element type the worker reports in `Info`.
    pub kv_cache_dtype: String,
}

impl Default for TestWorkerConfig {
    fn default() -> Self {
        Self {
            group_id: "fake-0".into(),
            model_id: "fake-model".into(),
            kv_blocks: 1024,
            block_size: 16,
            context_length: 2048,
            max_num_seqs: 256,
            step_delay: Duration::ZERO,
            tls: None,
            prefix_cache: false,
            model: echo_next,
            kv_cache_dtype: "f32".into(),
        }
    }
}

/// A test worker serving on a loopback port until dropped.
pub struct TestWorker {
    pub addr: SocketAddr,
    pub engine: EngineHandle,
    log: Arc<Mutex<FakeLog>>,
    shutdown: CancellationToken,
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestWorker {
    /// Serves on `127.0.0.1:0`.
    pub async fn start(config: TestWorkerConfig) -> std::io::Result<TestWorker> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config)
    }

    /// Serves on `listener` until the worker is dropped.
    pub fn start_on(
        listener: TcpListener,
        config: TestWorkerConfig,
    ) -> std::io::Result<TestWorker> {
        let addr = listener.local_addr()?;
        let mut runner = FakeRunner::new(
            TEST_VOCAB,
            config.context_length,
            config.block_size,
            config.kv_blocks,
        )
        .with_model(config.model)
        .with_model_id(&config.model_id)
        .with_kv_cache_dtype(&config.kv_cache_dtype)
        .with_step_delay(config.step_delay);
        if config.prefix_cache {
            runner = runner.with_prefix_cache();
        }
        let log = runner.log();
        let engine_config = EngineConfig {
            max_num_seqs: config.max_num_seqs,
            group_id: config.group_id.clone(),
            model: ModelFacts {
                tokenizer_json: test_tokenizer_json(),
                chat_template: TEST_CHAT_TEMPLATE.into(),
                eos_token_ids: vec![EOS_ID],
                bos_token: String::new(),
                eos_token: "<|endoftext|>".into(),
                add_bos: false,
            },
        };
        let (engine, _thread) =
            EngineHandle::spawn(Box::new(runner), engine_config).map_err(std::io::Error::other)?;
        let shutdown = CancellationToken::new();
        let service = WorkerService::new(engine.clone(), shutdown.child_token());
        tokio::spawn(serve_service(
            listener,
            service,
            config.tls.clone(),
            shutdown.clone(),
        ));
        Ok(TestWorker {
            addr,
            engine,
            log,
            shutdown,
        })
    }

    /// `http://…` address to give a coordinator.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, FakeLog> {
        self.log.lock().expect("fake log poisoned")
    }

    pub fn free_blocks(&self) -> usize {
        self.log().free_blocks
    }

    /// Sequences alive on the worker.
    pub fn running(&self) -> usize {
        self.log().live
    }

    /// Sequences that reached the model (first chunks accepted).
    pub fn admitted(&self) -> usize {
        self.log().added_prompts.len()
    }

    /// Prompts of the sequences that reached the model, in order.
    pub fn admitted_prompts(&self) -> Vec<Vec<u32>> {
        self.log().added_prompts.clone()
    }

    /// Sequences in each forward, in order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.log().forwards.iter().map(Vec::len).collect()
    }

    /// Makes the group act as one whose engine failed (`Some(why)`: `Health` not ready,
    /// steps fail) or healthy again (`None`: a restarted process on the same address).
    pub fn set_failing(&self, why: Option<&str>) {
        self.log().failing = why.map(str::to_string);
    }

    /// Steps refused while failing.
    pub fn failed_steps(&self) -> u64 {
        self.log().failed_forwards
    }

    pub async fn status(&self) -> EngineStatus {
        self.engine.status().await.expect("test engine running")
    }
}

/// One step stream kept open, as a coordinator keeps its stream: the sequences it starts
/// live until they finish, are released, or the stream ends.
pub struct StepStream {
    tx: tokio::sync::mpsc::Sender<pb::StepRequest>,
    answers: tonic::Streaming<pb::StepResponse>,
}

impl StepStream {
    pub async fn open(
        client: &mut WorkerClient<tonic::transport::Channel>,
    ) -> Result<StepStream, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let answers = client
            .steps(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(StepStream { tx, answers })
    }

    /// Sends one step without waiting for its answer (pipelining).
    pub async fn send(&self, req: pb::StepRequest) -> Result<(), tonic::Status> {
        self.tx
            .send(req)
            .await
            .map_err(|_| tonic::Status::unavailable("the step stream is closed"))
    }

    /// The next answer, in the order the steps were sent.
    pub async fn answer(&mut self) -> Result<pb::StepResponse, tonic::Status> {
        self.answers
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("the step stream ended without an answer"))
    }

    /// Sends one step and waits for its answer.
    pub async fn step(&mut self, req: pb::StepRequest) -> Result<pb::StepResponse, tonic::Status> {
        self.send(req).await?;
        self.answer().await
    }
}

/// Runs one step over a fresh step stream, which then ends: the sequences the step
/// started are released with it. Tests that continue a sequence use a [`StepStream`].
pub async fn step_once(
    client: &mut WorkerClient<tonic::transport::Channel>,
    req: pb::StepRequest,
) -> Result<pb::StepResponse, tonic::Status> {
    let mut answers = client.steps(tokio_stream::once(req)).await?.into_inner();
    answers
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unavailable("the step stream ended without an answer"))
}
