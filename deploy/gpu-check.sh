#!/usr/bin/env bash
# The GPU check: on a GPU host with only the NVIDIA driver, Python (PyTorch's
# `nvidia-*` CUDA 13 wheels in site-packages) and NO Rust toolchain, run the prebuilt
# binary's engine benchmark on a Llama shaped like Llama-3.2-1B with random bf16 weights,
# and print tokens/s at batch 1 and 32 and the memory-bandwidth ratio
# (weight bytes × decode steps/s ÷ 4.8 TB/s, an H200's HBM).
#
#   deploy/gpu-check.sh [BINARY]      # default: $SHARDLINE_BIN, else target/cuda/shardline
#                                     # (the stripped binary deploy/build-cuda.sh leaves)
#
# Knobs (environment):
#   GPU_CHECK_DEVICE   cuda (default) | cuda:N | cpu (candle's CPU device: tests this script
#                      anywhere, with a binary built without the cuda feature too)
#   GPU_CHECK_SHAPE    llama-3.2-1b (default) | tiny
#   GPU_CHECK_WORKDIR  where the random model is written (default: a temp dir, removed after)
#   GPU_CHECK_BATCHES (1,32)  GPU_CHECK_NEW_TOKENS (128)  GPU_CHECK_PROMPT_TOKENS (128)
#   GPU_CHECK_PP_TOKENS (512)
#   OUT                when set, everything printed also goes to $OUT/gpu-check.log
# Exits non-zero on any failure (missing library, benchmark error).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-${SHARDLINE_BIN:-$REPO/target/cuda/shardline}}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SHAPE="${GPU_CHECK_SHAPE:-llama-3.2-1b}"
BATCHES="${GPU_CHECK_BATCHES:-1,32}"
NEW_TOKENS="${GPU_CHECK_NEW_TOKENS:-128}"
PROMPT_TOKENS="${GPU_CHECK_PROMPT_TOKENS:-128}"
PP_TOKENS="${GPU_CHECK_PP_TOKENS:-512}"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu-check.log") 2>&1
fi

T0=$(date +%s%N)
say() {
    local ms=$((($(date +%s%N) - T0) / 1000000))
    printf '[gpu-check %4d.%ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"
}
fail() { say "FAILED: $*"; exit 1; }

say "host $(hostname), $(date -u +%FT%TZ), device $DEVICE, shape $SHAPE, binary $BIN"
[[ -x "$BIN" ]] || fail "no executable binary at $BIN (build it with deploy/build-cuda.sh)"
say "binary: $(stat -c %s "$BIN") bytes"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.memory \
        --format=csv,noheader || true
    nvidia-smi | sed -n '1,4p' || true
elif [[ "$DEVICE" == cuda* ]]; then
    say "warning: no nvidia-smi on PATH"
fi

PY="$(command -v python3 || command -v python || true)"
[[ -n "$PY" ]] || fail "no python3 on PATH"
say "python: $PY ($("$PY" --version 2>&1)), $("$PY" -c 'import numpy; print("numpy", numpy.__version__)' 2>&1 | tail -1), $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)"
"$PY" -c 'import numpy' 2>/dev/null || fail "the model writer needs numpy: pip install numpy"

# The CUDA 13 runtime libraries the binary links: PyTorch's nvidia-* wheels.
if [[ "$DEVICE" == cuda* ]]; then
    LIBS="$("$PY" - <<'EOF'
import glob, os, site, sys
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except ImportError:
    pass
for s in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    roots.append(os.path.join(s, "nvidia"))
dirs = []
for r in roots:
    for sub in ("cu13/lib", "nccl/lib", "cublas/lib", "cuda_runtime/lib", "cuda_nvrtc/lib", "curand/lib"):
        d = os.path.realpath(os.path.join(r, sub))
        if os.path.isdir(d) and d not in dirs and glob.glob(d + "/*.so*"):
            dirs.append(d)
print(":".join(dirs))
EOF
)"
    [[ -n "$LIBS" ]] || fail "no nvidia/cu13/lib or nvidia/nccl/lib under $PY's site-packages (pip install torch with CUDA 13, or nvidia-cublas nvidia-cuda-runtime nvidia-cuda-nvrtc nvidia-curand nvidia-nccl-cu13)"
    export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
say "ldd $BIN:"
ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|nccl|not found' | sed 's/^/    /' || true
if ldd "$BIN" | grep -q 'not found'; then
    fail "the binary has unresolved libraries (above)"
fi

WORK="${GPU_CHECK_WORKDIR:-}"
if [[ -z "$WORK" ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
MODEL="$WORK/$SHAPE"
mkdir -p "$MODEL"

# Random bf16 Llama as config.json + model.safetensors. numpy only (safetensors is a
# JSON header and raw little-endian data, written here directly): works where PyTorch is
# and where it is not.
say "writing the random $SHAPE model to $MODEL"
"$PY" - "$MODEL" "$SHAPE" <<'EOF'
import json, os, struct, sys
import numpy as np

out, shape = sys.argv[1], sys.argv[2]
shapes = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocab 128256, tied.
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128256),
    "tiny": dict(hidden=128, layers=2, heads=4, kv=2, ffn=256, vocab=512),
}
s = shapes[shape]
h, hd = s["hidden"], s["hidden"] // s["heads"]
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": h, "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
    "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"], "head_dim": hd,
    "vocab_size": s["vocab"], "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}
tensors = [("model.embed_tokens.weight", (s["vocab"], h), 0.02)]
for i in range(s["layers"]):
    p = f"model.layers.{i}."
    tensors += [
        (p + "input_layernorm.weight", (h,), None),
        (p + "self_attn.q_proj.weight", (s["heads"] * hd, h), 0.02),
        (p + "self_attn.k_proj.weight", (s["kv"] * hd, h), 0.02),
        (p + "self_attn.v_proj.weight", (s["kv"] * hd, h), 0.02),
        (p + "self_attn.o_proj.weight", (h, s["heads"] * hd), 0.02),
        (p + "post_attention_layernorm.weight", (h,), None),
        (p + "mlp.gate_proj.weight", (s["ffn"], h), 0.02),
        (p + "mlp.up_proj.weight", (s["ffn"], h), 0.02),
        (p + "mlp.down_proj.weight", (h, s["ffn"]), 0.02),
    ]
tensors.append(("model.norm.weight", (h,), None))

header, off = {}, 0
for name, shp, _ in tensors:
    n = int(np.prod(shp)) * 2
    header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + n]}
    off += n
hjson = json.dumps(header).encode()
hjson += b" " * (-len(hjson) % 8)

def bf16(x):
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")

rng = np.random.default_rng(0)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(hjson)))
    f.write(hjson)
    for name, shp, scale in tensors:
        n = int(np.prod(shp))
        if scale is None:
            f.write(bf16(np.ones(n, np.float32)).tobytes())
            continue
        step = 1 << 24
        for a in range(0, n, step):
            m = min(step, n - a)
            f.write(bf16(rng.standard_normal(m, dtype=np.float32) * scale).tobytes())
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
print(f"  {len(tensors)} tensors, {off / 1e9:.3f} GB of bf16 weights")
EOF
ls -la "$MODEL" | sed 's/^/    /'

say "engine benchmark: --device $DEVICE --batches $BATCHES --new-tokens $NEW_TOKENS --prompt-tokens $PROMPT_TOKENS --pp-tokens $PP_TOKENS"
set +e
"$BIN" engine-bench --model "$MODEL" --device "$DEVICE" --batches "$BATCHES" \
    --new-tokens "$NEW_TOKENS" --prompt-tokens "$PROMPT_TOKENS" --pp-tokens "$PP_TOKENS" \
    | tee "$WORK/bench.out"
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 0 ]] || fail "engine-bench exited with $rc"
grep -q '^decode batch' "$WORK/bench.out" || fail "engine-bench printed no decode figures"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.used,temperature.gpu --format=csv,noheader || true
fi
say "summary ($SHAPE, $DEVICE):"
grep -E '^(device:|decode batch|ours: prompt)' "$WORK/bench.out" | sed 's/^/    /'
say "OK"
