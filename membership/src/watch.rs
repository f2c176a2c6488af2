//! Coordinator side: a stream of membership changes that survives registry outages.
//!
//! The watch task reads the prefix, emits a `Put` per group, then [`MembershipEvent::Synced`],
//! and watches from the read revision + 1, so nothing written after the read is missed.
//! When the watch fails (registry down, stream cut, history compacted) it retries with
//! backoff and *resyncs*: it re-reads the prefix and emits `Put` only for records that
//! changed and `Delete` only for groups that are really gone. While the registry is
//! unreachable nothing is emitted, so consumers keep their last view.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::keys::{self, KeyLayout};
use crate::registry::{KeyValue, Registry, WatchEvent};
use shardline_proto::v1::WorkerRecord;

/// First retry delay after a failed read or watch; doubles up to [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest retry delay, which bounds how long after etcd's return the view is fresh again.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Events buffered for a slow consumer before the watch task waits for it.
const CHANNEL_CAPACITY: usize = 1024;

/// One membership change.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A group appeared or rewrote its record (re-registration, state or capacity change).
    Put(WorkerRecord),
    /// The group's key is gone: lease expired or revoked. Carries the group id.
    Delete(String),
    /// Every event of a (re)read of the prefix has been delivered: the consumer's view now
    /// matches the registry. Sent after the first read and after every resync.
    Synced,
}

/// The event stream returned by [`Membership::watch`](super::Membership::watch). Dropping
/// it stops the watch task.
#[derive(Debug)]
pub struct MembershipWatch {
    events: mpsc::Receiver<MembershipEvent>,
    _stop: DropGuard,
}

impl MembershipWatch {
    /// The next event; `None` only after the watch was stopped.
    pub async fn recv(&mut self) -> Option<MembershipEvent> {
        self.events.recv().await
    }
}

impl Stream for MembershipWatch {
    type Item = MembershipEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

pub(super) fn start(
    registry: Arc<dyn Registry>,
    layout: KeyLayout,
    shutdown: CancellationToken,
) -> MembershipWatch {
    let (tx, events) = mpsc::channel(CHANNEL_CAPACITY);
    let stop = shutdown.child_token();
    let task = Watcher {
        registry,
        layout,
        tx,
        known: HashMap::new(),
    };
    tokio::spawn(task.run(stop.clone()));
    MembershipWatch {
        events,
        _stop: stop.drop_guard(),
    }
}

/// The consumer went away; the task ends.
struct Closed;

struct Watcher {
    registry: Arc<dyn Registry>,
    layout: KeyLayout,
    tx: mpsc::Sender<MembershipEvent>,
    /// Groups the consumer was told about, with the revision of the record it got.
    known: HashMap<String, i64>,
}

impl Watcher {
    async fn run(mut self, stop: CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => {}
            Err(Closed) = self.watch_forever() => {}
        }
    }

    async fn watch_forever(&mut self) -> Result<(), Closed> {
        let prefix = self.layout.workers_prefix();
        let mut backoff = RETRY_INITIAL;
        let mut failing = false;
        loop {
            let snapshot = match self.registry.get_prefix(prefix.clone()).await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "membership read failed; keeping the last view and retrying");
                    }
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            self.resync(&snapshot.kvs).await?;
            let mut stream = match self
                .registry
                .watch_prefix(prefix.clone(), snapshot.revision + 1)
                .await
            {
                Ok(stream) => stream,
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "membership watch failed; retrying");
                    }
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            if failing {
                tracing::info!(
                    groups = self.known.len(),
                    "membership watch resumed after resync"
                );
            }
            backoff = RETRY_INITIAL;
            tracing::debug!(revision = snapshot.revision, "watching {prefix}");
            loop {
                match stream.next().await {
                    Some(Ok(batch)) => {
                        for event in batch {
                            self.apply(event).await?;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "membership watch lost; resyncing");
                        break;
                    }
                    None => {
                        tracing::warn!("membership watch ended; resyncing");
                        break;
                    }
                }
            }
            failing = true;
            tokio::time::sleep(backoff).await;
        }
    }

    async fn send(&self, event: MembershipEvent) -> Result<(), Closed> {
        self.tx.send(event).await.map_err(|_| Closed)
    }

    /// Brings the consumer from `known` to the snapshot's content, then says `Synced`.
    async fn resync(&mut self, kvs: &[KeyValue]) -> Result<(), Closed> {
        let mut present = HashMap::new();
        for kv in kvs {
            let Some((group_id, record)) = self.parse(kv) else {
                continue;
            };
            present.insert(group_id.clone(), kv.mod_revision);
            if self.known.get(&group_id) != Some(&kv.mod_revision) {
                self.send(MembershipEvent::Put(record)).await?;
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|group_id| !present.contains_key(*group_id))
            .cloned()
            .collect();
        for group_id in gone {
            tracing::info!(%group_id, "group gone while the watch was down");
            self.send(MembershipEvent::Delete(group_id)).await?;
        }
        self.known = present;
        self.send(MembershipEvent::Synced).await
    }

    async fn apply(&mut self, event: WatchEvent) -> Result<(), Closed> {
        match event {
            WatchEvent::Put(kv) => match self.parse(&kv) {
                Some((group_id, record)) => {
                    self.known.insert(group_id, kv.mod_revision);
                    self.send(MembershipEvent::Put(record)).await?;
                }
                // An unreadable record makes the group unusable: drop it if we had it.
                None => {
                    if let Some(group_id) = self.layout.group_id_of(&kv.key)
                        && self.known.remove(&group_id).is_some()
                    {
                        self.send(MembershipEvent::Delete(group_id)).await?;
                    }
                }
            },
            WatchEvent::Delete { key, .. } => {
                if let Some(group_id) = self.layout.group_id_of(&key)
                    && self.known.remove(&group_id).is_some()
                {
                    self.send(MembershipEvent::Delete(group_id)).await?;
                }
            }
        }
        Ok(())
    }

    /// The group and record a key holds; `None` (logged) for anything that is not a valid
    /// worker record of this layout.
    fn parse(&self, kv: &KeyValue) -> Option<(String, WorkerRecord)> {
        let Some(group_id) = self.layout.group_id_of(&kv.key) else {
            tracing::warn!(key = %kv.key, "ignoring a key that is not a worker record");
            return None;
        };
        let mut record = match keys::decode_record(&kv.value) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(key = %kv.key, %error, "ignoring a malformed worker record");
                return None;
            }
        };
        if record.group_id.is_empty() {
            record.group_id.clone_from(&group_id);
        } else if record.group_id != group_id {
            tracing::warn!(key = %kv.key, record_group = %record.group_id, "ignoring a record stored under another group's key");
            return None;
        }
        Some((group_id, record))
    }
}
