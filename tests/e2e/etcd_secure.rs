//! The `shardline` binary against an etcd that requires TLS client certificates and user
//! auth, as a Kubernetes etcd would: `shardline up` (the coordinator's flags) and a
//! separate `shardline worker` (the worker's flags) both reach it with `--etcd-ca`,
//! `--etcd-cert`/`--etcd-key` and `--etcd-user`/`--etcd-password-file`, the worker
//! registers and serves; wrong settings stop the process with a clear error.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use shardline_tests::cluster::Cluster;
use shardline_tests::etcd::{EtcdOptions, EtcdServer};
use shardline_tests::{Proc, free_port, model_path};

const BIN: &str = env!("CARGO_BIN_EXE_shardline");

async fn groups(http: &str) -> u64 {
    let r = shardline_tests::http::client(Duration::from_secs(5))
        .get(format!("{http}/health"))
        .send()
        .await;
    match r {
        Ok(r) => r
            .json::<Value>()
            .await
            .ok()
            .and_then(|v| v["groups"].as_u64())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_runs_on_an_etcd_with_tls_client_certificates_and_auth() {
    let etcd = EtcdServer::start_with(EtcdOptions {
        tls: true,
        client_cert_auth: true,
        ..EtcdOptions::default()
    })
    .await;
    etcd.enable_auth("shardline", "s3cret", "/shardline/");
    let tls = etcd.tls().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The client certificate names no etcd user with rights (`nobody`): the password
    // login is what grants them.
    let client = tls.client_cert("nobody");
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let path = |p: &Path| p.display().to_string();
    let secured = [
        "--etcd".to_string(),
        etcd.endpoint(),
        "--etcd-ca".into(),
        path(&tls.ca),
        "--etcd-cert".into(),
        path(&client.cert),
        "--etcd-key".into(),
        path(&client.key),
        "--etcd-user".into(),
        "shardline".into(),
        "--etcd-password-file".into(),
        path(&password),
    ];
    let args: Vec<&str> = secured.iter().map(String::as_str).collect();
    let cluster = Cluster::start(Path::new(BIN), &args);

    // A second group as its own process, registering through the worker's flags.
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.args(["worker", "--model"])
        .arg(model_path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--group-id", "secured-worker", "--threads", "1"])
        .args(&args)
        .env("RUST_LOG", "info");
    let mut worker = Proc::spawn("worker", cmd);
    let joined = tokio::time::timeout(Duration::from_secs(120), async {
        while groups(&cluster.http).await < 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    worker.assert_running();
    assert!(
        joined.is_ok(),
        "the worker never joined through the secured etcd:\n{}",
        worker.output()
    );
    let keys = etcd.etcdctl(&["get", "--prefix", "/shardline/workers/", "--keys-only"]);
    assert!(keys.contains("/shardline/workers/secured-worker"), "{keys}");

    // Requests are served (on either group).
    let http = shardline_tests::http::client(Duration::from_secs(60));
    for _ in 0..4 {
        let r = http
            .post(format!("{}/v1/completions", cluster.http))
            .json(&json!({"prompt": "Hello", "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    }
}

#[test]
fn wrong_etcd_settings_stop_the_process_with_the_reason() {
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["coordinator", "--http-listen", "127.0.0.1:0"])
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .expect("run shardline coordinator");
        assert!(!out.status.success(), "{extra:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--etcd", "https://127.0.0.1:2379"]);
    assert!(err.contains("needs --etcd-ca"), "{err}");
    let err = run(&[
        "--etcd",
        "https://127.0.0.1:2379",
        "--etcd-ca",
        "/nonexistent/ca.crt",
    ]);
    assert!(err.contains("--etcd-ca /nonexistent/ca.crt"), "{err}");
    let err = run(&["--etcd", "http://127.0.0.1:2379", "--etcd-user", "u"]);
    assert!(err.contains("--etcd-password-file"), "{err}");
}
