#!/usr/bin/env bash
# Build the product binary with the CUDA backend (candle-core/cuda + nccl), on a machine
# with no NVIDIA toolkit and no GPU: lays out the CUDA 13.0 toolkit from PyPI wheels
# (deploy/cuda-toolkit.sh) and builds into target/cuda, so it never holds the lock on the
# shared target/ the CPU builds use.
#
#   deploy/build-cuda.sh                # -> target/cuda/release/shardline, and stripped
#                                       #    (no debug info, ~28 MB) target/cuda/shardline
#   deploy/build-cuda.sh check          # cargo check -p shardline-worker --features cuda
#
# The binary links libcuda.so.1 (the driver), cudart/cublas/curand/nvrtc 13 and nccl 2
# at load time: on the GPU host put nvidia/cu13/lib and nvidia/nccl/lib on
# LD_LIBRARY_PATH (deploy/gpu-check.sh does).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
eval "$(deploy/cuda-toolkit.sh --env)"
export CARGO_TARGET_DIR="$REPO/target/cuda"
start=$(date +%s)
if [[ "${1:-}" == "check" ]]; then
    cargo check -p shardline-worker --features cuda --all-targets
else
    cargo build --release --features cuda --bin shardline
    bin="$CARGO_TARGET_DIR/release/shardline"
    strip -o "$CARGO_TARGET_DIR/shardline" "$bin"
    echo "build-cuda: $bin: $(stat -c %s "$bin") bytes, stripped $CARGO_TARGET_DIR/shardline: $(stat -c %s "$CARGO_TARGET_DIR/shardline") bytes; built in $(($(date +%s) - start)) s"
    ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|nccl' || true
fi
