#!/usr/bin/env python3
"""LangChain (langchain-openai) and LiteLLM against a live `ember serve` on the tiny Qwen3 fixture.

Run by tests/client_ecosystem.rs (cargo test), the packages pinned in
tests/clients/requirements.txt:
  python3 tests/clients/ecosystem_suite.py --ember target/release/ember

Behaviour, not just "no exception": greedy answers equal between whole and streamed responses,
usage counted, and a context overflow (a prompt alone over the context, and prompt + max_tokens
over it) raised as each library's own context-window error, which is what apps that trim
history and retry catch. Exits non-zero if any check failed.
"""

import argparse
import os

# LiteLLM would fetch its model price map from GitHub at import (no network here).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from langchain_core.exceptions import ContextOverflowError  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

from openai_suite import KEY, MODEL, Server, run_checks  # noqa: E402

# The fixture's context is 512 tokens; this prompt is well over it.
LONG = "the quick brown fox jumps over the lazy dog " * 200
MAX_TOKENS = 8


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def langchain_model(base, **kw):
    return ChatOpenAI(
        model=MODEL,
        base_url=base + "/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
        **kw,
    )


def check_langchain(base):
    llm = langchain_model(base, stream_usage=True)
    msg = [HumanMessage("Tell me about foxes")]
    whole = llm.invoke(msg)
    check(isinstance(whole.content, str) and whole.content, f"content: {whole.content!r}")
    check(whole.response_metadata.get("finish_reason") in ("stop", "length"), whole.response_metadata)
    usage = whole.usage_metadata
    check(usage and usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= MAX_TOKENS, usage)
    chunks = list(llm.stream(msg))
    streamed = "".join(c.content for c in chunks if isinstance(c.content, str))
    check(streamed == whole.content, f"streamed {streamed!r} != whole {whole.content!r}")
    total = None
    for c in chunks:
        total = c if total is None else total + c
    check(total.usage_metadata["output_tokens"] == usage["output_tokens"], total.usage_metadata)
    # Context overflow, both ways, as langchain's ContextOverflowError.
    for what, model, text in [
        ("a prompt over the context", langchain_model(base), LONG),
        ("prompt + max_tokens over the context", langchain_model(base).bind(max_tokens=4096), "hi"),
    ]:
        for mode in ("invoke", "stream"):
            try:
                if mode == "invoke":
                    model.invoke([HumanMessage(text)])
                else:
                    list(model.stream([HumanMessage(text)]))
            except ContextOverflowError:
                continue
            except Exception as e:  # noqa: BLE001 - the wrong class is the failure
                raise AssertionError(f"{what} ({mode}): {type(e).__name__}: {e}") from e
            raise AssertionError(f"{what} ({mode}): no error")


def litellm_args(base, **kw):
    return dict(
        model="openai/" + MODEL,
        api_base=base + "/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=MAX_TOKENS,
        num_retries=0,
        timeout=120,
        **kw,
    )


def check_litellm(base):
    messages = [{"role": "user", "content": "Tell me about dogs"}]
    whole = litellm.completion(messages=messages, **litellm_args(base))
    content = whole.choices[0].message.content
    check(isinstance(content, str) and content, f"content: {content!r}")
    check(0 < whole.usage.completion_tokens <= MAX_TOKENS and whole.usage.prompt_tokens > 0, whole.usage)
    stream = litellm.completion(
        messages=messages, stream=True, stream_options={"include_usage": True}, **litellm_args(base)
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    check("".join(parts) == content, f"streamed {''.join(parts)!r} != whole {content!r}")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage)
    legacy = litellm.text_completion(prompt="Once upon a time", **litellm_args(base))
    check(isinstance(legacy.choices[0].text, str) and legacy.choices[0].text, legacy)
    for what, text, max_tokens in [
        ("a prompt over the context", LONG, MAX_TOKENS),
        ("prompt + max_tokens over the context", "hi", 4096),
    ]:
        for stream in (False, True):
            args = litellm_args(base, stream=stream)
            args["max_tokens"] = max_tokens
            try:
                r = litellm.completion(messages=[{"role": "user", "content": text}], **args)
                if stream:
                    list(r)
            except litellm.ContextWindowExceededError:
                continue
            except Exception as e:  # noqa: BLE001 - the wrong class is the failure
                raise AssertionError(f"{what} (stream={stream}): {type(e).__name__}: {e}") from e
            raise AssertionError(f"{what} (stream={stream}): no error")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ember", required=True)
    args = ap.parse_args()
    server = Server(args.ember)
    run_checks(
        server,
        [
            ("langchain-openai", lambda: check_langchain(server.base)),
            ("litellm", lambda: check_litellm(server.base)),
        ],
    )


if __name__ == "__main__":
    main()
