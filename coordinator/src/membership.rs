//! Feeds the [`GroupSet`] from the cluster membership (`--etcd`): every `READY` group
//! registered under the prefix is added by its advertised address, a `DRAINING` one stops
//! receiving new requests (its running sequences finish there), and a group whose record
//! is deleted (lease revoked or expired) or that restarted under the same id is removed —
//! its requests continue on other groups with their prompt plus the tokens already sent
//! (migration, in [`groups`](crate::groups)).
//!
//! While etcd is unreachable the watch emits nothing, so the last known groups keep
//! serving; a group that really died meanwhile is found by its failing step RPCs, its
//! requests migrate at once, and it is not dialled again until its record is written
//! again (re-registration). See `proto/MEMBERSHIP.md`.

use std::collections::HashMap;

use shardline_membership::{Membership, MembershipView, ViewChange};
use shardline_proto::v1::{WorkerRecord, WorkerState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::groups::GroupSet;

/// Starts following `membership` until `shutdown`.
pub fn spawn(
    membership: Membership,
    groups: GroupSet,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(follow(membership, groups, shutdown))
}

/// What the coordinator did with the last record of each group.
#[derive(Debug, Default)]
struct Applied {
    /// group id → address it was added under.
    addresses: HashMap<String, String>,
}

impl Applied {
    fn add(&mut self, groups: &GroupSet, record: &WorkerRecord) {
        let draining = record.state == WorkerState::Draining as i32;
        tracing::info!(group = %record.group_id, address = %record.address, draining, "group registered");
        self.addresses
            .insert(record.group_id.clone(), record.address.clone());
        groups.set_draining(&record.address, draining);
        // No reconnect loop: a group whose step RPCs fail is dead until it registers
        // again (a new record version or process), see `Updated` / `Restarted`.
        groups.add_with(&record.address, false);
    }

    fn remove(&mut self, groups: &GroupSet, group_id: &str, why: &str) {
        if let Some(address) = self.addresses.remove(group_id) {
            tracing::warn!(group = %group_id, %address, why, "group left the membership; its requests move to other groups");
            groups.remove(&address);
            groups.set_draining(&address, false);
        }
    }

    fn apply(&mut self, groups: &GroupSet, view: &MembershipView, change: ViewChange) {
        match change {
            ViewChange::Added(id) => {
                if let Some(record) = view.get(&id) {
                    self.add(groups, record);
                }
            }
            ViewChange::Updated(id) => {
                if let Some(record) = view.get(&id) {
                    let draining = record.state == WorkerState::Draining as i32;
                    if draining {
                        tracing::info!(group = %id, "group is draining: no new requests go there");
                    }
                    groups.set_draining(&record.address, draining);
                    // A rewrite (re-registration after a lost lease, drain) brings back a
                    // group declared dead meanwhile; a no-op while it is still served.
                    groups.add_with(&record.address, false);
                }
            }
            ViewChange::Restarted(id) => {
                self.remove(groups, &id, "restarted");
                if let Some(record) = view.get(&id) {
                    self.add(groups, record);
                }
            }
            ViewChange::Removed(id) => self.remove(groups, &id, "record deleted"),
            ViewChange::Synced => {
                tracing::info!(
                    groups = view.len(),
                    ready = view.ready().count(),
                    "membership synced"
                )
            }
            ViewChange::Unchanged => {}
        }
    }
}

async fn follow(membership: Membership, groups: GroupSet, shutdown: CancellationToken) {
    let mut watch = membership.watch(&shutdown);
    let mut view = MembershipView::new();
    let mut applied = Applied::default();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = watch.recv() => e,
        };
        let Some(event) = event else { return };
        let change = view.apply(event);
        applied.apply(&groups, &view, change);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use shardline_membership::DEFAULT_LEASE_TTL;

    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn record(id: &str, address: &str) -> WorkerRecord {
        WorkerRecord {
            group_id: id.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    async fn wait_for(groups: &GroupSet, want: &[&str]) {
        for _ in 0..500 {
            let mut have = groups.addresses();
            have.sort();
            if have == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("groups never became {want:?}: {:?}", groups.addresses());
    }

    #[tokio::test]
    async fn registrations_add_drain_and_remove_groups() {
        let shutdown = CancellationToken::new();
        let groups = GroupSet::new(
            Arc::new(Config::default()),
            Metrics::new(),
            shutdown.clone(),
        );
        let membership = Membership::in_memory();
        let _task = spawn(membership.clone(), groups.clone(), shutdown.clone());

        // Nothing listens on these ports: groups are added (connecting) but never ready.
        let a = membership
            .register(record("a", "http://127.0.0.1:1"), DEFAULT_LEASE_TTL)
            .unwrap();
        let b = membership
            .register(record("b", "http://127.0.0.1:2"), DEFAULT_LEASE_TTL)
            .unwrap();
        wait_for(&groups, &["http://127.0.0.1:1", "http://127.0.0.1:2"]).await;

        a.set_state(WorkerState::Draining);
        for _ in 0..500 {
            if groups.is_draining("http://127.0.0.1:1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(groups.is_draining("http://127.0.0.1:1"));
        a.deregister().await.unwrap();
        wait_for(&groups, &["http://127.0.0.1:2"]).await;
        assert!(!groups.is_draining("http://127.0.0.1:1"));

        // Same group id from a new process at a new address: the old one is removed.
        let b2 = membership
            .register(
                WorkerRecord {
                    start_time_unix_ms: 7,
                    ..record("b", "http://127.0.0.1:3")
                },
                DEFAULT_LEASE_TTL,
            )
            .unwrap();
        wait_for(&groups, &["http://127.0.0.1:3"]).await;
        drop(b);
        drop(b2);
        shutdown.cancel();
    }
}
