#!/usr/bin/env bash
# Soak: `ember serve` driven well above its capacity by `ember bench serve`, with a share of
# clients hanging up at random points, for a bounded time. Passes when no request failed (no
# 5xx, no error event, none lost), the KV cache is back to zero blocks, nothing is left running
# or waiting, resident memory stayed flat (the end within RSS_GROWTH_PCT of the most seen in the
# first quarter, when bounded caches have filled), and the server drains and exits 0 on SIGTERM.
#
#   scripts/soak.sh                      # 10 minutes on the tiny committed fixture
#   DURATION=60 scripts/soak.sh          # shorter
#   MODEL=bench-work/qwen2.5-0.5b-shape CONCURRENCY=32 scripts/soak.sh
#
# Knobs (environment): MODEL, DURATION (s), CONCURRENCY, PROMPTS (per round), CANCEL (fraction),
# INPUT_LEN, OUTPUT_LEN, KV_MIB, MAX_SEQS, PORT, OUT (report directory), RSS_GROWTH_PCT (allowed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

MODEL=${MODEL:-tests/fixtures/models/qwen3}
DURATION=${DURATION:-600}
CONCURRENCY=${CONCURRENCY:-64}
PROMPTS=${PROMPTS:-256}
CANCEL=${CANCEL:-0.3}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
KV_MIB=${KV_MIB:-2}
MAX_SEQS=${MAX_SEQS:-16}
PORT=${PORT:-8377}
RSS_GROWTH_PCT=${RSS_GROWTH_PCT:-10}
OUT=${OUT:-soak-results/$(date -u +%Y%m%d-%H%M%S)}
EMBER=$ROOT/target/release/ember
BASE=http://127.0.0.1:$PORT

mkdir -p "$OUT"
[ -x "$EMBER" ] || cargo build --release
log() { echo "[soak $(date -u +%H:%M:%S)] $*" >&2; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
metric() { curl -s "$BASE/metrics" | awk -v m="$1" 'index($0, m) == 1 {print $NF; exit}'; }

"$EMBER" serve --model "$MODEL" --served-model-name soak --port "$PORT" \
    --kv-cache-mib "$KV_MIB" --max-num-seqs "$MAX_SEQS" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -sf "$BASE/health" > /dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
    sleep 0.5
done
curl -sf "$BASE/health" > /dev/null

bench() { # seed prompts cancel json
    "$EMBER" bench serve --base-url "$BASE" --model soak --tokenizer "$MODEL" \
        --num-prompts "$2" --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --ignore-eos --temperature 1 --seed "$1" \
        --cancel-fraction "$3" --timeout 300 --result-json "$4" > /dev/null 2>> "$OUT/bench.log"
}

log "warm-up (model $MODEL, concurrency $CONCURRENCY, KV $KV_MIB MiB, $MAX_SEQS sequences)"
# A full round, cancellations included: the allocator's arenas and the runtime's threads
# reach their working size before the baseline is taken.
bench 0 "$PROMPTS" "$CANCEL" "$OUT/warmup.json"
RSS_BEFORE=$(rss_kib "$SERVER")
log "resident memory after warm-up: $RSS_BEFORE KiB; soaking for $DURATION s"

START=$(date +%s)
ROUND=0
while [ $(( $(date +%s) - START )) -lt "$DURATION" ]; do
    ROUND=$((ROUND + 1))
    bench "$ROUND" "$PROMPTS" "$CANCEL" "$OUT/round-$ROUND.json"
    RSS=$(rss_kib "$SERVER")
    echo "$ROUND $(( $(date +%s) - START )) $RSS" >> "$OUT/rss.txt"
    log "round $ROUND: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["runs"][0]; print(r["completed"], "completed,", r["cancelled"], "cancelled,", r["failed"], "failed")' "$OUT/round-$ROUND.json"), RSS $RSS KiB"
done
ELAPSED=$(( $(date +%s) - START ))

# Let the aborted requests' last steps finish, then read the server's state.
sleep 3
KV=$(metric ember_kv_cache_usage_ratio)
RUNNING=$(metric ember_num_requests_running)
WAITING=$(metric ember_num_requests_waiting)
PREEMPTED=$(metric ember_num_preemptions_total)
ABORTED=$(metric 'ember_request_success_total{finished_reason="abort"}')
RSS_AFTER=$(rss_kib "$SERVER")

kill -TERM "$SERVER"
EXIT=0
wait "$SERVER" || EXIT=$?
trap - EXIT

python3 - "$OUT" "$ROUND" "$ELAPSED" "$KV" "$RUNNING" "$WAITING" "$PREEMPTED" "$ABORTED" \
    "$RSS_BEFORE" "$RSS_AFTER" "$EXIT" "$RSS_GROWTH_PCT" "$PROMPTS" <<'EOF'
import glob, json, sys
out, rounds, elapsed, kv, running, waiting, preempted, aborted, rss0, rss1, code, growth, per_round = sys.argv[1:]
sent = completed = cancelled = failed = 0
errors = set()
for path in sorted(glob.glob(f"{out}/round-*.json")):
    run = json.load(open(path))["runs"][0]
    sent += int(per_round)
    completed += run["completed"]
    cancelled += run["cancelled"]
    failed += run["failed"]
    errors.update(run["errors"])
lost = sent - completed - cancelled - failed
server_5xx = sum(1 for e in errors if e.startswith("HTTP 5"))
rss_warm, rss1 = int(rss0), int(rss1)
rows = [l.split() for l in open(f"{out}/rss.txt")]
series = [int(r[2]) for r in rows] or [rss1]
# The baseline is the largest resident size in the soak's first quarter: by then the bounded
# per-thread caches (the tokenizer's words) and the allocator's arenas have filled; what grows
# after it grows with the requests.
quarter = [int(r[2]) for r in rows if int(r[1]) <= int(elapsed) // 4] or series[:1]
rss0 = max(quarter)
rss_pct = 100.0 * (rss1 - rss0) / rss0
panics = open(f"{out}/server.log", errors="replace").read().count("panicked")
checks = {
    "no failed request": failed == 0,
    "no lost request": lost == 0,
    "KV cache back to zero": float(kv) == 0.0,
    "nothing running or waiting": float(running) == 0.0 and float(waiting) == 0.0,
    f"resident memory flat (end within {growth} % of the first quarter's most)": rss_pct <= float(growth),
    "no panic in the log": panics == 0,
    "SIGTERM exit 0": code == "0",
}
report = f"""| soak | |
|---|---|
| duration | {elapsed} s, {rounds} rounds |
| requests sent | {sent} |
| completed | {completed} |
| cancelled by the client | {cancelled} (the server counted {float(aborted):.0f} aborts, warm-up included) |
| failed (5xx among them) | {failed} ({server_5xx}) |
| lost | {lost} |
| preemptions | {float(preempted):.0f} |
| KV cache usage after | {float(kv):.3f} |
| running / waiting after | {float(running):.0f} / {float(waiting):.0f} |
| resident memory after warm-up | {rss_warm / 1024:.1f} MiB |
| resident memory, most in the first quarter / at the end | {rss0 / 1024:.1f} / {rss1 / 1024:.1f} MiB ({rss_pct:+.1f} %) |
| resident memory over the rounds (min / max) | {min(series) / 1024:.1f} / {max(series) / 1024:.1f} MiB |
| exit on SIGTERM | {code} |
"""
for name, ok in checks.items():
    report += f"\n- {'PASS' if ok else 'FAIL'}: {name}"
if errors:
    report += "\n\nerrors seen: " + "; ".join(sorted(errors)[:5])
print(report)
open(f"{out}/report.md", "w").write(report + "\n")
sys.exit(0 if all(checks.values()) else 1)
EOF
