//! The whole worker on the real SmolLM2 GGUF: `run_with_listener` loads model and
//! tokenizer, and a gRPC client does what a coordinator does — tokenizer and chat template
//! from `Info`, chunked prefill, decode to EOS, detokenize.

mod common;

use common::smollm2;

use clap::Parser;
use shardline_coordinator::chat_template::{ChatMessage, ChatTemplate};
use shardline_engine::testing::StepStream;
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use shardline_worker::WorkerArgs;
use shardline_worker::args::run_with_listener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn args(model: &std::path::Path) -> WorkerArgs {
    let model = model.to_str().unwrap();
    Cli::parse_from([
        "worker",
        "--model",
        model,
        "--kv-blocks",
        "128",
        "--max-num-seqs",
        "8",
        "--group-id",
        "it",
        "--threads",
        "2",
        "--drain-timeout-secs",
        "0",
    ])
    .worker
}

async fn connect(addr: std::net::SocketAddr) -> WorkerClient<Channel> {
    // The worker binds before it loads the model; retry until it serves.
    for _ in 0..600 {
        if let Ok(c) = WorkerClient::connect(format!("http://{addr}")).await {
            let mut c = c.max_decoding_message_size(64 << 20);
            if c.info(pb::InfoRequest {}).await.is_ok() {
                return c;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("worker at {addr} did not come up");
}

fn greedy(max_new_tokens: u32) -> pb::SequenceParams {
    pb::SequenceParams {
        max_new_tokens,
        ..Default::default()
    }
}

/// Prefills `prompt` in chunks of 8 and decodes to the end; returns the output tokens.
async fn generate(
    c: &mut StepStream,
    id: u64,
    prompt: Vec<u32>,
    params: pb::SequenceParams,
) -> (Vec<u32>, i32) {
    let mut chunk = pb::PrefillChunk {
        seq_id: id,
        prompt,
        params: Some(params),
        max_tokens: 8,
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let r = c
            .step(pb::StepRequest {
                prefill: vec![chunk.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, pb::SeqStatus::Ok as i32, "{res:?}");
        if res.has_token {
            out.push(res.token.as_ref().unwrap().token_id);
            if res.finish_reason != 0 {
                return (out, res.finish_reason);
            }
            break;
        }
        chunk = pb::PrefillChunk {
            seq_id: id,
            max_tokens: 8,
            ..Default::default()
        };
    }
    loop {
        let r = c
            .step(pb::StepRequest {
                decode: vec![id],
                ..Default::default()
            })
            .await
            .unwrap();
        let res = &r.results[0];
        assert_eq!(res.status, pb::SeqStatus::Ok as i32, "{res:?}");
        out.push(res.token.as_ref().unwrap().token_id);
        if res.finish_reason != 0 {
            return (out, res.finish_reason);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_answers_a_chat_over_grpc() {
    let model = smollm2();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_with_listener(args(&model), listener, shutdown.clone()));
    let mut c = connect(addr).await;

    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.group_id, "it");
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.kv_blocks_total, 128);
    assert_eq!(info.eos_token_ids, vec![0, 2]);
    let tokenizer: tokenizers::Tokenizer = info.tokenizer_json.parse().unwrap();
    let template = ChatTemplate::new(
        &info.chat_template,
        Some(&info.bos_token),
        Some(&info.eos_token),
    )
    .unwrap();
    let prompt = template
        .render(
            &[ChatMessage::new("user", "Name the capital city of France.")],
            true,
        )
        .unwrap();
    let ids = tokenizer
        .encode(prompt.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();

    let mut steps = StepStream::open(&mut c).await.unwrap();
    let (out, finish) = generate(&mut steps, 1, ids.clone(), greedy(48)).await;
    let text = tokenizer.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(finish, pb::FinishReason::Stop as i32, "answer: {text:?}");
    assert_eq!(*out.last().unwrap(), 2, "ends with <|im_end|>");

    // Seeded sampling on the real model: the same tokens alone and next to other sequences.
    let seeded = pb::SequenceParams {
        max_new_tokens: 12,
        sampling: Some(pb::SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (alone, _) = generate(&mut steps, 2, ids.clone(), seeded.clone()).await;
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![
                pb::PrefillChunk {
                    seq_id: 10,
                    prompt: ids[..20].to_vec(),
                    params: Some(greedy(30)),
                    max_tokens: 0,
                    ..Default::default()
                },
                pb::PrefillChunk {
                    seq_id: 11,
                    prompt: vec![1, 2, 3, 4, 5],
                    params: Some(greedy(30)),
                    max_tokens: 0,
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.results.iter().all(|x| x.has_token), "{r:?}");
    let mut crowded = Vec::new();
    let mut chunk = pb::PrefillChunk {
        seq_id: 3,
        prompt: ids.clone(),
        params: Some(seeded),
        max_tokens: 5,
        ..Default::default()
    };
    loop {
        let r = steps
            .step(pb::StepRequest {
                prefill: vec![chunk.clone()],
                decode: vec![10, 11],
                ..Default::default()
            })
            .await
            .unwrap();
        if r.results[0].has_token {
            crowded.push(r.results[0].token.as_ref().unwrap().token_id);
            break;
        }
        chunk = pb::PrefillChunk {
            seq_id: 3,
            max_tokens: 5,
            ..Default::default()
        };
    }
    while crowded.len() < alone.len() {
        let r = steps
            .step(pb::StepRequest {
                decode: vec![3, 10, 11],
                ..Default::default()
            })
            .await
            .unwrap();
        crowded.push(r.results[0].token.as_ref().unwrap().token_id);
    }
    assert_eq!(
        alone, crowded,
        "seeded sampling must not depend on the batch"
    );
    let free = steps
        .step(pb::StepRequest {
            release: vec![3, 10, 11],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(free.kv_blocks_free > 0);

    shutdown.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_model_is_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = run_with_listener(
        args("/nonexistent/model.gguf".as_ref()),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
}

#[tokio::test]
async fn a_corrupt_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF but not really").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = run_with_listener(args(&path), listener, CancellationToken::new())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("broken.gguf"), "{msg}");
}

/// `--device cpu` serves through the device backend (candle tensors; `cuda` takes the
/// same path on a GPU build): the greedy answer to a prompt is the CPU kernels' one for
/// the first tokens, and `--tp` with a device is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_backend_serves_over_grpc() {
    let model = smollm2();
    let prompt: Vec<u32> = vec![
        1, 9690, 198, 504, 3458, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let mut outs = Vec::new();
    for device in [None, Some("cpu")] {
        let mut a = args(&model);
        a.device = device.map(|d| d.parse().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(run_with_listener(a, listener, shutdown.clone()));
        let mut c = connect(addr).await;
        let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.kv_blocks_total, 128);
        if device.is_some() {
            assert_eq!(info.dtype, "f32", "candle CPU runs the dequantized weights");
        }
        let mut steps = StepStream::open(&mut c).await.unwrap();
        outs.push(generate(&mut steps, 1, prompt.clone(), greedy(6)).await.0);
        drop(steps);
        shutdown.cancel();
        worker.await.unwrap().unwrap();
    }
    // Different kernels (f32 weights vs Q4_1 × Q8_1): the first tokens agree.
    assert_eq!(outs[0][..3], outs[1][..3], "{outs:?}");

    // SmolLM2 (9 / 3 heads) on three device ranks of candle's CPU device.
    let mut a = args(&model);
    a.device = Some("cpu".parse().unwrap());
    a.tp = 3;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run_with_listener(a, listener, shutdown.clone()));
    let mut c = connect(addr).await;
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.tp, 3);
    assert_eq!(info.kv_blocks_total, 128, "the KV budget is per group");
    let mut steps = StepStream::open(&mut c).await.unwrap();
    let tp3 = generate(&mut steps, 1, prompt.clone(), greedy(6)).await.0;
    drop(steps);
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    // Same f32 weights as the tp 1 device run, only the row-parallel sums split per
    // rank (differences at f32 rounding): the same greedy tokens.
    assert_eq!(outs[1], tp3, "device tp 1 vs tp 3");
}
