#!/usr/bin/env bash
# Lay out a CUDA 13.0 toolkit from PyPI wheels, for building `--features cuda` on a
# machine without the NVIDIA toolkit (and without a GPU).
#
#   deploy/cuda-toolkit.sh [DIR]        # default DIR: <repo>/.cuda (git-ignored)
#   eval "$(deploy/cuda-toolkit.sh --env)"
#
# What it does (idempotent: each step is skipped when its output is there):
#   1. pip-downloads the 13.0 wheels (~1 GB): nvcc, nvvm (cicc), crt, runtime, cccl for the
#      kernels; nvrtc, cublas, curand, nccl for linking. 13.0 on purpose: 13.5's nvcc emits
#      PTX 9.5, which a CUDA 13.0 driver (the H200 hosts') rejects, and cudarc does not know
#      13.5. The cu12 compiler wheel has no nvcc at all.
#   2. unpacks them and lays out DIR/toolkit as nvcc expects a toolkit: bin, include (with
#      cccl and nccl.h), nvvm, lib64 with unversioned .so links for the linker.
#   3. builds a stub libcuda.so (soname libcuda.so.1) from cuda.h: no wheel ships the driver
#      library; at run time the host's real libcuda.so.1 is used.
#   4. prints the environment to export (with --env: only that, as shell code).
set -euo pipefail

ENV_ONLY=0
if [[ "${1:-}" == "--env" ]]; then
    ENV_ONLY=1
    shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.cuda}"
TK="$DIR/toolkit"

log() { if [[ $ENV_ONLY == 0 ]]; then echo "cuda-toolkit: $*" >&2; fi; }

WHEELS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
    "nvidia-cuda-nvrtc==13.0.*"
    "nvidia-cublas==13.0.*"
    "nvidia-curand==10.4.*"
    "nvidia-nccl-cu13"
)

if [[ ! -x "$TK/bin/nvcc" || ! -e "$TK/lib64/libcuda.so" ]]; then
    mkdir -p "$DIR/wheels"
    # 1. download (pip skips files already in the folder)
    if [[ $(ls "$DIR"/wheels/*.whl 2>/dev/null | wc -l) -lt ${#WHEELS[@]} ]]; then
        log "downloading ${#WHEELS[@]} wheels (~1 GB) into $DIR/wheels"
        pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
            -d "$DIR/wheels" "${WHEELS[@]}" >&2
    fi

    # 2. unpack into one tree (the wheels share the nvidia/cu13 namespace)
    rm -rf "$DIR/site" "$TK"
    mkdir -p "$DIR/site"
    for w in "$DIR"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$DIR/site/"
    done
    CU="$DIR/site/nvidia/cu13"
    NCCL="$DIR/site/nvidia/nccl"
    [[ -e "$CU/bin/nvcc" && -e "$CU/nvvm/bin/cicc" && -e "$NCCL/lib/libnccl.so.2" ]] || {
        echo "cuda-toolkit: the wheels do not have the expected layout (nvidia/cu13/bin/nvcc, nvidia/cu13/nvvm/bin/cicc, nvidia/nccl/lib)" >&2
        exit 1
    }
    # zip does not keep the executable bit
    chmod +x "$CU"/bin/* "$CU"/nvvm/bin/*

    mkdir -p "$TK"
    cp -al "$CU/bin" "$CU/nvvm" "$CU/include" "$TK/"
    cp -al "$NCCL"/include/* "$TK/include/"
    mkdir -p "$TK/lib64"
    cp -al "$CU"/lib/* "$NCCL"/lib/* "$TK/lib64/"
    # unversioned names for the linker: libfoo.so.N -> libfoo.so
    for f in "$TK"/lib64/lib*.so.*; do
        base="${f##*/}"
        case "$base" in *builtins*|*.alt.*) continue ;; esac
        link="$TK/lib64/${base%%.so.*}.so"
        [[ -e "$link" ]] || ln -s "$base" "$link"
    done

    # 3. stub libcuda.so: every cu* function cuda.h declares (after its _v2/_v3 macros),
    #    as an empty symbol; the soname makes binaries ask for the driver's libcuda.so.1.
    mkdir -p "$DIR/stub"
    gcc -E -P -I"$TK/include" -x c "$TK/include/cuda.h" -o "$DIR/stub/cuda.i"
    grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' "$DIR/stub/cuda.i" |
        sed -E 's/[[:space:]]*\($//' | sort -u |
        awk '{ printf "void %s(void) {}\n", $1 }' >"$DIR/stub/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib64/stubs_libcuda.so.1" "$DIR/stub/libcuda_stub.c"
    mkdir -p "$TK/lib64/stubs"
    mv "$TK/lib64/stubs_libcuda.so.1" "$TK/lib64/stubs/libcuda.so"
    # The linker finds the stub under lib64 too (LIBRARY_PATH); nothing named libcuda.so.1
    # is created, so the real driver is what the loader finds at run time.
    ln -sf stubs/libcuda.so "$TK/lib64/libcuda.so"
    log "stub libcuda.so: $(wc -l <"$DIR/stub/libcuda_stub.c") symbols"
fi

NVCC_VERSION="$("$TK/bin/nvcc" --version | grep -oE 'release [0-9.]+' || true)"
log "toolkit at $TK ($NVCC_VERSION)"

ENV="export CUDA_HOME=$TK
export CUDA_PATH=$TK
export CUDA_ROOT=$TK
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export PATH=$TK/bin:$TK/nvvm/bin:\$PATH
export LIBRARY_PATH=$TK/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CPATH=$TK/include\${CPATH:+:\$CPATH}"
if [[ $ENV_ONLY == 1 ]]; then
    echo "$ENV"
else
    log "export this before building with --features cuda:"
    echo "$ENV"
fi
