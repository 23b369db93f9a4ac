#!/usr/bin/env python3
"""For scripts/gpu-check.sh, on the GPU machine: writes a random-weight checkpoint in the exact
shape of Qwen3-8B (bf16 safetensors in shards, untied lm_head, q/k norms; speed does not depend
on weight values), generated on the GPU with torch, and measures the device's memory bandwidth
(a large device-to-device copy: bytes read + written per second). Never committed.

Usage: gpu_bench_model.py --out DIR --tokenizer-dir DIR --bandwidth-json FILE
Needs torch and safetensors (the GPU machine has both).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

SHARD_BYTES = 4 << 30


def shapes(c):
    h, i, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "self_attn.q_norm.weight", (d,)
        yield p + "self_attn.k_norm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def bandwidth():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return 2 * n * reps / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--bandwidth-json", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            for k in shard:
                weight_map[k] = name
            shard, size = {}, 0

    params = 0
    for name, shape in shapes(CONFIG):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02).cpu()
        shard[name] = t
        size += t.numel() * 2
        params += t.numel()
        if size >= SHARD_BYTES:
            flush()
    flush()
    # Shard names as transformers writes them (model-0000i-of-0000n.safetensors).
    n = len(files)
    for i, name in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        for k, v in list(weight_map.items()):
            if v == name:
                weight_map[k] = final
    index = {"metadata": {"total_size": params * 2}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 151643, "eos_token_id": 151645, "do_sample": False})
    )
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.tokenizer_dir) / f, out / f)
    bw = bandwidth()
    Path(args.bandwidth_json).write_text(
        json.dumps({"bytes_per_s": bw, "weight_bytes": params * 2, "params": params,
                    "gpu": torch.cuda.get_device_name(0), "write_s": time.time() - t0})
    )
    print(f"{params / 1e9:.2f}B parameters in {n} shards, {time.time() - t0:.0f} s; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
