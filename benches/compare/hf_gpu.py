#!/usr/bin/env python3
"""transformers on the GPU, for scripts/gpu-check.sh: batch-1 prefill tokens/s (one forward pass
over a prompt), batch-1 decode tokens/s (greedy generate with a KV cache, EOS ignored; the
prefill's time taken out), and the aggregate output tokens/s of a batch of B prompts of L
tokens generating O tokens each (greedy, EOS ignored). Prints JSON.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def timed(f):
    torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    vocab = model.config.vocab_size
    ids = lambda b, n: torch.randint(1000, min(vocab, 100_000), (b, n), device="cuda")
    gen = lambda x, n: model.generate(
        x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
        attention_mask=torch.ones_like(x))
    out = {"engine": "transformers", "dtype": "bfloat16"}
    with torch.inference_mode():
        x = ids(1, args.prefill_len)
        model(x)  # warm-up
        out["prefill_tok_per_s"] = args.prefill_len / min(timed(lambda: model(x)) for _ in range(3))
        x = ids(1, 128)
        gen(x, 4)  # warm-up
        first = min(timed(lambda: gen(x, 1)) for _ in range(2))
        full = timed(lambda: gen(x, args.decode_tokens + 1))
        out["decode_tok_per_s"] = args.decode_tokens / (full - first)
        x = ids(args.batch, args.input_len)
        seconds = timed(lambda: gen(x, args.output_len))
        out["batch"] = args.batch
        out["batch_output_tok_per_s"] = args.batch * args.output_len / seconds
    print(json.dumps(out))


if __name__ == "__main__":
    main()
