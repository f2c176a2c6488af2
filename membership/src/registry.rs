//! The storage boundary: the few etcd operations membership needs, as a mockable trait.
//!
//! [`Registry`] is deliberately low level (leases, puts, prefix reads, prefix watches) so
//! the lifecycle logic in `register` and `watch` is written once and runs unchanged over
//! [`EtcdRegistry`](super::EtcdRegistry) and [`MemoryRegistry`](super::MemoryRegistry).

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// An etcd lease id (etcd's own `int64`).
pub type LeaseId = i64;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key.
    pub mod_revision: i64,
    /// Lease the key is attached to; 0 for none.
    pub lease: LeaseId,
}

/// A consistent read of a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub kvs: Vec<KeyValue>,
    /// Store revision the read saw; a watch from `revision + 1` misses nothing after it.
    pub revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// The key was deleted or its lease expired / was revoked.
    Delete {
        key: String,
        mod_revision: i64,
    },
}

/// Batches of events in revision order. The stream ending, or yielding an error, means the
/// watch is gone; the caller re-reads and watches again.
pub type WatchEvents = BoxStream<'static, Result<Vec<WatchEvent>, RegistryError>>;

/// Why a registry operation failed, classified once so callers only decide "retry" or
/// "start over".
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The store did not answer (down, unreachable, timed out); retry later.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The lease expired or was revoked; grant a new one.
    #[error("lease {0:#x} not found")]
    LeaseNotFound(LeaseId),
    /// The watch start revision was compacted away; re-read the prefix.
    #[error("revision compacted (oldest available {0})")]
    Compacted(i64),
    /// The request itself was wrong (bad endpoint, bad TTL); retrying will not help.
    #[error("invalid registry request: {0}")]
    Invalid(String),
}

/// The store membership runs on: etcd in production, memory for `shardline up` and tests.
///
/// Semantics every implementation keeps (they are etcd's):
/// - a key put under a lease disappears (with a watch `Delete`) when the lease is revoked
///   or when no keep-alive arrived for its TTL;
/// - every write bumps one store-wide revision; a watch from revision `r` delivers every
///   change with revision `>= r`, in order.
pub trait Registry: Send + Sync + std::fmt::Debug + 'static {
    /// Grants a lease of `ttl` (rounded up to whole seconds).
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, RegistryError>>;
    /// Refreshes the lease once (back to its full TTL);
    /// [`RegistryError::LeaseNotFound`] when it is gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// Revokes the lease, deleting its keys at once. Revoking an unknown lease is `Ok`.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>>;
    /// Writes `key` attached to `lease` (0: no lease); returns the write's revision.
    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'_, Result<i64, RegistryError>>;
    /// Reads every key starting with `prefix`.
    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Snapshot, RegistryError>>;
    /// Watches every key starting with `prefix`, from `start_revision` on.
    fn watch_prefix(
        &self,
        prefix: String,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<WatchEvents, RegistryError>>;
}

/// Whole seconds, at least 1, as etcd leases take them.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}
