#!/usr/bin/env python3
"""Medians over the rounds of benches/structured/run.sh: output tokens/s and TPOT per mode and
concurrency, and each constrained mode against free decoding."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
cells = defaultdict(list)
for f in sorted(out.glob("*-c*-r*.json")):
    mode, c, _ = f.stem.split("-")
    run = json.loads(f.read_text())["runs"][0]
    cells[(mode, int(c[1:]))].append(run)


def med(runs, key):
    return statistics.median(key(r) for r in runs)


print("| mode | concurrency | output tok/s | TPOT p50 ms | mean output tokens | tok/s vs free | TPOT − free, ms |")
print("|---|---|---|---|---|---|---|")
for c in (1, 16):
    free = cells.get(("free", c))
    for mode in ("free", "corpus", "long"):
        runs = cells.get((mode, c))
        if not runs:
            continue
        tps = med(runs, lambda r: r["output_throughput"])
        tpot = med(runs, lambda r: r["tpot"]["p50_ms"])
        length = med(runs, lambda r: r["total_output_tokens"] / max(r["completed"], 1))
        vs = tps / med(free, lambda r: r["output_throughput"]) if free else float("nan")
        dt = tpot - med(free, lambda r: r["tpot"]["p50_ms"]) if free else float("nan")
        print(f"| {mode} | {c} | {tps:.1f} | {tpot:.1f} | {length:.0f} | {vs:.3f} | {dt:+.2f} |")
