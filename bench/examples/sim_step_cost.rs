//! How much CPU the engine spends on a simulated step beyond the modelled time: 32
//! decoding sequences on the h100-llama3.2-1b profile with time scale 0, steps timed.
use shardline_bench::sim::{self, SimArgs};
use shardline_engine::engine::EngineState;
use shardline_proto::worker::v1 as pb;

fn main() {
    let args = SimArgs {
        profile: "h100-llama3.2-1b".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        tokenizer: None,
        chat_template: None,
        group_id: None,
        time_scale: 0.0,
        kv_blocks: None,
        max_num_seqs: None,
        registration: Default::default(),
    };
    let (runner, config) = sim::build(&args, args.listen).unwrap();
    let mut e = EngineState::new(Box::new(runner), config);
    let n = 32u64;
    let prefill = (0..n)
        .map(|i| pb::PrefillChunk {
            seq_id: i,
            prompt: (1..33).map(|t| (t * (i as u32 + 1)) % 400 + 20).collect(),
            params: Some(pb::SequenceParams {
                max_new_tokens: 100_000,
                ignore_eos: true,
                ..Default::default()
            }),
            max_tokens: 0,
            ..Default::default()
        })
        .collect();
    e.step(pb::StepRequest {
        prefill,
        ..Default::default()
    })
    .unwrap();
    let decode: Vec<u64> = (0..n).collect();
    let steps = 2000;
    let t = std::time::Instant::now();
    for _ in 0..steps {
        e.step(pb::StepRequest {
            decode: decode.clone(),
            ..Default::default()
        })
        .unwrap();
    }
    let per = t.elapsed() / steps;
    println!("engine CPU per 32-sequence decode step: {per:?}");
}
