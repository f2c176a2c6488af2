//! Prefix-cache-aware routing over four test workers (the real worker service over a fake
//! runner with a prefix cache): requests that share a system prompt go to the group that
//! caches it (the hit rate read from the workers' own counters), and a hot prefix still
//! spreads once its group is loaded.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use shardline_coordinator::{Config, Routing};
use shardline_engine::testing::TestWorkerConfig;

fn groups(step_delay: Duration) -> Vec<TestWorkerConfig> {
    (0..4)
        .map(|i| TestWorkerConfig {
            group_id: format!("g{i}"),
            prefix_cache: true,
            step_delay,
            ..TestWorkerConfig::default()
        })
        .collect()
}

/// ~200 tokens of the byte-level test tokenizer: 12 full blocks of 16.
fn system_prompt(s: usize) -> String {
    format!("System {s}: you answer in one word. ") + &"Be brief and exact. ".repeat(8)
}

/// Prompt tokens the workers took from their prefix caches, over all prompt tokens.
async fn hit_rate(c: &Cluster) -> f64 {
    let (mut cached, mut computed) = (0u64, 0u64);
    for w in &c.workers {
        let counters = w.status().await.counters;
        cached += counters.prompt_tokens_cached;
        computed += counters.prompt_tokens_computed;
    }
    cached as f64 / (cached + computed) as f64
}

/// Workers whose admitted prompts include system prompt `s`.
fn holders(c: &Cluster, s: usize) -> usize {
    let prefix: Vec<u32> = shardline_engine::testing::test_tokenizer()
        .encode(system_prompt(s), false)
        .unwrap()
        .get_ids()
        .to_vec();
    c.workers
        .iter()
        .filter(|w| w.admitted_prompts().iter().any(|p| p.starts_with(&prefix)))
        .count()
}

#[tokio::test]
async fn a_shared_system_prompt_goes_where_it_is_cached() {
    let config = Config {
        routing: Routing::Prefix,
        ..Config::default()
    };
    let c = cluster(config, groups(Duration::ZERO)).await;
    for q in 0..6 {
        for s in 0..4 {
            let prompt = format!("{}Question {q}?", system_prompt(s));
            let (status, body) = c
                .post(
                    "/v1/completions",
                    json!({"prompt": prompt, "max_tokens": 2}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    for s in 0..4 {
        assert_eq!(holders(&c, s), 1, "system prompt {s} went to one group");
    }
    // Each system prompt is computed once and then read from the cache 5 times: 12 of
    // its ~13 blocks hit, so about 5/6 × 12/13 of all prompt tokens.
    let rate = hit_rate(&c).await;
    assert!(rate > 0.7, "prefix-cache hit rate {rate:.2}");
}

#[tokio::test]
async fn a_hot_prefix_spreads_once_its_group_is_loaded() {
    let config = Config {
        routing: Routing::Prefix,
        ..Config::default()
    };
    // 2 ms steps: 32 concurrent requests of 64 tokens keep a group busy.
    let c = cluster(config, groups(Duration::from_millis(2))).await;
    let all = (0..32).map(|q| {
        let (http, base) = (c.http.clone(), c.base.clone());
        let prompt = format!("{}Question {q}?", system_prompt(0));
        tokio::spawn(async move {
            http.post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": prompt, "max_tokens": 64}))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    for r in futures::future::join_all(all).await {
        assert_eq!(r.unwrap(), 200);
    }
    let spread = holders(&c, 0);
    assert!(
        spread >= 2,
        "32 concurrent requests on one prefix stayed on {spread} group"
    );
    let rate = hit_rate(&c).await;
    assert!(
        rate > 0.5,
        "the prefix is still mostly read from a cache: hit rate {rate:.2}"
    );
}
