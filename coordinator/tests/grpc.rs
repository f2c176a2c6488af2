//! The gRPC front end: Generate, GenerateStream, health.

mod common;

use common::*;
use futures::StreamExt;
use shardline_coordinator::Config;
use shardline_engine::testing::TestWorkerConfig;
use shardline_proto::v1::inference_client::InferenceClient;
use shardline_proto::v1::{ChatMessage, FinishReason, GenerateRequest, Priority};

#[tokio::test]
async fn generate_and_generate_stream_agree() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let mut client = InferenceClient::connect(format!("http://{}", c.coordinator.grpc_addr))
        .await
        .unwrap();
    let request = GenerateRequest {
        // Distinct bytes: the test worker's echo model repeats them.
        prompt: "grpc hi.".into(),
        max_tokens: Some(20),
        temperature: Some(0.0),
        stop: vec![".gr".into()],
        priority: Priority::High as i32,
        ..Default::default()
    };
    let unary = client.generate(request.clone()).await.unwrap().into_inner();
    assert_eq!(unary.text, "grpc hi");
    assert_eq!(unary.finish_reason, FinishReason::Stop as i32);
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(message) = stream.next().await {
        let message = message.unwrap();
        text.push_str(&message.text);
        last = Some(message);
    }
    assert_eq!(text, unary.text);
    let last = last.unwrap();
    assert_eq!(last.finish_reason, FinishReason::Stop as i32);
    assert_eq!(last.usage.unwrap().prompt_tokens, 8);

    let chat = GenerateRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "x".into(),
        }],
        max_tokens: Some(4),
        temperature: Some(0.0),
        ..Default::default()
    };
    let out = client.generate(chat).await.unwrap().into_inner();
    assert_eq!(out.usage.unwrap().completion_tokens, 4);
}

#[tokio::test]
async fn grpc_errors_use_canonical_codes() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let mut client = InferenceClient::connect(format!("http://{}", c.coordinator.grpc_addr))
        .await
        .unwrap();
    let err = client
        .generate(GenerateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("prompt"));
    let err = client
        .generate(GenerateRequest {
            prompt: "a".into(),
            temperature: Some(f32::NAN),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("temperature"), "{}", err.message());
    let err = client
        .generate(GenerateRequest {
            prompt: "a".into(),
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn health_service_reports_serving() {
    let c = one_worker(Config::default(), TestWorkerConfig::default()).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.coordinator.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shardline.v1.Inference".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn dropped_grpc_stream_releases_the_sequence() {
    let c = one_worker(
        Config::default(),
        TestWorkerConfig {
            step_delay: std::time::Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await;
    let total = c.workers[0].free_blocks();
    let mut client = InferenceClient::connect(format!("http://{}", c.coordinator.grpc_addr))
        .await
        .unwrap();
    let request = GenerateRequest {
        prompt: "stream then leave ".into(),
        max_tokens: Some(1000),
        ..Default::default()
    };
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    assert!(c.workers[0].free_blocks() < total);
    drop(stream);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.workers[0].free_blocks() != total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gRPC stream not released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
