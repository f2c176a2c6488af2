//! The simulated worker over real gRPC (the real worker service over the simulated
//! runner): Info, a prefill + decode + release cycle, Health, registration.

use shardline_bench::sim::{self, SimArgs};
use shardline_engine::testing::StepStream;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use shardline_proto::worker::v1::*;
use tokio_util::sync::CancellationToken;

async fn start(profile: &str) -> (WorkerClient<tonic::transport::Channel>, CancellationToken) {
    let args = SimArgs {
        profile: profile.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        tokenizer: None,
        chat_template: None,
        group_id: Some("g1".into()),
        time_scale: 0.0,
        kv_blocks: None,
        max_num_seqs: None,
        registration: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(sim::serve_sim(listener, args, stop.clone()));
    let client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .expect("connects");
    (client, stop)
}

#[tokio::test]
async fn sim_speaks_the_worker_protocol() {
    let (mut c, stop) = start("sim:tiny").await;
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.model_id.as_str(), info.group_id.as_str()),
        ("sim:tiny", "g1")
    );
    assert_eq!(
        (
            info.kv_block_size,
            info.kv_blocks_total,
            info.kv_blocks_free
        ),
        (4, 64, 64)
    );
    let tok = tokenizers::Tokenizer::from_bytes(info.tokenizer_json.as_bytes())
        .expect("Info serves a loadable tokenizer");
    assert_eq!(tok.get_vocab_size(true) as u32, info.vocab_size);
    assert!(info.chat_template.contains("im_start"));

    let params = SequenceParams {
        max_new_tokens: 3,
        ignore_eos: true,
        top_logprobs: 2,
        ..Default::default()
    };
    let chunk = PrefillChunk {
        seq_id: 7,
        prompt: vec![10, 11, 12, 13, 14],
        params: Some(params),
        max_tokens: 0,
        ..Default::default()
    };
    let mut steps = StepStream::open(&mut c).await.unwrap();
    let r = steps
        .step(StepRequest {
            prefill: vec![chunk],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (r.kv_blocks_free, r.num_running, r.batch_tokens),
        (62, 1, 5)
    );
    assert!(r.step_time_ns > 0);
    let res = &r.results[0];
    assert_eq!(
        (res.status, res.prompt_computed, res.has_token),
        (SeqStatus::Ok as i32, 5, true)
    );
    assert_eq!(res.token.as_ref().unwrap().top.len(), 2);

    let r = steps
        .step(StepRequest {
            decode: vec![7],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].finish_reason, FinishReason::Unspecified as i32);
    let r = steps
        .step(StepRequest {
            decode: vec![7],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.results[0].finish_reason, FinishReason::Length as i32);
    assert_eq!((r.kv_blocks_free, r.num_running), (64, 0));

    let again = PrefillChunk {
        seq_id: 8,
        prompt: vec![1; 8],
        params: Some(SequenceParams {
            max_new_tokens: 10,
            ..Default::default()
        }),
        max_tokens: 0,
        ..Default::default()
    };
    steps
        .step(StepRequest {
            prefill: vec![again],
            ..Default::default()
        })
        .await
        .unwrap();
    let rel = steps
        .step(StepRequest {
            release: vec![8, 999],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rel.kv_blocks_free, 64);
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(h.ready && !h.draining);
    assert_eq!((h.kv_blocks_free, h.num_running), (64, 0));
    stop.cancel();
}

#[test]
fn unknown_profile_names_the_known_ones() {
    let args = SimArgs {
        profile: "sim:b200-grok".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        tokenizer: None,
        chat_template: None,
        group_id: None,
        time_scale: 1.0,
        kv_blocks: None,
        max_num_seqs: None,
        registration: Default::default(),
    };
    let err = sim::build(&args, args.listen)
        .err()
        .expect("unknown profile")
        .to_string();
    assert!(
        err.contains("h100-llama3-8b") && err.contains("4xh100-llama3-70b"),
        "{err}"
    );
}

#[tokio::test]
async fn the_sim_registers_like_a_real_worker_and_deregisters_on_shutdown() {
    use shardline_membership::{Membership, MembershipEvent};
    let membership = Membership::in_memory();
    let registration = shardline_membership::registration::RegistrationArgs {
        membership: Some(membership.clone()),
        ..Default::default()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = SimArgs {
        profile: "sim:tiny".into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        metrics_listen: None,
        tokenizer: None,
        chat_template: None,
        group_id: Some("sim-a".into()),
        time_scale: 0.0,
        kv_blocks: None,
        max_num_seqs: None,
        registration,
    };
    let stop = CancellationToken::new();
    let sim = tokio::spawn(shardline_bench::run_sim(args, stop.clone()));
    let watch_stop = CancellationToken::new();
    let mut watch = membership.watch(&watch_stop);
    let record = loop {
        match watch.recv().await.expect("watch open") {
            MembershipEvent::Put(r) if r.group_id == "sim-a" => break r,
            _ => {}
        }
    };
    assert_eq!(record.address, format!("http://127.0.0.1:{port}"));
    assert!(record.capacity.unwrap().kv_blocks_total > 0);
    stop.cancel();
    sim.await.unwrap().unwrap();
    loop {
        match watch.recv().await.expect("watch open") {
            MembershipEvent::Delete(g) if g == "sim-a" => break,
            _ => {}
        }
    }
    watch_stop.cancel();
}
