#!/usr/bin/env python3
"""Turns the outputs of benches/compare/run.sh into the Markdown table of docs/BENCHMARKS.md:
batch-1 prefill/decode per engine, serving throughput and TTFT per concurrency, the ratios
Ember/llama.cpp and Ember/transformers, and Ember's batch-1 decode as a fraction of the
memory-bandwidth roofline.

Usage: summarize.py RESULTS_DIR MODEL_DIR
"""

import csv
import json
import statistics
import struct
import sys
from pathlib import Path


def weight_params(model_dir: Path) -> int:
    total = 0
    for f in model_dir.glob("*.safetensors"):
        raw = f.read_bytes()[:8]
        (n,) = struct.unpack("<Q", raw)
        with open(f, "rb") as fh:
            fh.seek(8)
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def ember_latency(path: Path):
    out = {"prefill": {}, "decode": None, "context": {}}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row["mode"] == "prefill":
                out["prefill"][row["prompt_len"]] = float(row["tok_per_s"])
            elif row["prompt_len"] == "16":
                out["decode"] = float(row["tok_per_s"])
            else:
                out["context"][int(row["prompt_len"])] = float(row["tok_per_s"])
    return out


def ember_profile(path: Path):
    """The per-op decode profile `ember bench offline --latency` wrote to stderr."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("decode step profile")), None)
    if start is None:
        return []
    return lines[start:start + 8] + [l for l in lines[start + 8:] if l.startswith("decode after")]


def llama_bench(path: Path):
    out = {"prefill": {}, "decode": None}
    for r in json.loads(path.read_text()):
        if r["n_gen"] == 0:
            out["prefill"][str(r["n_prompt"])] = r["avg_ts"]
        elif r["n_prompt"] == 0:
            out["decode"] = r["avg_ts"]
    return out


def hf_latency(path: Path):
    r = json.loads(path.read_text())
    return {"prefill": r["prefill"], "decode": r["decode_tok_per_s"]}


def decode_rounds(path: Path):
    """The interleaved decode rounds (ab_decode.sh's "round name tok/s" lines) that have both
    engines, in round order."""
    if not path.exists():
        return []
    per = {}
    for line in path.read_text().split("\n"):
        fields = line.split()
        if len(fields) == 3:
            try:
                per.setdefault(int(fields[0]), {})[fields[1]] = float(fields[2])
            except ValueError:
                continue
    return [per[n] for n in sorted(per) if per[n].get("ember") and per[n].get("llama")]


def named_rounds(path: Path):
    """ab_decode.sh's "round name tok/s" lines -> {name: [tok/s, ...]}."""
    out = {}
    if not path.exists():
        return out
    for line in path.read_text().split("\n"):
        fields = line.split()
        if len(fields) == 3:
            try:
                out.setdefault(fields[1], []).append(float(fields[2]))
            except ValueError:
                continue
    return out


def gguf_section(results: Path, bandwidth: float):
    """Ember and llama.cpp on the same GGUF files."""
    files = [t for t in ("q8_0", "q4_k_m") if (results / f"ember-latency-{t}.csv").exists()]
    if not files:
        return
    sizes = {}
    if (results / "gguf-files.csv").exists():
        sizes = {k: int(v) for k, v in (l.split(",") for l in (results / "gguf-files.csv").read_text().split())}
    print("\n### GGUF: Ember and llama.cpp on the same files\n")
    print("| file | engine | prefill 128 tok/s | prefill 512 tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    rows = {}
    for t in files:
        ember = ember_latency(results / f"ember-latency-{t}.csv")
        llama = llama_bench(results / f"llama-bench-{t}.json")
        rows[t] = (ember, llama)
        for name, r in (("Ember", ember), ("llama.cpp", llama)):
            print(f"| {t} | {name} | {fmt(r['prefill'].get('128'))} | {fmt(r['prefill'].get('512'))} | {fmt(r['decode'], 2)} |")
    rounds = named_rounds(results / "decode-rounds-gguf.txt")
    print("\n| file | prefill 128, Ember ÷ llama.cpp | prefill 512 | decode (single runs) | decode, median of interleaved rounds |")
    print("|---|---|---|---|---|")
    for t in files:
        ember, llama = rows[t]
        cells = [fmt(ember["prefill"].get(k) / llama["prefill"][k], 2) if llama["prefill"].get(k) and ember["prefill"].get(k) else "-" for k in ("128", "512")]
        single = fmt(ember["decode"] / llama["decode"], 2) if ember["decode"] and llama["decode"] else "-"
        e, l = rounds.get(f"ember-{t}"), rounds.get(f"llama-{t}")
        inter = "-"
        if e and l:
            inter = f"{statistics.median(e) / statistics.median(l):.2f} ({statistics.median(e):.2f} / {statistics.median(l):.2f} tok/s, {len(e)} rounds)"
        print(f"| {t} | {cells[0]} | {cells[1]} | {single} | {inter} |")
        if sizes.get(t) and e and l:
            ceiling = bandwidth * 1e9 / sizes[t]
            print(f"|  | roofline ({sizes[t] / 1e6:.0f} MB read per token at {bandwidth:.1f} GB/s): {ceiling:.1f} tok/s | Ember {100 * statistics.median(e) / ceiling:.0f} % | llama.cpp {100 * statistics.median(l) / ceiling:.0f} % | |")
    serve = {}
    for name in ("ember-q4_k_m", "llama-q4_k_m"):
        path = results / f"serve-{name}.json"
        if path.exists():
            for run in json.loads(path.read_text())["runs"]:
                serve[(name, run["value"])] = run
    if serve:
        print("\n| q4_k_m serving: concurrency | Ember output tok/s | llama-server output tok/s | Ember ÷ llama-server | TTFT p50 ms, Ember / llama-server |")
        print("|---|---|---|---|---|")
        for (name, value), run in sorted(serve.items(), key=lambda kv: kv[0][1]):
            other = serve.get(("llama-q4_k_m", value))
            if name != "ember-q4_k_m" or other is None:
                continue
            print(f"| {value:.0f} | {run['output_throughput']:.2f} | {other['output_throughput']:.2f} | {run['output_throughput'] / other['output_throughput']:.2f} | {run['ttft']['p50_ms']:.0f} / {other['ttft']['p50_ms']:.0f} |")
    mem = {}
    for name in ("ember", "llama"):
        path = results / f"{name}-serve-q4_k_m-memory.csv"
        if path.exists():
            mem[name] = dict(line.split(",", 1) for line in path.read_text().split())
    if len(mem) == 2:
        e, l = int(mem["ember"]["vm_rss_kib"]) / 1024, int(mem["llama"]["vm_rss_kib"]) / 1024
        print(f"\nResident memory after the runs, same q4_k_m file and KV budget: Ember {e:.0f} MiB, "
              f"llama-server {l:.0f} MiB (Ember − llama-server = {e - l:+.0f} MiB; target ≤ +191 MiB).")


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    results, model = Path(sys.argv[1]), Path(sys.argv[2])
    params = weight_params(model)
    bw = {}
    with open(results / "membw.csv") as fh:
        for row in csv.DictReader(fh):
            bw[int(row["threads"])] = float(row["read_gb_per_s"])
    bandwidth = max(bw.values())

    latency = [
        ("Ember", "f32", ember_latency(results / "ember-latency-f32.csv")),
        ("Ember", "bf16", ember_latency(results / "ember-latency-bf16.csv")),
        ("llama.cpp (llama-bench)", "f16", llama_bench(results / "llama-bench-f16.json")),
        ("llama.cpp (llama-bench)", "q8_0", llama_bench(results / "llama-bench-q8_0.json")),
        ("transformers", "f32", hf_latency(results / "hf-latency-float32.json")),
        ("transformers", "bf16", hf_latency(results / "hf-latency-bfloat16.json")),
    ]
    machine = (results / "machine.txt").read_text().splitlines()
    print(f"Machine: {machine[2].split(':', 1)[-1].strip()}, {machine[1]} vCPUs; commit {machine[3][:12]}; {machine[4]}")
    if len(machine) > 5:
        print(f"Ember: {machine[5]}")
    print(f"Model: {params / 1e6:.0f}M parameters (Qwen2.5-0.5B shape); read bandwidth "
          + ", ".join(f"{bw[t]:.1f} GB/s with {t} thread(s)" for t in sorted(bw)) + "\n")
    print("### Batch 1\n")
    print("| engine | weights | prefill 128 tok/s | prefill 512 tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, dtype, r in latency:
        print(f"| {name} | {dtype} | {fmt(r['prefill'].get('128'))} | {fmt(r['prefill'].get('512'))} | {fmt(r['decode'], 2)} |")

    def ratio(a, b):
        return None if not a or not b else a / b

    by = {(n.split(" ")[0], d): r for n, d, r in latency}
    interleaved = decode_rounds(results / "decode-rounds.txt")
    print("\nRatios (Ember ÷ other; above 1 means Ember is faster; decode from the single runs above,"
          " and for bf16 ÷ f16 also the median ratio of the interleaved rounds below):\n")
    print("| comparison | prefill 128 | prefill 512 | decode |")
    print("|---|---|---|---|")
    for label, a, b in [
        ("Ember bf16 ÷ llama.cpp f16", ("Ember", "bf16"), ("llama.cpp", "f16")),
        ("Ember f32 ÷ llama.cpp f16", ("Ember", "f32"), ("llama.cpp", "f16")),
        ("Ember bf16 ÷ llama.cpp q8_0", ("Ember", "bf16"), ("llama.cpp", "q8_0")),
        ("Ember f32 ÷ transformers f32", ("Ember", "f32"), ("transformers", "f32")),
        ("Ember bf16 ÷ transformers bf16", ("Ember", "bf16"), ("transformers", "bf16")),
    ]:
        ra, rb = by[a], by[b]
        cells = [fmt(ratio(ra["prefill"].get(k), rb["prefill"].get(k)), 2) for k in ("128", "512")]
        decode = fmt(ratio(ra['decode'], rb['decode']), 2)
        if interleaved and a == ("Ember", "bf16") and b == ("llama.cpp", "f16"):
            decode += f" (interleaved: {statistics.median(r['ember'] / r['llama'] for r in interleaved):.2f})"
        print(f"| {label} | {cells[0]} | {cells[1]} | {decode} |")

    # The ceiling uses the best bandwidth anything reached here: `ember bench memory`'s summing
    # loop, or the weight bytes per second an engine's decode actually streamed (llama.cpp's can
    # exceed the simple loop), so no fraction is flattered by a low bandwidth figure.
    decoders = [("Ember", "f32", 4), ("Ember", "bf16", 2), ("llama.cpp", "f16", 2),
                ("llama.cpp", "q8_0", 34 / 32), ("transformers", "f32", 4), ("transformers", "bf16", 2)]
    effective = {(n, d): (by[(n, d)]["decode"] or 0) * params * b / 1e9 for n, d, b in decoders}
    best_name = max(effective, key=effective.get)
    ceiling_bw = max(bandwidth, effective[best_name])
    print("\n### Roofline (batch-1 decode reads every weight once per token)\n")
    print(f"Bandwidth used for the ceiling: {ceiling_bw:.1f} GB/s (`ember bench memory`: "
          f"{bandwidth:.1f} GB/s; weights streamed by {' '.join(best_name)} decode: "
          f"{effective[best_name]:.1f} GB/s).\n")
    print("| engine | weights | bytes/token | ceiling tok/s | measured tok/s | fraction |")
    print("|---|---|---|---|---|---|")
    for name, dtype, nbytes in decoders:
        per_token = params * nbytes
        ceiling = ceiling_bw * 1e9 / per_token
        measured = by[(name, dtype)]["decode"]
        print(f"| {name} | {dtype} | {per_token / 1e9:.2f} GB | {ceiling:.1f} | {fmt(measured, 2)} | {fmt(100 * measured / ceiling if measured else None)} % |")

    both = interleaved
    if both:
        ratios = [r["ember"] / r["llama"] for r in both]
        em = statistics.median(r["ember"] for r in both)
        ll = statistics.median(r["llama"] for r in both)
        ceiling = ceiling_bw * 1e9 / (params * 2)
        print(f"\n### Interleaved batch-1 decode ({len(both)} rounds, Ember bf16 and llama-bench f16 taking turns)\n")
        print("| round | Ember bf16 tok/s | llama.cpp f16 tok/s | Ember ÷ llama.cpp |")
        print("|---|---|---|---|")
        for n, r in enumerate(both, 1):
            print(f"| {n} | {r['ember']:.2f} | {r['llama']:.2f} | {r['ember'] / r['llama']:.2f} |")
        print(f"| median | {em:.2f} | {ll:.2f} | {statistics.median(ratios):.2f} (ratio of medians {em / ll:.2f}) |")
        print(f"\nMedian Ember bf16 decode: {100 * em / ceiling:.1f} % of the ceiling above ({ceiling:.1f} tok/s).")

    bf16 = by[("Ember", "bf16")]
    if bf16["context"]:
        print("\n### Long context (Ember bf16, batch-1 decode after a prompt of N tokens)\n")
        print("| context | decode tok/s | ÷ context 128 |")
        print("|---|---|---|")
        base = bf16["context"].get(128)
        for n, rate in sorted(bf16["context"].items()):
            print(f"| {n} | {rate:.2f} | {fmt(ratio(rate, base), 2)} |")
    for d in ("f32", "bf16"):
        prof = ember_profile(results / f"ember-latency-{d}.log")
        if prof:
            print(f"\n### Where an Ember {d} decode step goes\n")
            print("```")
            print("\n".join(prof))
            print("```")

    gguf_section(results, bandwidth)

    print("\n### Serving (`ember bench serve`, closed loop)\n")
    print("| server | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | failed |")
    print("|---|---|---|---|---|---|---|")
    serve = {}
    for name in ("ember", "llama"):
        path = results / f"serve-{name}.json"
        if not path.exists():
            continue
        for run in json.loads(path.read_text())["runs"]:
            label = "Ember" if name == "ember" else "llama-server (f16, --parallel 16)"
            serve[(name, run["value"])] = run
            print(f"| {label} | {run['value']:.0f} | {run['output_throughput']:.2f} | {run['ttft']['p50_ms']:.0f} | {run['ttft']['p99_ms']:.0f} | {run['tpot']['p50_ms']:.0f} | {run['failed']} |")
    print("\n| concurrency | output tok/s, Ember ÷ llama-server | TTFT p50, Ember ÷ llama-server (above 1: Ember slower) |")
    print("|---|---|---|")
    for (name, value), run in sorted(serve.items(), key=lambda kv: kv[0][1]):
        if name != "ember" or ("llama", value) not in serve:
            continue
        other = serve[("llama", value)]
        print(f"| {value:.0f} | {fmt(ratio(run['output_throughput'], other['output_throughput']), 2)} | {fmt(ratio(run['ttft']['p50_ms'], other['ttft']['p50_ms']), 2)} |")
    mem = results / "ember-serve-memory.csv"
    if mem.exists():
        m = dict(line.split(",", 1) for line in mem.read_text().split())
        weights_mb = params * 2 / 1e6
        rss = int(m["vm_rss_kib"]) / 1024 if "vm_rss_kib" in m else None
        print(f"\n`ember serve` answered /health 200 after {m['ready_ms']} ms; resident memory after "
              f"the concurrency-16 run {fmt(rss, 0)} MiB, peak (loading included) "
              f"{int(m['vm_hwm_kib']) / 1024:.0f} MiB; bf16 weights {weights_mb / 1.048576:.0f} MiB "
              f"+ KV budget {m['kv_cache_mib']} MiB + 300 MB = "
              f"{weights_mb / 1.048576 + int(m['kv_cache_mib']) + 286:.0f} MiB.")


if __name__ == "__main__":
    main()
