#!/usr/bin/env python3
"""Structured output through the pinned clients, against a live `ember serve` on the tiny
random-weight Qwen3 fixture (run by tests/structured_output.rs):

  * every schema of tests/clients/schema_corpus.json through `response_format` json_schema:
    each completion that ends with `stop` validates against its schema (jsonschema, Draft
    2020-12 with formats), and nearly all of them end with `stop` (the schemas are bounded, so a
    constraint that holds makes random weights finish);
  * the official SDK's `client.chat.completions.parse(response_format=PydanticModel)` returns
    a parsed object;
  * LangChain's `ChatOpenAI(...).with_structured_output(Model)` returns one.

  python3 tests/clients/structured_suite.py --ember target/release/ember
"""

import argparse
import json
import sys
from enum import Enum
from pathlib import Path

import jsonschema
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_suite import KEY, MODEL, Server, run_checks  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "schema_corpus.json"
# No think block (the template closes it): the grammar starts at the first token.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
COMPLETIONS_PER_SCHEMA = 3
MAX_TOKENS = 400
# Share of completions that must end with `stop` (the rest may hit max_tokens on long runs of
# digits or whitespace that random weights like).
MIN_STOPPED = 0.9


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def messages():
    return [{"role": "user", "content": "Report the incident as JSON."}]


def check_corpus(client):
    corpus = json.loads(CORPUS.read_text())
    check(len(corpus) >= 30, f"{len(corpus)} schemas")
    total = stopped = 0
    for i, entry in enumerate(corpus):
        schema = entry["schema"]
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        r = client.chat.completions.create(
            model=MODEL,
            messages=messages(),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": entry["name"], "schema": schema, "strict": True},
            },
            n=COMPLETIONS_PER_SCHEMA,
            temperature=1.0,
            seed=i,
            max_tokens=MAX_TOKENS,
            extra_body=NO_THINKING,
        )
        for c in r.choices:
            total += 1
            if c.finish_reason != "stop":
                continue
            stopped += 1
            text = c.message.content
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise AssertionError(f"{entry['name']}: not JSON ({e}): {text!r}") from e
            errors = [e.message for e in validator.iter_errors(value)]
            check(not errors, f"{entry['name']}: {text!r} fails its schema: {errors}")
    print(f"     {stopped}/{total} completions over {len(corpus)} schemas ended with stop; all valid")
    check(stopped >= MIN_STOPPED * total, f"only {stopped} of {total} ended with stop")


class Severity(str, Enum):
    minor = "minor"
    major = "major"
    critical = "critical"


class Incident(BaseModel):
    road: str = Field(max_length=10)
    severity: Severity
    lanes_closed: int = Field(ge=0, le=4)


def check_sdk_parse(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=messages(),
        response_format=Incident,
        temperature=1.0,
        seed=1,
        max_tokens=MAX_TOKENS,
        extra_body=NO_THINKING,
    )
    c = r.choices[0]
    check(c.finish_reason == "stop", f"finish_reason {c.finish_reason}")
    check(isinstance(c.message.parsed, Incident), f"parsed: {c.message.parsed!r}")
    print(f"     parsed {c.message.parsed!r}")


def check_langchain(base):
    llm = ChatOpenAI(
        model=MODEL,
        base_url=base + "/v1",
        api_key=KEY,
        temperature=1.0,
        seed=2,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
        extra_body=NO_THINKING,
    )
    out = llm.with_structured_output(Incident).invoke("Report the incident.")
    check(isinstance(out, Incident), f"with_structured_output gave {out!r}")
    print(f"     with_structured_output gave {out!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ember", required=True)
    args = ap.parse_args()
    server = Server(args.ember)
    client = server.client()
    run_checks(
        server,
        [
            ("schema corpus", lambda: check_corpus(client)),
            ("openai chat.completions.parse", lambda: check_sdk_parse(client)),
            ("langchain with_structured_output", lambda: check_langchain(server.base)),
        ],
    )


if __name__ == "__main__":
    main()
