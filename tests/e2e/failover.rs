//! End-to-end tests of membership and failover over real processes: a real etcd,
//! `shardline worker --etcd` processes serving SmolLM2, `shardline coordinator --etcd`.
//!
//! The tests run one at a time (a process-wide lock): each starts its own etcd and
//! workers, and on a 2-core machine two clusters at once would only measure contention.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shardline_membership::{Membership, MembershipEvent, MembershipView};
use shardline_proto::v1::WorkerState;
use shardline_proto::worker::v1::{InfoRequest, InfoResponse, worker_client::WorkerClient};
use shardline_tests::etcd::EtcdServer;
use shardline_tests::http::metric_sum;
use shardline_tests::load::{body, client, complete, stream, streams};
use shardline_tests::worker::health;
use shardline_tests::{Proc, model_path};
use tokio_util::sync::CancellationToken;

fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_shardline"))
}

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Polls `$cond` (an `Option`) every 50 ms until it is `Some`, panicking after `$timeout`.
macro_rules! until {
    ($timeout:expr, $what:expr, $cond:expr) => {{
        let deadline = Instant::now() + $timeout;
        loop {
            if let Some(v) = $cond {
                break v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

struct Worker {
    proc: Proc,
    /// Known once the worker has logged the port it bound (it listens on port 0).
    url: Option<String>,
    group: String,
}

impl Worker {
    /// `http://127.0.0.1:PORT` of the worker's gRPC service, waiting for the model load.
    fn url(&mut self) -> String {
        if self.url.is_none() {
            let addr = self.proc.logged(
                "worker gRPC service listening",
                "addr",
                Duration::from_secs(120),
            );
            self.url = Some(format!("http://{addr}"));
        }
        self.url.clone().expect("set above")
    }
}

/// Starts a worker on port 0 (it registers the port it bound), without waiting for it.
fn start_worker(etcd: &EtcdServer, group: &str, extra: &[&str]) -> Worker {
    let mut cmd = Command::new(bin());
    cmd.arg("worker")
        .arg("--model")
        .arg(model_path())
        .args(["--listen", "127.0.0.1:0"])
        .args(["--etcd", &etcd.endpoint(), "--group-id", group])
        .args([
            "--lease-ttl-secs",
            "2",
            "--threads",
            "1",
            "--drain-timeout-secs",
            "30",
        ])
        .args(extra)
        .env("RUST_LOG", "info");
    Worker {
        proc: Proc::spawn(&format!("worker-{group}"), cmd),
        url: None,
        group: group.to_string(),
    }
}

struct Coordinator {
    proc: Proc,
    http: String,
}

/// Starts a coordinator following `etcd` on port 0 and waits until it has `groups` ready
/// groups.
async fn start_coordinator(etcd: &EtcdServer, name: &str, groups: u64) -> Coordinator {
    let mut cmd = Command::new(bin());
    cmd.arg("coordinator")
        .args(["--etcd", &etcd.endpoint()])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(["--step-timeout-s", "30"])
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(name, cmd);
    let http = proc.logged("coordinator listening", "http", Duration::from_secs(120));
    let mut c = Coordinator {
        proc,
        http: format!("http://{http}"),
    };
    let health = format!("{}/health", c.http);
    until!(Duration::from_secs(120), "the coordinator to be ready", {
        c.proc.assert_running();
        ready_groups(&health).await.filter(|&n| n >= groups)
    });
    c
}

/// `groups` of the coordinator's `/health` (groups it can route to), if it answers 200.
async fn ready_groups(health: &str) -> Option<u64> {
    let r = client().get(health).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json::<Value>().await.ok()?["groups"].as_u64()
}

/// The test's own view of the membership, from the same layer the coordinator uses.
struct Observer {
    view: Arc<Mutex<MembershipView>>,
    /// (time, event) of every event after the first sync.
    events: Arc<Mutex<Vec<(Instant, MembershipEvent)>>>,
    _stop: tokio_util::sync::DropGuard,
}

impl Observer {
    async fn start(etcd: &EtcdServer) -> Observer {
        let membership = Membership::etcd(&[etcd.endpoint()], "/shardline")
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let mut watch = membership.watch(&stop);
        let view = Arc::new(Mutex::new(MembershipView::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (v, e) = (view.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(event) = watch.recv().await {
                e.lock().unwrap().push((Instant::now(), event.clone()));
                v.lock().unwrap().apply(event);
            }
        });
        Observer {
            view,
            events,
            _stop: stop.drop_guard(),
        }
    }

    fn state(&self, group: &str) -> Option<WorkerState> {
        let view = self.view.lock().unwrap();
        view.get(group)
            .and_then(|r| WorkerState::try_from(r.state).ok())
    }

    /// When the first event matching `f` was seen.
    fn seen(&self, f: impl Fn(&MembershipEvent) -> bool) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| f(e))
            .map(|(t, _)| *t)
    }

    async fn wait_ready(&self, workers: &mut [&mut Worker]) {
        until!(Duration::from_secs(120), "the workers to register", {
            for w in workers.iter_mut() {
                w.proc.assert_running();
            }
            workers
                .iter()
                .all(|w| self.state(&w.group) == Some(WorkerState::Ready))
                .then_some(())
        });
        for w in workers.iter_mut() {
            w.url();
        }
    }
}

async fn info(worker: &str) -> InfoResponse {
    let mut w = WorkerClient::connect(worker.to_string())
        .await
        .expect("connect to the worker");
    w.info(InfoRequest {})
        .await
        .expect("worker info")
        .into_inner()
}

async fn started(worker: &str) -> u64 {
    health(worker)
        .await
        .expect("worker health")
        .sequences_started
}

/// Client loops sending short requests back to back until stopped; every status seen.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(u16, Value)>>>,
    done: Arc<AtomicUsize>,
}

impl Load {
    fn start(http: &str, clients: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|c| {
                let (http, stop, done) = (http.to_string(), stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut i = c * 1000;
                    while !stop.load(Ordering::Relaxed) {
                        seen.push(complete(&http, body(i, max_tokens)).await);
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    seen
                })
            })
            .collect();
        Load { stop, tasks, done }
    }

    /// A new request every `every` while fewer than `most` are in flight (a steady
    /// arrival stream that does not bury a small worker).
    fn open(http: &str, every: Duration, most: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let (http, flag, count) = (http.to_string(), stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(every);
            let inflight = Arc::new(AtomicUsize::new(0));
            let mut i = 2000;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                if inflight.load(Ordering::Relaxed) >= most {
                    continue;
                }
                inflight.fetch_add(1, Ordering::Relaxed);
                let (http, count, inflight) = (http.clone(), count.clone(), inflight.clone());
                sent.push(tokio::spawn(async move {
                    let r = complete(&http, body(i, max_tokens)).await;
                    count.fetch_add(1, Ordering::Relaxed);
                    inflight.fetch_sub(1, Ordering::Relaxed);
                    r
                }));
                i += 1;
            }
            let mut seen = Vec::new();
            for t in sent {
                seen.push(t.await.unwrap());
            }
            seen
        });
        Load {
            stop,
            tasks: vec![task],
            done,
        }
    }

    async fn wait_done(&self, n: usize) {
        until!(Duration::from_secs(60), "load requests to complete", {
            (self.done.load(Ordering::Relaxed) >= n).then_some(())
        });
    }

    /// Stops the clients and asserts every request they sent succeeded.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut n = 0;
        for t in self.tasks {
            for (status, v) in t.await.unwrap() {
                assert_eq!(status, 200, "a request failed under load: {v}");
                n += 1;
            }
        }
        n
    }
}

fn lease_records(etcd: &EtcdServer) -> Vec<i64> {
    let out = etcd.etcdctl(&["get", "--prefix", "/shardline/workers/", "-w", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcdctl json {e}: {out}"));
    v["kvs"].as_array().map_or(Vec::new(), |kvs| {
        kvs.iter()
            .map(|kv| kv["lease"].as_i64().unwrap_or(0))
            .collect()
    })
}

/// (1) Two workers register with leases; the coordinator routes to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_register_and_both_get_requests() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let (mut a, mut b) = (start_worker(&etcd, "a", &[]), start_worker(&etcd, "b", &[]));
    observer.wait_ready(&mut [&mut a, &mut b]).await;
    let leases = lease_records(&etcd);
    assert_eq!(
        leases.len(),
        2,
        "etcdctl get --prefix shows both records: {leases:?}"
    );
    assert!(
        leases.iter().all(|&l| l != 0),
        "both records are attached to a lease: {leases:?}"
    );
    let keys = etcd.etcdctl(&["get", "--prefix", "/shardline/workers/", "--keys-only"]);
    assert!(
        keys.contains("/shardline/workers/a") && keys.contains("/shardline/workers/b"),
        "{keys}"
    );

    let coordinator = start_coordinator(&etcd, "coordinator", 2).await;
    let results = streams(&coordinator.http, 0, 8, 8, Arc::default()).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (sa, sb) = (started(&a.url()).await, started(&b.url()).await);
    assert!(
        sa > 0 && sb > 0,
        "the coordinator routes to both groups (a: {sa}, b: {sb})"
    );
    assert_eq!(sa + sb, 8);
}

/// (2) kill -9 a worker in the middle of 8 streaming greedy requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_migrates_without_changing_the_text() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let (mut a, mut b) = (start_worker(&etcd, "a", &[]), start_worker(&etcd, "b", &[]));
    observer.wait_ready(&mut [&mut a, &mut b]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 2).await;

    let reference = streams(&coordinator.http, 0, 8, 40, Arc::default()).await;
    let reference: Vec<String> = reference.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        metric_sum(&coordinator.http, "shardline_request_migrations_total").await,
        0.0
    );

    let tokens = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let (http, tokens) = (coordinator.http.clone(), tokens.clone());
        async move { streams(&http, 0, 8, 40, tokens).await }
    });
    until!(Duration::from_secs(60), "tokens to flow", {
        (tokens.load(Ordering::Relaxed) >= 16).then_some(())
    });
    let running = health(&a.url()).await.map_or(0, |h| h.num_running);
    assert!(running > 0, "worker a runs sequences when it is killed");
    a.proc.signal("KILL");
    let at = tokens.load(Ordering::Relaxed);
    let results = run.await.unwrap();
    assert!(at < 8 * 40, "the kill happened mid-stream");
    for (i, (got, want)) in results.iter().zip(&reference).enumerate() {
        assert_eq!(
            got.as_ref(),
            Ok(want),
            "request {i}: text differs from the run without failure"
        );
    }
    let migrations = metric_sum(&coordinator.http, "shardline_request_migrations_total").await;
    assert!(
        migrations >= running as f64,
        "{migrations} migrations for {running} running on a"
    );
    assert!(
        coordinator.proc.output().contains("migrating a request"),
        "a log line per migration"
    );
    // The dead worker's record expires with its lease.
    until!(
        Duration::from_secs(10),
        "a's record to expire",
        observer.state("a").is_none().then_some(())
    );
}

/// (2a) Structured outputs survive a migration: 8 sampled streams constrained to a JSON
/// schema lose their worker mid-stream; each continues on the other group from its
/// grammar state (rebuilt from the tokens already sent) with exactly the text of a run
/// without failure, and every output is a document valid under the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_keeps_structured_outputs_valid_and_unchanged() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let (mut a, mut b) = (start_worker(&etcd, "a", &[]), start_worker(&etcd, "b", &[]));
    observer.wait_ready(&mut [&mut a, &mut b]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 2).await;
    let schema = json!({"type": "object", "properties": {
            "readings": {"type": "array", "minItems": 10, "maxItems": 10,
                         "items": {"type": "integer", "minimum": 0, "maximum": 999}},
            "unit": {"enum": ["mm", "cm"]}},
        "required": ["readings", "unit"], "additionalProperties": false});
    let request = |i: usize| {
        json!({"prompt": format!("Sensor {i} readings as JSON:"), "max_tokens": 300,
               "temperature": 0.8, "seed": i, "guided_json": schema})
    };
    let run = |tokens: Arc<AtomicUsize>| {
        let http = coordinator.http.clone();
        let all: Vec<_> = (0..8)
            .map(|i| {
                let (http, tokens, body) = (http.clone(), tokens.clone(), request(i));
                tokio::spawn(async move { stream(&http, body, tokens).await })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for t in all {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let reference: Vec<String> = run(Arc::default())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let tokens = Arc::new(AtomicUsize::new(0));
    let failing = tokio::spawn(run(tokens.clone()));
    until!(Duration::from_secs(60), "tokens to flow", {
        (tokens.load(Ordering::Relaxed) >= 16).then_some(())
    });
    let running = health(&a.url()).await.map_or(0, |h| h.num_running);
    assert!(running > 0, "worker a runs sequences when it is killed");
    a.proc.signal("KILL");
    let results = failing.await.unwrap();
    for (i, (got, want)) in results.iter().zip(&reference).enumerate() {
        assert_eq!(
            got.as_ref(),
            Ok(want),
            "request {i}: text differs after the kill"
        );
        let doc: Value = serde_json::from_str(want)
            .unwrap_or_else(|e| panic!("request {i}: not JSON ({e}): {want}"));
        let readings = doc["readings"].as_array().unwrap();
        assert_eq!(readings.len(), 10, "{want}");
        assert!(
            readings
                .iter()
                .all(|r| r.as_u64().is_some_and(|r| r <= 999))
        );
        assert!(doc["unit"] == "mm" || doc["unit"] == "cm", "{want}");
    }
    let migrations = metric_sum(&coordinator.http, "shardline_request_migrations_total").await;
    assert!(
        migrations >= running as f64,
        "{migrations} migrations for {running} running on a"
    );
}

/// (2b) A tensor-parallel group whose rank stops answering mid-stream: the step fails at
/// the collectives' deadline, the coordinator continues the group's requests on the other
/// group with the same text, and the failed worker leaves the membership and exits
/// non-zero (for its supervisor to restart) instead of staying registered and unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tensor_parallel_group_leaves_and_its_requests_continue() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let mut b = start_worker(&etcd, "b", &[]);
    observer.wait_ready(&mut [&mut b]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 1).await;

    // Rank 1 of a's three ranks hangs in a's 12th step; collectives wait 1 s.
    let mut a = start_worker(
        &etcd,
        "a",
        &[
            "--tp",
            "3",
            "--tp-timeout-secs",
            "1",
            "--inject-failure",
            "hang:1:11",
        ],
    );
    observer.wait_ready(&mut [&mut a]).await;
    until!(Duration::from_secs(30), "the coordinator to route to a", {
        ready_groups(&format!("{}/health", coordinator.http))
            .await
            .filter(|&n| n == 2)
    });
    let results = streams(&coordinator.http, 0, 8, 40, Arc::default()).await;
    let migrations = metric_sum(&coordinator.http, "shardline_request_migrations_total").await;
    assert!(migrations > 0.0, "a ran requests when its rank hung");
    let code = a.proc.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(Some(c)) if c != 0),
        "a exits non-zero after its group failed: {code:?}"
    );
    let out = a.proc.output();
    assert!(out.contains("leaving the cluster"), "{out}");
    assert!(
        observer
            .seen(|e| *e == MembershipEvent::Delete("a".into()))
            .is_some(),
        "a's record was deleted (lease revoked), not left to expire"
    );
    // Afterwards every request runs on b, with nothing more to migrate; the same
    // requests again, on b alone, are the reference for the texts that moved.
    let b_before = started(&b.url()).await;
    let reference = streams(&coordinator.http, 0, 8, 40, Arc::default()).await;
    assert_eq!(started(&b.url()).await - b_before, 8);
    assert_eq!(
        metric_sum(&coordinator.http, "shardline_request_migrations_total").await,
        migrations
    );
    for (i, (got, want)) in results.iter().zip(&reference).enumerate() {
        let want = want.as_ref().expect("reference request");
        assert_eq!(got.as_ref(), Ok(want), "request {i}: text differs");
    }
}

/// (2c) A coordinator lost with sequences running: the worker frees their KV blocks.
/// Killed, its step stream ends with its connection and the worker releases that
/// stream's sequences at once; frozen (SIGSTOP: the connection stays open, no step comes),
/// the worker releases them once no step has named them for `--seq-idle-timeout-secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_coordinators_sequences_are_released_by_the_worker() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let mut a = start_worker(&etcd, "a", &["--seq-idle-timeout-secs", "2"]);
    observer.wait_ready(&mut [&mut a]).await;
    let total = info(&a.url()).await.kv_blocks_total;
    let idle_released = |a: &Worker| {
        a.proc
            .output()
            .matches("released sequences no step named")
            .count()
    };
    let stream_released = |a: &Worker| {
        a.proc
            .output()
            .matches("released the sequences of a step stream")
            .count()
    };

    for (how, signal) in [("killed", "KILL"), ("frozen", "STOP")] {
        let coordinator = start_coordinator(&etcd, &format!("coordinator-{how}"), 1).await;
        let tokens = Arc::new(AtomicUsize::new(0));
        let run = tokio::spawn({
            let (http, tokens) = (coordinator.http.clone(), tokens.clone());
            async move { streams(&http, 0, 4, 400, tokens).await }
        });
        until!(Duration::from_secs(60), "tokens to flow", {
            (tokens.load(Ordering::Relaxed) >= 8).then_some(())
        });
        let h = health(&a.url()).await.expect("worker health");
        assert!(h.num_running > 0, "{how}: sequences run on a: {h:?}");
        assert!(
            h.kv_blocks_free < total,
            "{how}: they hold KV blocks: {h:?}"
        );
        let (idle_before, stream_before) = (idle_released(&a), stream_released(&a));
        coordinator.proc.signal(signal);
        let lost = Instant::now();
        let h = until!(Duration::from_secs(20), "a to release the sequences", {
            health(&a.url())
                .await
                .filter(|h| h.num_running == 0 && h.kv_blocks_free == total)
        });
        if how == "killed" {
            assert_eq!(
                (
                    stream_released(&a) - stream_before,
                    idle_released(&a) - idle_before
                ),
                (1, 0),
                "released with the stream, not by the idle timeout: {h:?}\n{}",
                a.proc.output()
            );
        } else {
            // Not before the idle timeout (2 s, checked every 0.5 s).
            assert!(lost.elapsed() >= Duration::from_millis(1500), "{h:?}");
            assert_eq!(
                idle_released(&a) - idle_before,
                1,
                "released by the idle timeout: {}",
                a.proc.output()
            );
            coordinator.proc.signal("KILL");
        }
        let results = run.await.unwrap();
        assert!(
            results.iter().all(Result::is_err),
            "{how}: streams end with the coordinator"
        );
    }
    a.proc.assert_running();
}

/// (3) SIGTERM a worker under load: drain, then leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_before_the_record_disappears() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let (mut a, mut b) = (start_worker(&etcd, "a", &[]), start_worker(&etcd, "b", &[]));
    observer.wait_ready(&mut [&mut a, &mut b]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 2).await;

    let tokens = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn({
        let (http, tokens) = (coordinator.http.clone(), tokens.clone());
        async move { streams(&http, 0, 8, 48, tokens).await }
    });
    until!(Duration::from_secs(60), "tokens to flow", {
        (tokens.load(Ordering::Relaxed) >= 16).then_some(())
    });
    assert!(
        health(&a.url()).await.unwrap().num_running > 0,
        "a runs sequences"
    );
    a.proc.signal("TERM");
    until!(Duration::from_secs(5), "a to be DRAINING", {
        (observer.state("a") == Some(WorkerState::Draining)).then_some(())
    });
    let a_started = started(&a.url()).await;
    // New requests meanwhile go to b.
    let b_before = started(&b.url()).await;
    let fresh =
        futures::future::join_all((100..104).map(|i| complete(&coordinator.http, body(i, 4))))
            .await;
    for (status, v) in &fresh {
        assert_eq!(*status, 200, "{v}");
    }
    assert_eq!(
        started(&b.url()).await - b_before,
        4,
        "new requests went to b"
    );
    if let Some(h) = health(&a.url()).await {
        assert_eq!(
            h.sequences_started, a_started,
            "no new sequence started on the draining a"
        );
        assert!(h.draining);
    }
    // a's sequences run to their end; the record goes only after that.
    let mut last_running = Instant::now();
    while let Some(h) = health(&a.url()).await {
        if h.num_running > 0 {
            last_running = Instant::now();
        }
        if observer.state("a").is_none() {
            assert_eq!(
                h.num_running, 0,
                "the record disappeared while a still ran sequences"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a.proc.wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "a exits 0"
    );
    let deleted = observer
        .seen(|e| *e == MembershipEvent::Delete("a".into()))
        .expect("a's record was deleted");
    assert!(
        deleted >= last_running,
        "deleted before a's sequences finished"
    );
    let results = run.await.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(results.iter().all(|r| !r.as_ref().unwrap().is_empty()));
    let migrations = metric_sum(&coordinator.http, "shardline_request_migrations_total").await;
    assert_eq!(migrations, 0.0, "a drained: nothing had to move");
}

/// (4) etcd down for 10 s under load: nothing fails, everything re-registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_under_load_changes_nothing() {
    let _serial = serial().await;
    let mut etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let (mut a, mut b) = (start_worker(&etcd, "a", &[]), start_worker(&etcd, "b", &[]));
    observer.wait_ready(&mut [&mut a, &mut b]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 2).await;

    let load = Load::start(&coordinator.http, 3, 8);
    load.wait_done(3).await;
    etcd.stop().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = load.done.load(Ordering::Relaxed);
    etcd.restart().await;
    until!(Duration::from_secs(20), "both records back in etcd", {
        (lease_records(&etcd).len() == 2).then_some(())
    });
    a.proc.assert_running();
    b.proc.assert_running();
    let served = load.finish().await;
    assert!(
        served > during.min(3),
        "requests were served during the outage"
    );
    // The coordinator still routes to both.
    let (sa, sb) = (started(&a.url()).await, started(&b.url()).await);
    // Prompts the load never sent: no prefix-cache affinity to either group.
    let results = streams(&coordinator.http, 500, 8, 4, Arc::default()).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (da, db) = (started(&a.url()).await - sa, started(&b.url()).await - sb);
    assert!(
        da > 0 && db > 0,
        "both groups still get requests after the outage (a: {da}, b: {db})"
    );
    assert_eq!(
        metric_sum(&coordinator.http, "shardline_request_migrations_total").await,
        0.0
    );
}

/// (5) A worker that joins under load gets requests within 2 s of registering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_worker_gets_requests_within_two_seconds() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    let mut a = start_worker(&etcd, "a", &[]);
    observer.wait_ready(&mut [&mut a]).await;
    let coordinator = start_coordinator(&etcd, "coordinator", 1).await;
    let load = Load::open(&coordinator.http, Duration::from_millis(400), 24, 2);
    load.wait_done(4).await;

    let mut b = start_worker(&etcd, "b", &[]);
    observer.wait_ready(&mut [&mut b]).await;
    let registered = observer
        .seen(|e| matches!(e, MembershipEvent::Put(r) if r.group_id == "b"))
        .expect("b's Put was seen");
    // The coordinator counts prompt tokens per group when it sends a step: the first
    // request it sends to b. (b's Health would lag: it answers between steps, and a
    // fresh worker's first step is slow.)
    let first = until!(Duration::from_secs(10), "b to get a request", {
        let sent = metric_sum(
            &coordinator.http,
            "shardline_prompt_tokens_total{group=\"b\"}",
        )
        .await;
        (sent > 0.0).then(Instant::now)
    });
    load.finish().await;
    assert!(started(&b.url()).await > 0, "b ran the requests it got");
    let after = first.duration_since(registered);
    assert!(
        after <= Duration::from_secs(2),
        "b got its first request {after:?} after registering"
    );
}

/// (6) Two coordinators share one small worker group whose KV cache cannot hold what
/// they start together: the worker, the authority on its blocks, refuses or preempts, and
/// no request is lost, duplicated or changed — every text equals the request run alone,
/// and every block is free afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_small_group_without_losing_a_request() {
    let _serial = serial().await;
    let etcd = EtcdServer::start().await;
    let observer = Observer::start(&etcd).await;
    // Prompt (~16 tokens) + 24 new tokens fill 3 blocks of 16; 24 blocks hold 8 such
    // sequences, and each coordinator alone starts more.
    let mut w = start_worker(&etcd, "w", &["--kv-blocks", "24"]);
    observer.wait_ready(&mut [&mut w]).await;
    let c1 = start_coordinator(&etcd, "coordinator-1", 1).await;
    let c2 = start_coordinator(&etcd, "coordinator-2", 1).await;
    let n = 24;
    let mut alone = Vec::new();
    for i in 0..n {
        let (status, v) = complete(&c1.http, body(i, 24)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let all = (0..n).map(|i| {
        let http = if i % 2 == 0 {
            c1.http.clone()
        } else {
            c2.http.clone()
        };
        tokio::spawn(async move { complete(&http, body(i, 24)).await })
    });
    let results: Vec<_> = futures::future::join_all(all)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for (i, (status, v)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
        assert_eq!(v["choices"][0]["text"], alone[i].as_str(), "request {i}");
    }
    let h = health(&w.url()).await.unwrap();
    assert!(
        h.sequences_started >= 2 * n as u64,
        "every request started at least once: {h:?}"
    );
    assert_eq!(h.num_running, 0, "{h:?}");
    assert_eq!(h.kv_blocks_free, 24, "every block is free again: {h:?}");
}
