//! [`Registry`] over a real etcd cluster (etcd-client; tested against etcd 3.4).
//!
//! The client connects lazily, so a worker or coordinator starts even while etcd is down.
//! Every call is bounded by a request timeout: while no endpoint is reachable the balanced
//! channel waits for one instead of failing, and membership must notice an outage quickly.
//!
//! [`EtcdSecurity`] is how a secured etcd is reached: TLS (`https://` endpoints, the CA
//! that signed etcd's certificate, a client certificate where etcd runs with
//! `--client-cert-auth`) and etcd's user/password auth. With a user the client
//! authenticates on first use rather than at start (so etcd may still be down then) and
//! again whenever etcd says the token expired.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
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

/// TLS and authentication towards etcd (flags shared by workers and coordinators).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdSecurity {
    /// CA certificate (PEM) that signed etcd's server certificate: talk TLS to etcd (the
    /// endpoints must then be `https://`).
    #[arg(long, env = "SHARDLINE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) to present to etcd, for an etcd run with
    /// `--client-cert-auth` (its common name is the etcd user when no `--etcd-user` is
    /// given). Needs `--etcd-key` and `--etcd-ca`.
    #[arg(long, env = "SHARDLINE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "SHARDLINE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, for an etcd with auth enabled; the password is read from
    /// `--etcd-password-file`.
    #[arg(long, env = "SHARDLINE_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the password of `--etcd-user` (e.g. a mounted Kubernetes Secret; one
    /// trailing newline is ignored).
    #[arg(long, env = "SHARDLINE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurity {
    /// Whether the connection is TLS.
    pub fn tls(&self) -> bool {
        self.etcd_ca.is_some()
    }

    /// The client options these settings add, files read now: a missing or unreadable
    /// file, or endpoints whose scheme does not match the TLS setting, is an error.
    fn apply(
        &self,
        mut options: ConnectOptions,
        endpoints: &[&str],
    ) -> Result<ConnectOptions, RegistryError> {
        for endpoint in endpoints {
            let https = endpoint.starts_with("https://");
            let http = endpoint.starts_with("http://");
            if self.tls() && http {
                return Err(RegistryError::Invalid(format!(
                    "etcd endpoint {endpoint}: --etcd-ca means TLS, use https://"
                )));
            }
            if !self.tls() && https {
                return Err(RegistryError::Invalid(format!(
                    "etcd endpoint {endpoint}: https:// needs --etcd-ca (the CA that signed etcd's certificate)"
                )));
            }
        }
        if let Some(ca) = &self.etcd_ca {
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca, "--etcd-ca")?));
            if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--etcd-cert")?,
                    read(key, "--etcd-key")?,
                ));
            }
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(file)) = (&self.etcd_user, &self.etcd_password_file) {
            let password =
                String::from_utf8(read(file, "--etcd-password-file")?).map_err(|_| {
                    RegistryError::Invalid(format!(
                        "--etcd-password-file {}: not UTF-8",
                        file.display()
                    ))
                })?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            options = options
                .with_user(user.clone(), password.to_string())
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

/// The bytes of the file a flag names, or an error that names the flag.
fn read(path: &Path, flag: &str) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path)
        .map_err(|e| RegistryError::Invalid(format!("{flag} {}: {e}", path.display())))
}

/// A cloneable etcd connection.
#[derive(Clone)]
pub struct EtcdRegistry {
    /// Set once the client is built: at once without a user, on first use with one
    /// (building it then authenticates, which needs etcd up).
    client: Arc<tokio::sync::OnceCell<Client>>,
    endpoints: Arc<[String]>,
    options: ConnectOptions,
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
        Self::connect_secured(endpoints, &EtcdSecurity::default(), request_timeout).await
    }

    /// [`connect_with_timeout`](Self::connect_with_timeout) with TLS and authentication.
    /// Certificate and password files are read now; etcd is contacted on first use.
    pub async fn connect_secured<S: AsRef<str>>(
        endpoints: &[S],
        security: &EtcdSecurity,
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
        let options = security.apply(options, &endpoints)?;
        let registry = Self {
            client: Arc::default(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            options,
            request_timeout,
        };
        if security.etcd_user.is_none() {
            // Nothing is sent yet: this only checks the endpoints and TLS settings.
            let client = Client::connect(&endpoints, Some(registry.options.clone()))
                .await
                .map_err(|e| {
                    RegistryError::Invalid(format!("etcd endpoints {endpoints:?}: {e}"))
                })?;
            let _ = registry.client.set(client);
        }
        Ok(registry)
    }

    /// The client, built (and authenticated) on first use; a failure is retried next time.
    async fn client(&self) -> Result<Client, RegistryError> {
        let build = || async {
            let connect = Client::connect(&self.endpoints[..], Some(self.options.clone()));
            match tokio::time::timeout(self.request_timeout, connect).await {
                Ok(result) => result.map_err(|e| match classify(e) {
                    RegistryError::Unavailable(text) => {
                        RegistryError::Unavailable(format!("etcd authentication: {text}"))
                    }
                    other => other,
                }),
                Err(_) => Err(RegistryError::Unavailable(format!(
                    "etcd authentication timed out after {:?}",
                    self.request_timeout
                ))),
            }
        };
        self.client.get_or_try_init(build).await.cloned()
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
            let mut client = self.client().await?;
            let response = self
                .bounded("lease grant", client.lease_grant(ttl_secs(ttl), None))
                .await?;
            Ok(response.id())
        }
        .boxed()
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), RegistryError>> {
        async move {
            let mut client = self.client().await?.lease_client();
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
            let mut client = self.client().await?;
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
            let mut client = self.client().await?;
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
            let mut client = self.client().await?;
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
            let mut client = self.client().await?;
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
