#!/usr/bin/env bash
# Interleaved A/B of batch-1 decode: Ember variants (environment settings such as
# EMBER_CPU_ISA) and llama-bench, one after the other in each round (in reverse order every
# other round), so that the VM's moving bandwidth hits every variant alike. Needs the assets
# benches/compare/run.sh builds; run.sh calls it for its interleaved decode rounds.
#
#   benches/compare/ab_decode.sh 3 "dp:" "fma:EMBER_CPU_ISA=avx512" "llama:"
#
# Arguments: rounds, then NAME:ENV (ENV: space-separated VAR=value, may be empty). The name
# "llama" runs llama-bench on the f16 GGUF, "llama-T" on model-T.gguf (T: q8_0, q4_k_m, ...);
# "ember-T" runs Ember on model-T.gguf, any other name Ember on the safetensors checkpoint.
# Prints "round name tok/s" lines.
# Knobs: WORK (default bench-work), DTYPE (default bf16), THREADS (default nproc),
# DECODE_TOKENS (default 64), EMBER (default target/release/ember).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
WORK=${WORK:-bench-work}
DTYPE=${DTYPE:-bf16}
THREADS=${THREADS:-$(nproc)}
DECODE_TOKENS=${DECODE_TOKENS:-64}
EMBER=${EMBER:-target/release/ember}
rounds=$1
shift
forward=("$@")
backward=()
for ((i = $# - 1; i >= 0; i--)); do backward+=("${forward[$i]}"); done
for r in $(seq 1 "$rounds"); do
    order=("${forward[@]}")
    [ $((r % 2)) -eq 0 ] && order=("${backward[@]}")
    for cfg in "${order[@]}"; do
        name=${cfg%%:*}
        envs=${cfg#*:}
        if [ "${name%%-*}" = llama ]; then
            gguf=f16
            [ "$name" != llama ] && gguf=${name#llama-}
            v=$("$WORK/llama.cpp-build/bin/llama-bench" -m "$WORK/model-$gguf.gguf" -p 0 -n "$DECODE_TOKENS" \
                -t "$THREADS" -r 1 -o json 2>/dev/null |
                python3 -c 'import json,sys; print(round(json.load(sys.stdin)[0]["avg_ts"], 2))')
        else
            model=$WORK/qwen2.5-0.5b-shape
            case $name in ember-*) model=$WORK/model-${name#ember-}.gguf ;; esac
            # shellcheck disable=SC2086 # ENV is a list of assignments
            v=$(env $envs "$EMBER" bench offline --model "$model" \
                --dtype "$DTYPE" --latency --prefill-lens 16 --output-len "$DECODE_TOKENS" --kv-cache-mib 256 \
                2>/dev/null | awk -F, '$1 == "decode" {print $4}')
        fi
        echo "$r $name $v"
    done
done
