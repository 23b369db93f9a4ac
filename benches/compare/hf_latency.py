#!/usr/bin/env python3
"""Batch-1 speed of HF transformers (PyTorch, CPU) on a checkpoint: prefill tokens/s at given
prompt lengths (one forward pass over the prompt) and decode tokens/s (greedy generate with a
KV cache, EOS ignored). Prints JSON. Part of benches/compare/run.sh.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prefill-lens", default="128,512")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    vocab = model.config.vocab_size
    out = {"engine": "transformers", "dtype": args.dtype, "threads": args.threads, "prefill": {}}
    with torch.inference_mode():
        warm = torch.randint(1000, 100000, (1, 16))
        model(warm)
        for n in [int(x) for x in args.prefill_lens.split(",")]:
            ids = torch.randint(1000, min(vocab, 100000), (1, n))
            best = float("inf")
            for _ in range(args.reps):
                t = time.perf_counter()
                model(ids, use_cache=False)
                best = min(best, time.perf_counter() - t)
            out["prefill"][str(n)] = n / best
        ids = torch.randint(1000, min(vocab, 100000), (1, 16))
        # Time the first token separately so the decode rate excludes the prefill.
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.generate(
            ids, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False
        )
        total = time.perf_counter() - t0
        n = gen.shape[1] - ids.shape[1]
        out["decode_tokens"] = n
        out["decode_tok_per_s"] = (n - 1) / max(total - first, 1e-9)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
