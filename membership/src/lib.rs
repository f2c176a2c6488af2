//! Cluster membership, shared by workers (who register), simulated workers and
//! coordinators (who watch).
//!
//! - [`keys`]: the key layout `<prefix>/workers/<group-id>` → protobuf
//!   [`WorkerRecord`](shardline_proto::v1::WorkerRecord), and its encoding.
//! - [`Registry`]: the storage boundary (leases, puts, prefix reads and watches) with
//!   [`EtcdRegistry`] for clusters and [`MemoryRegistry`] for `shardline up` and tests.
//! - [`Membership::register`] → [`RegistrationHandle`]: the worker's lease lifecycle.
//! - [`registration`]: the worker's membership flags ([`registration::RegistrationArgs`])
//!   and the three lifecycle points (register, drain, deregister) of a serving group.
//! - [`Membership::watch`] → [`MembershipWatch`] of [`MembershipEvent`]s, folded by
//!   [`MembershipView`]: the coordinator's view.
//!
//! `proto/MEMBERSHIP.md` explains the lifecycle, the outage behaviour and the
//! multi-coordinator design.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), shardline_membership::MembershipError> {
//! use futures::StreamExt;
//! use shardline_membership::{Membership, MembershipEvent, MembershipView, DEFAULT_LEASE_TTL};
//! use shardline_proto::v1::{WorkerRecord, WorkerState};
//! use tokio_util::sync::CancellationToken;
//!
//! // `Membership::etcd(&["http://127.0.0.1:2379"], "/shardline").await?` in a cluster.
//! let membership = Membership::in_memory();
//!
//! // Worker: register, drain, leave.
//! let record = WorkerRecord { group_id: "g0".into(), address: "http://10.0.0.7:50051".into(), ..Default::default() };
//! let registration = membership.register(record, DEFAULT_LEASE_TTL)?;
//! registration.wait_registered().await;
//!
//! // Coordinator: fold the events into a view.
//! let shutdown = CancellationToken::new();
//! let mut watch = membership.watch(&shutdown);
//! let mut view = MembershipView::new();
//! while let Some(event) = watch.next().await {
//!     let synced = event == MembershipEvent::Synced;
//!     view.apply(event);
//!     if synced { break; }
//! }
//! assert_eq!(view.ready().count(), 1);
//!
//! registration.set_state(WorkerState::Draining);
//! registration.deregister().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub mod keys;
pub mod registration;

mod etcd;
mod memory;
mod register;
mod registry;
mod view;
mod watch;

pub use etcd::{DEFAULT_REQUEST_TIMEOUT, EtcdRegistry, EtcdSecurity};
pub use keys::{DEFAULT_PREFIX, KeyLayout};
pub use memory::MemoryRegistry;
pub use register::{DEFAULT_LEASE_TTL, MIN_LEASE_TTL, RegistrationHandle, RegistrationStatus};
pub use registry::{KeyValue, LeaseId, Registry, RegistryError, Snapshot, WatchEvent, WatchEvents};
pub use view::{MembershipView, ViewChange};
pub use watch::{MembershipEvent, MembershipWatch};

use shardline_proto::v1::WorkerRecord;

/// Errors of the membership API.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("invalid membership prefix {0:?}: want `/a/b` (no empty segments or spaces)")]
    InvalidPrefix(String),
    #[error("invalid group id {0:?}: want one non-empty path segment without spaces or '/'")]
    InvalidGroupId(String),
    #[error("malformed worker record: {0}")]
    MalformedRecord(String),
    #[error("lease TTL {0:?} is below the minimum of 2 s")]
    InvalidTtl(Duration),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A registry plus the key layout: the one entry point both sides use. Cheap to clone;
/// clones of a memory-backed `Membership` share the same store.
#[derive(Debug, Clone)]
pub struct Membership {
    registry: Arc<dyn Registry>,
    layout: KeyLayout,
}

impl Membership {
    /// Membership over any registry.
    pub fn new(registry: Arc<dyn Registry>, layout: KeyLayout) -> Self {
        Self { registry, layout }
    }

    /// Membership over etcd at `endpoints` under `prefix`. Does not contact etcd yet, so
    /// it succeeds while etcd is down.
    pub async fn etcd<S: AsRef<str>>(
        endpoints: &[S],
        prefix: &str,
    ) -> Result<Self, MembershipError> {
        Self::etcd_secured(endpoints, prefix, &EtcdSecurity::default()).await
    }

    /// [`etcd`](Self::etcd) with TLS and authentication ([`EtcdSecurity`]).
    pub async fn etcd_secured<S: AsRef<str>>(
        endpoints: &[S],
        prefix: &str,
        security: &EtcdSecurity,
    ) -> Result<Self, MembershipError> {
        let layout = KeyLayout::new(prefix)?;
        let registry =
            EtcdRegistry::connect_secured(endpoints, security, DEFAULT_REQUEST_TIMEOUT).await?;
        Ok(Self::new(Arc::new(registry), layout))
    }

    /// Membership over a fresh in-process store under the default prefix (must be called
    /// inside a Tokio runtime). Share it by cloning.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(MemoryRegistry::new()), KeyLayout::default())
    }

    pub fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// Worker side: keeps `record` stored under `<prefix>/workers/<record.group_id>` with a
    /// lease of `ttl` (at least [`MIN_LEASE_TTL`]) until the handle is deregistered or
    /// dropped. Returns at once; the first write happens in the background
    /// ([`RegistrationHandle::wait_registered`]). A zero `start_time_unix_ms` is set to now;
    /// an unspecified state becomes `READY`.
    pub fn register(
        &self,
        record: WorkerRecord,
        ttl: Duration,
    ) -> Result<RegistrationHandle, MembershipError> {
        let key = self.layout.worker_key(&record.group_id)?;
        register::start(self.registry.clone(), key, record, ttl)
    }

    /// Coordinator side: every current group as `Put`, then `Synced`, then changes as they
    /// happen, resyncing after outages. Stops when `shutdown` fires or the watch is dropped.
    pub fn watch(&self, shutdown: &CancellationToken) -> MembershipWatch {
        watch::start(self.registry.clone(), self.layout.clone(), shutdown.clone())
    }
}
