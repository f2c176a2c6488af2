#!/usr/bin/env bash
# The test command of the README: installs what the tests need (deploy/setup.sh), checks
# formatting and lints (cargo fmt --check, clippy with warnings as errors), then runs every
# test (unit, integration, end-to-end over real processes, a real etcd, the OpenAI Python
# client, the Helm chart rendered and run under podman) with cargo-nextest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
deploy/setup.sh
export SHARDLINE_MODEL="${SHARDLINE_MODEL:-$here/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
echo "test: cargo fmt --check" >&2
cargo fmt --all -- --check
echo "test: cargo clippy (warnings are errors)" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
