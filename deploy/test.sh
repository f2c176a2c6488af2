#!/usr/bin/env bash
# The test command of the README: installs what the tests need (deploy/setup.sh), then
# runs every Rust test (unit, integration, end-to-end over real processes and a real
# etcd) with cargo-nextest, then the OpenAI-client compatibility tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
deploy/setup.sh
export SHARDLINE_MODEL="${SHARDLINE_MODEL:-$here/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
