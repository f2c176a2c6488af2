//! shardline's wire formats.
//!
//! - [`v1`]: the public API (`shardline.v1.Inference`) and the membership record stored
//!   in etcd ([`v1::WorkerRecord`]).
//! - [`worker::v1`]: the coordinator ↔ worker protocol (`shardline.worker.v1.Worker`).
//! - [`FILE_DESCRIPTOR_SET`]: for gRPC server reflection.
//! - [`chat_template`]: the model's Jinja chat template, rendered like Hugging Face's
//!   `apply_chat_template` (workers ship it in `Info`, coordinators render it).
//! - [`constraint`]: structured outputs — a worker-protocol constraint compiled by
//!   llguidance (coordinators validate with it, workers mask logits with it).
//! - [`membership`]: worker registration and coordinator watch over etcd (or memory),
//!   shared by both sides.

pub mod v1 {
    tonic::include_proto!("shardline.v1");
}

pub mod chat_template;
pub mod constraint;
pub mod membership;

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("shardline.worker.v1");
    }
}

/// Encoded descriptors of every shardline proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardline_descriptor");
