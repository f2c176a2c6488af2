//! Mutual TLS between coordinator and workers with a cluster CA: the coordinator serves
//! through a TLS worker; a worker refuses clients without a certificate the cluster CA
//! signed; a coordinator refuses a worker whose certificate does not name the address it
//! knows the worker by, or that another CA signed.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pki::client_config as test_client;
use serde_json::json;
use shardline_coordinator::tls::{ALPN_GRPC, ClientFiles, Tls, TlsFiles, client_config};
use shardline_coordinator::{Config, Coordinator};
use shardline_engine::testing::{TestWorker, TestWorkerConfig};
use shardline_proto::worker::v1 as pb;
use shardline_proto::worker::v1::worker_client::WorkerClient;
use shardline_tests::pki::{Ca, Leaf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A test worker serving mutual TLS with `leaf`, accepting clients `ca` signed.
async fn tls_worker(dir: &Path, ca: &Ca, leaf: &Leaf) -> TestWorker {
    let files = TlsFiles {
        cert: write(dir, "worker.crt", &leaf.cert),
        key: write(dir, "worker.key", &leaf.key),
        client_ca: Some(write(dir, "cluster-ca.crt", &ca.pem())),
    };
    TestWorker::start(TestWorkerConfig {
        tls: Some(Tls::load(files, ALPN_GRPC).unwrap()),
        ..TestWorkerConfig::default()
    })
    .await
    .unwrap()
}

/// A coordinator config calling workers as a client `ca` signed, trusting `ca`.
fn coordinator_config(dir: &Path, ca: &Ca) -> Config {
    let me = ca.leaf(&["coordinator"]);
    let files = ClientFiles {
        ca: write(dir, "ca.crt", &ca.pem()),
        cert: write(dir, "coordinator.crt", &me.cert),
        key: write(dir, "coordinator.key", &me.key),
    };
    Config {
        worker_tls: Some(client_config(&files).unwrap()),
        ..Config::default()
    }
}

#[tokio::test]
async fn coordinator_serves_through_a_mutual_tls_worker() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let worker = tls_worker(dir.path(), &ca, &ca.leaf(&["127.0.0.1"])).await;
    let config = coordinator_config(dir.path(), &ca);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = Coordinator::start(config, http, grpc, shutdown.clone()).unwrap();
    coordinator.groups.add(&worker.url());
    let mut ready = coordinator.groups.ready_count();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|n| *n == 1))
        .await
        .expect("the TLS worker becomes ready")
        .unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", coordinator.http_addr))
        .json(&json!({"prompt": "mtls", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `Health` over TLS with `identity` (or none), trusting `server_ca`.
async fn health(
    worker: &TestWorker,
    server_ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<(), String> {
    let tls = Arc::new(test_client(&server_ca.pem(), identity, &[b"h2"]));
    let addr = worker.addr;
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    WorkerClient::new(channel)
        .health(pb::HealthRequest {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_worker_refuses_clients_the_cluster_ca_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let other = Ca::new("another CA");
    let worker = tls_worker(dir.path(), &ca, &ca.leaf(&["127.0.0.1"])).await;
    // Plaintext h2c: no answer.
    let plain = async {
        let mut client = WorkerClient::connect(worker.url()).await.ok()?;
        client.health(pb::HealthRequest {}).await.ok()
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .ok()
            .flatten()
            .is_none(),
        "a plaintext client is served"
    );
    assert!(
        health(&worker, &ca, None).await.is_err(),
        "no client certificate"
    );
    assert!(
        health(&worker, &ca, Some(&other.leaf(&["coordinator"])))
            .await
            .is_err(),
        "a certificate of another CA"
    );
    health(&worker, &ca, Some(&ca.leaf(&["coordinator"])))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_coordinator_refuses_a_worker_whose_certificate_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let other = Ca::new("another CA");
    // Signed by the cluster CA but for another name; and the right name, wrong CA.
    let wrong_name = tls_worker(dir.path(), &ca, &ca.leaf(&["other.example"])).await;
    let other_dir = tempfile::tempdir().unwrap();
    let wrong_ca = tls_worker(other_dir.path(), &ca, &other.leaf(&["127.0.0.1"])).await;
    let config = coordinator_config(dir.path(), &ca);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = Coordinator::start(config, http, grpc, shutdown.clone()).unwrap();
    coordinator.groups.add(&wrong_name.url());
    coordinator.groups.add(&wrong_ca.url());
    let mut ready = coordinator.groups.ready_count();
    let became_ready =
        tokio::time::timeout(Duration::from_secs(3), ready.wait_for(|n| *n > 0)).await;
    assert!(became_ready.is_err(), "a mismatching worker was accepted");
}
