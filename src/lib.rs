//! The `shardline` command as a library: its command line ([`cli`]) and `shardline up`
//! ([`up`]), a whole cluster in one process. `src/main.rs` is the binary over them.

pub mod cli;
pub mod up;
