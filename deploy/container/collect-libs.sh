#!/usr/bin/env bash
# Copies the shared libraries BINARY loads from LIBDIR (the CUDA runtime libraries of a
# `--features cuda` build: cuBLAS and cuBLASLt, cudart, cuRAND, NCCL; NVRTC's builtins too
# when it links NVRTC)
# into DEST under their sonames, so the image carries exactly what the binary needs. The
# driver's libcuda.so.1 is not copied: the NVIDIA container runtime mounts the host's.
#
#   deploy/container/collect-libs.sh BINARY LIBDIR DEST
set -euo pipefail
bin="$1" libdir="$2" dest="$3"
mkdir -p "$dest"
libdir=$(cd "$libdir" && pwd -P)
LD_LIBRARY_PATH="$libdir" ldd "$bin" | awk '/=>/ {print $1, $3}' | while read -r soname path; do
    [[ -n "$path" && "$path" != "not" ]] || continue
    real=$(readlink -f "$path")
    case "$real" in "$libdir"/*) cp -L "$path" "$dest/$soname" ;; esac
done
# NVRTC loads its builtins with dlopen: ldd does not list them.
if compgen -G "$dest/libnvrtc.so.*" >/dev/null; then
    for f in "$libdir"/libnvrtc-builtins.so.*; do
        [[ -e "$f" ]] && cp -L "$f" "$dest/"
    done
fi
if LD_LIBRARY_PATH="$dest" ldd "$bin" | grep 'not found' | grep -v 'libcuda.so.1'; then
    echo "collect-libs: $bin needs libraries that are not in $libdir (above)" >&2
    exit 1
fi
echo "collect-libs: $(ls "$dest" | wc -l) libraries, $(du -sh "$dest" | cut -f1) in $dest" >&2
