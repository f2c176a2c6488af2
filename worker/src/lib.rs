//! shardline worker.
