//! Worker side: keep this group's record in the registry for as long as the worker lives.
//!
//! [`Membership::register`](super::Membership::register) spawns one task that owns the
//! lease. It grants a lease, puts the record under it, refreshes it every TTL/3, and never
//! gives up: when the lease is lost (expired while the registry was unreachable, or the
//! store was wiped) it grants a new one and puts the record again as soon as the registry
//! answers. After any failed call the record is rewritten on recovery, so a key lost
//! meanwhile comes back without waiting for the lease to fail.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::registry::{LeaseId, Registry, RegistryError};
use crate::{MembershipError, keys};
use shardline_proto::v1::{WorkerRecord, WorkerState};

/// Lease TTL used when none is configured.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// etcd 3.4 (default election timeout) refuses shorter leases.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// First delay after a failed call; doubles up to TTL/3.
const RETRY_INITIAL: Duration = Duration::from_millis(100);

/// Where the registration stands, as last observed by its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// Not written yet (registry not reached so far).
    Pending,
    /// The record with `version` is stored under `lease`, and the lease was refreshed
    /// within the last TTL.
    Registered { lease: LeaseId, version: u64 },
    /// No successful refresh for longer than the TTL: the key has probably expired. The
    /// task keeps retrying and re-registers when the registry answers.
    Lost,
}

/// Owns a running registration. Dropping it stops the keep-alive *without* revoking the
/// lease, so the key disappears after the TTL, exactly like a crashed worker; call
/// [`deregister`](Self::deregister) for a clean exit.
#[derive(Debug)]
pub struct RegistrationHandle {
    group_id: String,
    desired_state: watch::Sender<WorkerState>,
    status: watch::Receiver<RegistrationStatus>,
    cancel: CancellationToken,
    /// Yields the lease held when the task stopped; `None` once deregistered.
    task: Option<JoinHandle<Option<LeaseId>>>,
    registry: Arc<dyn Registry>,
}

impl RegistrationHandle {
    /// The registered group.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// Rewrites the record with `state` (version bumped) as soon as the registry answers.
    /// Coordinators stop sending new sequences to a `Draining` group.
    pub fn set_state(&self, state: WorkerState) {
        self.desired_state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// The registration's current status; `changed()` on the receiver waits for the next.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Waits until the record is stored (returns at once if it is).
    pub async fn wait_registered(&self) -> RegistrationStatus {
        let mut status = self.status.clone();
        let current = status
            .wait_for(|s| matches!(s, RegistrationStatus::Registered { .. }))
            .await
            .map(|s| *s);
        // The task only ends through this handle, which is alive here.
        current.unwrap_or(RegistrationStatus::Lost)
    }

    /// Stops the keep-alive and revokes the lease: the key disappears at once. If the
    /// registry is unreachable the error is returned and the key expires after the TTL.
    pub async fn deregister(mut self) -> Result<(), MembershipError> {
        self.cancel.cancel();
        let lease = match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        let Some(lease) = lease else {
            tracing::info!(group_id = %self.group_id, "deregistered (no lease was held)");
            return Ok(());
        };
        self.registry.revoke(lease).await?;
        tracing::info!(group_id = %self.group_id, lease = format_args!("{lease:#x}"), "deregistered: lease revoked");
        Ok(())
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Validates and starts a registration (see the module docs).
pub(super) fn start(
    registry: Arc<dyn Registry>,
    key: String,
    mut record: WorkerRecord,
    ttl: Duration,
) -> Result<RegistrationHandle, MembershipError> {
    if ttl < MIN_LEASE_TTL {
        return Err(MembershipError::InvalidTtl(ttl));
    }
    keys::validate_group_id(&record.group_id)?;
    if record.start_time_unix_ms == 0 {
        record.start_time_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }
    let state = WorkerState::try_from(record.state).unwrap_or(WorkerState::Ready);
    let state = if state == WorkerState::Unspecified {
        WorkerState::Ready
    } else {
        state
    };
    record.state = state as i32;
    let (desired_state, state_rx) = watch::channel(state);
    let (status_tx, status) = watch::channel(RegistrationStatus::Pending);
    let cancel = CancellationToken::new();
    let group_id = record.group_id.clone();
    let task = Task {
        registry: registry.clone(),
        key,
        record,
        ttl,
        lease: None,
        dirty: true,
        last_ok: Instant::now(),
        status: status_tx,
    };
    let task = tokio::spawn(task.run(state_rx, cancel.clone()));
    Ok(RegistrationHandle {
        group_id,
        desired_state,
        status,
        cancel,
        task: Some(task),
        registry,
    })
}

struct Task {
    registry: Arc<dyn Registry>,
    key: String,
    /// The record as last written (or about to be); `version` is the last one used.
    record: WorkerRecord,
    ttl: Duration,
    lease: Option<LeaseId>,
    /// The record must be (re)written before the next keep-alive.
    dirty: bool,
    /// When the lease was last known to be alive.
    last_ok: Instant,
    status: watch::Sender<RegistrationStatus>,
}

impl Task {
    async fn run(
        mut self,
        mut desired_state: watch::Receiver<WorkerState>,
        cancel: CancellationToken,
    ) -> Option<LeaseId> {
        let period = self.ttl / 3;
        let mut delay = Duration::ZERO;
        let mut backoff = RETRY_INITIAL;
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = desired_state.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = *desired_state.borrow_and_update();
                    tracing::info!(group_id = %self.record.group_id, ?state, "worker state changed");
                    self.record.state = state as i32;
                    self.dirty = true;
                }
                () = tokio::time::sleep(delay) => {}
            }
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                result = self.step() => result,
            };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!(group_id = %self.record.group_id, "registry reachable again");
                    }
                    failing = false;
                    backoff = RETRY_INITIAL;
                    delay = if self.dirty { Duration::ZERO } else { period };
                }
                Err(RegistryError::LeaseNotFound(lease)) => {
                    tracing::warn!(
                        group_id = %self.record.group_id,
                        lease = format_args!("{lease:#x}"),
                        "lease lost; registering again with a new lease"
                    );
                    self.lease = None;
                    self.dirty = true;
                    self.status.send_replace(RegistrationStatus::Lost);
                    delay = backoff;
                    backoff = (backoff * 2).min(period);
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(group_id = %self.record.group_id, %error, "registry call failed; retrying");
                    } else {
                        tracing::debug!(group_id = %self.record.group_id, %error, "registry still failing");
                    }
                    failing = true;
                    // Rewrite on recovery: the key may have expired or been lost meanwhile.
                    self.dirty = true;
                    let registered =
                        matches!(*self.status.borrow(), RegistrationStatus::Registered { .. });
                    if registered && self.last_ok.elapsed() > self.ttl {
                        tracing::warn!(
                            group_id = %self.record.group_id,
                            ttl = ?self.ttl,
                            "no keep-alive for longer than the lease TTL; record presumed expired"
                        );
                        self.status.send_replace(RegistrationStatus::Lost);
                    }
                    delay = backoff;
                    backoff = (backoff * 2).min(period);
                }
            }
        }
        self.lease
    }

    /// One registry round: grant if needed, write the record if needed, else refresh.
    async fn step(&mut self) -> Result<(), RegistryError> {
        let lease = match self.lease {
            Some(lease) => lease,
            None => {
                let lease = self.registry.grant(self.ttl).await?;
                tracing::debug!(group_id = %self.record.group_id, lease = format_args!("{lease:#x}"), "lease granted");
                self.lease = Some(lease);
                self.dirty = true;
                lease
            }
        };
        if self.dirty {
            let mut record = self.record.clone();
            record.version += 1;
            self.registry
                .put(self.key.clone(), keys::encode_record(&record), lease)
                .await?;
            self.record = record;
            self.dirty = false;
            self.last_ok = Instant::now();
            let status = RegistrationStatus::Registered {
                lease,
                version: self.record.version,
            };
            let previous = self.status.send_replace(status);
            if !matches!(previous, RegistrationStatus::Registered { lease: l, .. } if l == lease) {
                tracing::info!(
                    group_id = %self.record.group_id,
                    key = %self.key,
                    lease = format_args!("{lease:#x}"),
                    version = self.record.version,
                    state = ?self.record.state(),
                    "registered"
                );
            }
        } else {
            self.registry.keep_alive(lease).await?;
            self.last_ok = Instant::now();
        }
        Ok(())
    }
}
