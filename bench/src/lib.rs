//! shardline load generator.
