//! The `shardline` command: `up`, `coordinator`, `worker`, `bench`, `generate`.
fn main() {}
