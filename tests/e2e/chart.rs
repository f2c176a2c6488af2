//! The Helm chart, offline: rendered with Helm's own engine, linted, every object
//! validated against the Kubernetes OpenAPI schemas of several minor versions, bad values
//! refused (all in `tests/helm/chart.py`); and every shardline command line the chart
//! renders parsed by the binary's own command-line parser, so a renamed flag or
//! environment variable breaks this test, not a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command as Process;

use clap::{CommandFactory, FromArgMatches};
use serde_json::Value;
use shardline::cli::{Cli, Command};

fn chart_py(args: &[&str]) -> std::process::Output {
    let script = shardline_tests::workspace_root().join("tests/helm/chart.py");
    Process::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run python3 {}: {e} (install Python 3)", script.display()))
}

#[test]
fn the_chart_lints_renders_validates_and_refuses_bad_values() {
    let out = chart_py(&["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the chart's checks failed:\n{text}");
    // The checks ran over the examples and the option matrix, not over nothing.
    assert!(text.contains("examples/values-gpu.yaml"), "{text}");
    assert!(
        text.contains("objects validated against Kubernetes"),
        "{text}"
    );
}

/// A value for an environment variable the kubelet fills in (downward API, Secrets).
fn sample_value(var: &Value) -> String {
    if let Some(v) = var.get("value").and_then(Value::as_str) {
        return v.to_string();
    }
    let from = &var["valueFrom"];
    match from["fieldRef"]["fieldPath"].as_str() {
        Some("metadata.name") => "demo-worker-0".into(),
        Some("status.podIP") => "10.1.2.3".into(),
        Some(other) => panic!("an env var from an unexpected field {other}: {var}"),
        None if from.get("secretKeyRef").is_some() => "sk-from-secret".into(),
        None => panic!("an env var whose value the test cannot stand in for: {var}"),
    }
}

/// Expands `$(VAR)` as the kubelet does in args, from the container's env.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Every shardline container of every rendering (the examples and the option matrix)
/// parses with the real parser, with its `SHARDLINE_*` environment applied as clap applies
/// it (a flag given on the command line wins), and its configuration validates.
#[test]
fn every_command_line_the_chart_renders_is_accepted_by_shardline() {
    let out = chart_py(&["containers"]);
    assert!(
        out.status.success(),
        "chart.py containers failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let containers: Vec<Value> = serde_json::from_slice(&out.stdout).expect("containers JSON");
    let cli = Cli::command();
    let etcd_help = etcd_flags();
    let mut checked = BTreeSet::new();
    for c in &containers {
        let where_ = format!("{} {} {}", c["rendering"], c["workload"], c["container"]);
        // The kubelet expands `$(VAR)` of the variables defined before, in values too.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for v in c["env"].as_array().unwrap() {
            let value = expand(&sample_value(v), &env);
            env.insert(v["name"].as_str().unwrap().to_string(), value);
        }
        let args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| expand(a.as_str().unwrap(), &env))
            .collect();
        if c.get("etcd").is_some() {
            for a in &args {
                let flag = a.split('=').next().unwrap();
                assert!(
                    etcd_help.contains(&format!("{flag} "))
                        || etcd_help.contains(&format!("{flag}\n")),
                    "{where_}: etcd does not know {flag} (etcd --help)"
                );
            }
            continue;
        }
        assert!(
            args.iter().chain(env.values()).all(|a| !a.contains("$(")),
            "{where_}: unexpanded reference in {args:?} or {env:?}"
        );
        let sub = cli
            .find_subcommand(&args[0])
            .unwrap_or_else(|| panic!("{where_}: no subcommand {:?}", args[0]));
        // Environment variables: each SHARDLINE_* one is the env of one of the
        // subcommand's flags, and becomes that flag unless the command line has it.
        let mut argv = vec!["shardline".to_string()];
        argv.extend(args.iter().cloned());
        for (name, value) in &env {
            if name == "RUST_LOG" {
                continue;
            }
            let flag = sub
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| {
                    panic!(
                        "{where_}: env {name} is read by no flag of `shardline {}`",
                        args[0]
                    )
                });
            let long = flag.get_long().expect("every flag has a long name");
            if !args.iter().any(|a| a.starts_with(&format!("--{long}"))) {
                argv.push(format!("--{long}={value}"));
            }
        }
        let matches = Cli::command()
            .try_get_matches_from(&argv)
            .unwrap_or_else(|e| panic!("{where_}: shardline refuses {argv:?}:\n{e}"));
        let parsed = Cli::from_arg_matches(&matches).expect("matches convert");
        match parsed.command {
            Command::Coordinator(args) => {
                args.config()
                    .unwrap_or_else(|e| panic!("{where_}: {argv:?}: {e}"));
                assert!(!args.etcd.is_empty(), "{where_}: coordinator without etcd");
            }
            Command::Worker(args) => {
                args.registration
                    .validate()
                    .unwrap_or_else(|e| panic!("{where_}: {argv:?}: {e}"));
                assert!(
                    args.registration.advertise.is_some() && args.group_id.is_some(),
                    "{where_}: a worker in a pod must advertise its address and name its group"
                );
            }
            _ => panic!("{where_}: unexpected subcommand {}", args[0]),
        }
        checked.insert(format!(
            "{}:{}",
            c["rendering"].as_str().unwrap(),
            c["container"].as_str().unwrap()
        ));
    }
    assert!(
        checked.iter().any(|c| c.contains("coordinator"))
            && checked.iter().any(|c| c.contains("worker")),
        "no coordinator or worker container checked: {checked:?}"
    );
    println!("{} shardline containers parsed: {checked:?}", checked.len());
}

/// The flags Debian's etcd (3.4) knows, from `etcd --help`.
fn etcd_flags() -> String {
    let out = Process::new("etcd").arg("--help").output().unwrap_or_else(|e| {
        panic!("run etcd --help: {e}: install etcd (apt-get install etcd-server; deploy/setup.sh does)")
    });
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
