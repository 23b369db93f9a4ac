#!/usr/bin/env python3
"""The official OpenAI Python SDK against a live `ember serve` on the tiny Qwen3 fixture.

Run by tests/openai_sdk.rs (cargo test), with the SDK pinned in tests/clients/requirements.txt:
  python3 tests/clients/openai_suite.py --ember target/release/ember

It starts `ember serve` on a free port, runs every check against it and against a second server
whose completions are forced to contain reasoning and a tool call (started in process by
tests/openai_sdk.rs with a library-only test hook: `--forced-base`), stops its server with
SIGTERM (it must exit 0) and exits non-zero if any check failed.
"""

import argparse
import json
import math
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import openai
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/models/qwen3"
MODEL = "tiny"
KEY = "suite-key"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


class Server:
    """`ember serve` on port 0; the address is read from its stderr."""

    def __init__(self, ember, *extra):
        cmd = [ember, "serve", "--model", str(FIXTURE), "--port", "0", "--served-model-name", MODEL,
               "--api-key", KEY, "--kv-cache-mib", "16", *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.base = None
        deadline = time.time() + 60
        while self.base is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"ember exited early with {self.proc.wait()}")
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.base = m.group(1)
            if time.time() > deadline:
                raise RuntimeError("ember did not start listening")
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health") as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.time() > deadline:
                raise RuntimeError("ember did not become ready")
            time.sleep(0.05)

    def client(self, key=KEY):
        return OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        if code != 0:
            raise RuntimeError(f"ember exited with {code} after SIGTERM")


class Attached:
    """A server someone else started (and stops): the forced-output one."""

    def __init__(self, base):
        self.base = base.rstrip("/")

    def client(self, key=KEY):
        return OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self):
        pass


def golden():
    data = json.loads((FIXTURE / "golden.json").read_text())
    raw = (FIXTURE / "golden.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = raw[8 + header_len :]
    logits = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32"
        rows, cols = info["shape"]
        start, end = info["data_offsets"]
        flat = struct.unpack(f"<{rows * cols}f", body[start:end])
        logits[name] = [flat[r * cols : (r + 1) * cols] for r in range(rows)]
    return data, logits


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def user(text):
    return [{"role": "user", "content": text}]


# ---- checks against the normal server ----


def check_chat(c):
    whole = c.chat.completions.create(model=MODEL, messages=user("Hello!"), max_tokens=10, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= whole.usage.completion_tokens <= 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = c.chat.completions.create(
        model=MODEL, messages=user("Hello!"), max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (choice.message.content or ""), (text, choice.message.content)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.choices for ch in chunks[:-1]), "no empty-choices chunk before the usage chunk"


def check_completions(c):
    whole = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    stream = c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def check_echo_logprobs_and_greedy_match_transformers(c):
    data, logits = golden()
    for i, prompt in enumerate(data["prompt_ids"][:4]):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + 1
        assert lp.token_logprobs[0] is None
        rows = logits[f"logits.{i}"]
        for p in range(1, len(prompt)):
            want = log_softmax(rows[p - 1])[prompt[p]]
            got = lp.token_logprobs[p]
            assert abs(got - want) < 1e-4, f"prompt {i} position {p}: {got} vs {want}"
    for prompt, expected in list(zip(data["prompt_ids"], data["greedy"]))[:4]:
        r = c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=len(expected), temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        ids = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
        assert ids == expected, (ids, expected)


def check_n_and_seed(c):
    r = c.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [ch.index for ch in r.choices] == [0, 1]
    again = c.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=6, n=2, temperature=1.0, seed=3)
    assert [ch.message.content for ch in r.choices] == [ch.message.content for ch in again.choices]
    s1 = c.completions.create(model=MODEL, prompt="Paris", max_tokens=12, temperature=1.0, seed=11)
    s2 = c.completions.create(model=MODEL, prompt="Paris", max_tokens=12, temperature=1.0, seed=11)
    assert s1.choices[0].text == s2.choices[0].text


def check_errors(c, base):
    try:
        c.chat.completions.create(model=MODEL, messages=user("x"), temperature=-1)
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    try:
        c.chat.completions.create(model="no-such-model", messages=user("x"))
        raise AssertionError("no error")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
    try:
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("no error")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


# ---- checks against the server with forced output ----


def check_tool_calls(c):
    with c.chat.completions.stream(model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, max_tokens=100) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls", choice.finish_reason
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "Let me check."
    whole = c.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, max_tokens=100)
    m = whole.choices[0].message
    assert m.tool_calls[0].function.name == "get_weather"
    assert getattr(m, "reasoning_content", None) == "Need the weather.", m
    # The call goes back to the model as history, with the tool's answer.
    follow = c.chat.completions.create(
        model=MODEL, max_tokens=4,
        messages=user("Weather in Paris?") + [m.model_dump(exclude_none=True),
                                              {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny"}],
    )
    assert follow.choices[0].message.role == "assistant"


def run_checks(server, checks):
    """Runs each (name, thunk), reporting every failure, then stops `server`; exits 1 if any
    failed (the suites that import this: ecosystem_suite.py, structured_suite.py)."""
    failed = []
    try:
        for name, fn in checks:
            try:
                fn()
                print(f"ok   {name}")
            except Exception:  # noqa: BLE001 - report every failure
                failed.append(name)
                print(f"FAIL {name}\n{traceback.format_exc()}")
    finally:
        server.stop()
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}")
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ember", required=True)
    ap.add_argument("--forced-base", required=True, help="base URL of the forced-output server")
    args = ap.parse_args()
    print(f"openai SDK {openai.__version__}")
    failures = 0
    servers = []
    try:
        plain = Server(args.ember)
        servers.append(plain)
        forced = Attached(args.forced_base)
        checks = [
            (check_chat, plain.client()),
            (check_completions, plain.client()),
            (check_echo_logprobs_and_greedy_match_transformers, plain.client()),
            (check_n_and_seed, plain.client()),
            (lambda c: check_errors(c, plain.base), plain.client()),
            (check_tool_calls, forced.client()),
        ]
        for check, client in checks:
            name = getattr(check, "__name__", "check")
            if name == "<lambda>":
                name = "check_errors"
            try:
                check(client)
                print(f"PASS {name}")
            except Exception:
                failures += 1
                print(f"FAIL {name}\n{traceback.format_exc()}")
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as e:
                failures += 1
                print(f"FAIL shutdown: {e}")
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
