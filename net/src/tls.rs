//! TLS of the public APIs (rustls with the `ring` provider): a certificate chain and key
//! from PEM files, optionally a CA whose client certificates are then required; the files
//! are re-read when they change, so a renewed certificate (cert-manager, a rotated
//! Secret) is served to new connections without a restart. Connections already open keep
//! the certificate they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The PEM files of one TLS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle: when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS cannot be set up from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The files' bytes, in order: what a reload compares to see a change.
fn snapshot(files: &TlsFiles) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut out = vec![read(&files.cert)?, read(&files.key)?];
    if let Some(ca) = &files.client_ca {
        out.push(read(ca)?);
    }
    Ok(out)
}

fn build(files: &TlsFiles, content: &[Vec<u8>], alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert, &content[0])?;
    let key = PrivateKeyDer::from_pem_slice(&content[1]).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        message: format!("no usable private key: {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&files.client_ca, content.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs(path, pem)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            message: format!("the key does not fit the certificate: {e}"),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

struct Current {
    acceptor: TlsAcceptor,
    content: Vec<Vec<u8>>,
}

/// A TLS endpoint's live configuration, swapped when its files change.
#[derive(Clone)]
pub struct Tls {
    files: Arc<TlsFiles>,
    alpn: &'static [&'static [u8]],
    current: Arc<RwLock<Current>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// ALPN of the HTTP API: HTTP/2 and HTTP/1.1.
pub const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a gRPC endpoint: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];

impl Tls {
    /// Loads the files; every problem is an error naming the file.
    pub fn load(files: TlsFiles, alpn: &'static [&'static [u8]]) -> Result<Tls, TlsError> {
        let content = snapshot(&files)?;
        let config = build(&files, &content, alpn)?;
        Ok(Tls {
            files: Arc::new(files),
            alpn,
            current: Arc::new(RwLock::new(Current {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                content,
            })),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .expect("TLS lock poisoned; this is a bug")
            .acceptor
            .clone()
    }

    /// Re-reads the files; swaps the configuration in when they changed and still make
    /// a valid one. Returns whether it did.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let content = snapshot(&self.files)?;
        if self
            .current
            .read()
            .expect("TLS lock poisoned; this is a bug")
            .content
            == content
        {
            return Ok(false);
        }
        let config = build(&self.files, &content, self.alpn)?;
        let mut current = self
            .current
            .write()
            .expect("TLS lock poisoned; this is a bug");
        current.acceptor = TlsAcceptor::from(Arc::new(config));
        current.content = content;
        Ok(true)
    }
}

/// How often [`spawn_reloader`] looks at the files for a change.
pub const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Re-reads `tls`'s files every [`RELOAD_POLL`] until `shutdown`; a file
/// that does not make a valid configuration (a half-written rotation) is logged and the
/// served certificate stays.
pub fn spawn_reloader(tls: Tls, name: &'static str, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(RELOAD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => {}
            }
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(true)) => tracing::info!(endpoint = name, "TLS certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::error!(
                    endpoint = name,
                    error = %e,
                    "TLS files not reloaded; the current certificate stays"
                ),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    });
}

/// The PEM files of a client in the cluster's mutual TLS (a coordinator calling workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The cluster CA: the only one whose server certificates are trusted.
    pub ca: PathBuf,
    /// This client's certificate chain, which the servers check against the same CA.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A rustls client configuration for [`ClientFiles`], speaking HTTP/2 (gRPC). The server
/// name a connection is made with is checked against the server's certificate.
pub fn client_config(files: &ClientFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = read(&files.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&files.ca, &ca)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: files.ca.clone(),
            message: e.to_string(),
        })?;
    }
    let chain = certs(&files.cert, &read(&files.cert)?)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        message: format!("no usable private key: {e}"),
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            message: format!("the key does not fit the certificate: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
