//! shardline coordinator.
