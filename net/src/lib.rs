//! shardline's connection layer, shared by the coordinator and the workers.
//!
//! - [`tls`]: server TLS from PEM files (rustls with `ring`), client certificates
//!   required when a CA is given, files re-read when they change; client configurations
//!   for the cluster's mutual TLS (coordinator → worker);
//! - [`listen`]: the accept loop: open-connection limit, TCP_NODELAY, the TLS handshake
//!   with a deadline, yielding connections hyper and tonic serve.

pub mod listen;
pub mod tls;
