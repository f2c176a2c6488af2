//! The Helm chart's cluster, live: the image built from `deploy/container/Dockerfile`
//! (its `runtime-prebuilt` target over this build's binary), the chart rendered with
//! `tests/helm/values-podman.yaml`, and its coordinator and two worker workloads run by
//! `podman kube play` with host networking against a real etcd on loopback.
//!
//! What podman 4.3 runs differs from a Kubernetes cluster where `tests/helm/chart.py`
//! (`for_podman`) says; StatefulSets, Services, probes, autoscalers, PodDisruptionBudgets
//! and NetworkPolicies are covered by rendering and schema validation
//! (`tests/e2e/chart.rs`), not here.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use serde_json::json;
use shardline_tests::etcd::EtcdServer;
use shardline_tests::http::metric_sum;
use shardline_tests::load::streams;
use shardline_tests::podman::Podman;
use shardline_tests::worker::health;
use shardline_tests::{free_port, model_path, workspace_root};

/// The release name `chart.py` renders with: pods are `<release>-shardline-<workload>-pod-0`.
const RELEASE: &str = "demo-shardline";

fn container(workload: &str, name: &str) -> String {
    format!("{RELEASE}-{workload}-pod-0-{name}")
}

/// Polls `cond` every 100 ms until it returns `Some`, panicking after `timeout`.
async fn until<T>(timeout: Duration, what: &str, mut cond: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready_groups(http: &str) -> u64 {
    let r = shardline_tests::http::client(Duration::from_secs(5))
        .get(format!("{http}/health"))
        .send()
        .await;
    match r {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["groups"].as_u64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn worker_keys(etcd: &EtcdServer) -> Vec<String> {
    etcd.etcdctl(&["get", "--prefix", "/shardline/workers/", "--keys-only"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Requests `first..first + n` (32 greedy tokens each) streaming in the background, once
/// the worker at `worker` runs some of them: what the test does next happens mid-stream.
async fn streams_running_on(
    http: &str,
    worker: &str,
    first: usize,
    n: usize,
) -> tokio::task::JoinHandle<Vec<Result<String, String>>> {
    let run = tokio::spawn({
        let http = http.to_string();
        async move { streams(&http, first, n, 32, Arc::new(AtomicUsize::new(0))).await }
    });
    until(
        Duration::from_secs(60),
        "the worker to run sequences",
        async || health(worker).await.filter(|h| h.num_running > 0),
    )
    .await;
    run
}

/// Every stream of `run` succeeded with the same text as undisturbed (`reference[first..]`).
async fn assert_reference_texts(
    run: tokio::task::JoinHandle<Vec<Result<String, String>>>,
    reference: &[String],
    first: usize,
    what: &str,
) {
    for (i, r) in run.await.unwrap().iter().enumerate() {
        let text = r
            .as_ref()
            .unwrap_or_else(|e| panic!("a stream failed {what}: {e}"));
        assert_eq!(text, &reference[first + i], "stream {} {what}", first + i);
    }
}

/// The official `openai` Python client against the coordinator: models, a chat
/// completion and a streamed one.
fn openai_client_answers(http: &str) -> String {
    let script = r#"
import sys
try:
    from openai import OpenAI
except ImportError:
    sys.exit("the openai Python package is missing: pip install openai (deploy/setup.sh installs it)")
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=60)
model = client.models.list().data[0].id
r = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
    messages=[{"role": "user", "content": "Name a colour."}])
assert r.choices[0].message.content, r
text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, max_tokens=16, temperature=0, stream=True,
    messages=[{"role": "user", "content": "Name a colour."}]) if c.choices)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
print(f"openai ok: model {model}: {text!r}")
"#;
    let out = Command::new("python3")
        .args(["-c", script, http])
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the openai client failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_a_cluster_that_fails_over_and_drains_under_podman() {
    let podman = Podman::new();
    let image = podman.build_image(
        Path::new(env!("CARGO_BIN_EXE_shardline")),
        "localhost/shardline:test",
    );
    assert_eq!(image, "localhost/shardline:test");
    // The image runs the binary as its entrypoint, as a numeric non-root user.
    let user = podman.ok(&[
        "image",
        "inspect",
        &image,
        "--format",
        "{{.Config.User}} {{.Config.Entrypoint}}",
    ]);
    assert_eq!(user.trim(), "65532:65532 [/usr/local/bin/shardline]");
    let version = podman.ok(&["run", "--rm", "--network", "none", &image, "--version"]);
    assert!(version.starts_with("shardline "), "{version}");

    let etcd = EtcdServer::start().await;
    let (http_port, grpc_port, a_port, b_port) =
        (free_port(), free_port(), free_port(), free_port());
    // Host networking: the two workers share the machine's ports, so each pool gets its
    // own metrics port too (in a cluster each pod has its own network and both use 9100).
    let (a_metrics, b_metrics) = (free_port(), free_port());
    let models = model_path()
        .parent()
        .expect("the model's folder")
        .to_path_buf();
    let model_file = model_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let overrides = json!({
        "image": {"repository": "localhost/shardline", "tag": "test"},
        "etcd": {"external": {"endpoints": [etcd.endpoint()]}},
        "model": {
            "path": format!("/models/{model_file}"),
            "volume": {"hostPath": {"path": models}},
        },
        "coordinator": {"httpPort": http_port, "grpcPort": grpc_port},
        "workers": {"pools": {
            "a": {"port": a_port, "metricsPort": a_metrics},
            "b": {"port": b_port, "metricsPort": b_metrics},
        }},
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/helm/chart.py"))
        .arg("podman")
        .arg(workspace_root().join("tests/helm/values-podman.yaml"))
        .arg(overrides.to_string())
        .arg(dir.path())
        .output()
        .expect("run chart.py");
    assert!(
        out.status.success(),
        "chart.py podman: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |w: &str| dir.path().join(format!("{RELEASE}-{w}.yaml"));

    let a = podman.play(&file("worker-a"));
    let b = podman.play(&file("worker-b"));
    let coordinator = podman.play(&file("coordinator"));
    let logs = |c: &str| String::from_utf8_lossy(&podman.run(&["logs", c]).stderr).into_owned();
    let http = format!("http://127.0.0.1:{http_port}");
    let (a_url, b_url) = (
        format!("http://127.0.0.1:{a_port}"),
        format!("http://127.0.0.1:{b_port}"),
    );
    let ready = tokio::time::timeout(Duration::from_secs(180), async {
        while ready_groups(&http).await < 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the cluster never had two ready groups;\ncoordinator:\n{}\nworker a:\n{}\nworker b:\n{}",
        logs(&container("coordinator", "coordinator")),
        logs(&container("worker-a", "worker")),
        logs(&container("worker-b", "worker"))
    );

    // Both workers registered in etcd, under their pod names, at the advertised address.
    let keys = worker_keys(&etcd);
    assert_eq!(
        keys,
        vec![
            format!("/shardline/workers/{RELEASE}-worker-a-pod-0"),
            format!("/shardline/workers/{RELEASE}-worker-b-pod-0")
        ]
    );
    let record = etcd.etcdctl(&["get", &keys[0], "--print-value-only"]);
    assert!(
        record.contains(&format!("127.0.0.1:{a_port}")),
        "a's record: {record:?}"
    );

    println!("{}", openai_client_answers(&http));

    // The texts the requests must have, whatever happens to the groups serving them.
    let reference: Vec<String> = streams(&http, 0, 12, 32, Arc::new(AtomicUsize::new(0)))
        .await
        .into_iter()
        .map(|r| r.expect("reference request"))
        .collect();

    // A worker killed mid-stream: its streams finish on the other group.
    let before = metric_sum(&http, "shardline_request_migrations_total").await;
    let run = streams_running_on(&http, &a_url, 0, 6).await;
    // A crash, not a stop: kill -9 of the worker's process from outside (a user's
    // `podman kill` would also switch the restart policy off).
    let pid = podman.ok(&[
        "inspect",
        &container("worker-a", "worker"),
        "--format",
        "{{.State.Pid}}",
    ]);
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {pid}");
    assert_reference_texts(run, &reference, 0, "after the kill").await;
    let moved = metric_sum(&http, "shardline_request_migrations_total").await - before;
    assert!(moved > 0.0, "a's streams moved to b (migrations {moved})");
    println!(
        "kill -9 of worker a: 6/6 streams finished with the reference text, {moved} migrations"
    );

    // podman restarts the crashed container (restartPolicy Always, as the kubelet would);
    // it registers again and the coordinator routes to it.
    until(Duration::from_secs(120), "a to come back", async || {
        (ready_groups(&http).await == 2 && worker_keys(&etcd).len() == 2).then_some(())
    })
    .await;

    // The drain path, as the kubelet deletes a pod: SIGTERM, then up to the pod's
    // terminationGracePeriodSeconds before SIGKILL (`podman pod stop --time`). b's streams
    // finish there (no migration), its record goes, and it exits 0.
    let rendered = std::fs::read_to_string(file("worker-b")).expect("b's manifest");
    let grace = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .expect("the worker's grace period")
        .to_string();
    let before = metric_sum(&http, "shardline_request_migrations_total").await;
    let run = streams_running_on(&http, &b_url, 6, 6).await;
    let pod = format!("{RELEASE}-worker-b-pod-0");
    let stopping = Instant::now();
    podman.ok(&["pod", "stop", "--time", &grace, &pod]);
    let took = stopping.elapsed();
    assert_reference_texts(run, &reference, 6, "during the drain").await;
    let moved = metric_sum(&http, "shardline_request_migrations_total").await - before;
    assert_eq!(
        moved, 0.0,
        "b drained: its streams finished there, nothing moved"
    );
    let exit = podman.ok(&[
        "inspect",
        &container("worker-b", "worker"),
        "--format",
        "{{.State.ExitCode}}",
    ]);
    assert_eq!(
        exit.trim(),
        "0",
        "b exits 0 after draining:\n{}",
        logs(&container("worker-b", "worker"))
    );
    assert_eq!(
        worker_keys(&etcd),
        vec![format!("/shardline/workers/{RELEASE}-worker-a-pod-0")],
        "b's record is gone"
    );
    println!(
        "SIGTERM to worker b under load: 6/6 streams finished on b, stopped in {took:?}, no migration"
    );
    b.down();

    // `podman kube down` of a worker under load (podman removes the pod at once, without
    // a grace period): nothing is lost either, its streams move to the other group.
    let b = podman.play(&file("worker-b"));
    until(Duration::from_secs(120), "b to come back", async || {
        (ready_groups(&http).await == 2).then_some(())
    })
    .await;
    let run = streams_running_on(&http, &b_url, 6, 6).await;
    b.down();
    assert_reference_texts(run, &reference, 6, "after kube down").await;
    println!("kube down of worker b under load: 6/6 streams finished with the reference text");

    // New requests still work on a alone.
    let run = tokio::spawn({
        let http = http.clone();
        async move { streams(&http, 0, 2, 32, Arc::new(AtomicUsize::new(0))).await }
    });
    assert_reference_texts(run, &reference, 0, "after the drain").await;

    // The coordinator drains too: on SIGTERM it takes no new connection and finishes
    // the streams it serves, then exits 0.
    let run = streams_running_on(&http, &a_url, 0, 4).await;
    podman.ok(&[
        "pod",
        "stop",
        "--time",
        "60",
        &format!("{RELEASE}-coordinator-pod-0"),
    ]);
    assert_reference_texts(run, &reference, 0, "while the coordinator drained").await;
    let exit = podman.ok(&[
        "inspect",
        &container("coordinator", "coordinator"),
        "--format",
        "{{.State.ExitCode}}",
    ]);
    assert_eq!(exit.trim(), "0", "the coordinator exits 0 after draining");
    println!("SIGTERM to the coordinator under load: 4/4 streams finished");

    drop(coordinator);
    drop(a);
    let left = podman.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!left.contains(RELEASE), "containers left behind: {left}");
}
