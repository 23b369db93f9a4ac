#!/usr/bin/env bash
# Fuzzing: each proptest target of tests/fuzz.rs for a bounded time.
#
#   scripts/fuzz.sh                 # 120 s per target
#   FUZZ_SECONDS=600 scripts/fuzz.sh detokenizer
#
# Targets (test names): request_parsing_and_validation, chat_template_rendering,
# reasoning_parser_does_not_depend_on_chunking, tool_call_parser_does_not_depend_on_chunking,
# detokenizer_and_stop_strings. A failure is shrunk to a minimal case, printed, and its seed
# kept in tests/fuzz-corpus/<target>.txt (commit it: every later run replays it first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FUZZ_SECONDS=${FUZZ_SECONDS:-120}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(request_parsing_and_validation chat_template_rendering
        reasoning_parser_does_not_depend_on_chunking tool_call_parser_does_not_depend_on_chunking
        detokenizer_and_stop_strings)
fi
cargo test --release --test fuzz --no-run
status=0
LOG=$(mktemp)
for t in "${TARGETS[@]}"; do
    start=$(date +%s)
    if cargo test --release --test fuzz -- --exact "$t" --nocapture > "$LOG" 2>&1; then
        result=pass
    else
        result=FAIL
        status=1
    fi
    cases=$(grep -aoE "^fuzz [a-z_]+: [0-9]+ cases" "$LOG" || true)
    echo "$t: $result, $(( $(date +%s) - start )) s, ${cases:-?}"
    if [ "$result" != pass ]; then
        grep -av "^\s*$" "$LOG" | grep -avE "^(running|test |failures:|    [a-z_]+$)" | tail -40 || true
    fi
done
rm -f "$LOG"
exit $status
