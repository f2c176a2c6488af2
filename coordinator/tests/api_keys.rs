//! API keys and tenants end to end over both front ends: every route needs a key (the
//! routes come from the router's own table and the gRPC descriptor set, so a new one
//! cannot be forgotten), 401 / 403 / 429 with their headers, one tenant's flood does not
//! touch another's requests, and a live reload adds and revokes keys while a stream runs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use prost::Message as _;
use serde_json::{Value, json};
use shardline_coordinator::Config;
use shardline_coordinator::http::{Access, routes};
use shardline_coordinator::keys::{KeySource, Keys, TenantLimits, hash_key};
use shardline_engine::testing::TestWorkerConfig;
use tonic_prost::ProstCodec;

fn keys_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("keys.toml");
    // Write then rename, as a Secret update does: a reader never sees half a file.
    let tmp = dir.join("keys.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn config_with(path: &Path) -> Config {
    Config {
        keys: Keys::load(KeySource {
            file: Some(path.to_path_buf()),
            api_key: None,
            defaults: TenantLimits::default(),
        })
        .unwrap(),
        ..Config::default()
    }
}

/// Tenants `a` (slow request rate), `b` (unlimited), `small` (one model it does not
/// have, low priority at most), `gw` (a trusted gateway).
fn tenants() -> String {
    format!(
        "[tenants.a]\nkeys = [\"{}\"]\nrequests_per_second = 0.01\nburst = 2\n\
         [tenants.b]\nkeys = [\"{}\"]\n\
         [tenants.small]\nkeys = [\"{}\"]\nmodels = [\"other-model\"]\nmax_priority = \"low\"\n\
         [tenants.low]\nkeys = [\"{}\"]\nmax_priority = \"normal\"\n\
         [tenants.gw]\nkeys = [\"{}\"]\ntrusted_gateway = true\n",
        hash_key("key-a"),
        hash_key("key-b"),
        hash_key("key-small"),
        hash_key("key-low"),
        hash_key("key-gw"),
    )
}

async fn send(
    c: &Cluster,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = c.http.request(method, format!("{}{path}", c.base));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("send")
}

fn body_for(path: &str) -> Option<Value> {
    match path {
        "/v1/completions" => Some(json!({"prompt": "hi", "max_tokens": 2})),
        "/v1/chat/completions" => Some(json!({
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2
        })),
        "/tokenize" => Some(json!({"prompt": "hi"})),
        "/detokenize" => Some(json!({"tokens": [104, 105]})),
        _ => None,
    }
}

#[tokio::test]
async fn every_route_but_probes_and_metrics_needs_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = keys_file(dir.path(), &tenants());
    let c = one_worker(config_with(&path), TestWorkerConfig::default()).await;
    let routes = routes();
    assert!(routes.iter().any(|r| r.access == Access::Key));
    for route in &routes {
        let body = body_for(route.path);
        for key in [None, Some("wrong-key"), Some("")] {
            let r = send(&c, route.method.clone(), route.path, key, body.clone()).await;
            let status = r.status().as_u16();
            match route.access {
                Access::Public => assert_ne!(status, 401, "{} {}", route.method, route.path),
                Access::Key => {
                    assert_eq!(status, 401, "{} {} with {key:?}", route.method, route.path);
                    let json: Value = r.json().await.unwrap();
                    assert_eq!(json["error"]["code"], "invalid_api_key", "{json}");
                }
            }
        }
        let r = send(&c, route.method.clone(), route.path, Some("key-b"), body).await;
        assert_eq!(
            r.status(),
            200,
            "{} {} with a key",
            route.method,
            route.path
        );
    }
    // Paths and methods the router does not know: no key, no answer about them.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/nope"),
        (reqwest::Method::GET, "/v1/completions"),
        (reqwest::Method::DELETE, "/v1/models"),
    ] {
        let r = send(&c, method.clone(), path, None, None).await;
        assert_eq!(r.status(), 401, "{method} {path}");
        let r = send(&c, method.clone(), path, Some("key-b"), None).await;
        assert!(
            [404, 405].contains(&r.status().as_u16()),
            "{method} {path} with a key: {}",
            r.status()
        );
    }
}

/// Calls `path` (`/package.Service/Method`) with an empty message and returns the code.
async fn grpc_code(
    channel: &tonic::transport::Channel,
    path: &str,
    key: Option<&str>,
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(());
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let path = path.parse().unwrap();
    match grpc
        .unary::<(), (), _>(request, path, ProstCodec::default())
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_grpc_method_but_health_needs_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = keys_file(dir.path(), &tenants());
    let c = one_worker(config_with(&path), TestWorkerConfig::default()).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.coordinator.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    // The public API's methods, from the descriptor set the server reflects.
    let descriptors =
        prost_types::FileDescriptorSet::decode(shardline_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = Vec::new();
    for file in &descriptors.file {
        let package = file.package();
        if package != "shardline.v1" {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                methods.push(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    assert!(methods.len() >= 2, "{methods:?}");
    methods.push("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
    for method in &methods {
        for key in [None, Some("wrong-key")] {
            assert_eq!(
                grpc_code(&channel, method, key).await,
                tonic::Code::Unauthenticated,
                "{method} with {key:?}"
            );
        }
        assert_ne!(
            grpc_code(&channel, method, Some("key-b")).await,
            tonic::Code::Unauthenticated,
            "{method} with a key"
        );
    }
    assert_eq!(
        grpc_code(&channel, "/grpc.health.v1.Health/Check", None).await,
        tonic::Code::Ok,
        "health stays open for probes"
    );
}

#[tokio::test]
async fn forbidden_models_and_priorities_get_403() {
    let dir = tempfile::tempdir().unwrap();
    let path = keys_file(dir.path(), &tenants());
    let c = one_worker(config_with(&path), TestWorkerConfig::default()).await;
    let completion = |extra: Value| {
        let mut body = json!({"prompt": "hi", "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Some(body)
    };
    let post = reqwest::Method::POST;
    let r = send(
        &c,
        post.clone(),
        "/v1/completions",
        Some("key-small"),
        completion(json!({})),
    )
    .await;
    assert_eq!(r.status(), 403);
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "permission_denied", "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fake-model")
    );
    let r = send(
        &c,
        reqwest::Method::GET,
        "/v1/models",
        Some("key-small"),
        None,
    )
    .await;
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["data"], json!([]), "a tenant sees only its models");

    let r = send(
        &c,
        post.clone(),
        "/v1/completions",
        Some("key-low"),
        completion(json!({"priority": "high"})),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = send(
        &c,
        post.clone(),
        "/v1/completions",
        Some("key-low"),
        completion(json!({"priority": "low"})),
    )
    .await;
    assert_eq!(r.status(), 200);

    // A tenant header from an ordinary key is ignored; a trusted gateway's names the
    // tenant (an unknown one is refused).
    let with_tenant = |key: &str, tenant: &str| {
        c.http
            .post(format!("{}/v1/completions", c.base))
            .bearer_auth(key)
            .header("x-shardline-tenant", tenant)
            .json(&json!({"prompt": "hi", "max_tokens": 1}))
            .send()
    };
    assert_eq!(with_tenant("key-b", "small").await.unwrap().status(), 200);
    assert_eq!(with_tenant("key-gw", "small").await.unwrap().status(), 403);
    assert_eq!(with_tenant("key-gw", "b").await.unwrap().status(), 200);
    assert_eq!(with_tenant("key-gw", "nobody").await.unwrap().status(), 403);
}

#[tokio::test]
async fn one_tenants_flood_gets_429_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = keys_file(dir.path(), &tenants());
    let c = one_worker(
        config_with(&path),
        TestWorkerConfig {
            step_delay: Duration::from_millis(2),
            ..TestWorkerConfig::default()
        },
    )
    .await;
    let post = |key: &'static str| {
        let http = c.http.clone();
        let url = format!("{}/v1/completions", c.base);
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"prompt": "flood", "max_tokens": 4}))
                .send()
                .await
                .unwrap()
        }
    };
    // Tenant a's burst is 2 at 0.01 requests/s: a flood of 40 gets 38 refusals.
    let flood = futures::future::join_all((0..40).map(|_| post("key-a")));
    let others = futures::future::join_all((0..20).map(|_| post("key-b")));
    let (flood, others) = tokio::join!(flood, others);
    let refused: Vec<_> = flood.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(refused.len(), 38);
    let r = refused[0];
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=100).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
    assert!(
        others.iter().all(|r| r.status() == 200),
        "tenant b is served"
    );
    // Usage is counted under the key's tenant, in the per-tenant series.
    let metrics = c.metrics().await;
    let sum =
        |name: &str, tenant: &str| series_sum(&metrics, name, &format!("tenant=\"{tenant}\""));
    assert_eq!(sum("shardline_requests_total", "b"), 20.0, "{metrics}");
    assert_eq!(sum("shardline_requests_total", "a"), 2.0, "{metrics}");
    assert_eq!(
        sum("shardline_requests_rejected_total", "a"),
        38.0,
        "a's refusals are a's: {metrics}"
    );
    assert_eq!(
        sum("shardline_tenant_generation_tokens_total", "b"),
        80.0,
        "4 tokens x 20 requests: {metrics}"
    );
    assert!(
        sum("shardline_tenant_prompt_tokens_total", "b") >= 20.0,
        "{metrics}"
    );
    let last = post("key-a").await;
    let json: Value = last.json().await.unwrap();
    assert_eq!(json["error"]["type"], "rate_limit_error", "{json}");
}

#[tokio::test]
async fn reload_adds_and_revokes_keys_while_a_stream_runs() {
    let dir = tempfile::tempdir().unwrap();
    let one = |key: &str| format!("[tenants.t]\nkeys = [\"{}\"]\n", hash_key(key));
    let path = keys_file(dir.path(), &one("old-key"));
    let c = one_worker(
        config_with(&path),
        TestWorkerConfig {
            step_delay: Duration::from_millis(20),
            ..TestWorkerConfig::default()
        },
    )
    .await;
    let stream = c
        .http
        .post(format!("{}/v1/completions", c.base))
        .bearer_auth("old-key")
        .json(&json!({
            "prompt": "s", "max_tokens": 200, "stream": true, "ignore_eos": true,
            "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = stream.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    // Revoke the old key, add a new one; the coordinator notices the file change.
    keys_file(dir.path(), &one("new-key"));
    let models = |key: &'static str| {
        let http = c.http.clone();
        let url = format!("{}/v1/models", c.base);
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while models("new-key").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "reload within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(models("old-key").await, 401, "revoked");
    // The stream admitted under the old key runs to its end.
    let mut rest = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = body.next().await {
        rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(
        rest.contains("\"completion_tokens\":200"),
        "every token arrived: {rest}"
    );
    // A broken file is refused; the keys in force stay.
    keys_file(dir.path(), "[tenants.t]\nkeys = \"oops\"\n");
    tokio::time::sleep(shardline_coordinator::keys::RELOAD_POLL * 2).await;
    assert_eq!(models("new-key").await, 200);
}

/// The sum of the samples of metric `name` whose labels include `label` (`k="v"`).
fn series_sum(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
