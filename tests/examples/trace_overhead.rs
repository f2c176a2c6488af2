//! What exporting traces costs: the same cluster — `shardline coordinator` over two
//! simulated worker groups (`sim:h100-llama3.2-1b`: 1.2 ms steps, where anything the
//! coordinator adds per step shows) — driven by `shardline bench` with tracing off and
//! with every process exporting to an in-process OTLP receiver, alternating, in one run.
//! Prints each round's output throughput and the ratio on/off (odd rounds run tracing off
//! first, even rounds on first).
//!
//! ```sh
//! cargo build --bin shardline && cargo run -p shardline-tests --example trace_overhead -- \
//!     [--bin target/debug/shardline] [--rounds 3] [--requests 300] [--concurrency 32]
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use shardline_tests::otlp::Receiver;
use shardline_tests::{Proc, workspace_root};

struct Options {
    bin: PathBuf,
    rounds: usize,
    requests: usize,
    concurrency: usize,
}

fn options() -> Options {
    let mut o = Options {
        bin: workspace_root().join("target/debug/shardline"),
        rounds: 3,
        requests: 300,
        concurrency: 32,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--bin" => o.bin = value.into(),
            "--rounds" => o.rounds = value.parse().expect("--rounds N"),
            "--requests" => o.requests = value.parse().expect("--requests N"),
            "--concurrency" => o.concurrency = value.parse().expect("--concurrency N"),
            other => panic!("unknown flag {other}"),
        }
    }
    o
}

/// One cluster, one `shardline bench` run: its output tokens per second.
fn run(o: &Options, otlp: Option<&str>) -> f64 {
    let traced = |cmd: &mut Command| {
        if let Some(endpoint) = otlp {
            cmd.args(["--otlp-endpoint", endpoint]);
        }
        cmd.env(
            "RUST_LOG",
            "warn,shardline_engine=info,shardline_coordinator=info",
        );
    };
    let mut workers = Vec::new();
    for g in ["a", "b"] {
        let mut cmd = Command::new(&o.bin);
        cmd.args([
            "worker",
            "--model",
            "sim:h100-llama3.2-1b",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--group-id", g, "--max-num-seqs", "256"]);
        traced(&mut cmd);
        let mut proc = Proc::spawn(&format!("sim-{g}"), cmd);
        let addr = proc.logged(
            "worker gRPC service listening",
            "addr",
            Duration::from_secs(60),
        );
        workers.push((proc, addr));
    }
    let mut cmd = Command::new(&o.bin);
    cmd.args([
        "coordinator",
        "--http-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    for (_, addr) in &workers {
        cmd.args(["--worker", &format!("http://{addr}")]);
    }
    traced(&mut cmd);
    let mut coordinator = Proc::spawn("coordinator", cmd);
    let http = coordinator.logged("coordinator listening", "http", Duration::from_secs(60));
    let ready = shardline_tests::wait_until(Duration::from_secs(30), || {
        let groups = coordinator
            .output()
            .lines()
            .filter(|l| l.contains("worker group ready"))
            .count();
        (groups == 2).then_some(())
    });
    assert!(
        ready.is_some(),
        "groups not ready:\n{}",
        coordinator.output()
    );
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(&o.bin)
        .arg("bench")
        .args(["--base-url", &format!("http://{http}")])
        .args(["--concurrency", &o.concurrency.to_string()])
        .args(["--num-requests", &o.requests.to_string()])
        .args(["--warmup-requests", "32"])
        .args([
            "--input-len",
            "128",
            "--output-len",
            "64",
            "--ignore-eos",
            "true",
        ])
        .arg("--json")
        .arg(json.path())
        .arg("--no-progress")
        .output()
        .expect("run shardline bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    let run = &v["runs"][0];
    assert_eq!(run["failed"].as_u64(), Some(0), "{run}");
    run["output_throughput"]
        .as_f64()
        .expect("output_throughput")
}

#[tokio::main]
async fn main() {
    let o = options();
    assert!(
        o.bin.is_file(),
        "{} not built (cargo build --bin shardline)",
        o.bin.display()
    );
    let (endpoint, receiver) = Receiver::start().await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let o = &o;
        let endpoint = endpoint.clone();
        let off_run = || tokio::task::block_in_place(|| run(o, None));
        let on_run = || tokio::task::block_in_place(|| run(o, Some(&endpoint)));
        // Which goes first alternates, so a machine that speeds up or slows down over the
        // run favours neither.
        let (a, b) = if round % 2 == 1 {
            let a = off_run();
            (a, on_run())
        } else {
            let b = on_run();
            (off_run(), b)
        };
        println!(
            "round {round}: off {a:.0} tok/s, on {b:.0} tok/s, on/off {:.3}",
            b / a
        );
        off.push(a);
        on.push(b);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (a, b) = (mean(&off), mean(&on));
    println!(
        "mean output throughput: off {a:.0} tok/s, on {b:.0} tok/s, on/off {:.3} ({:+.1} %); spans received: {}",
        b / a,
        (b / a - 1.0) * 100.0,
        receiver.spans().len()
    );
}
