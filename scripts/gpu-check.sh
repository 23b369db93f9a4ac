#!/usr/bin/env bash
# The one-call GPU check.
#
#   scripts/gpu-check.sh --pack   here (no GPU, no nvcc): builds the CUDA release binary and the
#                                 CUDA test binaries with the CUDA 13.0 wheels
#                                 (scripts/cuda-toolchain.sh), strips them and packs them, with
#                                 the Qwen3 tokenizer, into gpu-pack/ember-gpu.tar.xz (ignored;
#                                 at most 60 MiB, so it can travel with the working tree)
#   scripts/gpu-check.sh          on the GPU machine (NVIDIA driver 580 / CUDA 13.0, PyTorch and
#                                 transformers installed), in a copy of the repository that
#                                 carries gpu-pack/: builds nothing, and in under 8 minutes runs
#                                   1. every CUDA kernel test against its CPU path,
#                                   2. model parity on the tiny fixtures (tests/fixtures: the
#                                      transformers golden logits) with the models on the GPU,
#                                   3. a random-weight checkpoint in the Qwen3-8B shape, made
#                                      there with torch (scripts/gpu_bench_model.py), and the
#                                      device's copy bandwidth,
#                                   4. `ember bench offline --latency` and at concurrency 1,8,64,
#                                   5. the same workload through transformers
#                                      (benches/compare/hf_gpu.py),
#                                 then prints one summary table (also in $OUT/summary.md).
# The CUDA runtime and cuBLAS come from PyTorch's Python environment there (LD_LIBRARY_PATH is
# pointed at its nvidia/*/lib folders).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PACK=$ROOT/gpu-pack/ember-gpu.tar.xz
LIMIT_BYTES=$((60 << 20))
log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

if [ "${1:-}" = "--pack" ]; then
    TOKENIZER_DIR=${TOKENIZER_DIR:-$ROOT/bench-work/tokenizer/package/models}
    if [ ! -f "$TOKENIZER_DIR/tokenizer.json" ]; then
        echo "no Qwen3 tokenizer in $TOKENIZER_DIR (benches/compare/run.sh fetches it; or set TOKENIZER_DIR)" >&2
        exit 1
    fi
    STAGE=$(mktemp -d)
    trap 'rm -rf "$STAGE"' EXIT
    mkdir -p "$STAGE/bin" "$STAGE/tests" "$STAGE/tokenizer"
    log "ember (release, CUDA)"
    scripts/cuda-toolchain.sh cargo build --release --features cuda --target-dir target/cuda --bin ember
    cp target/cuda/release/ember "$STAGE/bin/"
    # The test suites that run on a GPU: the kernels' (each kernel against its CPU path) and the
    # models' parity suite (EMBER_TEST_DEVICE=cuda).
    log "CUDA test binaries"
    WANT="rms_norm silu_and_mul parity"
    scripts/cuda-toolchain.sh cargo test --release --features cuda --target-dir target/cuda \
        -p ember-kernels -p ember-models --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys
want = set(sys.argv[1].split())
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        print(m["target"]["name"], m["executable"])
' "$WANT" | while read -r name exe; do cp "$exe" "$STAGE/tests/$name"; done
    for t in $WANT; do
        [ -x "$STAGE/tests/$t" ] || { echo "test binary $t was not built" >&2; exit 1; }
    done
    strip "$STAGE"/bin/* "$STAGE"/tests/*
    cp "$TOKENIZER_DIR/tokenizer.json" "$TOKENIZER_DIR/tokenizer_config.json" "$STAGE/tokenizer/"
    git rev-parse HEAD > "$STAGE/COMMIT"
    mkdir -p "$(dirname "$PACK")"
    log "packing"
    tar -C "$STAGE" -cf - . | xz -9 -T0 > "$PACK"
    du -b "$STAGE"/bin/* "$STAGE"/tests/* "$STAGE"/tokenizer/*
    size=$(stat -c %s "$PACK")
    echo "pack: $PACK, $((size >> 20)) MiB ($size bytes; limit 60 MiB), commit $(cat "$STAGE/COMMIT")"
    [ "$size" -le "$LIMIT_BYTES" ] || { echo "the pack is over 60 MiB" >&2; exit 1; }
    exit 0
fi

# On the GPU machine.
[ -f "$PACK" ] || { echo "no $PACK: run scripts/gpu-check.sh --pack first, and carry gpu-pack/" >&2; exit 1; }
OUT=${OUT:-${OUT_DIR:-/tmp/ember-gpu-check}}
RUN=$(mktemp -d)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBS=$( (ls -d "$SITE"/nvidia/*/lib "$SITE"/torch/lib 2>/dev/null || true) | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
# Python's tarfile reads xz whether or not the machine has the xz tool.
"$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$PACK" "$RUN"
EMBER=$RUN/bin/ember
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
log "pack of commit $(cat "$RUN/COMMIT")"

# 1. The kernels against their CPU paths; 2. parity on the fixtures, models on the GPU (the rerun
# on other CPU paths does not apply).
status() { if "$@"; then echo pass; else echo FAIL; fi; }
log "kernel tests"
KERNELS=$(status sh -c "'$RUN/tests/rms_norm' > '$OUT/test-rms_norm.txt' 2>&1 && '$RUN/tests/silu_and_mul' > '$OUT/test-silu_and_mul.txt' 2>&1")
log "model parity on the fixtures (CUDA)"
PARITY=$(status sh -c "EMBER_TEST_DEVICE=cuda EMBER_FIXTURES_DIR='$ROOT/tests/fixtures/models' '$RUN/tests/parity' --skip every_cpu_isa_path > '$OUT/test-parity.txt' 2>&1")
grep -h "test result" "$OUT"/test-*.txt || true

# 3. The 8B-shape checkpoint and the copy bandwidth.
MODEL=${MODEL_DIR:-/tmp/qwen3-8b-shape}
log "Qwen3-8B-shape checkpoint (torch, on the GPU)"
"$PY" scripts/gpu_bench_model.py --out "$MODEL" --tokenizer-dir "$RUN/tokenizer" \
    --bandwidth-json "$OUT/bandwidth.json"

# 4. Ember.
log "ember bench offline --latency"
"$EMBER" bench offline --model "$MODEL" --device cuda --latency --prefill-lens 128,512 \
    --output-len 64 > "$OUT/ember-latency.csv" 2> "$OUT/ember-latency.log" || true
log "ember bench offline, concurrency 1,8,64"
"$EMBER" bench offline --model "$MODEL" --device cuda --concurrency 1,8,64 --input-len 128 \
    --output-len 128 > "$OUT/ember-offline.csv" 2> "$OUT/ember-offline.log" || true

# 5. transformers.
log "transformers"
"$PY" benches/compare/hf_gpu.py --model "$MODEL" --batch 64 --input-len 128 --output-len 128 \
    > "$OUT/hf.json" 2> "$OUT/hf.log" || true

"$PY" - "$OUT" "$KERNELS" "$PARITY" <<'PY' | tee "$OUT/summary.md"
import csv, json, sys
from pathlib import Path
out, kernels, parity = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def rows(name):
    p = out / name
    return list(csv.DictReader(p.open())) if p.exists() and p.stat().st_size else []
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
bw, hf = load("bandwidth.json"), load("hf.json")
lat = {(r["mode"], r["prompt_len"]): float(r["tok_per_s"]) for r in rows("ember-latency.csv")}
off = {int(r["concurrency"]): float(r["output_tok_per_s"]) for r in rows("ember-offline.csv")}
fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "-"
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
print(f"GPU: {gpu}; copy bandwidth {bw.get('bytes_per_s', 0) / 1e9:.0f} GB/s; "
      f"weights {bw.get('weight_bytes', 0) / 1e9:.2f} GB (Qwen3-8B shape, bf16)\n")
print("| check | Ember | transformers | ratio / fraction | target |")
print("|---|---|---|---|---|")
print(f"| CUDA kernels vs CPU (rms_norm, add_rms_norm, silu_and_mul) | {kernels} | | | pass |")
print(f"| parity on the tiny fixtures, models on the GPU | {parity} | | | pass |")
pre = lat.get(("prefill", "512"))
print(f"| prefill 512, tok/s | {fmt(pre)} | {fmt(hf.get('prefill_tok_per_s'))} | "
      f"{fmt(pre / hf['prefill_tok_per_s']) if pre and hf.get('prefill_tok_per_s') else '-'} | |")
dec = next((v for (m, _), v in lat.items() if m == "decode"), None)
roof = bw.get("bytes_per_s", 0) / bw["weight_bytes"] if bw.get("weight_bytes") else 0
frac = f"{100 * dec / roof:.0f} % of {roof:.0f} tok/s" if dec and roof else "-"
print(f"| batch-1 decode, tok/s | {fmt(dec)} | {fmt(hf.get('decode_tok_per_s'))} | {frac} | ≥ 80 % |")
b64, hf64 = off.get(64), hf.get("batch_output_tok_per_s")
print(f"| batch 64 (128 in / 128 out), output tok/s | {fmt(b64)} | {fmt(hf64)} | "
      f"{fmt(b64 / hf64) + ' ×' if b64 and hf64 else '-'} | ≥ 10 × |")
for c in sorted(off):
    print(f"| concurrency {c}, output tok/s | {fmt(off[c])} | | | |")
PY
log "done: $OUT"
