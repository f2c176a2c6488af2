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

    /// The prefix-cache key of a full KV block: a hash of the previous block's key
    /// (`parent`, 0 for the first block) and the block's tokens, so a key stands for the
    /// whole prefix up to its block's end. Workers key their prefix caches by it, and
    /// coordinators track by it what each group caches.
    pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// The [`chain_hash`] keys of `prompt`'s full blocks of `block_size` tokens, in
    /// order (a partial last block has none).
    pub fn block_hashes(prompt: &[u32], block_size: usize) -> impl Iterator<Item = u64> + '_ {
        let mut parent = 0u64;
        prompt.chunks_exact(block_size.max(1)).map(move |block| {
            parent = chain_hash(parent, block);
            parent
        })
    }
}

/// Encoded descriptors of every shardline proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shardline_descriptor");
