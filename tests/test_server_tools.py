"""Tool calling and output constraints on the server, without the engine enforcing anything: requests' fields ->
SamplingParams.structured_outputs and the tool plan (and their 400s), the built-in model's Qwen2.5 chat template
rendering tools and tool messages, and tool calls parsed from a model's text, whole and streamed, through a real
server with the `openai` client (the model's text is scripted: random weights never write a call).

Outputs that only a constraint makes valid are tested in tests/test_structured_outputs_server.py.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from test_server import ServerThread

from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.models.default_model import default_model_dir
from qwenjax.outputs import CompletionOutput, RequestOutput
from qwenjax.tokenizer import apply_chat_template, load_tokenizer
from server.app import create_app
from server.protocol import APIError
from server.serving import OpenAIServing
from server.tool_parsers.hermes import extract_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


def serving_of(tok, auto_tool_parser: str | None = "hermes") -> OpenAIServing:
    """The server's request preparation over the built-in model's tokenizer, with no engine behind it."""
    llm = SimpleNamespace(tokenizer=tok, max_model_len=2048, model_config=SimpleNamespace(vocab_size=151936),
                          args=None, generation_defaults=None)
    return OpenAIServing(SimpleNamespace(engine=llm), model_names=["m"], metrics=None, chat_template=None,
                         auto_tool_parser=auto_tool_parser)


@pytest.fixture(scope="module")
def serving(tok):
    return serving_of(tok)


def prepare(serving, body: dict, route: str = "chat"):
    """(formatter, prompts, params, stream, constraint field) of a request body."""
    fn = serving._prepare_chat if route == "chat" else serving._prepare_completions
    base = {"messages": USER} if route == "chat" else {"prompt": "hi"}
    return fn(json.dumps({**base, "max_tokens": 8, **body}).encode())


# ---------------------------------------------------------------------------------------------- fields -> params
@pytest.mark.parametrize("route, body, kind, value, field", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA,
                                                                          "strict": True}}},
     "json", SCHEMA, "response_format"),
    ("chat", {"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ("completions", {"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ("chat", {"structured_outputs": {"regex": "[a-z]{3}"}}, "regex", "[a-z]{3}", "structured_outputs"),
    ("completions", {"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ("yes", "no"),
     "structured_outputs"),
    ("completions", {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, "json", SCHEMA,
     "structured_outputs"),
    ("chat", {"structured_outputs": {"grammar": 'start: "a"+'}}, "grammar", 'start: "a"+', "structured_outputs"),
    ("chat", {"guided_json": json.dumps(SCHEMA)}, "json", SCHEMA, "guided_json"),
    ("completions", {"guided_regex": "\\d+"}, "regex", "\\d+", "guided_regex"),
    ("chat", {"guided_choice": ["a", "b"]}, "choice", ("a", "b"), "guided_choice"),
    ("completions", {"guided_grammar": 'start: "x"'}, "grammar", 'start: "x"', "guided_grammar"),
])
def test_constraint_fields(serving, route, body, kind, value, field):
    _, _, params, _, param = prepare(serving, body, route)
    so = params.structured_outputs
    assert so.kind == kind and param == field
    assert (so.schema if kind == "json" else getattr(so, kind)) == value


def test_text_format_and_no_constraint(serving):
    assert prepare(serving, {"response_format": {"type": "text"}})[2].structured_outputs is None
    assert prepare(serving, {})[2].structured_outputs is None


BAD = [  # (body, param, substrings of the message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     ["json_schema.schema"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema.schema"]),
    ({"response_format": {"type": "xml"}}, "response_format", ["'text', 'json_object', 'json_schema'", "'xml'"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format",
     ["JSON schema object"]),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     ["one output constraint", "response_format and structured_outputs"]),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", ["guided_json and guided_regex"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"jsn": SCHEMA}}, "structured_outputs", ["'jsn'"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", ["non-empty list"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     ["'get_time'", "not in tools", "'get_weather'"]),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ['"required"', "sometimes"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", ["tool_choice must be"]),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", ["name"]),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", ["cannot be combined with response_format"]),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages", ["arguments", "JSON"]),
]


@pytest.mark.parametrize("body, param, needles", BAD, ids=range(len(BAD)))
def test_bad_input_is_a_400_naming_it(serving, body, param, needles):
    with pytest.raises(APIError) as e:
        prepare(serving, body)
    err = e.value
    assert err.status == 400 and err.param == param, (err.param, err.message)
    for needle in needles:
        assert needle in err.message, err.message


def test_auto_needs_the_parser_flags(tok):
    flagless = serving_of(tok, auto_tool_parser=None)
    for body in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
        with pytest.raises(APIError) as e:
            prepare(flagless, body)
        assert e.value.param == "tool_choice"
        assert "--enable-auto-tool-choice --tool-call-parser hermes" in e.value.message
    for body in ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": [WEATHER], "tool_choice": "required"},
                 {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}):
        prepare(flagless, body)  # neither needs them


def test_tool_plans(serving):
    fmt, _, params, _, field = prepare(serving, {"tools": [WEATHER, TIME]})  # "auto"
    assert params.structured_outputs is None and fmt.tool_parser.max_calls is None and field is None
    fmt, _, params, _, _ = prepare(serving, {"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    assert fmt.tool_parser.max_calls == 1
    fmt, _, params, _, _ = prepare(serving, {"tools": [WEATHER], "tool_choice": "none"})
    assert fmt.tool_parser is None and params.structured_outputs is None
    fmt, _, params, _, field = prepare(serving, {"tools": [WEATHER, TIME], "tool_choice": "required"})
    grammar = params.structured_outputs.grammar
    assert field == "tools" and fmt.tool_parser.max_calls is None
    assert grammar.startswith('start: call ("\\n" call)*\ncall: <tool_call> "\\n" body "\\n" </tool_call>')
    assert '"const": "get_weather"' in grammar and '"const": "get_time"' in grammar
    fmt, _, params, _, _ = prepare(serving, {"tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}})
    grammar = params.structured_outputs.grammar
    assert grammar.startswith("start: call\n") and '"get_weather"' not in grammar and fmt.tool_parser.max_calls == 1


# ---------------------------------------------------------------------------------------------- the template
def test_builtin_template_renders_tools_and_tool_messages(tok, serving):
    assert tok.convert_tokens_to_ids("<tool_call>") == 151657 and len(tok.encode("</tool_call>")) == 1
    messages = [*USER,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "chatcmpl-tool-1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": '{"temp": 21}'}]
    prompt = apply_chat_template(tok, messages, tools=[WEATHER])
    assert "# Tools" in prompt and json.dumps(WEATHER) in prompt
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in prompt
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # what the template writes, the parser reads back as the same call
    _, (parsed,) = extract_tool_calls(call)
    assert parsed["function"] == messages[1]["tool_calls"][0]["function"]
    # the server renders the same prompt, and /tokenize takes tools too
    _, (p,), _, _, _ = prepare(serving, {"messages": messages, "tools": [WEATHER], "tool_choice": "none"})
    assert p.text == prompt
    assert serving._tokenize(json.dumps({"messages": messages, "tools": [WEATHER]}).encode())["tokens"] == p.ids


# ---------------------------------------------------------------------------------------------- formatting
def _out(text, reason, n_tokens):
    return RequestOutput("x", None, [1], None, [CompletionOutput(0, text, list(range(n_tokens)), None, None, reason)],
                         reason is not None)


@pytest.mark.parametrize("reason, want", [("stop", "tool_calls"), ("length", "length")])
def test_finish_reason_with_calls(serving, reason, want):
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    fmt = prepare(serving, {"tools": [WEATHER]})[0]
    (choice,) = fmt.response([_out(text, reason, 9)])["choices"]
    assert choice["finish_reason"] == want and choice["message"]["content"] == "Sure."
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    fmt = prepare(serving, {"tools": [WEATHER], "stream": True})[0]
    chunks = [c for k in range(1, len(text) + 1) for c in fmt.stream_chunks(0, _out(
        text[:k], reason if k == len(text) else None, k))]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == want
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Sure."
    args = "".join(d["function"]["arguments"] for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", []))
    assert args == '{"city": "Rome"}'
    plain = fmt.response([_out("no call", "stop", 2)])["choices"][0]
    assert plain["finish_reason"] == "stop" and "tool_calls" not in plain["message"]


# ---------------------------------------------------------------------------------------------- a real server
SCRIPTS = {  # seed -> the text the model is made to write (then EOS)
    31: 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
}
ARGS = EngineArgs(model=None, dtype="float32", max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512,
                  decode_buckets=(8,), prefill_token_buckets=(512,), num_kv_pages=256, generation_config="vllm")


def _script(llm) -> None:
    """engine_setup hook (in the engine process): a request whose seed is in SCRIPTS writes that text, then EOS."""
    forced = {seed: llm.tokenizer.encode(text, add_special_tokens=False) + [151645] for seed, text in SCRIPTS.items()}
    original = llm.runner.execute

    def execute(*args, **kwargs):
        result = original(*args, **kwargs)
        res = result[0] if isinstance(result, tuple) else result
        tensors = args[2] if len(args) > 2 else kwargs["tensors"]
        ids, steps = np.array(res.token_ids), np.asarray(tensors.steps)
        for b, seed in enumerate(np.asarray(tensors.seeds)):
            if int(seed) in forced:
                script = forced[int(seed)]
                ids[b] = script[min(int(steps[b]), len(script) - 1)]
        res = dataclasses.replace(res, token_ids=jnp.asarray(ids))
        return (res, *result[1:]) if isinstance(result, tuple) else res

    llm.runner.execute = execute


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS, engine_setup=_script)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with ServerThread(create_app(engine, enable_auto_tool_choice=True, tool_call_parser="hermes")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def test_auto_tool_calls_whole_and_streamed(client):
    kw = {"model": "qwenjax/tiny-random-qwen2", "messages": USER, "tools": [WEATHER, TIME], "seed": 31,
          "max_tokens": 100}
    r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "CET"})]
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in choice.message.tool_calls)

    content, streamed, reasons = "", {}, []
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.id is not None:
                streamed[d.index] = [d.function.name, ""]
            streamed[d.index][1] += d.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "Let me look." and reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    assert [(n, json.loads(a)) for n, a in streamed.values()] == calls


def test_a_call_cut_by_max_tokens_keeps_length(client):
    kw = {"model": "qwenjax/tiny-random-qwen2", "messages": USER, "tools": [WEATHER, TIME], "seed": 31,
          "max_tokens": 12}
    (choice,) = client.chat.completions.create(**kw).choices
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("Let me look.\n<tool_call>")  # the broken call stays text
    last = list(client.chat.completions.create(**kw, stream=True))[-1]
    assert last.choices[0].finish_reason == "length"


def test_auto_without_the_flags_is_a_400(engine):
    with ServerThread(create_app(engine)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in r.json()["error"]["message"]
