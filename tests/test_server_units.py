"""AsyncLLMEngine and the server's pieces without a model: a scripted fake engine (no JAX), the CLI, JSON errors,
request -> SamplingParams, and stream formatting with stop-string holdback."""

from __future__ import annotations

import asyncio
import time
import types

import httpx
import pytest

from qwenjax.engine.async_llm import AsyncLLMEngine, EngineDeadError
from qwenjax.outputs import CompletionOutput, RequestOutput
from qwenjax.sampling_params import SamplingParams
from qwenjax.tokenizer import default_tokenizer_dir, load_tokenizer
from server.__main__ import engine_args, make_parser, served_names
from server.app import create_app
from server.errors import parse_json
from server.formatting import ChatFormatter, TokenText
from server.protocol import APIError, ChatCompletionRequest, CompletionRequest


class FakeEngine:
    """LLMEngine's interface over scripted texts: each step appends one character to every request's text."""

    def __init__(self, tokenizer=None, fail_at_step: int | None = None):
        self.final_only = True
        self.requests: dict[str, types.SimpleNamespace] = {}
        self.aborted: list[str] = []
        self.fail_at_step = fail_at_step
        self.stats = types.SimpleNamespace(prompt_tokens=0, generation_tokens=0, steps=0, max_decode_batch=0,
                                           preemptions=0)
        self.blocks = types.SimpleNamespace(usage=0.0, num_free=8, num_pages=8)
        self.tokenizer = tokenizer
        self.max_model_len = 64
        self.model_config = types.SimpleNamespace(vocab_size=151936)
        self.generation_defaults = {}
        self.args = None
        self.num_waiting = 0
        self.unfinished_checks = 0

    @property
    def num_running(self):
        return len(self.requests)

    def has_unfinished_requests(self):
        self.unfinished_checks += 1
        return bool(self.requests)

    def take_failed(self):
        return []

    def add_request(self, rid, prompt, params, *, prompt_token_ids=None, arrival_time=None, priority=0,
                    lora_request=None):
        if prompt == "bad":
            raise ValueError("the prompt is bad")
        if prompt is None:
            prompt = self.tokenizer.decode(prompt_token_ids)
        self.requests[rid] = types.SimpleNamespace(rid=rid, target=prompt, n=0, reason=None)

    def abort_request(self, rid):
        self.aborted.append(rid)
        req = self.requests.pop(rid, None)
        if req is not None:
            req.reason = "abort"

    def request_output(self, req):
        comp = CompletionOutput(0, req.target[:req.n], list(range(req.n)), None, None, req.reason)
        return RequestOutput(req.rid, req.target, [1], None, [comp], req.reason is not None)

    def shutdown(self):
        self.shut_down = True

    def step(self, on_dispatch=None):
        self.stats.steps += 1
        if self.fail_at_step is not None and self.stats.steps >= self.fail_at_step:
            raise RuntimeError("device on fire")
        time.sleep(0.002)
        outs = []
        for req in list(self.requests.values()):
            req.n += 1
            self.stats.generation_tokens += 1
            if req.n >= len(req.target):
                req.reason = "length"
                del self.requests[req.rid]
            outs.append(self.request_output(req))
        return outs


def run(coro):
    return asyncio.run(coro)


def test_streams_deliver_cumulative_outputs_and_finish():
    eng = AsyncLLMEngine(FakeEngine())
    try:
        async def main():
            async def one(i):
                texts = []
                async for out in eng.generate(f"text number {i}", SamplingParams(), f"r{i}"):
                    texts.append(out.outputs[0].text)
                return texts, out

            return await asyncio.gather(*(one(i) for i in range(5)))

        for i, (texts, last) in enumerate(run(main())):
            assert last.finished and last.outputs[0].text == f"text number {i}"
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    finally:
        eng.shutdown()


def test_abort_ends_the_stream_and_reaches_the_engine():
    fake = FakeEngine()
    eng = AsyncLLMEngine(fake)
    try:
        async def main():
            stream = eng.add_request("a", "x" * 10_000, SamplingParams())
            first = await stream.__anext__()
            assert not first.finished
            stream.abort()
            outs = [o async for o in stream]
            return outs

        outs = run(main())
        assert outs and outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert fake.aborted == ["a"] and not fake.requests
    finally:
        eng.shutdown()


def test_leaving_generate_early_aborts():
    fake = FakeEngine()
    eng = AsyncLLMEngine(fake)
    try:
        async def main():
            async for _ in eng.generate("y" * 10_000, SamplingParams(), "b"):
                break

        run(main())
        deadline = time.monotonic() + 60  # a guard against a hang: the abort is an event, waited for
        while "b" not in fake.aborted:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        eng.shutdown()


def test_bad_request_fails_only_its_own_stream():
    eng = AsyncLLMEngine(FakeEngine())
    try:
        async def main():
            bad = eng.add_request("bad", "bad", SamplingParams())
            good = eng.add_request("good", "fine", SamplingParams())
            with pytest.raises(ValueError, match="the prompt is bad"):
                await bad.__anext__()
            return [o async for o in good][-1]

        assert run(main()).outputs[0].text == "fine"
        assert not eng.dead
    finally:
        eng.shutdown()


def test_a_built_engine_runs_in_a_thread():
    fake = FakeEngine()
    with pytest.raises(ValueError, match="multiprocess=True needs EngineArgs"):
        AsyncLLMEngine(fake, multiprocess=True, start=False)
    eng = AsyncLLMEngine(fake, start=False)
    assert not eng.multiprocess and eng.engine is fake and eng.engine_pid is None


def test_idle_loop_sleeps():
    fake = FakeEngine()
    eng = AsyncLLMEngine(fake)
    try:
        async def main():
            return [o async for o in eng.generate("abc", SamplingParams(), "c")]

        run(main())
        time.sleep(0.1)
        checks = fake.unfinished_checks
        time.sleep(0.5)
        assert fake.unfinished_checks - checks <= 1  # asleep on the condition, not polling
        assert eng.is_running
    finally:
        eng.shutdown()
    assert not eng.is_running


def check_engine_death(eng, params: SamplingParams, message: str) -> None:
    """Three requests on an engine whose loop dies at a step with `message`: each fails with EngineDeadError, later
    submissions fail at once, /health and new HTTP requests answer 503."""
    app = create_app(eng, served_model_names=["m"])

    async def main():
        waiting = [eng.add_request(f"d{i}", "z" * 50, params) for i in range(3)]
        for s in waiting:
            with pytest.raises(EngineDeadError, match=message):
                async for _ in s:
                    pass
        assert eng.dead
        with pytest.raises(EngineDeadError):
            eng.add_request("late", "z", SamplingParams())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})

    health, late = run(main())
    assert health.status_code == 503 and message in health.json()["error"]["message"]
    assert late.status_code == 503 and late.json()["error"]["type"] == "server_error"


def test_engine_death_reaches_every_request_and_health():
    tok = load_tokenizer(default_tokenizer_dir())
    check_engine_death(AsyncLLMEngine(FakeEngine(tok, fail_at_step=3)), SamplingParams(), "device on fire")


def test_engine_death_mid_request_is_an_http_error():
    tok = load_tokenizer(default_tokenizer_dir())
    eng = AsyncLLMEngine(FakeEngine(tok, fail_at_step=4))
    app = create_app(eng, served_model_names=["m"])

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", json={"prompt": "a long enough prompt", "max_tokens": 30})

    r = run(main())
    assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}


class FailingFake(FakeEngine):
    """A request whose prompt starts with "boom" fails alone in a step, as LLMEngine.fail_request reports it."""

    def __init__(self):
        super().__init__()
        self.failed = []

    def step(self, on_dispatch=None):
        for rid, req in list(self.requests.items()):
            if req.target.startswith("boom") and req.n >= 2:
                del self.requests[rid]
                self.failed.append((rid, OverflowError("injected")))
        return super().step(on_dispatch)

    def take_failed(self):
        failed, self.failed = self.failed, []
        return failed


def test_a_request_failed_in_a_step_fails_alone_in_thread_mode():
    eng = AsyncLLMEngine(FailingFake())
    try:
        async def main():
            async def one(prompt):
                try:
                    async for out in eng.generate(prompt, SamplingParams(), prompt):
                        pass
                    return out.outputs[0].text
                except OverflowError as e:
                    return f"failed: {e}"

            # the timeout is only the failure path: an unreported failure leaves its stream waiting forever
            return await asyncio.wait_for(asyncio.gather(one("boom goes this one"), one("this one is fine")), 60)

        assert run(main()) == ["failed: injected", "this one is fine"]
        assert not eng.dead
    finally:
        eng.shutdown()


def test_engine_death_stops_the_server_after_streams_had_their_errors():
    """create_app(on_engine_death=...) (python -m server's default): once the loop died, the callback runs after the
    open requests got their errors; without it (--keep-alive-on-engine-death) the app keeps answering 503."""
    tok = load_tokenizer(default_tokenizer_dir())
    eng = AsyncLLMEngine(FakeEngine(tok, fail_at_step=3))
    events = []
    app = create_app(eng, served_model_names=["m"], on_engine_death=lambda: events.append("stop the server"))

    async def main():
        async with app.router.lifespan_context(app):
            stream = eng.add_request("d", "z" * 50, SamplingParams())
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            events.append("request failed")
            while "stop the server" not in events:
                await asyncio.sleep(0.05)

    run(asyncio.wait_for(main(), 120))  # the timeout is only the failure path
    assert events == ["request failed", "stop the server"] and app.state.engine_died


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_flags_map_onto_engine_args():
    ns = make_parser().parse_args([
        "--model", "/ckpt/qwen2", "--mesh", "4", "--max-model-len", "4096", "--gpu-memory-utilization", "0.8",
        "--quantization", "awq", "--kv-cache-dtype", "fp8_e5m2", "--dtype", "bfloat16", "--seed", "3",
        "--block-size", "32", "--max-num-seqs", "64", "--max-num-batched-tokens", "8192",
        "--served-model-name", "Qwen/Qwen2-7B-Instruct", "qwen", "--api-key", "k", "--chat-template", "{{ x }}",
        "--generation-config", "vllm", "--decode-buckets", "8,64", "--load-format", "dummy"])
    a = engine_args(ns)
    assert (a.model, a.tensor_parallel_size, a.max_model_len, a.gpu_memory_utilization) == ("/ckpt/qwen2", 4, 4096, 0.8)
    assert (a.quantization, a.kv_cache_dtype, a.dtype, a.seed, a.block_size) == ("awq", "fp8_e5m2", "bfloat16", 3, 32)
    assert (a.max_num_seqs, a.max_num_batched_tokens, a.generation_config) == (64, 8192, "vllm")
    assert a.served_model_name == ("Qwen/Qwen2-7B-Instruct", "qwen") and a.chat_template == "{{ x }}"
    assert a.decode_buckets == (8, 64) and a.load_format == "dummy"
    assert served_names(ns) == ["Qwen/Qwen2-7B-Instruct", "qwen"] and ns.api_key == "k"
    assert engine_args(make_parser().parse_args(["--tensor-parallel-size", "2"])).tensor_parallel_size == 2
    plain = engine_args(make_parser().parse_args([]))  # left to the device, with the server's defaults (8192 tokens)
    assert (plain.max_num_seqs, plain.max_num_batched_tokens, plain.usage_context) == (None, None, "server")
    assert a.usage_context == "server"
    moe = engine_args(make_parser().parse_args(["--enable-expert-parallel", "--enable-chunked-prefill", "false"]))
    assert moe.enable_expert_parallel and moe.enable_chunked_prefill is False
    assert not engine_args(make_parser().parse_args([])).enable_expert_parallel
    d = make_parser().parse_args([])
    assert (d.host, d.port, d.model) == ("localhost", 8000, None)
    assert not d.disable_frontend_multiprocessing  # the engine runs in its own process by default
    assert make_parser().parse_args(["--disable-frontend-multiprocessing"]).disable_frontend_multiprocessing
    assert served_names(d) == ["qwenjax/tiny-random-qwen2"]
    assert served_names(make_parser().parse_args(["--model", "/x/y"])) == ["/x/y"]


# ---------------------------------------------------------------------------------------------- requests
def test_trailing_comma_message_points_at_the_comma():
    with pytest.raises(APIError) as e:
        parse_json(b'{"a": [1, 2,\n ]}')
    assert "trailing comma at line 1 column 12, before ']'" in e.value.message and e.value.status == 400
    with pytest.raises(APIError) as e:
        parse_json(b'{"a": 1 "b": 2}')
    assert "trailing comma" not in e.value.message and "line 1 column 9" in e.value.message


def test_only_fields_the_client_set_block_generation_defaults():
    qwen_defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "top_p": 0.5,
                                                "ignore_eos": True, "unknown_field": 1})
    p = req.sampling_params(max_tokens=10, logprobs=None).apply_generation_defaults(qwen_defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.5, 20, 1.05)
    assert p.ignore_eos and p.max_tokens == 10 and p.logprobs is None
    creq = CompletionRequest.model_validate({"prompt": "x", "temperature": 0, "stop": "END", "seed": 5})
    p = creq.sampling_params(max_tokens=4, logprobs=2).apply_generation_defaults(qwen_defaults)
    assert p.is_greedy and p.stop == ["END"] and p.seed == 5 and p.logprobs == 2
    assert p.repetition_penalty == 1.05  # not set by the client: the model's default applies


def test_stream_formatting_holds_back_stop_prefixes():
    tok = load_tokenizer(default_tokenizer_dir())
    params = SamplingParams(stop=["STOP"], max_tokens=20)
    fmt = ChatFormatter(request_id="x", model="m", params=params, prompt_lens=[3], token_text=TokenText(tok),
                        num_logprobs=None, include_usage=True)
    steps = [("Hi S", None), ("Hi ST", None), ("Hi STa", None), ("Hi STa S", None), ("Hi STa ", "stop")]
    sent = []
    for k, (text, reason) in enumerate(steps):
        out = RequestOutput("x", None, [1, 2, 3], None,
                            [CompletionOutput(0, text, list(range(k + 1)), None, None, reason)], reason is not None)
        for chunk in fmt.stream_chunks(0, out):
            sent.append(chunk["choices"][0]["delta"].get("content", ""))
    # "S", "ST" and the second "S" could start "STOP": each is held until the next text decides
    assert sent == ["Hi ", "STa", " ", ""]
    (usage,) = fmt.final_chunks()
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_token_bytes_are_exact():
    tok = load_tokenizer(default_tokenizer_dir())
    tt = TokenText(tok)
    text = "naïve 你好 🎉"
    ids = tok.encode(text)
    assert bytes(b for t in ids for b in tt.bytes(t)).decode("utf-8") == text
    assert tt.bytes(151645) == list(b"<|im_end|>")


def test_stream_interval_and_dispatch_hook():
    fake = FakeEngine()
    calls = []
    real_step = fake.step

    def step(on_dispatch=None):
        calls.append(on_dispatch)
        if on_dispatch is not None:
            on_dispatch()  # the engine calls it once the step is on the device: the last step's outputs go out
        return real_step()

    fake.step = step
    eng = AsyncLLMEngine(fake, stream_interval=3)
    try:
        async def main():
            stream = eng.add_request("s", "x" * 20, SamplingParams())
            seen = [o async for o in stream]
            return seen, stream

        seen, stream = run(main())
        texts = [o.outputs[0].text for o in seen]
        assert texts[0] == "x" and texts[-1] == "x" * 20 and seen[-1].finished
        assert len(seen) <= 1 + 20 // 3 + 1  # first, every third step, last
        assert len(stream.take_itl()) == 19  # one gap per step all the same
        assert stream.first_token_time <= stream.finished_time
    finally:
        eng.shutdown()
    assert len(calls) >= 20 and all(callable(c) for c in calls)  # every step got the dispatch callback
