//! shardline's wire formats, as generated code.
//!
//! - [`v1`]: the public API (`shardline.v1.Inference`) and the membership record stored
//!   in etcd ([`v1::WorkerRecord`]; the membership itself is `shardline-membership`).
//! - [`worker::v1`]: the coordinator ↔ worker protocol (`shardline.worker.v1.Worker`;
//!   its one implementation is `shardline-engine`).
//! - [`FILE_DESCRIPTOR_SET`]: for gRPC server reflection.

pub mod v1 {
    tonic::include_proto!("shardline.v1");
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("shardline.worker.v1");
    }

    /// KV blocks a sequence can occupy at most: its prompt (`prompt_len`, generated
    /// tokens of a migrated request included) plus every token it may still generate,
    /// capped by the context length (0 = unknown, no cap). Coordinators refuse a request
    /// whose demand exceeds a group's whole cache (it could not finish even alone), and
    /// budget admission by it under `--kv-admission worst-case`.
    pub fn kv_blocks_demand(
        prompt_len: usize,
        params: &v1::SequenceParams,
        context_length: usize,
        block_size: usize,
    ) -> usize {
        let remaining = match params.max_new_tokens as usize {
            0 => context_length,
            max => max.saturating_sub(params.num_generated as usize),
        };
        let mut tokens = prompt_len + remaining;
        if context_length > 0 {
            tokens = tokens.min(context_length.max(prompt_len));
        }
        tokens.div_ceil(block_size.max(1))
    }
}

/// Encoded descriptors of every shardline proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardline_descriptor");
