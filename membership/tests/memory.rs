//! Membership semantics over `MemoryRegistry`, on paused time: registration, lease expiry,
//! deregistration, outages, lease loss, watch completeness and draining.

use std::time::Duration;

use shardline_membership::{
    Membership, MembershipEvent, MembershipView, MembershipWatch, MemoryRegistry,
    RegistrationStatus, Registry, keys,
};
use shardline_proto::v1::{WorkerCapacity, WorkerRecord, WorkerState};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(3);

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

fn setup() -> (MemoryRegistry, Membership) {
    let registry = MemoryRegistry::new();
    let membership = Membership::new(std::sync::Arc::new(registry.clone()), Default::default());
    (registry, membership)
}

/// The next event, or `None` if none came within `within` (virtual time).
async fn next_event(watch: &mut MembershipWatch, within: Duration) -> Option<MembershipEvent> {
    tokio::time::timeout(within, watch.recv())
        .await
        .ok()
        .flatten()
}

/// Events up to and including the next `Synced`.
async fn until_synced(watch: &mut MembershipWatch) -> Vec<MembershipEvent> {
    let mut events = Vec::new();
    loop {
        let event = next_event(watch, Duration::from_secs(30))
            .await
            .expect("no Synced from the watch");
        if event == MembershipEvent::Synced {
            return events;
        }
        events.push(event);
    }
}

#[tokio::test(start_paused = true)]
async fn two_workers_appear_in_the_snapshot_with_leases() {
    let (registry, membership) = setup();
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
    let a_record = view.get("a").unwrap();
    assert_eq!(a_record.state(), WorkerState::Ready);
    assert_eq!(a_record.version, 1);
    assert!(a_record.start_time_unix_ms > 0);
    for id in ["a", "b"] {
        let lease = registry.lease_of(&format!("/shardline/workers/{id}"));
        assert!(
            matches!(lease, Some(l) if l != 0),
            "{id} has no lease: {lease:?}"
        );
    }
    // Keep-alives hold the records for many TTLs.
    assert_eq!(next_event(&mut watch, TTL * 10).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_registration_expires_after_the_ttl() {
    let (_registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    assert_eq!(until_synced(&mut watch).await.len(), 1);

    let dropped_at = Instant::now();
    drop(a);
    let event = next_event(&mut watch, TTL * 2).await;
    assert_eq!(event, Some(MembershipEvent::Delete("a".into())));
    let lived = dropped_at.elapsed();
    assert!(
        lived >= TTL - TTL / 3 && lived <= TTL,
        "key lived {lived:?} after the last keep-alive"
    );
}

#[tokio::test(start_paused = true)]
async fn deregister_removes_the_record_at_once() {
    let (registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    let started = Instant::now();
    a.deregister().await.unwrap();
    assert_eq!(registry.lease_of("/shardline/workers/a"), None);
    assert_eq!(
        next_event(&mut watch, TTL).await,
        Some(MembershipEvent::Delete("a".into()))
    );
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_ttl_keeps_the_view_and_recovers() {
    let (registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    let mut view = MembershipView::new();
    for event in until_synced(&mut watch).await {
        view.apply(event);
    }

    registry.set_available(false);
    // Ten seconds of outage: the watcher says nothing, so the view keeps "a".
    assert_eq!(next_event(&mut watch, Duration::from_secs(10)).await, None);
    assert_eq!(*a.status().borrow(), RegistrationStatus::Lost);
    registry.set_available(true);

    let mut seen = Vec::new();
    while let Some(event) = next_event(&mut watch, Duration::from_secs(5)).await {
        assert!(
            !matches!(event, MembershipEvent::Delete(_)),
            "spurious {event:?}"
        );
        seen.push(event.clone());
        view.apply(event);
    }
    assert!(
        seen.contains(&MembershipEvent::Synced),
        "no resync: {seen:?}"
    );
    assert!(
        view.get("a").unwrap().version > 1,
        "the worker did not rewrite its record"
    );
    assert!(matches!(
        *a.status().borrow(),
        RegistrationStatus::Registered { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_resync_deletes_only_groups_that_are_really_gone() {
    let (registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    let b = membership.register(record("b"), TTL).unwrap();
    a.wait_registered().await;
    let RegistrationStatus::Registered { lease: b_lease, .. } = b.wait_registered().await else {
        panic!("b not registered");
    };
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    assert_eq!(until_synced(&mut watch).await.len(), 2);

    // b goes away while the watcher is disconnected: only the resync can tell.
    registry.cut_watches();
    drop(b);
    registry.revoke(b_lease).await.unwrap();
    assert_eq!(
        until_synced(&mut watch).await,
        vec![MembershipEvent::Delete("b".into())]
    );
    // a is still watched live after the resync.
    a.set_state(WorkerState::Draining);
    let Some(MembershipEvent::Put(draining)) = next_event(&mut watch, TTL).await else {
        panic!("no live event after the resync");
    };
    assert_eq!(draining.group_id, "a");
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_replaced_by_a_new_one() {
    let (registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    let RegistrationStatus::Registered { lease: first, .. } = a.wait_registered().await else {
        panic!("not registered");
    };
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    registry.revoke(first).await.unwrap();
    assert_eq!(
        next_event(&mut watch, TTL).await,
        Some(MembershipEvent::Delete("a".into()))
    );
    let Some(MembershipEvent::Put(back)) = next_event(&mut watch, TTL).await else {
        panic!("the worker did not re-register");
    };
    assert_eq!(back.group_id, "a");
    let second = registry.lease_of("/shardline/workers/a").unwrap();
    assert_ne!(second, first);
    assert_ne!(second, 0);
}

#[tokio::test(start_paused = true)]
async fn a_worker_started_while_the_registry_is_down_registers_when_it_returns() {
    let (registry, membership) = setup();
    registry.set_available(false);
    let a = membership.register(record("a"), TTL).unwrap();
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(*a.status().borrow(), RegistrationStatus::Pending);
    registry.set_available(true);
    a.wait_registered().await;
    assert!(registry.lease_of("/shardline/workers/a").is_some());
}

#[tokio::test(start_paused = true)]
async fn draining_propagates_with_a_new_version() {
    let (_registry, membership) = setup();
    let a = membership.register(record("a"), TTL).unwrap();
    a.wait_registered().await;
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    until_synced(&mut watch).await;

    a.set_state(WorkerState::Draining);
    let Some(MembershipEvent::Put(draining)) = next_event(&mut watch, TTL).await else {
        panic!("no draining record");
    };
    assert_eq!(draining.state(), WorkerState::Draining);
    assert_eq!(draining.version, 2);
    let mut view = MembershipView::new();
    view.apply(MembershipEvent::Put(draining));
    assert_eq!(view.ready().count(), 0);
}

#[tokio::test]
async fn a_watch_started_during_writes_misses_nothing() {
    let (registry, membership) = setup();
    let layout = membership.layout().clone();
    let writer = {
        let registry = registry.clone();
        let layout = layout.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let record = record(&format!("g{i:03}"));
                let key = layout.worker_key(&record.group_id).unwrap();
                registry
                    .put(key, keys::encode_record(&record), 0)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    writer.await.unwrap();
    let sentinel = record("zz-sentinel");
    let key = layout.worker_key(&sentinel.group_id).unwrap();
    registry
        .put(key, keys::encode_record(&sentinel), 0)
        .await
        .unwrap();

    let mut view = MembershipView::new();
    while view.get("zz-sentinel").is_none() {
        let event = next_event(&mut watch, Duration::from_secs(10))
            .await
            .expect("watch stalled");
        view.apply(event);
    }
    assert_eq!(view.len(), 301);
}

#[tokio::test]
async fn malformed_and_foreign_keys_are_ignored() {
    let (registry, membership) = setup();
    registry
        .put("/shardline/workers/bad".into(), vec![0xff, 0xff, 0xff], 0)
        .await
        .unwrap();
    registry
        .put(
            "/elsewhere/workers/x".into(),
            keys::encode_record(&record("x")),
            0,
        )
        .await
        .unwrap();
    let mismatched = keys::encode_record(&record("other"));
    registry
        .put("/shardline/workers/y".into(), mismatched, 0)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut watch = membership.watch(&shutdown);
    assert_eq!(until_synced(&mut watch).await, vec![]);
    registry
        .put(
            "/shardline/workers/ok".into(),
            keys::encode_record(&record("ok")),
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut watch, Duration::from_secs(10)).await,
        Some(MembershipEvent::Put(record("ok")))
    );
}

#[tokio::test]
async fn bad_registrations_are_errors() {
    let (_registry, membership) = setup();
    assert!(membership.register(record("a/b"), TTL).is_err());
    assert!(membership.register(record(""), TTL).is_err());
    assert!(
        membership
            .register(record("a"), Duration::from_secs(1))
            .is_err()
    );
}
