"""Issue 24: no request can kill, stall or starve the engine. Each input that once killed the engine, or answered a
500, is sent to a real server (uvicorn on loopback, the built-in model in an engine core process); afterwards the
engine still serves and every KV page is back.

Faults the validation cannot reach (defence in depth) are injected in the engine process: a request whose seed is
in FAIL_BUILD raises while its sampler row is built, one in FAIL_FINISH while its sampled token is appended. Each
must fail alone, with an error, while a request beside it completes.
"""

from __future__ import annotations

import http.client
import json
import time

import httpx
import pytest

from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.config import EngineArgs
from server.app import create_app
from test_server import ServerThread

VOCAB = 151936  # the built-in model's vocabulary
ARGS = EngineArgs(model=None, dtype="float32", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=256,
                  decode_buckets=(4, 16), prefill_token_buckets=(64,), num_kv_pages=256, generation_config="vllm")
FAIL_BUILD, FAIL_FINISH = 1313, 1414


def _inject_faults(llm) -> None:
    """engine_setup hook (runs in the engine process): rows of the FAIL_* seeds raise OverflowError."""
    out = llm.output_processor  # where a row's sampled tokens are finished
    build, append, append_many = llm._sampling_row, out.append_token, out.append_tokens

    def sampling_row(r, *args):
        if r.samples and r.seq.params.seed == FAIL_BUILD:
            raise OverflowError("Python int too large to convert to C long (injected)")
        return build(r, *args)

    def finish(original):
        def wrapped(seq, *args, **kwargs):
            if seq.params.seed == FAIL_FINISH:
                raise OverflowError("injected while finishing the row")
            return original(seq, *args, **kwargs)
        return wrapped

    llm._sampling_row = sampling_row
    out.append_token, out.append_tokens = finish(append), finish(append_many)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS, engine_setup=_inject_faults)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as s:
        yield s


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def assert_serves_and_pages_back(server, engine) -> None:
    """A plain request completes, then the engine holds no request and every page is free."""
    r = post(server, "/v1/completions", {"prompt": "still alive?", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    llm = engine.engine
    deadline = time.monotonic() + 60
    while llm.blocks.num_free != llm.blocks.num_pages or llm.has_unfinished_requests():
        assert time.monotonic() < deadline, (llm.blocks.num_free, llm.blocks.num_pages)
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").status_code == 200


def assert_400(r: httpx.Response, param: str, *fragments: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for f in fragments:
        assert f in err["message"], (f, err["message"])


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BIG = 10**30

# (route, body, param, fragments of the message: the field's range and the value sent)
REFUSED = [
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [2147483648]}, "stop_token_ids",
     [f"[0, {VOCAB})", "2147483648"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [VOCAB]}, "stop_token_ids",
     [f"[0, {VOCAB})", str(VOCAB)]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [2**63]}, "stop_token_ids", [str(2**63)]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "logprobs": 1000000}, "logprobs", ["[0, 20]", "1000000"]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 21}, "prompt_logprobs", ["[0, 20]", "21"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 21}, "logprobs", ["[0, 20]", "21"]),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1000000}, "top_logprobs",
     ["[0, 20]", "1000000"]),
    ("/v1/chat/completions", {**CHAT, "seed": 2**63}, "seed", [f"[{-2**63}, {2**63 - 1}]", str(2**63)]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "seed": -2**63 - 1}, "seed", [str(-2**63 - 1)]),
    ("/v1/chat/completions", {**CHAT, "n": 10000, "max_tokens": 1}, "n", ["[1, 128]", "10000"]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "n": 129}, "n", ["[1, 128]", "129"]),
    ("/v1/completions", {"prompt": [[1, 2147483648]], "max_tokens": 2}, "prompt", [f"[0, {VOCAB})", "2147483648"]),
    ("/v1/completions", {"prompt": [5, -1], "max_tokens": 2}, "prompt", [f"[0, {VOCAB})", "-1"]),
    ("/detokenize", {"tokens": [2**64]}, "tokens", [f"[0, {VOCAB})", str(2**64)]),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "min_tokens": 2, "stop_token_ids": list(range(100_000))},
     "stop_token_ids", ["at most 1024 token ids", "100000"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(5000)]}, "stop",
     ["at most 1024 strings", "5000"]),
    # vLLM's per-token controls: ids outside the vocabulary and empty words never reach a step
    ("/v1/chat/completions", {**CHAT, "allowed_token_ids": [1, VOCAB]}, "allowed_token_ids",
     [f"[0, {VOCAB})", str(VOCAB)]),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(VOCAB): 5}}, "logit_bias", [f"[0, {VOCAB})", str(VOCAB)]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"x": 1}}, "logit_bias",
     ["keys must be token ids", "'x'"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "bad_words": [" "]}, "bad_words", ["non-empty words"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
     ["at least 1", "got 0"]),
]


@pytest.mark.parametrize("route,body,param,fragments", REFUSED, ids=[f"{r[0]}:{r[2]}" for r in REFUSED])
def test_engine_killers_are_400s(server, engine, route, body, param, fragments):
    assert_400(post(server, route, body), param, *fragments)


def test_per_token_controls_are_served(server, engine):
    """logit_bias, allowed_token_ids and bad_words reach the sampler (9707 is "Hello", 1879 " world")."""
    body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    r = post(server, "/v1/completions", {**body, "logit_bias": {"9707": 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello" * 3, r.text
    r = post(server, "/v1/completions", {**body, "temperature": 1.0, "allowed_token_ids": [1879]})
    assert r.json()["choices"][0]["text"] == " world" * 3, r.text
    r = post(server, "/v1/completions", {**body, "logit_bias": {"9707": 100}, "bad_words": ["Hello"]})
    assert "Hello" not in r.json()["choices"][0]["text"], r.text


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {**CHAT, "top_k": BIG, "temperature": 1.0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": BIG, "top_p": 0.5}),
    ("/generate", {"prompt": "hi", "max_tokens": 2, "top_k": 2**31, "temperature": 1.0}),
])
def test_top_k_past_the_vocabulary_is_clamped(server, engine, route, body):
    """vLLM's rule: a top_k at or past the vocabulary keeps every token (it is not an error)."""
    r = post(server, route, body)
    assert r.status_code == 200, r.text


def test_engine_serves_after_the_killers(server, engine):
    for route, body, _, _ in REFUSED:
        post(server, route, body)
    assert_serves_and_pages_back(server, engine)


@pytest.mark.parametrize("seed", [FAIL_BUILD, FAIL_FINISH])
def test_a_fault_in_one_requests_rows_fails_it_alone(server, engine, seed):
    """An exception while building or finishing one request's rows: that request gets a 500 naming the error, the
    one running beside it completes, the loop survives and the failed request's pages come back."""
    import asyncio

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(
                c.post("/v1/completions", json={"prompt": "bad one", "max_tokens": 8, "seed": seed,
                                                "temperature": 1.0}),
                c.post("/v1/completions", json={"prompt": "good one", "max_tokens": 8, "temperature": 0}))

    bad, good = asyncio.run(main())
    assert bad.status_code == 500, bad.text
    assert "OverflowError" in bad.json()["error"]["message"] and "injected" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8
    assert not engine.dead
    assert_serves_and_pages_back(server, engine)


def test_streamed_fault_ends_with_an_error_event(server, engine):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={"prompt": "bad", "max_tokens": 8, "seed": FAIL_FINISH, "temperature": 1.0,
                            "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.status_code == 500 or any("OverflowError" in x for x in lines), lines
    assert_serves_and_pages_back(server, engine)


# ---------------------------------------------------------------------------------------------- malformed text
def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


MALFORMED = [  # (route, raw JSON body, param, a fragment of the message)
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages", "lone UTF-16 surrogate \\ud800 at character 1"),
    ("/v1/chat/completions", '{"messages": [{"role": "us\\udfffer", "content": "hi"}], "max_tokens": 2}',
     "messages", "messages[0].role"),
    ("/v1/chat/completions", '{"model": "m\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
     "model", "surrogate"),
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", "surrogate"),
    ("/v1/completions", '{"prompt": ["ok", "\\udc00"], "max_tokens": 2}', "prompt", "prompt[1]"),
    ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt", "surrogate"),
    ("/generate", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", "surrogate"),
    # parsed by every Python's json (3.11 stops near 1,000 levels, 3.12 goes further), then refused by the walk
    ("/v1/chat/completions", '{"messages": ' + deep(200) + '}', "messages", "at most 64 levels"),
    ("/v1/completions", deep(100000), None, "at most 64 levels"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": '
     + deep(500) + '}}', "chat_template_kwargs", "at most 64 levels"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
     '"chat_template_kwargs": {"tokenize": true}}', "chat_template_kwargs", "may not set 'tokenize'"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
     '"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}', "chat_template_kwargs", "'chat_template'"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None,
     "NaN is not a JSON number"),
    ("/generate", '{"prompt": "hi", "top_p": Infinity}', None, "Infinity is not a JSON number"),
]


@pytest.mark.parametrize("route,raw,param,fragment", MALFORMED, ids=[f"{m[0]}:{m[3][:24]}" for m in MALFORMED])
def test_malformed_text_is_a_400_and_keeps_the_connection(server, route, raw, param, fragment):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", route, body=raw.encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 400, body
        assert body["error"]["param"] == param and fragment in body["error"]["message"], body
        assert r.getheader("connection", "").lower() != "close"
        sock = conn.sock
        assert sock is not None  # http.client drops its socket when the server closes the connection
        conn.request("GET", "/health")
        r2 = conn.getresponse()
        r2.read()
        assert r2.status == 200 and conn.sock is sock  # the same connection answered
    finally:
        conn.close()


def test_engine_serves_after_the_malformed(server, engine):
    for route, raw, _, _ in MALFORMED:
        httpx.post(server.url + route, content=raw.encode(), headers={"Content-Type": "application/json"},
                   timeout=120)
    assert_serves_and_pages_back(server, engine)


# ---------------------------------------------------------------------------------------------- size and the loop
@pytest.fixture(scope="module")
def small_server(engine):
    """An app over the same engine whose bodies may be at most 4096 bytes."""
    with ServerThread(create_app(engine, max_request_body_bytes=4096)) as s:
        yield s


def test_body_past_the_limit_is_413_before_parsing(small_server, engine):
    prompt = "x" * 5000
    r = httpx.post(small_server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=120)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert "at most 4096 bytes" in err["message"] and str(len(r.request.content)) in err["message"], err
    # a chunked body (no Content-Length) is cut off once it passes the limit
    def chunks():
        for _ in range(10):
            yield b" " * 1000
    r = httpx.post(small_server.url + "/generate", content=chunks(), timeout=120)
    assert r.status_code == 413 and "more than 4096 bytes" in r.json()["error"]["message"], r.text
    # not-JSON junk past the limit is refused by size: nothing parsed it
    r = httpx.post(small_server.url + "/v1/chat/completions", content=b"{" * 5000, timeout=120)
    assert r.status_code == 413
    r = httpx.post(small_server.url + "/v1/completions", json={"prompt": "fits", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200, r.text


class GatedTokenizer:
    """The frontend's tokenizer, except that encoding a text starting with GATED waits for `gate` (recording the
    order of events); a timeout is only the failure path (an encode on the event loop would block /health)."""

    def __init__(self, tok, events: list, gate):
        self._tok, self.events, self.gate = tok, events, gate

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, **kw):
        if isinstance(text, str) and text.startswith("GATED"):
            self.events.append("encode started")
            self.events.append("encode released" if self.gate.wait(60) else "encode gave up waiting")
        return self._tok.encode(text, **kw)


def test_health_answers_while_a_large_request_is_prepared(engine):
    import threading

    app = create_app(engine)
    events, gate = [], threading.Event()
    serving = app.state.serving
    serving.tokenizer = GatedTokenizer(serving.tokenizer, events, gate)
    big = "GATED " + "lorem ipsum " * 200_000  # 2.4 MB
    with ServerThread(app) as s:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            s.url + "/v1/completions", json={"prompt": big, "max_tokens": 2}, timeout=180)))
        t.start()
        while "encode started" not in events:
            assert t.is_alive()
            time.sleep(0.01)
        r = httpx.get(s.url + "/health", timeout=120)
        events.append(f"health {r.status_code}")
        gate.set()
        t.join(180)
    assert events == ["encode started", "health 200", "encode released"]
    assert result["r"].status_code == 400 and "context_length_exceeded" in result["r"].text  # it was prepared


def test_truncate_prompt_tokens_counts_the_tokens_that_ran(server, engine):
    """vLLM's truncate_prompt_tokens: only the prompt's last k tokens run, and usage counts them."""
    ids = list(range(1000, 1040))
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 2, "temperature": 0,
                                         "truncate_prompt_tokens": 8})
    assert r.status_code == 200, r.text
    cut = post(server, "/v1/completions", {"prompt": ids[-8:], "max_tokens": 2, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == 8
    assert r.json()["choices"][0]["text"] == cut.json()["choices"][0]["text"]
