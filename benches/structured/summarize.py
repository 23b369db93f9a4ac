#!/usr/bin/env python3
"""Medians over the rounds of benches/structured/run.sh: output tokens/s and TPOT per mode and
concurrency; `corpus` against `matched` (free decoding of the same lengths), `long` against
`free`."""

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


CONTROL = {"free": "free", "matched": "matched", "corpus": "matched", "long": "free"}
print("| mode | concurrency | output tok/s | TPOT p50 ms | mean output tokens | control | tok/s vs control | TPOT − control, ms |")
print("|---|---|---|---|---|---|---|---|")
for c in (1, 16):
    for mode in ("free", "long", "matched", "corpus"):
        runs = cells.get((mode, c))
        free = cells.get((CONTROL[mode], c))
        if not runs:
            continue
        tps = med(runs, lambda r: r["output_throughput"])
        tpot = med(runs, lambda r: r["tpot"]["p50_ms"])
        length = med(runs, lambda r: r["total_output_tokens"] / max(r["completed"], 1))
        vs = tps / med(free, lambda r: r["output_throughput"]) if free else float("nan")
        dt = tpot - med(free, lambda r: r["tpot"]["p50_ms"]) if free else float("nan")
        print(f"| {mode} | {c} | {tps:.1f} | {tpot:.1f} | {length:.0f} | {CONTROL[mode]} | {vs:.3f} | {dt:+.2f} |")

metrics = out / "grammar-metrics.txt"
if metrics.exists():
    m = dict(line.split() for line in metrics.read_text().splitlines() if line.strip())
    masks = float(m.get("ember_structured_output_masks_total", 0))
    busy = float(m.get("ember_structured_output_mask_seconds_total", 0))
    wait = float(m.get("ember_structured_output_wait_seconds_total", 0))
    if masks:
        print(f"\n{masks:.0f} grammar masks: {busy / masks * 1e6:.0f} µs each on the worker thread, "
              f"{wait / masks * 1e6:.1f} µs each waited for by the engine thread")
