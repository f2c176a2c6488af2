//! The worker gRPC service end to end over loopback, with [`FakeRunner`] behind the engine.

use shardline_engine::engine::{EngineConfig, EngineHandle, ModelFacts};
use shardline_engine::fake::FakeRunner;
use shardline_engine::service::{WorkerService, serve, serve_service};
use shardline_engine::testing::StepStream;
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn engine() -> EngineHandle {
    let config = EngineConfig {
        max_num_seqs: 8,
        group_id: "group-a".into(),
        model: ModelFacts {
            tokenizer_json: "{}".into(),
            chat_template: "{{ messages }}".into(),
            eos_token_ids: vec![31],
            bos_token: String::new(),
            eos_token: "<eos>".into(),
            add_bos: false,
        },
    };
    EngineHandle::spawn(Box::new(FakeRunner::new(32, 64, 4, 16)), config)
        .expect("engine thread")
        .0
}

async fn client(addr: std::net::SocketAddr) -> WorkerClient<Channel> {
    WorkerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn chunk(id: u64, prompt: Vec<u32>) -> pb::PrefillChunk {
    pb::PrefillChunk {
        seq_id: id,
        prompt,
        params: Some(pb::SequenceParams {
            max_new_tokens: 3,
            top_logprobs: 1,
            ..Default::default()
        }),
        max_tokens: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn round_trip_over_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, engine(), shutdown.clone()));
    let mut c = client(addr).await;

    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, "fake");
    assert_eq!(info.group_id, "group-a");
    assert_eq!(
        (
            info.kv_blocks_total,
            info.kv_blocks_free,
            info.kv_block_size
        ),
        (16, 16, 4)
    );
    assert_eq!(info.eos_token_ids, vec![31]);
    assert_eq!(info.vocab_size, 32);
    assert_eq!(info.context_length, 64);

    let mut steps = StepStream::open(&mut c).await.unwrap();
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![chunk(1, vec![1, 2, 3]), chunk(2, vec![1; 70])],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].status, pb::SeqStatus::Ok as i32);
    let t = r.results[0].token.as_ref().unwrap();
    assert_eq!(t.token_id, 4);
    assert!(t.logprob < 0.0 && t.logprob > -1.0, "{t:?}");
    assert_eq!(t.top[0].token_id, 4);
    assert_eq!(r.results[1].status, pb::SeqStatus::Invalid as i32);
    assert!(
        r.results[1].error.contains("context length"),
        "{}",
        r.results[1].error
    );
    assert_eq!(r.num_running, 1);

    let r = steps
        .step(pb::StepRequest {
            decode: vec![1, 77],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].token.as_ref().unwrap().token_id, 5);
    assert_eq!(r.results[1].status, pb::SeqStatus::Invalid as i32);

    let r = steps
        .step(pb::StepRequest {
            prefill: vec![chunk(3, vec![10])],
            decode: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].token.as_ref().unwrap().token_id, 11);
    assert_eq!(r.results[1].token.as_ref().unwrap().token_id, 6);
    assert_eq!(r.results[1].finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(r.num_running, 1);
    assert_eq!(r.batch_tokens, 2);

    let free = steps
        .step(pb::StepRequest {
            release: vec![3, 999],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(free.results.is_empty());
    assert_eq!(free.kv_blocks_free, 16);

    let health = c.health(pb::HealthRequest {}).await.unwrap();
    let health = health.into_inner();
    assert!(health.ready && !health.draining, "{health:?}");
    assert_eq!(health.num_running, 0);
    assert_eq!(
        health.sequences_started, 2,
        "seq 2 was rejected before it reached the runner"
    );

    // Standard gRPC health too.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shardline.worker.v1.Worker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn draining_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let draining = CancellationToken::new();
    let service = WorkerService::new(engine(), draining.clone());
    let server = tokio::spawn(serve_service(listener, service, None, shutdown.clone()));
    let mut c = client(addr).await;
    let mut steps = StepStream::open(&mut c).await.unwrap();
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![chunk(1, vec![1, 2])],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].status, pb::SeqStatus::Ok as i32);
    draining.cancel();
    // Running sequences go on; new ones are turned away, in request order.
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![chunk(2, vec![5])],
            decode: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].seq_id, 2);
    assert_eq!(r.results[0].status, pb::SeqStatus::OutOfBlocks as i32);
    assert!(
        r.results[0].error.contains("draining"),
        "{}",
        r.results[0].error
    );
    assert_eq!(r.results[1].token.as_ref().unwrap().token_id, 4);
    let health = c.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(!health.ready && health.draining, "{health:?}");
    assert_eq!(health.message, "draining");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Steps sent back to back on one stream are answered in order, and a plan sent before
/// the previous answer (pipelining) is sorted out by the worker: a decode of a sequence
/// that finished in the step before is answered "unknown", a prefill chunk of a prompt
/// already complete decodes.
#[tokio::test]
async fn pipelined_steps_are_answered_in_order() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, engine(), shutdown.clone()));
    let mut c = client(addr).await;
    let mut steps = StepStream::open(&mut c).await.unwrap();
    // Three steps before any answer: the whole prompt, a second "chunk" of it, a decode.
    steps
        .send(pb::StepRequest {
            prefill: vec![chunk(1, vec![1, 2, 3])],
            ..Default::default()
        })
        .await
        .unwrap();
    steps
        .send(pb::StepRequest {
            prefill: vec![pb::PrefillChunk {
                seq_id: 1,
                max_tokens: 2,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    steps
        .send(pb::StepRequest {
            decode: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    steps
        .send(pb::StepRequest {
            decode: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    let tokens: Vec<u32> = [
        steps.answer().await.unwrap(),
        steps.answer().await.unwrap(),
        steps.answer().await.unwrap(),
    ]
    .iter()
    .map(|r| r.results[0].token.as_ref().unwrap().token_id)
    .collect();
    assert_eq!(tokens, [4, 5, 6], "max_new_tokens 3: the third ends it");
    let late = steps.answer().await.unwrap();
    assert_eq!(late.results[0].status, pb::SeqStatus::Invalid as i32);
    assert!(late.results[0].error.contains("unknown"), "{late:?}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A stopping server ends the open step streams (graceful shutdown does not wait for a
/// coordinator that keeps its stream open).
#[tokio::test]
async fn stopping_ends_open_streams() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, engine(), shutdown.clone()));
    let mut c = client(addr).await;
    let mut steps = StepStream::open(&mut c).await.unwrap();
    steps
        .step(pb::StepRequest {
            prefill: vec![chunk(1, vec![1, 2])],
            ..Default::default()
        })
        .await
        .unwrap();
    shutdown.cancel();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), steps.answer())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("the server stops while the stream's sender is still open")
        .unwrap()
        .unwrap();
    drop(steps);
}

/// The sequences of a step stream that ends — its coordinator crashed, or its connection
/// dropped — are released at once, not only after the idle timeout; another stream's
/// sequences stay.
#[tokio::test]
async fn an_ended_streams_sequences_are_released_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, engine(), shutdown.clone()));
    let mut c = client(addr).await;
    let long = |id, prompt| pb::PrefillChunk {
        params: Some(pb::SequenceParams {
            max_new_tokens: 50,
            ..Default::default()
        }),
        ..chunk(id, prompt)
    };
    let health = |mut c: WorkerClient<Channel>| async move {
        c.health(pb::HealthRequest {}).await.unwrap().into_inner()
    };

    // Stream a keeps one sequence; stream b starts two, then is dropped as a crashed
    // coordinator's would be.
    let mut a = StepStream::open(&mut c).await.unwrap();
    a.step(pb::StepRequest {
        prefill: vec![long(1, vec![1, 2, 3, 4, 5])],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut b = StepStream::open(&mut c).await.unwrap();
    let r = b
        .step(pb::StepRequest {
            prefill: vec![long(2, vec![1; 9]), long(3, vec![7])],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        r.results
            .iter()
            .all(|r| r.status == pb::SeqStatus::Ok as i32),
        "{r:?}"
    );
    let h = health(c.clone()).await;
    assert_eq!(h.num_running, 3, "{h:?}");
    let held_by_a = 16 - 2; // 5 prompt tokens + 1 generated, blocks of 4
    assert!(h.kv_blocks_free < held_by_a, "{h:?}");

    drop(b);
    let h = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let h = health(c.clone()).await;
            if h.num_running == 1 {
                return h;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("b's sequences are released within moments, with no idle timeout set");
    assert_eq!(
        h.kv_blocks_free, held_by_a,
        "only a's blocks are held: {h:?}"
    );
    // a's sequence goes on.
    let r = a
        .step(pb::StepRequest {
            decode: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].status, pb::SeqStatus::Ok as i32, "{r:?}");
    assert!(r.results[0].has_token, "{r:?}");
    shutdown.cancel();
    drop(a);
    server.await.unwrap().unwrap();
}

/// A coordinator whose connection goes silent without closing (its machine vanished: no
/// FIN, no RST) stops answering the worker's HTTP/2 pings: the worker closes the
/// connection, and the stream's sequences are released — long before an idle timeout.
#[tokio::test]
async fn a_silent_connection_is_closed_by_keepalive_and_its_sequences_released() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let service = WorkerService::new(engine(), shutdown.child_token())
        .with_keepalive(Duration::from_millis(200), Duration::from_millis(300));
    let server = tokio::spawn(serve_service(listener, service, None, shutdown.clone()));

    // A proxy that forwards until frozen, then holds both sockets open and moves nothing.
    let frozen = Arc::new(AtomicBool::new(false));
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    tokio::spawn({
        let frozen = frozen.clone();
        async move {
            let (client, _) = proxy.accept().await.unwrap();
            let upstream = tokio::net::TcpStream::connect(worker_addr).await.unwrap();
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                        mut to: tokio::net::tcp::OwnedWriteHalf,
                        frozen: Arc<AtomicBool>| async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match from.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if frozen.load(Ordering::SeqCst) {
                        // Swallow everything; keep both sockets open.
                        continue;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await;
            };
            let a = tokio::spawn(pump(cr, uw, frozen.clone()));
            let b = tokio::spawn(pump(ur, cw, frozen));
            let _ = tokio::join!(a, b);
        }
    });

    let mut through_proxy = client(proxy_addr).await;
    let mut steps = StepStream::open(&mut through_proxy).await.unwrap();
    let r = steps
        .step(pb::StepRequest {
            prefill: vec![pb::PrefillChunk {
                params: Some(pb::SequenceParams {
                    max_new_tokens: 50,
                    ..Default::default()
                }),
                ..chunk(1, vec![1, 2, 3, 4, 5])
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.num_running, 1, "{r:?}");
    frozen.store(true, Ordering::SeqCst);

    let mut direct = client(worker_addr).await;
    let h = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let h = direct
                .health(pb::HealthRequest {})
                .await
                .unwrap()
                .into_inner();
            if h.num_running == 0 {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the silent connection is closed and its sequence released");
    assert_eq!(h.kv_blocks_free, 16, "{h:?}");
    drop(steps);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
