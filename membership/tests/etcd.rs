//! Membership against a real etcd (Debian's `etcd` 3.4, started per test on free ports):
//! leases visible to `etcdctl`, expiry, deregistration, an etcd outage longer than the TTL,
//! lease loss, watch completeness under concurrent writes, and draining.

use std::time::Duration;

use shardline_membership::{
    EtcdRegistry, Membership, MembershipEvent, MembershipView, MembershipWatch, RegistrationStatus,
    Registry, keys,
};
use shardline_proto::v1::{WorkerCapacity, WorkerRecord, WorkerState};
use shardline_tests::etcd::EtcdServer;
use tokio_util::sync::CancellationToken;

/// etcd 3.4's minimum lease TTL; keeps the expiry tests short.
const TTL: Duration = Duration::from_secs(2);
/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(20);

fn record(group_id: &str) -> WorkerRecord {
    WorkerRecord {
        group_id: group_id.into(),
        address: format!("http://{group_id}.local:50051"),
        model: "smollm2-135m".into(),
        tp: 1,
        capacity: Some(WorkerCapacity {
            kv_blocks_total: 64,
            kv_block_size: 16,
            max_num_seqs: 8,
            context_length: 2048,
        }),
        ..WorkerRecord::default()
    }
}

async fn membership(etcd: &EtcdServer) -> Membership {
    Membership::etcd(&[etcd.endpoint()], "/shardline")
        .await
        .expect("connect to etcd")
}

async fn next_event(watch: &mut MembershipWatch, within: Duration) -> Option<MembershipEvent> {
    tokio::time::timeout(within, watch.recv())
        .await
        .ok()
        .flatten()
}

async fn until_synced(watch: &mut MembershipWatch) -> Vec<MembershipEvent> {
    let mut events = Vec::new();
    loop {
        match next_event(watch, PATIENCE).await {
            Some(MembershipEvent::Synced) => return events,
            Some(event) => events.push(event),
            None => panic!("no Synced from the watch; got {events:?}"),
        }
    }
}

/// Waits for the first event matching `want`, failing with what came instead.
async fn expect_event(
    watch: &mut MembershipWatch,
    what: &str,
    want: impl Fn(&MembershipEvent) -> bool,
) -> MembershipEvent {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(watch, left).await {
            Some(event) if want(&event) => return event,
            Some(event) => seen.push(event),
            None => panic!("no {what} within {PATIENCE:?}; saw {seen:?}"),
        }
    }
}

/// `(key, lease)` of every worker key, as `etcdctl get --prefix -w json` reports them.
fn etcdctl_workers(etcd: &EtcdServer) -> Vec<(String, i64)> {
    let json = etcd.etcdctl(&["get", "--prefix", "/shardline/workers/", "--write-out=json"]);
    let value: serde_json::Value = serde_json::from_str(&json).expect("etcdctl json");
    let Some(kvs) = value["kvs"].as_array() else {
        return Vec::new();
    };
    kvs.iter()
        .map(|kv| {
            let key = kv["key"].as_str().expect("key");
            (decode_base64(key), kv["lease"].as_i64().unwrap_or(0))
        })
        .collect()
}

/// etcdctl prints keys base64-encoded; a tiny decoder keeps the deps down.
fn decode_base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in text.bytes().filter(|b| *b != b'=') {
        let value = ALPHABET.iter().position(|a| *a == byte).expect("base64") as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    String::from_utf8(out).expect("utf-8 key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_are_visible_to_the_watch_and_to_etcdctl_with_leases() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    let b = membership.register(record("b"), TTL).unwrap();
    a.wait_registered().await;
    b.wait_registered().await;

    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    let mut view = MembershipView::new();
    for event in until_synced(&mut watch).await {
        view.apply(event);
    }
    let ids: Vec<&str> = view.groups().map(|r| r.group_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(view.get("b").unwrap(), &{
        let mut expected = record("b");
        expected.state = WorkerState::Ready as i32;
        expected.version = 1;
        expected.start_time_unix_ms = view.get("b").unwrap().start_time_unix_ms;
        expected
    });

    let stored = etcdctl_workers(&etcd);
    let keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec!["/shardline/workers/a", "/shardline/workers/b"]);
    assert!(stored.iter().all(|(_, lease)| *lease != 0), "{stored:?}");

    // Keep-alives hold both records well past the TTL.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(etcdctl_workers(&etcd).len(), 2);
    assert_eq!(
        next_event(&mut watch, Duration::from_millis(100)).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_keep_alive_lets_the_key_expire_and_the_watch_sees_delete() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    drop(a); // stops the keep-alive without revoking, like kill -9
    assert_eq!(etcdctl_workers(&etcd).len(), 1, "dropping must not revoke");
    expect_event(&mut watch, "Delete(a)", |e| {
        *e == MembershipEvent::Delete("a".into())
    })
    .await;
    assert!(etcdctl_workers(&etcd).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_removes_the_key_at_once() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership
        .register(record("a"), Duration::from_secs(30))
        .unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    a.deregister().await.unwrap();
    assert!(etcdctl_workers(&etcd).is_empty());
    expect_event(&mut watch, "Delete(a)", |e| {
        *e == MembershipEvent::Delete("a".into())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_longer_than_the_ttl_keeps_the_view_and_the_worker_comes_back() {
    let mut etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    let mut view = MembershipView::new();
    for event in until_synced(&mut watch).await {
        view.apply(event);
    }

    etcd.stop().await;
    // Down for 3 TTLs: the watcher must not invent a Delete.
    let outage_end = tokio::time::Instant::now() + TTL * 3;
    let during_outage = tokio::time::timeout_at(outage_end, watch.recv()).await;
    assert!(
        during_outage.is_err(),
        "event while etcd was down: {during_outage:?}"
    );
    assert_eq!(*a.status().borrow(), RegistrationStatus::Lost);
    assert_eq!(view.len(), 1);
    etcd.restart().await;

    // The worker rewrites its record (a new version) and the watcher resyncs to it.
    let event = expect_event(
        &mut watch,
        "Put(a) with a new version",
        |e| matches!(e, MembershipEvent::Put(r) if r.group_id == "a" && r.version > 1),
    )
    .await;
    view.apply(event);
    assert_eq!(view.len(), 1);
    let stored = etcdctl_workers(&etcd);
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].1, 0);
    let status = tokio::time::timeout(PATIENCE, a.wait_registered()).await;
    assert!(matches!(status, Ok(RegistrationStatus::Registered { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_replaced_and_the_watch_sees_the_group_again() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    let RegistrationStatus::Registered { lease: first, .. } = a.wait_registered().await else {
        panic!("not registered");
    };
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    etcd.etcdctl(&["lease", "revoke", &format!("{first:x}")]);
    expect_event(&mut watch, "Delete(a)", |e| {
        *e == MembershipEvent::Delete("a".into())
    })
    .await;
    expect_event(
        &mut watch,
        "Put(a) again",
        |e| matches!(e, MembershipEvent::Put(r) if r.group_id == "a"),
    )
    .await;
    let stored = etcdctl_workers(&etcd);
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].1, first);
    assert_ne!(stored[0].1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_etcd_registers_when_etcd_comes_up() {
    let mut etcd = EtcdServer::start().await;
    etcd.stop().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    tokio::time::sleep(TTL).await;
    assert_eq!(*a.status().borrow(), RegistrationStatus::Pending);
    etcd.restart().await;
    let status = tokio::time::timeout(PATIENCE, a.wait_registered()).await;
    assert!(matches!(status, Ok(RegistrationStatus::Registered { .. })));
    assert_eq!(etcdctl_workers(&etcd).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_started_during_writes_misses_nothing() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let registry = EtcdRegistry::connect(&[etcd.endpoint()]).await.unwrap();
    let layout = membership.layout().clone();
    let put = move |registry: EtcdRegistry, group: String| {
        let layout = layout.clone();
        async move {
            let record = record(&group);
            let key = layout.worker_key(&group).unwrap();
            registry
                .put(key, keys::encode_record(&record), 0)
                .await
                .unwrap();
        }
    };
    let writer = {
        let registry = registry.clone();
        let put = put.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                put(registry.clone(), format!("g{i:03}")).await;
            }
        })
    };
    // Let some writes land before the initial read, the rest race with it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    writer.await.unwrap();
    put(registry.clone(), "zz-sentinel".into()).await;

    let mut view = MembershipView::new();
    while view.get("zz-sentinel").is_none() {
        let event = next_event(&mut watch, PATIENCE)
            .await
            .expect("watch stalled");
        view.apply(event);
    }
    assert_eq!(view.len(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_propagates_to_the_watch() {
    let etcd = EtcdServer::start().await;
    let membership = membership(&etcd).await;
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    a.set_state(WorkerState::Draining);
    let event = expect_event(
        &mut watch,
        "Put(a) draining",
        |e| matches!(e, MembershipEvent::Put(r) if r.state() == WorkerState::Draining),
    )
    .await;
    let MembershipEvent::Put(draining) = event else {
        unreachable!()
    };
    assert_eq!(draining.version, 2);
    a.deregister().await.unwrap();
}
