#!/usr/bin/env bash
# A long fuzzing run of the property-based fuzz targets (coordinator/tests/fuzz.rs):
# request JSON through the HTTP server, chat templates, the worker's step messages.
# deploy/test.sh runs them with 64 cases each; this runs CASES (default 20000) each.
#
#   deploy/fuzz.sh [CASES]
#
# A failure prints the smallest input proptest found; add it to the targets as a case.
set -euo pipefail
cd "$(dirname "$0")/.."
export SHARDLINE_FUZZ_CASES="${1:-20000}"
echo "fuzz: $SHARDLINE_FUZZ_CASES cases per target" >&2
cargo nextest run -p shardline-coordinator --test fuzz --no-fail-fast
