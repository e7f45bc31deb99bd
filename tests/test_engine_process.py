"""AsyncLLMEngine's process mode: the engine core process (qwenjax/engine/core.py) and its frontend client
(qwenjax/engine/core_client.py). Deltas round-trip without a process; the rest spawns small engines of the built-in model
(skip_warmup: each bucket compiles on first use) and checks what crosses the pipes: refused requests, aborts that free
pages, start-up errors, and the engine's death (an exception in a step, or the process killed) reaching every open
request and /health."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine, EngineDeadError
from qwenjax.engine.core import OutputEncoder
from qwenjax.engine.core_client import RemoteOutput
from qwenjax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from qwenjax.sampling_params import SamplingParams
from server.app import create_app
from tests.conftest import pythonpath_with
from tests.test_server_units import check_engine_death

REPO = Path(__file__).resolve().parents[1]

ARGS = EngineArgs(model=None, dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256,
                  decode_buckets=(8,), prefill_token_buckets=(32, 128), num_kv_pages=64, generation_config="vllm",
                  skip_warmup=True)


def _explode_at_third_step(llm) -> None:
    """engine_setup hook (in the engine process): the third step raises, as a device failure would."""
    real_step, calls = llm.step, []

    def step(on_dispatch=None):
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError("device on fire")
        return real_step(on_dispatch=on_dispatch)

    llm.step = step


class _StoppedClock:
    """Stands in for the `time` module: monotonic() reads `now`; everything else is the real module's."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _wait(cond, timeout=60.0, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS, stream_interval=2)  # applied in the engine process
    yield eng
    eng.shutdown()


# ---------------------------------------------------------------------------------------------- deltas, no process
def test_deltas_rebuild_every_cumulative_output():
    """Growing outputs of two completions (logprobs on one), then a stop string cut out of the final text: each
    rebuilt output equals the engine's."""
    def out(step, finished=False):
        texts = ["ab" * step, "xyz" * step]  # text grows while running
        comps = []
        for i, text in enumerate(texts):
            ids = list(range(10 * i, 10 * i + step))
            lps = [{t: Logprob(-0.5, 1, "t")} for t in ids] if i == 0 else None
            if finished and i == 1:
                text = text[:2]  # a stop string matched: the final text is shorter than what streamed
            comps.append(CompletionOutput(i, text, ids, -1.0 * step if i == 0 else None, lps,
                                          "stop" if finished else None, "Q" if finished and i == 1 else None))
        metrics = RequestMetrics(1.0, 2.0, 3.0 if step else None, 4.0 if finished else None, 0)
        return RequestOutput("r", None, [5, 6, 7], None, comps, finished, metrics)

    enc = OutputEncoder()
    enc.add("r", send_prompt_ids=True)
    remote = RemoteOutput("r", None, None, 1.0)
    for step in (1, 2, 3):
        remote.apply(enc.encode(out(step)))
        assert remote.build() == out(step)
    remote.apply(enc.encode(out(4, finished=True)))
    assert remote.build() == out(4, finished=True)
    assert "r" not in enc.sent  # forgotten once finished


def test_deltas_read_from_requests_equal_deltas_of_their_outputs():
    """The engine core encodes each advanced Request directly (raw_outputs); the deltas equal those of the
    RequestOutputs the engine builds otherwise, step by step: n = 2 with logprobs, a stop string, async placeholders."""
    from qwenjax.engine.llm_engine import LLMEngine

    engine = LLMEngine(ARGS)
    engine.raw_outputs = True
    direct, via_outputs = OutputEncoder(), OutputEncoder()
    params = [SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=9, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, stop=["e"], ignore_eos=True)]
    for i, p in enumerate(params):
        engine.add_request(str(i), "Tell me about dragons", p)
        for enc in (direct, via_outputs):
            enc.add(str(i), send_prompt_ids=False)
    seen = 0
    while engine.has_unfinished_requests():
        for req in engine.step():
            a = direct.encode_request(req)
            b = via_outputs.encode(engine.request_output(req))
            assert a == b, (req.request_id, a, b)
            seen += 1
    assert seen >= 10 and not direct.sent and not via_outputs.sent


# ---------------------------------------------------------------------------------------------- one shared engine
def test_frontend_never_initialises_jax():
    """In a fresh interpreter (this one may already have started JAX for other tests): a process-mode engine starts,
    serves a request and answers the tokenizer, and JAX was never initialised in the frontend; then jax.devices()
    initialises it there (the probe can tell)."""
    script = textwrap.dedent("""
        import asyncio
        from jax._src import xla_bridge
        from qwenjax.engine.async_llm import AsyncLLMEngine
        from qwenjax.sampling_params import SamplingParams
        from tests.test_engine_process import ARGS

        async def main(eng):
            return [o async for o in eng.generate("hello", SamplingParams(max_tokens=3, temperature=0), "r")]

        eng = AsyncLLMEngine(ARGS)
        try:
            final = asyncio.run(main(eng))[-1]
            view = eng.engine
            print("engine", eng.multiprocess, eng.engine_pid is not None, final.finished,
                  len(final.outputs[0].token_ids), view.tokenizer.decode(view.tokenizer.encode("hello")))
            print("frontend initialised JAX:", xla_bridge.backends_are_initialized())
        finally:
            eng.shutdown()
        import jax
        jax.devices()
        print("after jax.devices():", xla_bridge.backends_are_initialized())
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath_with(REPO))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.splitlines()[-3:] == ["engine True True True 3 hello", "frontend initialised JAX: False",
                                             "after jax.devices(): True"], proc.stdout


def test_the_frontend_view_reads_the_engine_process(engine):
    assert engine.multiprocess and engine.engine_pid != os.getpid()
    view = engine.engine
    assert view.max_model_len == 128 and view.model_config.vocab_size == 151936
    assert view.tokenizer.decode(view.tokenizer.encode("hello")) == "hello"
    assert view.blocks.num_pages == 64 and view.blocks.num_free == 64 and view.generation_defaults == {}


def test_a_refused_request_fails_only_its_own_stream(engine):
    async def main():
        bad_id = engine.add_request("bad-id", None, SamplingParams(max_tokens=3), prompt_token_ids=[1, 10**7])
        bad_type = engine.add_request("bad-type", 123, SamplingParams(max_tokens=3))
        good = engine.add_request("good", "hello", SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(ValueError, match="prompt token id 10000000 is out of range"):
            await bad_id.__anext__()
        with pytest.raises(TypeError, match="prompt must be a string"):
            await bad_type.__anext__()
        outs = [o async for o in good]
        dup = engine.add_request("dup", "hi", SamplingParams(max_tokens=50, ignore_eos=True))
        dup2 = engine.add_request("dup", "hi", SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="already in use"):
            await dup2.__anext__()
        dup.abort()
        return outs

    outs = asyncio.run(main())
    final = outs[-1]
    assert final.finished and len(final.outputs[0].token_ids) == 4 and final.outputs[0].finish_reason == "length"
    assert final.prompt == "hello" and final.prompt_token_ids == engine.engine.tokenizer.encode("hello")
    assert final.metrics.first_token_time is not None and final.metrics.finished_time >= final.metrics.arrival_time
    assert not engine.dead


def test_stream_interval_and_token_times(engine):
    async def main():
        stream = engine.add_request("every-other", "x", SamplingParams(max_tokens=9, ignore_eos=True, temperature=0))
        return [o async for o in stream], stream

    seen, stream = asyncio.run(main())
    assert [len(o.outputs[0].token_ids) for o in seen][-1] == 9 and seen[-1].finished
    assert len(seen) <= 1 + 9 // 2 + 1  # the first, then every other step, and the last
    assert len(stream.take_itl()) == 8  # one gap per token step, whether or not its output went out
    assert stream.first_token_time <= stream.finished_time


def test_idle_time_counts_the_wait_in_progress(engine, monkeypatch):
    """The engine process tells the frontend when it starts waiting for requests, so the idle time of a window
    (benchmarks/serve.py's server_engine_idle_s) includes a wait still in progress, and a step ends it."""
    async def one():
        return [o async for o in engine.generate(None, SamplingParams(max_tokens=3, ignore_eos=True), "idle-1",
                                                 prompt_token_ids=[5, 6, 7])]

    asyncio.run(one())
    _wait(lambda: engine.idle_since is not None, 30, "the engine process never reported waiting")
    since, done = engine.idle_since, engine.idle_seconds
    # The frontend's clock, stopped at chosen instants: the wait in progress counts up to each of them.
    clock = _StoppedClock()
    monkeypatch.setattr(sys.modules[type(engine).idle_seconds_now.__module__], "time", clock)
    for elapsed in (7.0, 9.5):
        clock.now = since + elapsed
        assert engine.idle_seconds_now() == pytest.approx(done + elapsed, abs=1e-6)
    monkeypatch.undo()
    waited = engine.idle_seconds_now()  # the idle time so far, the wait in progress included (the real clock)
    steps = engine.num_steps

    async def two():
        return [o async for o in engine.generate(None, SamplingParams(max_tokens=3, ignore_eos=True), "idle-2",
                                                 prompt_token_ids=[8, 9])]

    asyncio.run(two())
    _wait(lambda: engine.idle_since is not None and engine.num_steps > steps, 30, "no idle report after the steps")
    assert engine.idle_seconds >= waited  # the finished wait was added, whole
    assert engine.idle_seconds_now() >= engine.idle_seconds


def test_abort_in_flight_frees_its_pages(engine):
    async def main():
        stream = engine.add_request("long", None, SamplingParams(max_tokens=100, ignore_eos=True, temperature=0),
                                    prompt_token_ids=list(range(100, 140)))
        first = await stream.__anext__()
        assert not first.finished
        assert engine.engine.blocks.num_free < engine.engine.blocks.num_pages  # its pages are in use
        stream.abort()
        return [o async for o in stream]

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) < 100
    view = engine.engine
    _wait(lambda: view.blocks.num_free == view.blocks.num_pages and not view.has_unfinished_requests(), 30,
          "the aborted request's pages were not freed")
    assert view.num_running == 0 and view.blocks.usage == 0.0


def test_reset_prefix_cache_runs_in_the_engine_process(engine):
    async def main():
        return [o async for o in engine.generate(None, SamplingParams(max_tokens=2), "cached",
                                                 prompt_token_ids=list(range(200, 240)))]

    engine.engine.reset_prefix_cache()  # pages the earlier tests' prompts left named
    asyncio.run(main())
    assert engine.engine.reset_prefix_cache() == 2  # the 40-token prompt's two full pages of 16
    assert engine.engine.reset_prefix_cache() == 0


def test_thread_mode_gives_the_same_outputs(engine):
    """The same greedy request with logprobs, n=2 sampled with a seed, and a stop string, through the engine process
    and through an engine in a thread of this process."""
    requests = [("greedy", "The capital of France is", SamplingParams(max_tokens=8, temperature=0, logprobs=2)),
                ("seeded", "Once upon a time", SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=3)),
                ("stop", "abc", SamplingParams(max_tokens=12, temperature=0, stop=[" "]))]

    def run(eng):
        async def main():
            finals = []
            for rid, prompt, params in requests:
                finals.append([o async for o in eng.generate(prompt, params, rid)][-1])
            return finals

        return asyncio.run(main())

    thread = AsyncLLMEngine(ARGS, multiprocess=False)
    try:
        assert not thread.multiprocess and thread.engine_pid is None
        here = run(thread)
    finally:
        thread.shutdown()
    there = run(engine)
    for a, b in zip(here, there):
        assert a.prompt_token_ids == b.prompt_token_ids and a.finished and b.finished
        for x, y in zip(a.outputs, b.outputs):
            assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == (y.text, y.token_ids, y.finish_reason,
                                                                             y.stop_reason)
            assert (x.logprobs is None) == (y.logprobs is None)
            for ex, ey in zip(x.logprobs or [], y.logprobs or []):
                assert ex.keys() == ey.keys()
                assert all(abs(ex[t].logprob - ey[t].logprob) < 1e-4 for t in ex)


# ---------------------------------------------------------------------------------------------- failures
def test_start_up_errors_keep_their_type():
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AsyncLLMEngine(EngineArgs(model=os.path.dirname(__file__)))


def test_an_exception_in_a_step_fails_every_request_and_health():
    eng = AsyncLLMEngine(ARGS, engine_setup=_explode_at_third_step)
    try:
        check_engine_death(eng, SamplingParams(max_tokens=50, ignore_eos=True), "device on fire")
        _wait(lambda: not eng.is_running, 30, "the engine process did not exit after its loop died")
    finally:
        eng.shutdown()


def test_killing_the_engine_process_fails_open_requests_and_health():
    from tests.test_server import ServerThread

    eng = AsyncLLMEngine(ARGS)
    try:
        with ServerThread(create_app(eng, served_model_names=["m"])) as srv:
            assert httpx.get(srv.url + "/health").status_code == 200
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0},
                           timeout=120)
            assert r.status_code == 200

            async def main():
                stream = eng.add_request("open", "z", SamplingParams(max_tokens=120, ignore_eos=True))
                await stream.__anext__()  # it is running in the engine
                os.kill(eng.engine_pid, signal.SIGKILL)
                with pytest.raises(EngineDeadError, match="killed by signal 9"):
                    async for _ in stream:
                        pass

            asyncio.run(main())
            assert eng.dead and not eng.is_running
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]["message"]
            late = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["type"] == "server_error"
    finally:
        eng.shutdown(timeout=5)
