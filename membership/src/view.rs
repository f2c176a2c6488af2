//! The coordinator's current membership, folded from [`MembershipEvent`]s.
//!
//! Pure state: no I/O, no clock. Feed it every event of a [`MembershipWatch`](super::MembershipWatch)
//! and act on the returned [`ViewChange`].

use std::collections::BTreeMap;

use crate::watch::MembershipEvent;
use shardline_proto::v1::{WorkerRecord, WorkerState};

/// What one event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// A group the view did not hold.
    Added(String),
    /// A held group's record changed (state, capacity, version) within the same process.
    Updated(String),
    /// The group id is now served by another process (start time or address changed):
    /// every sequence the old process held is gone and must be migrated. A fast restart
    /// re-registers before the old lease expires, so no `Removed` comes first.
    Restarted(String),
    Removed(String),
    /// The view is complete (first read or a resync done).
    Synced,
    /// Nothing changed (same record again, or a delete of an unknown group).
    Unchanged,
}

/// `group_id → WorkerRecord` as last reported by the registry.
#[derive(Debug, Clone, Default)]
pub struct MembershipView {
    groups: BTreeMap<String, WorkerRecord>,
    synced: bool,
}

impl MembershipView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event into the view.
    pub fn apply(&mut self, event: MembershipEvent) -> ViewChange {
        match event {
            MembershipEvent::Put(record) => {
                let group_id = record.group_id.clone();
                match self.groups.insert(group_id.clone(), record.clone()) {
                    None => ViewChange::Added(group_id),
                    Some(old) if old == record => ViewChange::Unchanged,
                    Some(old)
                        if old.start_time_unix_ms != record.start_time_unix_ms
                            || old.address != record.address =>
                    {
                        ViewChange::Restarted(group_id)
                    }
                    Some(_) => ViewChange::Updated(group_id),
                }
            }
            MembershipEvent::Delete(group_id) => match self.groups.remove(&group_id) {
                Some(_) => ViewChange::Removed(group_id),
                None => ViewChange::Unchanged,
            },
            MembershipEvent::Synced => {
                self.synced = true;
                ViewChange::Synced
            }
        }
    }

    /// The record of one group.
    pub fn get(&self, group_id: &str) -> Option<&WorkerRecord> {
        self.groups.get(group_id)
    }

    /// Every known group, ordered by id.
    pub fn groups(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.groups.values()
    }

    /// Groups that take new sequences (state `READY`), ordered by id.
    pub fn ready(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.groups
            .values()
            .filter(|record| record.state() == WorkerState::Ready)
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a full read of the registry has been applied at least once.
    pub fn is_synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: WorkerState, version: u64) -> WorkerRecord {
        WorkerRecord {
            group_id: id.into(),
            state: state as i32,
            version,
            ..WorkerRecord::default()
        }
    }

    #[test]
    fn puts_add_then_update_and_repeats_are_unchanged() {
        let mut view = MembershipView::new();
        let a1 = record("a", WorkerState::Ready, 1);
        assert_eq!(
            view.apply(MembershipEvent::Put(a1.clone())),
            ViewChange::Added("a".into())
        );
        assert_eq!(view.apply(MembershipEvent::Put(a1)), ViewChange::Unchanged);
        let a2 = record("a", WorkerState::Draining, 2);
        assert_eq!(
            view.apply(MembershipEvent::Put(a2.clone())),
            ViewChange::Updated("a".into())
        );
        assert_eq!(view.get("a"), Some(&a2));
        assert_eq!(view.len(), 1);
    }

    #[test]
    fn a_new_start_time_or_address_is_a_restart() {
        let mut view = MembershipView::new();
        view.apply(MembershipEvent::Put(record("a", WorkerState::Ready, 3)));
        let mut again = record("a", WorkerState::Ready, 1);
        again.start_time_unix_ms = 42;
        let change = view.apply(MembershipEvent::Put(again.clone()));
        assert_eq!(change, ViewChange::Restarted("a".into()));
        again.address = "http://elsewhere:1".into();
        let change = view.apply(MembershipEvent::Put(again));
        assert_eq!(change, ViewChange::Restarted("a".into()));
    }

    #[test]
    fn ready_excludes_draining_groups() {
        let mut view = MembershipView::new();
        view.apply(MembershipEvent::Put(record("a", WorkerState::Ready, 1)));
        view.apply(MembershipEvent::Put(record("b", WorkerState::Draining, 1)));
        let ready: Vec<&str> = view.ready().map(|r| r.group_id.as_str()).collect();
        assert_eq!(ready, vec!["a"]);
        assert_eq!(view.groups().count(), 2);
    }

    #[test]
    fn deletes_remove_and_unknown_deletes_are_unchanged() {
        let mut view = MembershipView::new();
        assert!(!view.is_synced());
        view.apply(MembershipEvent::Put(record("a", WorkerState::Ready, 1)));
        assert_eq!(view.apply(MembershipEvent::Synced), ViewChange::Synced);
        assert!(view.is_synced());
        assert_eq!(
            view.apply(MembershipEvent::Delete("x".into())),
            ViewChange::Unchanged
        );
        assert_eq!(
            view.apply(MembershipEvent::Delete("a".into())),
            ViewChange::Removed("a".into())
        );
        assert!(view.is_empty());
    }
}
