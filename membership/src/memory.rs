//! An in-process [`Registry`] with etcd's semantics, for `shardline up` and tests.
//!
//! Leases expire when keep-alives stop (a reaper task sleeps until the next deadline, so
//! `tokio::time::pause()` drives it), watches see every change from a revision on, and
//! [`MemoryRegistry::set_available`] simulates an etcd outage: while "down" every call fails
//! with [`RegistryError::Unavailable`], open watches end with an error and no lease expires;
//! on recovery every lease gets its full TTL back, as etcd does after a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::registry::{
    KeyValue, LeaseId, Registry, RegistryError, Snapshot, WatchEvent, WatchEvents, ttl_secs,
};

/// Events kept for watches that start in the past; older ones count as compacted.
const HISTORY_LIMIT: usize = 10_000;

/// A cloneable handle on one in-memory store; clones share it.
#[derive(Clone)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
    /// Wakes the reaper when a deadline moved earlier (grant) or leases changed.
    reaper_wake: Arc<Notify>,
}

type WatchSender = mpsc::UnboundedSender<Result<Vec<WatchEvent>, RegistryError>>;

struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: WatchSender,
}

#[derive(Default)]
struct State {
    revision: i64,
    kvs: BTreeMap<String, Stored>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Every change, oldest first; `compacted` is the newest revision dropped from it.
    history: Vec<WatchEvent>,
    compacted: i64,
    watchers: Vec<Watcher>,
    down: bool,
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryRegistry")
            .field("revision", &state.revision)
            .field("keys", &state.kvs.len())
            .field("leases", &state.leases.len())
            .field("down", &state.down)
            .finish()
    }
}

impl MemoryRegistry {
    /// An empty store. Must be called inside a Tokio runtime (it spawns the lease reaper,
    /// which ends when the last clone is dropped).
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State {
            next_lease: 0x1000,
            ..State::default()
        }));
        let reaper_wake = Arc::new(Notify::new());
        tokio::spawn(reap(Arc::downgrade(&state), reaper_wake.clone()));
        Self { state, reaper_wake }
    }

    /// Simulates etcd going down (`false`) or coming back (`true`).
    pub fn set_available(&self, available: bool) {
        let mut state = self.lock();
        if available && state.down {
            let now = Instant::now();
            for lease in state.leases.values_mut() {
                lease.deadline = now + lease.ttl;
            }
        }
        if !available && !state.down {
            for watcher in state.watchers.drain(..) {
                let _ = watcher
                    .tx
                    .send(Err(RegistryError::Unavailable("registry stopped".into())));
            }
        }
        state.down = !available;
        drop(state);
        self.reaper_wake.notify_one();
    }

    /// Ends every open watch with an error while the store stays up, as a network blip
    /// between a watcher and etcd does; watchers must resync.
    pub fn cut_watches(&self) {
        for watcher in self.lock().watchers.drain(..) {
            let _ = watcher
                .tx
                .send(Err(RegistryError::Unavailable("watch cut".into())));
        }
    }

    /// The lease a key is attached to (0: none), `None` when the key does not exist.
    pub fn lease_of(&self, key: &str) -> Option<LeaseId> {
        self.lock().kvs.get(key).map(|stored| stored.lease)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this file; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_state<T>(
        &self,
        op: impl FnOnce(&mut State) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut state = self.lock();
        if state.down {
            return Err(RegistryError::Unavailable("registry stopped".into()));
        }
        let result = op(&mut state);
        drop(state);
        self.reaper_wake.notify_one();
        result
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn record(&mut self, event: WatchEvent) {
        let key = match &event {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        };
        self.watchers.retain(|watcher| {
            !key.starts_with(&watcher.prefix) || watcher.tx.send(Ok(vec![event.clone()])).is_ok()
        });
        self.history.push(event);
        if self.history.len() > HISTORY_LIMIT {
            let dropped: Vec<_> = self.history.drain(..HISTORY_LIMIT / 2).collect();
            self.compacted = dropped.last().map_or(self.compacted, revision_of);
        }
    }

    fn delete_key(&mut self, key: &str) {
        if self.kvs.remove(key).is_some() {
            self.revision += 1;
            let mod_revision = self.revision;
            self.record(WatchEvent::Delete {
                key: key.to_owned(),
                mod_revision,
            });
        }
    }

    fn drop_lease(&mut self, id: LeaseId) {
        if let Some(lease) = self.leases.remove(&id) {
            for key in lease.keys {
                self.delete_key(&key);
            }
        }
    }
}

fn revision_of(event: &WatchEvent) -> i64 {
    match event {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

/// Expires leases whose deadline passed; sleeps until the next deadline otherwise.
async fn reap(state: Weak<Mutex<State>>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(state) = state.upgrade() else { return };
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if state.down {
                None
            } else {
                let now = Instant::now();
                let expired: Vec<LeaseId> = state
                    .leases
                    .iter()
                    .filter(|(_, lease)| lease.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    tracing::debug!(
                        lease = format_args!("{id:#x}"),
                        "memory registry: lease expired"
                    );
                    state.drop_lease(id);
                }
                state.leases.values().map(|lease| lease.deadline).min()
            }
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl Registry for MemoryRegistry {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, RegistryError>> {
        let result = self.with_state(|state| {
            let ttl = Duration::from_secs(ttl_secs(ttl) as u64);
            state.next_lease += 1;
            let id = state.next_lease;
            state.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            Ok(id)
        });
        async move { result }.boxed()
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>> {
        let result = self.with_state(|state| match state.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(RegistryError::LeaseNotFound(lease)),
        });
        async move { result }.boxed()
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>> {
        let result = self.with_state(|state| {
            state.drop_lease(lease);
            Ok(())
        });
        async move { result }.boxed()
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'_, Result<i64, RegistryError>> {
        let result = self.with_state(|state| {
            if lease != 0 && !state.leases.contains_key(&lease) {
                return Err(RegistryError::LeaseNotFound(lease));
            }
            if let Some(old) = state.kvs.get(&key)
                && old.lease != lease
                && let Some(old_lease) = state.leases.get_mut(&old.lease)
            {
                old_lease.keys.remove(&key);
            }
            if let Some(l) = state.leases.get_mut(&lease) {
                l.keys.insert(key.clone());
            }
            state.revision += 1;
            let mod_revision = state.revision;
            state.kvs.insert(
                key.clone(),
                Stored {
                    value: value.clone(),
                    mod_revision,
                    lease,
                },
            );
            state.record(WatchEvent::Put(KeyValue {
                key,
                value,
                mod_revision,
                lease,
            }));
            Ok(mod_revision)
        });
        async move { result }.boxed()
    }

    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Snapshot, RegistryError>> {
        let result = self.with_state(|state| {
            let kvs = state
                .kvs
                .range(prefix.clone()..)
                .take_while(|(key, _)| key.starts_with(&prefix))
                .map(|(key, stored)| KeyValue {
                    key: key.clone(),
                    value: stored.value.clone(),
                    mod_revision: stored.mod_revision,
                    lease: stored.lease,
                })
                .collect();
            Ok(Snapshot {
                kvs,
                revision: state.revision,
            })
        });
        async move { result }.boxed()
    }

    fn watch_prefix(
        &self,
        prefix: String,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<WatchEvents, RegistryError>> {
        let result = self.with_state(|state| {
            if start_revision <= state.compacted {
                return Err(RegistryError::Compacted(state.compacted + 1));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let past: Vec<WatchEvent> = state
                .history
                .iter()
                .filter(|event| revision_of(event) >= start_revision)
                .filter(|event| match event {
                    WatchEvent::Put(kv) => kv.key.starts_with(&prefix),
                    WatchEvent::Delete { key, .. } => key.starts_with(&prefix),
                })
                .cloned()
                .collect();
            if !past.is_empty() {
                let _ = tx.send(Ok(past));
            }
            state.watchers.push(Watcher { prefix, tx });
            Ok(UnboundedReceiverStream::new(rx).boxed())
        });
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leased_keys_expire_without_keep_alive() {
        let registry = MemoryRegistry::new();
        let lease = registry.grant(Duration::from_secs(2)).await.unwrap();
        registry
            .put("/k".into(), b"v".to_vec(), lease)
            .await
            .unwrap();
        let mut watch = registry.watch_prefix("/".into(), 1).await.unwrap();
        assert!(matches!(
            &watch.next().await.unwrap().unwrap()[0],
            WatchEvent::Put(_)
        ));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        registry.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(registry.get_prefix("/".into()).await.unwrap().kvs.len(), 1);
        let events = watch.next().await.unwrap().unwrap();
        assert!(matches!(&events[0], WatchEvent::Delete { key, .. } if key == "/k"));
        assert_eq!(
            registry.keep_alive(lease).await,
            Err(RegistryError::LeaseNotFound(lease))
        );
        assert!(
            registry
                .get_prefix("/".into())
                .await
                .unwrap()
                .kvs
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outage_fails_calls_ends_watches_and_refreshes_leases() {
        let registry = MemoryRegistry::new();
        let lease = registry.grant(Duration::from_secs(2)).await.unwrap();
        registry.put("/k".into(), vec![], lease).await.unwrap();
        let mut watch = registry.watch_prefix("/".into(), 2).await.unwrap();
        registry.set_available(false);
        assert!(matches!(
            watch.next().await,
            Some(Err(RegistryError::Unavailable(_)))
        ));
        assert!(matches!(
            registry.get_prefix("/".into()).await,
            Err(RegistryError::Unavailable(_))
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        registry.set_available(true);
        assert_eq!(registry.lease_of("/k"), Some(lease));
        assert!(registry.keep_alive(lease).await.is_ok());
    }

    #[tokio::test]
    async fn put_moves_a_key_between_leases_and_revoke_deletes() {
        let registry = MemoryRegistry::new();
        let old = registry.grant(Duration::from_secs(5)).await.unwrap();
        let new = registry.grant(Duration::from_secs(5)).await.unwrap();
        registry.put("/k".into(), vec![1], old).await.unwrap();
        registry.put("/k".into(), vec![2], new).await.unwrap();
        registry.revoke(old).await.unwrap();
        assert_eq!(registry.lease_of("/k"), Some(new));
        registry.revoke(new).await.unwrap();
        assert_eq!(registry.lease_of("/k"), None);
        assert_eq!(
            registry.put("/k".into(), vec![], new).await,
            Err(RegistryError::LeaseNotFound(new))
        );
    }

    #[tokio::test]
    async fn watch_from_a_past_revision_replays_history() {
        let registry = MemoryRegistry::new();
        for i in 0..3u8 {
            registry.put(format!("/p/{i}"), vec![i], 0).await.unwrap();
        }
        registry.put("/q/x".into(), vec![], 0).await.unwrap();
        let mut watch = registry.watch_prefix("/p/".into(), 2).await.unwrap();
        let events = watch.next().await.unwrap().unwrap();
        let revisions: Vec<i64> = events.iter().map(revision_of).collect();
        assert_eq!(revisions, vec![2, 3]);
    }
}
