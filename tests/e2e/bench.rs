//! End-to-end test of the load generator against the real cluster: the `shardline bench`
//! binary, as a child process, drives `shardline up` with SmolLM2 in a small closed loop
//! and writes valid JSON and non-empty PNG/SVG plots; a closed stdout does not stop it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shardline_proto::worker::v1::{InfoRequest, worker_client::WorkerClient};
use shardline_tests::cluster::Cluster;
use shardline_tests::free_port;

const CONCURRENCY: u64 = 2;
const REQUESTS: u64 = 6;
const INPUT_LEN: u64 = 32;
const OUTPUT_LEN: u64 = 8;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shardline"))
}

/// A scratch directory removed when dropped (kept when the test fails, for inspection).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        let dir = std::env::temp_dir().join(format!(
            "shardline-e2e-bench-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The served model's `tokenizer.json`, as the worker ships it in `Info`.
fn fetch_tokenizer_json(worker: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut w = WorkerClient::connect(worker.to_string())
            .await
            .unwrap_or_else(|e| panic!("connect to worker {worker}: {e}"));
        w.info(InfoRequest {})
            .await
            .expect("worker Info")
            .into_inner()
            .tokenizer_json
    })
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    files
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG ({} bytes)",
        path.display(),
        bytes.len()
    );
    assert!(
        bytes.len() > 1_000,
        "{} is only {} bytes",
        path.display(),
        bytes.len()
    );
}

fn assert_svg(path: &Path) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(text.contains("<svg"), "{} is not an SVG", path.display());
    assert!(
        text.len() > 1_000,
        "{} is only {} bytes",
        path.display(),
        text.len()
    );
}

#[test]
fn bench_closed_loop_against_shardline_up_writes_json_and_plots() {
    let started = Instant::now();
    let cluster = Cluster::start(bin(), &[]);
    let scratch = ScratchDir::new();
    let tokenizer = scratch.0.join("tokenizer.json");
    let tok_json = fetch_tokenizer_json(&cluster.worker);
    assert!(
        !tok_json.is_empty(),
        "worker Info carried no tokenizer_json"
    );
    std::fs::write(&tokenizer, tok_json).expect("write tokenizer.json");
    let json = scratch.0.join("results.json");
    let plots = scratch.0.join("plots");

    let out = Command::new(bin())
        .arg("bench")
        .args(["--base-url", &cluster.http])
        .args(["--concurrency", &CONCURRENCY.to_string()])
        .args(["--num-requests", &REQUESTS.to_string()])
        .args(["--input-len", &INPUT_LEN.to_string()])
        .args(["--output-len", &OUTPUT_LEN.to_string()])
        .args(["--timeout", "120s"])
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--json")
        .arg(&json)
        .arg("--plots")
        .arg(&plots)
        .arg("--no-progress")
        .output()
        .expect("run shardline bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "shardline bench failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let text = std::fs::read_to_string(&json).expect("bench wrote --json");
    let v: Value = serde_json::from_str(&text).expect("--json is valid JSON");
    let runs = v["runs"].as_array().expect("`runs` array");
    assert_eq!(runs.len(), 1, "one load point: {text}");
    let run = &runs[0];
    assert_eq!(
        run["load_value"].as_f64(),
        Some(CONCURRENCY as f64),
        "{run}"
    );
    assert_eq!(
        run["completed"].as_u64(),
        Some(REQUESTS),
        "all requests complete: {run}"
    );
    assert_eq!(run["failed"].as_u64(), Some(0), "{run}");
    assert_eq!(run["rate_limited"].as_u64(), Some(0), "{run}");
    assert_eq!(
        run["total_input_tokens"].as_u64(),
        Some(REQUESTS * INPUT_LEN),
        "prompts have exactly {INPUT_LEN} tokens: {run}"
    );
    assert_eq!(
        run["total_output_tokens"].as_u64(),
        Some(REQUESTS * OUTPUT_LEN),
        "ignore_eos: every output has exactly {OUTPUT_LEN} tokens: {run}"
    );
    for metric in ["ttft_ms", "tpot_ms", "e2e_ms"] {
        let p50 = run[metric]["p50"].as_f64().unwrap_or(f64::NAN);
        assert!(p50 > 0.0 && p50.is_finite(), "{metric} p50 = {p50}: {run}");
    }
    assert!(
        run["output_throughput"].as_f64().unwrap_or(0.0) > 0.0,
        "{run}"
    );

    let files = list_files(&plots);
    let named = |ext: &str| -> Vec<&PathBuf> {
        files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect()
    };
    let (pngs, svgs) = (named("png"), named("svg"));
    assert!(
        !pngs.is_empty() && !svgs.is_empty(),
        "plots written: {files:?}"
    );
    // One load point: its TTFT/ITL distribution plot (the sweep plot needs several points).
    for ext in ["png", "svg"] {
        assert!(
            files.iter().any(|p| {
                p.extension().is_some_and(|e| e == ext)
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("dist-00-"))
            }),
            "dist-00-*.{ext} (TTFT/ITL histograms) written: {files:?}"
        );
    }
    pngs.iter().for_each(|p| assert_png(p));
    svgs.iter().for_each(|p| assert_svg(p));

    drop(cluster);
    eprintln!("e2e bench test took {:.1?}", started.elapsed());
}

/// `shardline bench … | head`: a closed stdout does not stop the benchmark, which still
/// finishes and writes its JSON.
#[test]
fn a_closed_stdout_does_not_stop_the_bench() {
    let port = free_port();
    let mut fake = shardline_tests::Proc::spawn("fake-server", {
        let mut cmd = Command::new(bin());
        cmd.args([
            "bench",
            "fake-server",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        cmd
    });
    let url = format!("http://127.0.0.1:{port}");
    let up = shardline_tests::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(
        up.is_some(),
        "fake server never listened:\n{}",
        fake.output()
    );
    let scratch = ScratchDir::new();
    let json = scratch.0.join("results.json");
    let mut bench = Command::new(bin())
        .arg("bench")
        .args(["--base-url", &url])
        .args(["--request-rate", "200,inf", "--num-requests", "20"])
        .args(["--input-len", "8", "--output-len", "4", "--no-progress"])
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run shardline bench");
    // The reader goes away before the first report line.
    drop(bench.stdout.take());
    let out = bench.wait_with_output().expect("bench exits");
    assert!(
        out.status.success(),
        "bench failed on a closed stdout ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("--json"))
        .expect("--json is valid JSON");
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(2), "{v}");
    fake.assert_running();
}
