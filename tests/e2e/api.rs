//! End-to-end tests of the coordinator against the real worker and SmolLM2, over real
//! processes (`shardline up`).

/// Extra `shardline up` flags of every cluster in the shared cases.
const UP_ARGS: &[&str] = &[];

include!("api_cases.rs");

/// Structured outputs (pydantic schemas through `parse()`, streamed, n > 1, under
/// concurrent load), tool calls (required and named round trips, streamed deltas),
/// logit_bias, n, /tokenize and a 400 naming the field for each bad input, all with the
/// official client: tests/python/openai_structured.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_and_tools_with_the_openai_client() {
    let up = Cluster::start(bin(), UP_ARGS);
    let out = std::process::Command::new("python3")
        .arg(shardline_tests::workspace_root().join("tests/python/openai_structured.py"))
        .args(["--base-url", &format!("{}/v1", up.http)])
        .output()
        .expect("run python3 (install Python 3; deploy/setup.sh installs the openai client)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn configuration_docs_show_every_flag_verbatim() {
    let docs =
        std::fs::read_to_string(shardline_tests::workspace_root().join("docs/configuration.md"))
            .unwrap();
    for command in ["up", "coordinator", "worker"] {
        let mut cmd = std::process::Command::new(bin());
        // `--help` shows the values of set `SHARDLINE_*` variables; the docs show none.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SHARDLINE_") {
                cmd.env_remove(key);
            }
        }
        let out = cmd.args([command, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            docs.contains(help.trim_end()),
            "docs/configuration.md's `shardline {command} --help` section is stale: run deploy/sync-flags.py"
        );
    }
}

/// The quick tour's requests name the model `shardline up` serves by default (its id is
/// the GGUF's file name without `.gguf`); another name gets 404 `model_not_found`.
#[test]
fn readme_quick_tour_names_the_served_model() {
    let readme =
        std::fs::read_to_string(shardline_tests::workspace_root().join("README.md")).unwrap();
    let model = shardline_tests::model_path();
    let id = model.file_stem().unwrap().to_str().unwrap();
    let mut named = 0;
    for marker in ["\"model\": \"", "model=\""] {
        for (i, _) in readme.match_indices(marker) {
            let rest = &readme[i + marker.len()..];
            let name = &rest[..rest.find('"').unwrap()];
            assert_eq!(
                name, id,
                "README.md names model `{name}`; the served id is `{id}`"
            );
            named += 1;
        }
    }
    assert!(
        named >= 5,
        "the quick tour's requests were not found in README.md"
    );
}

/// `shardline up --api-key`: the key guards the API (the model list included), the probes
/// and metrics stay open.
#[tokio::test]
async fn an_api_key_guards_every_route_but_probes_and_metrics() {
    let up = Cluster::start(bin(), &["--api-key", "sk-e2e"]);
    let http = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut request = http.get(format!("{}{path}", up.http));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let models = get("/v1/models", None).await.unwrap();
    assert_eq!(models.status(), 401);
    let body: Value = models.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(
        get("/v1/models", Some("wrong")).await.unwrap().status(),
        401
    );
    let models: Value = get("/v1/models", Some("sk-e2e"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1), "{models}");
    for open in ["/health", "/livez", "/metrics"] {
        assert_eq!(get(open, None).await.unwrap().status(), 200, "{open}");
    }
    let (status, _) = completion(&up.http, json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, 401, "completions need the key too");
}
