#!/usr/bin/env bash
# What structured output costs: `ember bench serve` against one `ember serve` on the random-weight
# Qwen2.5-0.5B-shape checkpoint (benches/compare/run.sh step 2 makes it), free decoding against
# the same requests under JSON schemas, at concurrency 1 and 16, in interleaved rounds (the
# machine is noisy):
#   free     no constraint
#   corpus   tests/clients/schema_corpus.json, schema i for request i (short outputs: the
#            grammars complete and end the request)
#   matched  free, with max_tokens the corpus run's mean output length (its fair control: short
#            requests spend more of each step on the prompts of the next ones)
#   long     benches/structured/long_array.json (an array of at least 100 strings: no request
#            completes it within max_tokens, so the output lengths equal the free run's)
# All runs ask for --ignore-eos, so free requests and long ones run to max_tokens.
#
#   benches/structured/run.sh              # results in bench-results/structured-<date>/
# benches/structured/paired.py measures the same at concurrency 1 in request pairs (finer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
WORK=${WORK:-$ROOT/bench-work}
MODEL=${MODEL:-$WORK/qwen2.5-0.5b-shape}
OUT=${OUT:-$ROOT/bench-results/structured-$(date -u +%Y%m%d-%H%M%S)}
EMBER=${EMBER:-$ROOT/target/release/ember}
ROUNDS=${ROUNDS:-2}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
# One request per corpus schema in every run.
NUM_PROMPTS=${NUM_PROMPTS:-33}
mkdir -p "$OUT"
[ -f "$MODEL/model.safetensors" ] || { echo "no checkpoint at $MODEL (benches/compare/run.sh makes it)" >&2; exit 1; }
[ -x "$EMBER" ] || cargo build --release

"$EMBER" serve --model "$MODEL" --dtype bf16 --served-model-name bench --port 8321 \
    --kv-cache-mib 1024 2> "$OUT/ember-serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 6000); do curl -sf http://127.0.0.1:8321/health >/dev/null 2>&1 && break; sleep 0.05; done

run() { # name concurrency output_len [schema]
    local schema=()
    [ -n "${4:-}" ] && schema=(--json-schema "$4")
    "$EMBER" bench serve --base-url http://127.0.0.1:8321 --model bench --tokenizer "$MODEL" \
        --num-prompts "$NUM_PROMPTS" --concurrency "$2" --input-len "$INPUT_LEN" --output-len "$3" \
        --ignore-eos --warmup 1 --seed 1 "${schema[@]}" \
        --result-json "$OUT/$1-c$2-r$ROUND.json" > "$OUT/$1-c$2-r$ROUND.txt"
}
for ROUND in $(seq 1 "$ROUNDS"); do
    for C in 1 16; do
        run free "$C" "$OUTPUT_LEN"
        run corpus "$C" "$OUTPUT_LEN" tests/clients/schema_corpus.json
        MEAN=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["runs"][0]; print(max(1, round(r["total_output_tokens"] / r["completed"])))' "$OUT/corpus-c$C-r$ROUND.json")
        run matched "$C" "$MEAN"
        run long "$C" "$OUTPUT_LEN" benches/structured/long_array.json
    done
done
# The engine's own account of the constrained runs: masks, their time on the worker thread, and
# what the engine thread waited for them after its forward passes.
curl -s http://127.0.0.1:8321/metrics | grep '^ember_structured_output' > "$OUT/grammar-metrics.txt"
kill -TERM $PID; wait $PID || true
grep -h "grammar compiler" "$OUT/ember-serve.log" | tail -1 || true
python3 benches/structured/summarize.py "$OUT" | tee "$OUT/summary.md"
