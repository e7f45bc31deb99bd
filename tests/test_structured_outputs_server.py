"""Structured outputs and constrained tool calls through a real server with the official `openai` client (issue 26):
the built-in model's weights are random, so its outputs are valid only because the engine enforces the constraint.
Sampled at temperature 1 over several seeds and n copies, streaming and not; oracles: the `jsonschema` library for
JSON and tool arguments, Python's `re` for regexes. Bad constraints are 400s naming their field, and the engine
serves on.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from test_server import ServerThread

from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine
from server.app import create_app
from tests.test_structured_outputs import PERSON  # nested objects, arrays, enums, bounds, a pattern

MODEL = "qwenjax/tiny-random-qwen2"
ARGS = EngineArgs(model=None, dtype="float32", max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512,
                  decode_buckets=(16,), prefill_token_buckets=(512,), num_kv_pages=512, generation_config="vllm")
SEEDS = (1, 2, 3)
N = 4  # copies per request: SEEDS x N samples per check
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                     "label": {"type": "string", "maxLength": 6}},
    "required": ["hour"], "additionalProperties": False}}}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ALARM)}
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, enable_auto_tool_choice=True, tool_call_parser="hermes")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=600)


def chat_texts(client, stream: bool, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) of every choice of the chat requests over SEEDS, at temperature 1 with N copies."""
    out = []
    for seed in SEEDS:
        args = {"model": MODEL, "messages": USER, "temperature": 1.0, "n": N, "seed": seed, "max_tokens": 200, **kw}
        if not stream:
            out += [(c.message.content, c.finish_reason) for c in client.chat.completions.create(**args).choices]
            continue
        texts, reasons = [""] * N, [None] * N
        for chunk in client.chat.completions.create(**args, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                reasons[c.index] = c.finish_reason or reasons[c.index]
        out += list(zip(texts, reasons, strict=True))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_outputs_validate(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    outs = chat_texts(client, stream, response_format=fmt)
    assert len(outs) == len(SEEDS) * N and len({t for t, _ in outs}) > 1
    for text, reason in outs:
        assert reason == "stop", (reason, text)
        jsonschema.validate(json.loads(text), PERSON)


def test_parse_with_a_pydantic_model(client):
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})
        legs: int = pydantic.Field(ge=0, le=8)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in SEEDS:
        r = parse(model=MODEL, messages=USER, response_format=Pet, temperature=1.0, seed=seed, max_tokens=200)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.legs <= 8 and len(pet.name) <= 8


@pytest.mark.parametrize("stream", [False, True])
def test_regex_and_choice_on_completions_and_chat(client, stream):
    regex = r"[a-z]{2,5}@[a-z]{3}\.(com|org)"
    for seed in SEEDS:
        kw = {"model": MODEL, "prompt": "Email:", "temperature": 1.0, "n": N, "seed": seed, "max_tokens": 40,
              "extra_body": {"structured_outputs": {"regex": regex}}}
        if stream:
            texts = [""] * N
            for chunk in client.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    texts[c.index] += c.text
        else:
            texts = [c.text for c in client.completions.create(**kw).choices]
        assert all(re.fullmatch(regex, t) for t in texts), texts
    for text, reason in chat_texts(client, stream, extra_body={"guided_choice": ["red", "green", "blue"]}):
        assert text in ("red", "green", "blue") and reason == "stop"


def test_guided_json_on_completions(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in SEEDS:
        r = client.completions.create(model=MODEL, prompt="JSON:", temperature=1.0, n=N, seed=seed, max_tokens=60,
                                      extra_body={"guided_json": schema})
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), schema)


def calls_of(client, stream: bool, **kw) -> list[tuple[list[tuple[str, str]], str]]:
    """([(name, arguments)], finish_reason) of every choice over SEEDS, N copies, temperature 1."""
    out = []
    for seed in SEEDS:
        args = {"model": MODEL, "messages": USER, "tools": [WEATHER, ALARM], "temperature": 1.0, "n": N,
                "seed": seed, "max_tokens": 200, **kw}
        if not stream:
            for c in client.chat.completions.create(**args).choices:
                assert not c.message.content
                out.append(([(t.function.name, t.function.arguments) for t in c.message.tool_calls],
                            c.finish_reason))
            continue
        calls, reasons = [{} for _ in range(N)], [None] * N
        for chunk in client.chat.completions.create(**args, stream=True):
            for c in chunk.choices:
                assert not c.delta.content
                for d in c.delta.tool_calls or []:
                    if d.id is not None:
                        assert d.function.arguments == "" and d.type == "function"
                        calls[c.index][d.index] = [d.function.name, ""]
                    calls[c.index][d.index][1] += d.function.arguments or ""
                reasons[c.index] = c.finish_reason or reasons[c.index]
        out += [([tuple(v) for v in cs.values()], r) for cs, r in zip(calls, reasons, strict=True)]
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_validate(client, stream):
    for parallel in (True, False):
        outs = calls_of(client, stream, tool_choice="required", parallel_tool_calls=parallel)
        for calls, reason in outs:
            assert reason == "tool_calls" and calls and (parallel or len(calls) == 1), (calls, reason)
            for name, arguments in calls:
                jsonschema.validate(json.loads(arguments), TOOLS[name])
        if parallel:
            assert {n for calls, _ in outs for n, _ in calls} == set(TOOLS)  # both tools get called


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_calls_validate(client, stream):
    named = {"type": "function", "function": {"name": "set_alarm"}}
    for calls, reason in calls_of(client, stream, tool_choice=named):
        assert reason == "tool_calls" and len(calls) == 1 and calls[0][0] == "set_alarm"
        jsonschema.validate(json.loads(calls[0][1]), TOOLS["set_alarm"])


def test_cut_by_max_tokens_keeps_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=5, seed=1)
    assert r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required",
                                       max_tokens=5, seed=1)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls


BAD = [  # (route, body, param, substring of the message)
    ("/v1/chat/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ("/v1/completions", {"guided_regex": "[z-a]"}, "guided_regex", "regex"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strnig"}}}}, "response_format", "json"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs",
     "grammar"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools",
     "for tool_choice 'required' or a named function: Invalid type: nonsense"),
]


@pytest.mark.parametrize("route, body, param, needle", BAD, ids=range(len(BAD)))
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400s_and_the_engine_serves_on(server, client, route, body, param, needle, stream):
    base = {"messages": USER} if "chat" in route else {"prompt": "hi"}
    r = httpx.post(server.url + route, json={**base, **body, "max_tokens": 8, "stream": stream}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error", err
    ok = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, extra_body={
        "structured_outputs": {"choice": ["yes", "no"]}})
    assert ok.choices[0].message.content in ("yes", "no")
