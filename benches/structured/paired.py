#!/usr/bin/env python3
"""Per-token cost of structured output at concurrency 1, in pairs: for each schema of the corpus
(twice over), a constrained streaming request and then a free one of exactly the same output
length (ignore_eos, max_tokens = the constrained output's tokens); and pairs of the long-array
schema and free requests of 64 tokens. TPOT of a request = (last token - first token) / (n - 1);
the medians of the paired differences are what a token costs, drift between pairs cancelled.

  python3 benches/structured/paired.py http://127.0.0.1:8321     # an `ember serve --served-model-name bench`
"""

import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8321"
ROOT = Path(__file__).resolve().parents[2]
CORPUS = json.loads((ROOT / "tests/clients/schema_corpus.json").read_text())
LONG = json.loads((ROOT / "benches/structured/long_array.json").read_text())
PROMPT = "The dispatch log for today, written by the night shift supervisor, reads as follows:"


def tpot(schema, max_tokens):
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    req = urllib.request.Request(BASE + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    times = []
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())
    n = len(times)
    return ((times[-1] - times[0]) / (n - 1) * 1000 if n > 1 else None), n


def main():
    tpot(None, 8)  # warm-up
    corpus, long = [], []
    for _ in range(2):
        for entry in CORPUS:
            t, n = tpot(entry["schema"], 64)
            if t is None or n < 4:
                continue
            f, _ = tpot(None, n)
            corpus.append(t - f)
        for _ in range(8):
            t, _ = tpot(LONG, 64)
            f, _ = tpot(None, 64)
            long.append(t - f)
    for name, d in (("corpus vs free of equal length", corpus), ("long array vs free, 64 tokens", long)):
        print(f"{name}: {len(d)} pairs, median TPOT difference {statistics.median(d):+.2f} ms "
              f"(quartiles {statistics.quantiles(d, n=4)[0]:+.2f} / {statistics.quantiles(d, n=4)[2]:+.2f})")


if __name__ == "__main__":
    main()
