"""Issue 32: data-parallel replicas behind one server (`--data-parallel-size 2`, the "mp" backend: two engine core
processes of this host). The server runs in a thread over a DataParallelEngine as `python -m server` builds it; the
oracle of the tokens is one offline engine (qwenjax.LLM) on the same built-in model. Which replica served what is
read from the server's /metrics (the replicas' own prefix-cache counters, labelled engine="i").

The replica-death test kills a replica: it runs last.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.config import EngineArgs
from qwenjax.core.routing import make_router
from qwenjax.engine.data_parallel import DataParallelEngine, device_env
from server.app import create_app
from tests.test_server import ServerThread, metrics_of

ARGS = EngineArgs(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=128, num_kv_pages=64,
                  decode_buckets=(4,), prefill_token_buckets=(64,), generation_config="vllm", usage_context="server",
                  data_parallel_size=2)
PROMPTS = [[1, 2, 3, 4 + i] * (i + 1) for i in range(6)]
SYSTEM = list(range(100, 164))  # 4 full blocks of 16 tokens shared by the prefix tests' prompts


@pytest.fixture(scope="module")
def dp():
    eng = DataParallelEngine(ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(dp):
    with ServerThread(create_app(dp, served_model_names=["tiny"])) as s:
        yield s


def complete(url: str, ids: list[int], max_tokens: int = 8) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=300)


def one_engine_texts() -> list[str]:
    """The oracle: PROMPTS' greedy completions (8 tokens) from one offline engine with the replicas' arguments."""
    llm = LLM(**{f.name: getattr(ARGS, f.name) for f in dataclasses.fields(EngineArgs)
                 if f.name not in ("data_parallel_size", "usage_context")})
    return [o.outputs[0].text for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
        max_tokens=8, temperature=0), use_tqdm=False)]


def per_engine(url: str, name: str) -> list[float]:
    m = metrics_of(url)
    return [m[f"vllm:{name}_total{{engine={i}}}"] for i in range(2)]


def test_device_groups_split_the_visible_gpus_and_refuse_too_few():
    assert device_env(1, 2, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert device_env(1, 2, {}) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert device_env(0, 2, {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a"}) \
        == {"XLA_FLAGS": "--a --xla_force_host_platform_device_count=2"}
    with pytest.raises(ValueError, match=r"replica 1 needs devices 2..3 of CUDA_VISIBLE_DEVICES='0,1,2'"):
        device_env(1, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2"})


def test_server_flags_build_data_parallel_engine_args_and_refuse_a_thread_engine():
    from server.__main__ import engine_args, make_parser
    from server.data_parallel import check_data_parallel

    ns = make_parser().parse_args(["--data-parallel-size", "2", "--data-parallel-routing", "prefix_aware",
                                   "--distributed-executor-backend", "ray"])
    args = engine_args(ns)
    assert (args.data_parallel_size, args.distributed_executor_backend) == (2, "ray")
    check_data_parallel(ns)
    ns = make_parser().parse_args(["--data-parallel-size", "2", "--disable-frontend-multiprocessing"])
    with pytest.raises(ValueError, match="each run in their own process"):
        check_data_parallel(ns)


def test_ray_backend_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RuntimeError, match=r"needs Ray, which is not installed: pip install ray"):
        DataParallelEngine(dataclasses.replace(ARGS, distributed_executor_backend="ray"))


def test_replicas_spanning_hosts_need_ray_and_are_refused_by_name_otherwise():
    missing = EngineArgs(num_processes=2, data_parallel_size=2, usage_context="server").unsupported()
    assert any("replicas that span hosts are placed by Ray" in m for m in missing), missing
    assert not EngineArgs(num_processes=2, data_parallel_size=2, distributed_executor_backend="ray",
                          usage_context="server").unsupported()
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of 'mp', 'ray', got 'slurm'"):
        EngineArgs(distributed_executor_backend="slurm")


def test_two_replicas_give_each_request_the_tokens_of_one_engine(server, dp):
    want = one_engine_texts()
    before = per_engine(server.url, "prefix_cache_queries")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda ids: complete(server.url, ids), PROMPTS))
    assert [r.status_code for r in got] == [200] * 6
    assert [r.json()["choices"][0]["text"] for r in got] == want  # greedy: the same tokens, hence the same text
    after = per_engine(server.url, "prefix_cache_queries")
    assert all(a > b for a, b in zip(after, before)), (before, after)  # least_loaded used both replicas
    m = metrics_of(server.url)
    assert m["vllm:prefix_cache_queries_total"] == sum(after)  # the unlabelled series is the sum
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json() == {"engines": [{"engine": 0, "healthy": True, "error": None},
                                         {"engine": 1, "healthy": True, "error": None}]}


@pytest.mark.parametrize("routing", ["round_robin", "prefix_aware"])
def test_prefix_aware_routing_keeps_a_shared_prefix_on_one_replica(server, dp, routing):
    dp.router = make_router(routing)
    prompts = [SYSTEM + [7, 8, 9 + i] for i in range(6)]
    before = per_engine(server.url, "prefix_cache_queries")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda ids: complete(server.url, ids, max_tokens=4), prompts))
    assert [r.status_code for r in got] == [200] * 6
    queried = [a - b for a, b in zip(per_engine(server.url, "prefix_cache_queries"), before)]
    if routing == "round_robin":  # the control: the shared prefix is computed on both replicas
        assert all(q > 0 for q in queried), queried
    else:
        assert sorted(q > 0 for q in queried) == [False, True], queried
    dp.router = make_router("least_loaded")


def test_prefix_aware_replica_hits_its_cached_prefix(server, dp):
    """A prompt computes a new prefix on one replica; four concurrent prompts sharing it then all hit it there
    (least_loaded would spread them, and those sent to the other replica would miss)."""
    dp.router = make_router("prefix_aware")
    prefix = list(range(200, 264))
    hits0 = per_engine(server.url, "prefix_cache_hits")
    assert complete(server.url, prefix + [50, 51], max_tokens=2).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: complete(server.url, prefix + [60 + i, 61], max_tokens=4), range(4)))
    assert [r.status_code for r in got] == [200] * 4
    gained = [a - b for a, b in zip(per_engine(server.url, "prefix_cache_hits"), hits0)]
    assert sorted(gained) == [0, 4 * len(prefix)], gained
    dp.router = make_router("least_loaded")


def test_routing_real_benchmark_smoke(tmp_path):
    """benchmarks/routing_real.py end to end on a small trace (its own two replicas): a result with every router's
    real and simulated figures; where routing does not hang on timing (round_robin's turns, prefix_aware's one home
    per prefix; arrivals far enough apart that no prefix is computed twice at once) the real hit rates equal the
    simulator's (same trace, same scheduler and block manager)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import routing_real

    result = routing_real.main(["--num-requests", "8", "--request-rate", "4", "--prefix-groups", "2",
                                "--prefix-len", "64", "--max-model-len", "256", "--repeats", "2",
                                "--results-dir", str(tmp_path)])
    written = json.loads(next(tmp_path.glob("routing-real-*-cpu-*.json")).read_text())
    assert written["metrics"] == result["metrics"]
    m = result["metrics"]
    for r in ("round_robin", "least_loaded", "prefix_aware"):
        assert m[f"real_{r}_ttft_ms_mean"] > 0 and m[f"sim_{r}_ttft_ms_mean"] > 0
    for r in ("round_robin", "prefix_aware"):
        assert m[f"real_{r}_prefix_cache_hit_rate"] == pytest.approx(m[f"sim_{r}_prefix_cache_hit_rate"], abs=0.02)
    assert m["real_prefix_aware_prefix_cache_hit_rate"] > m["real_round_robin_prefix_cache_hit_rate"]
    assert sorted(result["config"]["order_real"]) == sorted(result["config"]["order_sim"])
    assert len(result["config"]["traces"]) == 2 and 0 <= m["resolved_pairs"] <= 3
    assert all(m[f"real_{r}_ttft_ms_mean_se"] >= 0 for r in ("round_robin", "least_loaded", "prefix_aware"))


def wait_until_streaming(replica, n: int) -> None:
    """Until `n` requests of `replica` have their first token and are not finished (they have ~120 to go)."""
    deadline = time.monotonic() + 300
    while sum(1 for s, _ in list(replica.inflight.values()) if s.first_token_time is not None and not s.finished) < n:
        assert time.monotonic() < deadline, "the replica's requests did not start"
        time.sleep(0.005)


def test_a_killed_replica_fails_its_requests_clearly_and_the_other_serves_on(server, dp):
    dp.router = make_router("round_robin")
    victim = dp.replicas[1].engine.engine_pid
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, server.url, [5, 6, 7, i], 120) for i in range(4)]
        wait_until_streaming(dp.replicas[1], 2)
        os.kill(victim, signal.SIGKILL)
        got = [f.result() for f in futures]
    codes = sorted(r.status_code for r in got)
    assert codes == [200, 200, 503, 503], [r.text for r in got]
    for r in got:
        if r.status_code == 503:
            assert "data parallel replica 1: the engine process was killed by signal 9" in r.json()["error"]["message"]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert [e["healthy"] for e in health.json()["engines"]] == [True, False]
    assert "killed by signal 9" in health.json()["engines"][1]["error"]
    assert not dp.dead
    assert [complete(server.url, ids).status_code for ids in PROMPTS[:4]] == [200] * 4  # all to replica 0
    assert all(not r.inflight for r in dp.replicas[1:])
