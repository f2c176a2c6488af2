#!/usr/bin/env bash
# The run command of the README: builds shardline, fetches the default model
# (SmolLM2-135M-Instruct) and starts a local cluster (one coordinator, one worker group)
# serving it. Extra arguments go to `shardline up` (see `shardline up --help`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
SHARDLINE_SETUP_MINIMAL=1 deploy/setup.sh
exec cargo run --quiet --bin shardline -- up --model "$here/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$@"
