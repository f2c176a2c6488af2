#!/usr/bin/env bash
# The run command of the README: builds shardline, fetches the default model
# (SmolLM2-135M-Instruct) and starts a local cluster (one coordinator, one worker group)
# serving it. Extra arguments go to `shardline up` (see `shardline up --help`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
SHARDLINE_SETUP_MINIMAL=1 deploy/setup.sh
# Not `cargo run --quiet`: the first build compiles a few hundred crates (10-20 minutes
# on two cores) and must show its progress.
bin="${CARGO_TARGET_DIR:-$here/target}/debug/shardline"
if [[ ! -x "$bin" ]]; then
  echo "up: first build of shardline: a few hundred crates, 10-20 minutes on 2 cores (progress below)" >&2
fi
cargo build --bin shardline
exec "$bin" up --model "$here/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$@"
