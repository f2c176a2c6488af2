//! The worker's membership: with `--etcd`, the group registers its [`WorkerRecord`] under a
//! lease once its gRPC server listens, marks itself `DRAINING` first thing on shutdown and
//! revokes the lease once its running sequences are done (see `proto/MEMBERSHIP.md`).
//!
//! The lease lifecycle itself (keep-alive, re-registration after a lost lease, never
//! exiting because etcd blipped) is `shardline_membership`'s; this module only
//! builds the record from the loaded model and drives the three lifecycle points.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    DEFAULT_LEASE_TTL, DEFAULT_PREFIX, EtcdSecurity, MIN_LEASE_TTL, Membership, MembershipError,
    RegistrationHandle,
};
use shardline_proto::v1::{WorkerCapacity, WorkerRecord, WorkerState};

/// Membership flags of `shardline worker` (flattened into `WorkerArgs`).
#[derive(Debug, Clone, clap::Args)]
pub struct RegistrationArgs {
    /// etcd endpoints to register this group with (comma-separated or repeated), e.g.
    /// `http://127.0.0.1:2379`. Without it the worker is only reachable through a
    /// coordinator's static `--worker`.
    #[arg(long = "etcd", env = "SHARDLINE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Key prefix of the cluster in etcd.
    #[arg(long, env = "SHARDLINE_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,

    #[command(flatten)]
    pub etcd_security: EtcdSecurity,

    /// TTL of the registration lease in seconds (at least 2): a crashed worker disappears
    /// from the membership after this long. Keep-alives go every TTL/3.
    #[arg(long, env = "SHARDLINE_LEASE_TTL_SECS", default_value_t = DEFAULT_LEASE_TTL.as_secs())]
    pub lease_ttl_secs: u64,

    /// Address coordinators reach this worker at: `host:port`, a URL, or a host alone
    /// (then the listen port), e.g. the pod IP in Kubernetes (default: the listen
    /// address; set it when listening on 0.0.0.0 or behind NAT).
    #[arg(long, env = "SHARDLINE_ADVERTISE")]
    pub advertise: Option<String>,

    /// An already built membership (e.g. `shardline up`'s in-process registry); takes
    /// precedence over `--etcd`. Not a flag.
    #[arg(skip)]
    pub membership: Option<Membership>,
}

impl Default for RegistrationArgs {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            etcd_prefix: DEFAULT_PREFIX.to_string(),
            etcd_security: EtcdSecurity::default(),
            lease_ttl_secs: DEFAULT_LEASE_TTL.as_secs(),
            advertise: None,
            membership: None,
        }
    }
}

/// Why registration could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("invalid --lease-ttl-secs {0}: must be at least {min} s", min = MIN_LEASE_TTL.as_secs())]
    Ttl(u64),
    #[error("invalid --advertise {0:?}: want host, host:port or http://host:port")]
    Advertise(String),
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

impl RegistrationArgs {
    /// Whether this worker registers anywhere.
    pub fn enabled(&self) -> bool {
        self.membership.is_some() || !self.etcd.is_empty()
    }

    /// Checks the flags before the (slow) model load.
    pub fn validate(&self) -> Result<(), RegistrationError> {
        if !self.enabled() {
            return Ok(());
        }
        if Duration::from_secs(self.lease_ttl_secs) < MIN_LEASE_TTL {
            return Err(RegistrationError::Ttl(self.lease_ttl_secs));
        }
        if let Some(a) = &self.advertise {
            // The format only: the port a bare host takes is known once bound.
            advertised_url(a, 1)?;
        }
        Ok(())
    }

    /// The URL coordinators dial: `--advertise`, else the bound listen address.
    pub fn address(&self, listening: SocketAddr) -> Result<String, RegistrationError> {
        match &self.advertise {
            Some(a) => advertised_url(a, listening.port()),
            None => Ok(format!("http://{listening}")),
        }
    }
}

/// `--advertise` as the URL coordinators dial; a host without a port takes `port`.
fn advertised_url(a: &str, port: u16) -> Result<String, RegistrationError> {
    let a = a.trim();
    let (scheme, rest) = match a.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some(_) => return Err(RegistrationError::Advertise(a.to_string())),
        None => ("http", a),
    };
    let bad = rest.is_empty()
        || rest.contains('/')
        || rest.contains(char::is_whitespace)
        || rest.starts_with(':');
    if bad {
        return Err(RegistrationError::Advertise(a.to_string()));
    }
    // A bare IP (IPv6 included, whose colons are not a port) or a name without a port.
    if let Ok(ip) = rest.parse::<std::net::IpAddr>() {
        return Ok(format!("{scheme}://{}", SocketAddr::new(ip, port)));
    }
    if !rest.contains(':') {
        return Ok(format!("{scheme}://{rest}:{port}"));
    }
    let ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !ok {
        return Err(RegistrationError::Advertise(a.to_string()));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// What a group serves, as its record tells coordinators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub model_id: String,
    pub tp: usize,
    pub kv_blocks_total: usize,
    pub kv_block_size: usize,
    pub max_num_seqs: usize,
    pub context_length: usize,
}

/// The record this group publishes.
pub fn worker_record(group_id: &str, address: String, served: &ServedModel) -> WorkerRecord {
    let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    WorkerRecord {
        group_id: group_id.to_string(),
        address,
        model: served.model_id.clone(),
        tp: clamp(served.tp.max(1)),
        capacity: Some(WorkerCapacity {
            kv_blocks_total: clamp(served.kv_blocks_total),
            kv_block_size: clamp(served.kv_block_size),
            max_num_seqs: clamp(served.max_num_seqs),
            context_length: clamp(served.context_length),
        }),
        state: WorkerState::Ready as i32,
        version: 0,
        start_time_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// A running registration, or nothing when the worker does not register.
#[derive(Debug, Default)]
pub struct Registration {
    handle: Option<RegistrationHandle>,
}

impl Registration {
    /// Starts registering `record` (returns at once; the first write happens in the
    /// background and is retried until etcd answers).
    pub async fn start(
        args: &RegistrationArgs,
        record: WorkerRecord,
    ) -> Result<Registration, RegistrationError> {
        if !args.enabled() {
            return Ok(Registration::default());
        }
        args.validate()?;
        let membership = match &args.membership {
            Some(m) => m.clone(),
            None => {
                Membership::etcd_secured(&args.etcd, &args.etcd_prefix, &args.etcd_security).await?
            }
        };
        let group_id = record.group_id.clone();
        let address = record.address.clone();
        let handle = membership.register(record, Duration::from_secs(args.lease_ttl_secs))?;
        tracing::info!(group = %group_id, %address, ttl_s = args.lease_ttl_secs, "registering with the membership");
        Ok(Registration {
            handle: Some(handle),
        })
    }

    /// First step of a shutdown: coordinators stop sending new sequences here.
    pub fn set_draining(&self) {
        if let Some(h) = &self.handle {
            tracing::info!(group = %h.group_id(), "marking the group DRAINING");
            h.set_state(WorkerState::Draining);
        }
    }

    /// Last step of a shutdown: revokes the lease so the record disappears at once. A
    /// failure is logged, not returned: the record then expires after the TTL.
    pub async fn deregister(self) {
        if let Some(h) = self.handle {
            let group = h.group_id().to_string();
            if let Err(e) = h.deregister().await {
                tracing::warn!(%group, error = %e, "could not revoke the lease; the record expires after its TTL");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{MembershipView, MembershipWatch, ViewChange};
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn info() -> ServedModel {
        ServedModel {
            model_id: "m".into(),
            tp: 1,
            context_length: 2048,
            kv_block_size: 16,
            kv_blocks_total: 64,
            max_num_seqs: 8,
        }
    }

    #[test]
    fn advertise_is_normalised_and_checked() {
        assert_eq!(
            advertised_url("10.0.0.7:50051", 9).unwrap(),
            "http://10.0.0.7:50051"
        );
        assert_eq!(advertised_url("http://w1:7", 9).unwrap(), "http://w1:7");
        // A host alone (a pod IP from the downward API) takes the listen port.
        assert_eq!(advertised_url("10.0.0.7", 9).unwrap(), "http://10.0.0.7:9");
        assert_eq!(advertised_url("w1", 9).unwrap(), "http://w1:9");
        assert_eq!(advertised_url("http://w1", 9).unwrap(), "http://w1:9");
        assert_eq!(advertised_url("fd00::7", 9).unwrap(), "http://[fd00::7]:9");
        assert_eq!(
            advertised_url("[fd00::7]:50051", 9).unwrap(),
            "http://[fd00::7]:50051"
        );
        for bad in [
            "",
            ":7",
            "w1:x",
            "w 1:7",
            "http://w1:7/x",
            "ftp://w1:7",
            "http://",
        ] {
            assert!(advertised_url(bad, 9).is_err(), "{bad:?} accepted");
        }
        let args = RegistrationArgs {
            etcd: vec!["http://127.0.0.1:1".into()],
            lease_ttl_secs: 1,
            ..Default::default()
        };
        assert!(matches!(args.validate(), Err(RegistrationError::Ttl(1))));
        let listening: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            RegistrationArgs::default().address(listening).unwrap(),
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn record_carries_the_capacity() {
        let r = worker_record("g", "http://a:1".into(), &info());
        let c = r.capacity.unwrap();
        assert_eq!(
            (
                c.kv_blocks_total,
                c.kv_block_size,
                c.max_num_seqs,
                c.context_length
            ),
            (64, 16, 8, 2048)
        );
        assert_eq!(r.state, WorkerState::Ready as i32);
        assert!(r.start_time_unix_ms > 0);
    }

    #[tokio::test]
    async fn register_drain_deregister_in_memory() {
        let membership = Membership::in_memory();
        let args = RegistrationArgs {
            membership: Some(membership.clone()),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let mut watch = membership.watch(&shutdown);
        let mut view = MembershipView::new();
        async fn next(watch: &mut MembershipWatch, view: &mut MembershipView) -> ViewChange {
            view.apply(watch.recv().await.expect("watch ended"))
        }
        assert_eq!(next(&mut watch, &mut view).await, ViewChange::Synced);

        let reg = Registration::start(&args, worker_record("g", "http://a:1".into(), &info()))
            .await
            .unwrap();
        assert_eq!(
            next(&mut watch, &mut view).await,
            ViewChange::Added("g".into())
        );
        reg.set_draining();
        assert_eq!(
            next(&mut watch, &mut view).await,
            ViewChange::Updated("g".into())
        );
        reg.deregister().await;
        assert_eq!(
            next(&mut watch, &mut view).await,
            ViewChange::Removed("g".into())
        );
        // Nothing registers without --etcd.
        let none = Registration::start(
            &RegistrationArgs::default(),
            worker_record("h", "x".into(), &info()),
        )
        .await
        .unwrap();
        assert!(none.handle.is_none());
    }
}
