//! [`Registry`] over a real etcd cluster (etcd-client; tested against etcd 3.4).
//!
//! The client connects lazily, so a worker or coordinator starts even while etcd is down.
//! Every call is bounded by a request timeout: while no endpoint is reachable the balanced
//! channel waits for one instead of failing, and membership must notice an outage quickly.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use crate::registry::{
    KeyValue, LeaseId, Registry, RegistryError, Snapshot, WatchEvent, WatchEvents, ttl_secs,
};

/// Default bound on one etcd request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 keep-alive ping interval on the etcd connection. etcd refuses pings more often
/// than its `--grpc-keepalive-min-time` (default 5 s): it answers with GOAWAY, which ends
/// every watch on the connection (seen as a watch lost every ~8 s with 2 s pings).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A cloneable etcd connection.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects to `endpoints` (`http://host:port` or `host:port`). Succeeds without
    /// contacting etcd; an empty or malformed endpoint list is an error.
    pub async fn connect<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, RegistryError> {
        Self::connect_with_timeout(endpoints, DEFAULT_REQUEST_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with an explicit per-request timeout.
    pub async fn connect_with_timeout<S: AsRef<str>>(
        endpoints: &[S],
        request_timeout: Duration,
    ) -> Result<Self, RegistryError> {
        let endpoints: Vec<&str> = endpoints
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(RegistryError::Invalid("no etcd endpoint given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(request_timeout)
            .with_timeout(request_timeout)
            // HTTP/2 pings find a dead connection under an idle watch.
            .with_keep_alive(KEEP_ALIVE_INTERVAL, request_timeout)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| RegistryError::Invalid(format!("etcd endpoints {endpoints:?}: {e}")))?;
        Ok(Self {
            client,
            request_timeout,
        })
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(RegistryError::Unavailable(format!(
                "etcd {what} timed out after {:?}",
                self.request_timeout
            ))),
        }
    }
}

/// Lease-not-found is the only answer that changes what the caller does; the rest is
/// "etcd did not do it, try again".
fn classify(error: etcd_client::Error) -> RegistryError {
    let text = error.to_string();
    if text.contains("lease not found") {
        // The id is filled in by the caller, which knows it.
        RegistryError::LeaseNotFound(0)
    } else if let etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) = error {
        RegistryError::Invalid(text)
    } else {
        RegistryError::Unavailable(text)
    }
}

fn with_lease<T>(result: Result<T, RegistryError>, lease: LeaseId) -> Result<T, RegistryError> {
    result.map_err(|e| match e {
        RegistryError::LeaseNotFound(_) => RegistryError::LeaseNotFound(lease),
        other => other,
    })
}

fn key_value(kv: &etcd_client::KeyValue) -> Option<KeyValue> {
    Some(KeyValue {
        key: kv.key_str().ok()?.to_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

impl Registry for EtcdRegistry {
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, RegistryError>> {
        async move {
            let mut client = self.client.clone();
            let response = self
                .bounded("lease grant", client.lease_grant(ttl_secs(ttl), None))
                .await?;
            Ok(response.id())
        }
        .boxed()
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>> {
        async move {
            let mut client = self.client.lease_client();
            // One round trip on a fresh stream (etcd-client reads the first answer and turns
            // TTL 0 into "lease not found"): at one refresh per TTL/3 a long-lived stream is
            // not worth its failure modes (a half-dead stream after an etcd restart).
            let call = async { client.keep_alive(lease).await.map(drop) };
            with_lease(self.bounded("lease keep-alive", call).await, lease)
        }
        .boxed()
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>> {
        async move {
            let mut client = self.client.clone();
            match self
                .bounded("lease revoke", client.lease_revoke(lease))
                .await
            {
                Ok(_) | Err(RegistryError::LeaseNotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> BoxFuture<'_, Result<i64, RegistryError>> {
        async move {
            let mut client = self.client.clone();
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            let response = with_lease(
                self.bounded("put", client.put(key, value, options)).await,
                lease,
            )?;
            Ok(response.header().map_or(0, |h| h.revision()))
        }
        .boxed()
    }

    fn get_prefix(&self, prefix: String) -> BoxFuture<'_, Result<Snapshot, RegistryError>> {
        async move {
            let mut client = self.client.clone();
            let response = self
                .bounded(
                    "get",
                    client.get(prefix, Some(GetOptions::new().with_prefix())),
                )
                .await?;
            Ok(Snapshot {
                kvs: response.kvs().iter().filter_map(key_value).collect(),
                revision: response.header().map_or(0, |h| h.revision()),
            })
        }
        .boxed()
    }

    fn watch_prefix(
        &self,
        prefix: String,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<WatchEvents, RegistryError>> {
        async move {
            let mut client = self.client.clone();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(start_revision);
            let stream = self
                .bounded("watch", client.watch(prefix, Some(options)))
                .await?;
            // `None` state ends the stream after the error that closed it.
            let events = futures::stream::unfold(Some(stream), |state| async move {
                let mut stream = state?;
                loop {
                    match stream.message().await {
                        Ok(Some(response)) => {
                            if response.canceled() || response.compact_revision() > 0 {
                                let error = if response.compact_revision() > 0 {
                                    RegistryError::Compacted(response.compact_revision())
                                } else {
                                    RegistryError::Unavailable(format!(
                                        "etcd canceled the watch: {}",
                                        response.cancel_reason()
                                    ))
                                };
                                return Some((Err(error), None));
                            }
                            let batch: Vec<WatchEvent> = response
                                .events()
                                .iter()
                                .filter_map(|event| {
                                    let kv = key_value(event.kv()?)?;
                                    Some(match event.event_type() {
                                        EventType::Put => WatchEvent::Put(kv),
                                        EventType::Delete => WatchEvent::Delete {
                                            key: kv.key,
                                            mod_revision: kv.mod_revision,
                                        },
                                    })
                                })
                                .collect();
                            if !batch.is_empty() {
                                return Some((Ok(batch), Some(stream)));
                            }
                        }
                        Ok(None) => {
                            let error = RegistryError::Unavailable("etcd closed the watch".into());
                            return Some((Err(error), None));
                        }
                        Err(e) => return Some((Err(classify(e)), None)),
                    }
                }
            });
            Ok(events.boxed())
        }
        .boxed()
    }
}
