//! The etcd key layout and the record's byte encoding.
//!
//! Every worker group owns exactly one key, `<prefix>/workers/<group-id>`, whose value is
//! the protobuf encoding of [`WorkerRecord`]. Both the worker (writer) and the coordinator
//! (reader) build keys only through [`KeyLayout`], so the layout lives in one place.

use prost::Message;

use crate::MembershipError;
use shardline_proto::v1::WorkerRecord;

/// The prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/shardline";

/// Maps group ids to keys and back under one configurable prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Normalised prefix: starts with `/`, never ends with `/` (empty means the root).
    prefix: String,
}

impl Default for KeyLayout {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl KeyLayout {
    /// A layout under `prefix` (e.g. `/shardline` or `/prod/shardline/`); a missing
    /// leading `/` is added and trailing ones are dropped.
    pub fn new(prefix: &str) -> Result<Self, MembershipError> {
        if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(MembershipError::InvalidPrefix(prefix.to_owned()));
        }
        let trimmed = prefix.trim_matches('/');
        if trimmed.split('/').any(|part| part.is_empty()) && !trimmed.is_empty() {
            return Err(MembershipError::InvalidPrefix(prefix.to_owned()));
        }
        let prefix = if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        };
        Ok(Self { prefix })
    }

    /// The configured prefix, normalised (no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix every worker key starts with: `<prefix>/workers/`.
    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    /// The key of one group: `<prefix>/workers/<group-id>`.
    pub fn worker_key(&self, group_id: &str) -> Result<String, MembershipError> {
        validate_group_id(group_id)?;
        Ok(format!("{}/workers/{group_id}", self.prefix))
    }

    /// The group id a key belongs to, or `None` when the key is not a worker key of this
    /// layout (another prefix, a nested path, an invalid id).
    pub fn group_id_of(&self, key: &str) -> Option<String> {
        let id = key.strip_prefix(&self.workers_prefix())?;
        validate_group_id(id).ok()?;
        Some(id.to_owned())
    }
}

/// A group id is one non-empty path segment of printable characters.
pub fn validate_group_id(group_id: &str) -> Result<(), MembershipError> {
    let ok = !group_id.is_empty()
        && group_id.len() <= 253
        && !group_id
            .chars()
            .any(|c| c == '/' || c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(MembershipError::InvalidGroupId(group_id.to_owned()))
    }
}

/// The bytes stored as a key's value.
pub fn encode_record(record: &WorkerRecord) -> Vec<u8> {
    record.encode_to_vec()
}

/// Decodes a key's value; a malformed value is an error, never a panic.
pub fn decode_record(bytes: &[u8]) -> Result<WorkerRecord, MembershipError> {
    WorkerRecord::decode(bytes).map_err(|e| MembershipError::MalformedRecord(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_proto::v1::{WorkerCapacity, WorkerState};

    #[test]
    fn default_layout_matches_the_documented_keys() {
        let layout = KeyLayout::default();
        assert_eq!(layout.workers_prefix(), "/shardline/workers/");
        assert_eq!(layout.worker_key("g0").unwrap(), "/shardline/workers/g0");
        assert_eq!(
            layout.group_id_of("/shardline/workers/g0").as_deref(),
            Some("g0")
        );
    }

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(KeyLayout::new("prod/x/").unwrap().prefix(), "/prod/x");
        assert_eq!(KeyLayout::new("/").unwrap().workers_prefix(), "/workers/");
        assert!(KeyLayout::new("/a//b").is_err());
        assert!(KeyLayout::new("/a b").is_err());
    }

    #[test]
    fn foreign_and_nested_keys_are_not_groups() {
        let layout = KeyLayout::default();
        assert_eq!(layout.group_id_of("/other/workers/g0"), None);
        assert_eq!(layout.group_id_of("/shardline/workers/"), None);
        assert_eq!(layout.group_id_of("/shardline/workers/a/b"), None);
        assert!(layout.worker_key("a/b").is_err());
        assert!(layout.worker_key("").is_err());
    }

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let record = WorkerRecord {
            group_id: "g0".into(),
            address: "http://127.0.0.1:50051".into(),
            model: "m".into(),
            tp: 2,
            capacity: Some(WorkerCapacity {
                kv_blocks_total: 10,
                kv_block_size: 16,
                max_num_seqs: 4,
                context_length: 2048,
            }),
            state: WorkerState::Draining as i32,
            version: 7,
            start_time_unix_ms: 1,
        };
        assert_eq!(decode_record(&encode_record(&record)).unwrap(), record);
        assert!(matches!(
            decode_record(&[0xff, 0xff, 0xff]),
            Err(MembershipError::MalformedRecord(_))
        ));
    }
}
