#!/usr/bin/env bash
# Builds the shardline image with podman where no registry is reachable: the
# `runtime-prebuilt` target of deploy/container/Dockerfile over a Debian base made by
# deploy/container/base-image.sh, with a binary built on this machine. With a registry,
# build the whole Dockerfile instead (its header says how).
#
#   deploy/container/build-image.sh [--binary PATH] [--cuda] [--tag TAG] [--base IMAGE]
#
#   --binary PATH   a built `shardline` (default: cargo build --release, or with --cuda
#                   deploy/build-cuda.sh's target/cuda/release/shardline)
#   --cuda          the GPU variant: the CUDA runtime libraries come from the toolkit that
#                   deploy/cuda-toolkit.sh lays out (.cuda/toolkit/lib64)
#   --tag TAG       image name (default localhost/shardline:dev, or :dev-cuda)
#   --base IMAGE    runtime base (default localhost/debian:bookworm, made when missing)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
binary="" cuda=0 tag="" base="localhost/debian:bookworm"
while (($#)); do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --cuda) cuda=1; shift ;;
        --tag) tag="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        *) echo "build-image: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
command -v podman >/dev/null || {
    echo "build-image: podman is missing: apt-get install podman runc catatonit (deploy/setup.sh installs them)" >&2
    exit 1
}
if [[ -z "$binary" ]]; then
    if ((cuda)); then
        "$repo/deploy/build-cuda.sh"
        binary="$repo/target/cuda/release/shardline"
    else
        echo "build-image: cargo build --release --bin shardline" >&2
        (cd "$repo" && cargo build --release --bin shardline)
        binary="${CARGO_TARGET_DIR:-$repo/target}/release/shardline"
    fi
fi
[[ -x "$binary" ]] || { echo "build-image: no executable binary at $binary" >&2; exit 1; }
[[ -n "$tag" ]] || tag=$( ((cuda)) && echo localhost/shardline:dev-cuda || echo localhost/shardline:dev)
[[ "$base" != localhost/debian:bookworm ]] || "$repo/deploy/container/base-image.sh" "$base"

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/lib"
cp "$binary" "$context/shardline"
if ((cuda)); then
    "$repo/deploy/container/collect-libs.sh" "$context/shardline" "$repo/.cuda/toolkit/lib64" "$context/lib"
fi
podman build --quiet -f "$repo/deploy/container/Dockerfile" \
    --build-arg BASE_IMAGE="$base" --target runtime-prebuilt -t "$tag" "$context" >/dev/null
echo "build-image: $tag ($(podman image inspect "$tag" --format '{{.Size}}') bytes) from $binary" >&2
echo "$tag"
