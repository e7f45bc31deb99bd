"""The OpenAI-compatible server end to end: real uvicorn on loopback, the built-in default model on CPU, the official
`openai` client, curl, and load from many concurrent clients. One engine serves the whole module (two apps), in an
engine core process as `python -m server` runs it: what the tests read of the engine (counters, free pages) comes
from the child's stats snapshots.

Some tests need known output text from a model with random weights: a request whose seed is in FORCED_TEXTS gets its
sampled token ids replaced by a script (one token per UTF-8 byte of the text) after the real sampler ran, in the
engine process (the engine, detokenizer, stop checker and server paths are all the real ones; only the sampler's
choice is overridden).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import subprocess
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.engine.llm_engine import LLMEngine
from server.app import create_app

MODEL = "Qwen/Qwen2-7B-Instruct"  # served under the guide's name as well as the default model's
ENGINE_ARGS = EngineArgs(model=None, dtype="float32", max_model_len=256, max_num_seqs=256, max_num_batched_tokens=1024,
                         decode_buckets=(4, 256), prefill_token_buckets=(64,), num_kv_pages=1024,
                         generation_config="vllm")
API_KEY = "test-key-123"
FORCED_TEXTS = {4242: "Hello world. STOP and more",  # S, T, O, P arrive one token each
                777: "你好，世界！🎉😀 Qwen2 说：“欢迎来到北京” 👨‍👩‍👧 ok"}  # CJK and emoji split over 3-4 tokens
FORCED: dict[int, list[int]] = {}  # in the engine's process: seed -> token ids the sampler is made to produce

GUIDE_BODY = """{
    "model": "Qwen/Qwen2-7B-Instruct",
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Tell me something about large language models."}
    ],
  }"""
GUIDE_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Tell me something about large language models."}]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30, backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _force_sampled_tokens(llm: LLMEngine) -> None:
    """engine_setup hook (runs in the engine process): scripts the sampler for the seeds of FORCED_TEXTS."""
    FORCED.update({seed: byte_tokens(llm.tokenizer, text) for seed, text in FORCED_TEXTS.items()})
    original = llm.runner.execute

    def execute(*args, **kwargs):
        result = original(*args, **kwargs)
        res = result[0] if isinstance(result, tuple) else result  # (SamplerOutput, extras) or SamplerOutput
        tensors = args[2] if len(args) > 2 else kwargs["tensors"]
        seeds = [int(s) for s in np.asarray(tensors.seeds)]
        if not any(s in FORCED for s in seeds):
            return result
        ids, steps = np.array(res.token_ids), np.asarray(tensors.steps)
        for b, s in enumerate(seeds):
            if s in FORCED:
                script = FORCED[s]
                ids[b] = script[min(int(steps[b]), len(script) - 1)]
        res = dataclasses.replace(res, token_ids=jnp.asarray(ids))
        return (res, *result[1:]) if isinstance(result, tuple) else res

    llm.runner.execute = execute


def _install_step_gate(llm: LLMEngine) -> None:
    """engine_setup hook (runs in the engine process): a gate on the engine's steps, worked through engine.call()
    commands, which the engine process applies in order with adds and aborts. While the gate is shut the engine
    reports no unfinished request to its loop, so the loop runs no step but still applies every command (adds wait,
    aborts free their pages). open_gate / shut_gate; run_to_3_tokens: steps run until every request holds 3 known
    output tokens, then the gate shuts; count_requests: the requests in the engine."""
    real = llm.has_unfinished_requests
    gate = {"shut": False, "until": None}

    def has_unfinished_requests() -> bool:
        if not real() or gate["shut"]:
            return False
        until = gate["until"]
        if until is not None and all(s.finished or s.num_known_outputs >= until
                                     for r in llm.requests.values() for s in r.seqs):
            gate.update(shut=True, until=None)
            return False
        return True

    llm.has_unfinished_requests = has_unfinished_requests
    llm.open_gate = lambda: gate.update(shut=False, until=None)
    llm.shut_gate = lambda: gate.update(shut=True, until=None)
    llm.run_to_3_tokens = lambda: gate.update(shut=False, until=3)
    llm.count_requests = lambda: len(llm.requests)


def _engine_setup(llm: LLMEngine) -> None:
    _force_sampled_tokens(llm)
    _install_step_gate(llm)


def _engine_call(engine: AsyncLLMEngine, name: str):
    """LLMEngine.<name>() in the engine process, after every command submitted before it."""
    return engine.engine._client.call(name)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ENGINE_ARGS, engine_setup=_engine_setup)  # an engine core process
    assert eng.multiprocess and eng.engine_pid is not None
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, served_model_names=[MODEL, "tiny"])) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(engine):
    with ServerThread(create_app(engine, served_model_names=[MODEL], api_key=API_KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.engine.tokenizer


def byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: every multi-byte character is split across tokens."""
    ids = []
    for t in tok.encode(text, add_special_tokens=False):
        piece = tok.convert_ids_to_tokens(t)
        ids.extend(tok.convert_tokens_to_ids(list(piece)))
    assert tok.decode(ids) == text
    return ids


def metrics_of(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[key] = s.value
    return out


# ---------------------------------------------------------------------------------------------- basic routes
def test_models_health_version(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL, "tiny"]
    assert data[0]["max_model_len"] == 256 and data[0]["object"] == "model"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_tokenize_detokenize(server, tok):
    text = "你好，世界！🎉 Qwen2"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert len(r["token_strs"]) == r["count"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    chat = httpx.post(server.url + "/tokenize", json={"messages": GUIDE_MESSAGES}).json()
    assert tok.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------- openai client
def test_chat_non_streaming_and_streaming_agree(client, server):
    kw = dict(model=MODEL, messages=GUIDE_MESSAGES, max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    prompt_len = httpx.post(server.url + "/tokenize", json={"messages": GUIDE_MESSAGES}).json()["count"]
    assert full.object == "chat.completion" and full.model == MODEL
    (choice,) = full.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == \
        (prompt_len, 8, prompt_len + 8)

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_logprobs_greedy(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_chat_logprobs_bytes_spell_the_text(client, tok):
    """Each logprobs entry's bytes are its token's UTF-8 bytes, also for tokens holding part of a character: a
    known text whose CJK characters and emoji are split over single-byte tokens comes back whole from the bytes."""
    text = FORCED_TEXTS[777]
    script = byte_tokens(tok, text)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], seed=777,
                                       max_tokens=len(script), temperature=0, logprobs=True, top_logprobs=1)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == text and len(content) == len(script)
    assert all(len(e.bytes) == 1 for e in content)  # one byte per token (byte_tokens)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8") == text


def test_completions_n_seed_logprobs(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=6, n=2, temperature=1.0, seed=7)
    a = client.completions.create(**kw, logprobs=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens == 12
    for c in a.choices:
        assert c.finish_reason == "length"
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
        assert all(len(t) <= 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    b = client.completions.create(**kw)  # same seed, same tokens
    assert [c.text for c in b.choices] == [c.text for c in a.choices]

    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in a.choices]
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_batch_of_prompts_and_echo(client, tok):
    ids = tok.encode("hello there", add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=3, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("hello there") and r.choices[1].text.startswith("hello")
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 6


def test_stop_string_is_cut_and_never_streamed(client, tok):
    script = byte_tokens(tok, FORCED_TEXTS[4242])  # S, T, O, P arrive one token each: the stream must hold "S", ...
    kw = dict(model=MODEL, prompt="x", max_tokens=len(script), temperature=0, seed=4242, stop=["STOP"])
    full = client.completions.create(**kw)
    assert full.choices[0].text == "Hello world. " and full.choices[0].finish_reason == "stop"
    assert full.choices[0].model_extra["stop_reason"] == "STOP"
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(pieces) == "Hello world. "
    assert len(pieces) > 3  # it really streamed


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_chinese_and_emoji_stream_without_broken_characters(client, tok, endpoint):
    text = FORCED_TEXTS[777]  # every CJK character and emoji split over 3-4 single-byte tokens
    kw = dict(model=MODEL, max_tokens=len(byte_tokens(tok, text)), temperature=0, seed=777, stream=True)
    if endpoint == "chat":
        chunks = client.chat.completions.create(messages=[{"role": "user", "content": "说你好"}], **kw)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        chunks = client.completions.create(prompt="说你好", **kw)
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 10


def test_eos_ends_a_request_with_stop(eos_chain):
    """Served from a checkpoint whose greedy continuation of any prompt is " one two three" then EOS
    (tests/checkpoints.py): completions and chat, whole and streamed, end with finish_reason "stop" after exactly 4
    completion tokens (EOS counted, as vLLM counts it), the EOS itself not in the text."""
    from tests.checkpoints import EOS_CHAIN_WORDS
    from tests.conftest import SMALL_ENGINE

    path, chain = eos_chain
    text = "".join(EOS_CHAIN_WORDS)
    eng = AsyncLLMEngine(EngineArgs(model=str(path), skip_warmup=True, **SMALL_ENGINE))
    try:
        with ServerThread(create_app(eng, served_model_names=["eos"])) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
            kw = dict(model="eos", max_tokens=20, temperature=0)
            r = c.completions.create(prompt="Hello world", **kw)
            assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
            assert r.choices[0].model_extra["stop_reason"] is None and r.usage.completion_tokens == len(chain) + 1
            r = c.chat.completions.create(messages=[{"role": "user", "content": "Count"}], **kw)
            assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, "stop")
            assert r.usage.completion_tokens == len(chain) + 1
            chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "Count"}], stream=True,
                                                    stream_options={"include_usage": True}, **kw))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
            assert chunks[-1].usage.completion_tokens == len(chain) + 1
            r = c.completions.create(prompt="Hello world", **{**kw, "max_tokens": len(chain)})
            assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "length")
    finally:
        eng.shutdown()


def test_guide_curl_request(server):
    def curl(body):
        cmd = ["curl", "-sS", "-w", "\n%{http_code}", server.url + "/v1/chat/completions", "-H",
               "Content-Type: application/json", "-d", body]
        if shutil.which("curl"):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
            payload, status = out.rsplit("\n", 1)
            return int(status), json.loads(payload)
        r = httpx.post(server.url + "/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json"}, timeout=300)
        return r.status_code, r.json()

    status, body = curl(GUIDE_BODY)  # the guide's body, trailing comma and all
    assert status == 400
    msg = body["error"]["message"]
    assert "not valid JSON" in msg and "trailing comma at line 6 column 6" in msg, msg
    assert body["error"]["type"] == "invalid_request_error"

    corrected = GUIDE_BODY.replace("],\n  }", "]\n  }")
    status, body = curl(corrected)
    assert status == 200, body
    assert body["model"] == MODEL and body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256


def test_generate_demo_endpoint(server):
    r = httpx.post(server.url + "/generate", json={"prompt": "San Francisco is a", "max_tokens": 4, "temperature": 0,
                                                   "n": 1}, timeout=60)
    assert r.status_code == 200
    (text,) = r.json()["text"]
    assert text.startswith("San Francisco is a") and len(text) > len("San Francisco is a")
    with httpx.stream("POST", server.url + "/generate", json={"prompt": "San Francisco is a", "max_tokens": 4,
                                                              "temperature": 0, "stream": True}, timeout=60) as s:
        raw = s.read().decode()
    parts = [json.loads(x) for x in raw.split("\0") if x]
    assert len(parts) >= 2 and parts[-1]["text"] == [text]  # greedy: the same text, streamed cumulatively
    bad = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokenz": 4})
    assert bad.status_code == 400 and "max_tokenz" in bad.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- errors
def _long_ids(n):
    return [100 + (i % 50) for i in range(n)]


ERROR_CASES = [
    # (id, path, body (str: raw bytes), status, param, substrings of the message)
    ("malformed-json", "/v1/chat/completions", '{"model": "tiny", "messages": [', 400, None, ["not valid JSON"]),
    ("not-an-object", "/v1/completions", "[1, 2]", 400, None, ["must be a JSON object"]),
    ("empty-body", "/v1/completions", "", 400, None, ["body is empty"]),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", ["messages", "Field required"]),
    ("messages-not-list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages", ["valid list"]),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages", ["messages is empty"]),
    ("message-without-role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages",
     ["lacks 'role'"]),
    ("temperature", "/v1/chat/completions", {"messages": GUIDE_MESSAGES, "temperature": -1}, 400, "temperature",
     ["temperature must be non-negative, got -1.0"]),
    ("top-p", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", ["top_p must be in (0, 1], got 1.5"]),
    ("presence", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", ["[-2, 2]"]),
    ("n-zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", ["n must be at least 1, got 0"]),
    ("greedy-n", "/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, 400, "n", ["greedy"]),
    ("top-k", "/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", ["top_k must be -1"]),
    ("top-logprobs", "/v1/chat/completions", {"messages": GUIDE_MESSAGES, "logprobs": True, "top_logprobs": 30},
     400, "top_logprobs", ["[0, 20]", "30"]),
    ("logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", ["[0, 20]"]),
    ("max-tokens-zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["at least 1"]),
    ("prompt-too-long", "/v1/completions", {"prompt": _long_ids(300)}, 400, "prompt",
     ["maximum context length is 256 tokens", "300 input tokens"]),
    ("max-tokens-too-large", "/v1/completions", {"prompt": _long_ids(10), "max_tokens": 250}, 400, "max_tokens",
     ["maximum context length is 256 tokens. However, you requested 260 tokens (10 in the prompt, 250 in the "
      "completion)"]),
    ("chat-max-completion-tokens", "/v1/chat/completions",
     {"messages": GUIDE_MESSAGES, "max_completion_tokens": 1000}, 400, "max_completion_tokens",
     ["maximum context length is 256 tokens", "in the messages, 1000 in the completion"]),
    ("chat-prompt-too-long", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages", ["256 tokens", "input tokens"]),
    ("token-out-of-range", "/v1/completions", {"prompt": [1, 2, 10**7]}, 400, "prompt", ["10000000", "151936"]),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", ["empty"]),
    ("stream-options-without-stream", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, "stream_options", ["only allowed"]),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-4", "messages": GUIDE_MESSAGES}, 404, "model",
     ["The model `gpt-4` does not exist"]),
    ("unknown-model-completions", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", ["nope"]),
    ("detokenize-bad-id", "/detokenize", {"tokens": [-1]}, 400, "tokens", ["out of range"]),
    ("unknown-route", "/v1/embeddings", {"input": "hi"}, 404, None, ["Not Found"]),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_responses(server, case):
    _, path, body, status, param, needles = case
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    for needle in needles:
        assert needle in err["message"], err["message"]
    if status == 404 and param == "model":
        assert err["code"] == "model_not_found"


def test_wrong_method_is_an_openai_error(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(keyed_server):
    url = keyed_server.url
    body = {"model": MODEL, "messages": GUIDE_MESSAGES, "max_tokens": 2, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/generate", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    ok = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert ok.chat.completions.create(**body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_count_what_was_sent(server, client, engine):
    before = metrics_of(server.url)
    sent_prompt, sent_gen, n_tokens_steps = 0, 0, 0
    for n in (7, 9, 11):
        r = client.completions.create(model=MODEL, prompt=_long_ids(n), max_tokens=5, temperature=0)
        sent_prompt += r.usage.prompt_tokens
        sent_gen += r.usage.completion_tokens
        n_tokens_steps += r.usage.completion_tokens - 1
    chunks = list(client.chat.completions.create(model=MODEL, messages=GUIDE_MESSAGES, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    sent_prompt += chunks[-1].usage.prompt_tokens
    sent_gen += chunks[-1].usage.completion_tokens
    n_tokens_steps += chunks[-1].usage.completion_tokens - 1
    after = metrics_of(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("vllm:prompt_tokens_total") == sent_prompt == 7 + 9 + 11 + chunks[-1].usage.prompt_tokens
    assert delta("vllm:generation_tokens_total") == sent_gen == 19
    assert delta("vllm:request_success_total{finished_reason=length}") == 4
    assert delta("vllm:time_to_first_token_seconds_count") == 4
    assert delta("vllm:e2e_request_latency_seconds_count") == 4
    assert delta("vllm:inter_token_latency_seconds_count") == n_tokens_steps
    assert delta("vllm:time_to_first_token_seconds_sum") > 0
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    assert after["vllm:num_preemptions_total"] == engine.engine.stats.preemptions
    # Every prompt is looked up in the prefix cache (on by default); hits are counted in tokens, as vLLM's.
    assert delta("vllm:prefix_cache_queries_total") == sent_prompt


def test_metrics_count_prefix_cache_hits(server, client, engine):
    page = engine.engine.blocks.page_size
    prompt = [7 + (i * 13) % 400 for i in range(2 * page + 9)]  # two full pages, then 9 tokens
    engine.engine.reset_prefix_cache()
    before = metrics_of(server.url)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = metrics_of(server.url)
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == 2 * len(prompt)
    # the second request finds the first one's two full pages
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 2 * page


# ---------------------------------------------------------------------------------------------- load
async def _stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, dict, str]:
    text, usage, reason = "", None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                text += c["text"]
                reason = c["finish_reason"] or reason
            usage = chunk.get("usage") or usage
    return text, usage, reason


def test_200_concurrent_streams_batch_together(server, engine):
    llm = engine.engine
    tokens = 16

    async def main():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(limits=limits, timeout=300) as c:
            bodies = [{"model": MODEL, "prompt": f"request {i}:", "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                      for i in range(200)]
            return await asyncio.gather(*(_stream_completion(c, server.url, b) for b in bodies))

    results = asyncio.run(main())
    assert len(results) == 200
    for text, usage, reason in results:
        assert usage["completion_tokens"] == tokens and reason == "length"
    assert llm.stats.max_decode_batch >= 64, llm.stats.max_decode_batch


def test_100_disconnecting_clients_free_every_page(server, engine):
    """50 streaming clients hang up after their first chunk, 50 waiting for a whole response hang up while it runs:
    each request is aborted (none reaches its 200 tokens) and every page is freed. The engine's step gate orders it:
    no step runs until all 100 requests are in, then steps run until each holds 3 tokens, and none runs again until
    every hang-up has been applied as an abort."""
    llm = engine.engine  # the engine process's counters, as of its newest step message
    abort_key = "vllm:request_success_total{finished_reason=abort}"
    before = metrics_of(server.url).get(abort_key, 0)

    def wait_for(cond, what):
        deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    async def leave_streaming(c, i):
        body = {"model": MODEL, "prompt": f"leave {i}", "max_tokens": 200, "ignore_eos": True, "temperature": 0,
                "stream": True}
        async with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # one chunk, then hang up

    async def wait_whole(c, i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"leave {i}"}], "max_tokens": 200,
                "ignore_eos": True, "temperature": 0}
        await c.post(server.url + "/v1/chat/completions", json=body)
        raise AssertionError("a response came back: the request was not aborted")

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=300) as c:
            streaming = [asyncio.ensure_future(leave_streaming(c, i)) for i in range(50)]
            waiting = [asyncio.ensure_future(wait_whole(c, i)) for i in range(50)]
            await asyncio.to_thread(wait_for, lambda: _engine_call(engine, "count_requests") == 100,
                                    "the 100 requests did not all reach the engine")
            await asyncio.to_thread(_engine_call, engine, "run_to_3_tokens")
            await asyncio.gather(*streaming)  # each read its first chunk and hung up
            assert not any(t.done() for t in waiting)
            for t in waiting:
                t.cancel()  # hang up: the connection closes
            ended = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(e, asyncio.CancelledError) for e in ended), ended
            await asyncio.to_thread(wait_for, lambda: _engine_call(engine, "count_requests") == 0,
                                    "the hung-up requests were not all aborted")

    _engine_call(engine, "shut_gate")
    try:
        asyncio.run(main())
    finally:
        _engine_call(engine, "open_gate")
    wait_for(lambda: llm.blocks.num_free == llm.blocks.num_pages and not llm.has_unfinished_requests(),
             (llm.blocks.num_free, llm.blocks.num_pages, llm.num_requests))
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "still alive?", "max_tokens": 3,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").status_code == 200
    assert metrics_of(server.url)[abort_key] - before == 100  # every one of them was aborted
