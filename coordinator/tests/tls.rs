//! TLS on the public APIs: the official `openai` Python client over HTTPS with the
//! test's CA, gRPC over TLS, a renewed certificate served without a restart, and client
//! certificates required when `--tls-client-ca` is set.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pki::{client_config, https_get};
use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use shardline_coordinator::Config;
use shardline_coordinator::keys::{Keys, TenantLimits};
use shardline_coordinator::tls::{ALPN_HTTP, Tls, TlsFiles};
use shardline_engine::testing::TestWorkerConfig;
use shardline_proto::v1::GenerateRequest;
use shardline_proto::v1::inference_client::InferenceClient;
use shardline_tests::pki::{Ca, Leaf};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn tls_config(dir: &Path, leaf: &Leaf, client_ca: Option<&str>) -> Config {
    let files = TlsFiles {
        cert: write(dir, "tls.crt", &leaf.cert),
        key: write(dir, "tls.key", &leaf.key),
        client_ca: client_ca.map(|ca| write(dir, "client-ca.crt", ca)),
    };
    Config {
        tls: Some(Tls::load(files, ALPN_HTTP).unwrap()),
        keys: Keys::single("sk-test", TenantLimits::default()),
        ..Config::default()
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

const OPENAI_OVER_HTTPS: &str = r#"
import json, sys
try:
    import httpx, openai
except ImportError:
    sys.exit("the openai Python package is missing: pip install openai (deploy/setup.sh installs it)")
base, ca = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0,
                       http_client=httpx.Client(verify=ca, timeout=30))
models = [m.id for m in client.models.list()]
chat = client.chat.completions.create(model=models[0], max_tokens=4,
                                      messages=[{"role": "user", "content": "hi"}])
text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=models[0], max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]))
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0,
                  http_client=httpx.Client(verify=ca)).models.list()
    unauthorized = False
except openai.AuthenticationError:
    unauthorized = True
print(json.dumps({"models": models, "usage": chat.usage.completion_tokens,
                  "streamed": len(text) > 0, "unauthorized": unauthorized}))
"#;

#[tokio::test]
async fn openai_client_over_https_and_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("shardline test CA");
    let first = ca.leaf(&["localhost", "127.0.0.1"]);
    let c = one_worker(
        tls_config(dir.path(), &first, None),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    let ca_path = write(dir.path(), "ca.crt", &ca.pem());
    let base = format!("https://localhost:{}/v1", addr.port());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(OPENAI_OVER_HTTPS)
            .arg(base)
            .arg(ca_path)
            .output()
            .expect("python3 runs (deploy/setup.sh installs it)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai client over HTTPS:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["models"], serde_json::json!(["fake-model"]));
    assert_eq!(result["usage"], 4);
    assert_eq!(result["streamed"], true);
    assert_eq!(result["unauthorized"], true);

    // Plain HTTP on the TLS port gets no answer.
    let plain = c.http.get(format!("http://{addr}/health")).send().await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plaintext must not be served on a TLS port"
    );

    // A renewed certificate reaches new connections without a restart.
    let (response, leaf) = https_get(addr, client_config(&ca.pem(), None, &[]), "/livez")
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(leaf, der(&first.cert));
    let second = ca.leaf(&["localhost"]);
    write(dir.path(), "tls.key", &second.key);
    write(dir.path(), "tls.crt", &second.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((_, leaf)) = https_get(addr, client_config(&ca.pem(), None, &[]), "/livez").await
            && leaf == der(&second.cert)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn grpc_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("shardline test CA");
    let leaf = ca.leaf(&["localhost"]);
    let c = one_worker(
        tls_config(dir.path(), &leaf, None),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.grpc_addr;
    let tls = std::sync::Arc::new(client_config(&ca.pem(), None, &[b"h2"]));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut client = InferenceClient::new(channel);
    let mut request = tonic::Request::new(GenerateRequest {
        prompt: "tls".into(),
        max_tokens: Some(3),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer sk-test".parse().unwrap());
    let out = client.generate(request).await.unwrap().into_inner();
    assert_eq!(out.usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn client_ca_requires_a_certificate_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("someone else");
    let leaf = server_ca.leaf(&["localhost"]);
    let c = one_worker(
        tls_config(dir.path(), &leaf, Some(&client_ca.pem())),
        TestWorkerConfig::default(),
    )
    .await;
    let addr = c.coordinator.http_addr;
    let get = |identity: Option<Leaf>| {
        let config = client_config(&server_ca.pem(), identity.as_ref(), &[]);
        https_get(addr, config, "/livez")
    };
    assert!(get(None).await.is_err(), "no client certificate");
    assert!(
        get(Some(other_ca.leaf(&["client"]))).await.is_err(),
        "a certificate another CA signed"
    );
    let (response, _) = get(Some(client_ca.leaf(&["client"]))).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
