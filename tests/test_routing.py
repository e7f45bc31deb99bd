"""Routing over data-parallel replicas (issue 32): the routers on hand-made replica states, and the simulator's
cluster of replicas (qwenjax.sim.cluster) against the single-engine simulator and on shared-prefix traces."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenjax.core.routing import (ROUTERS, LeastLoadedRouter, PrefixAwareRouter, ReplicaLoad, RoundRobinRouter,
                                  RouteRequest, Router, make_router)
from qwenjax.sim import Lengths, Poisson, SimConfig, Uniform, make_trace, simulate
from qwenjax.sim.cluster import compare_routers, simulate_cluster
from qwenjax.sim.step_model import QWEN2_7B_H100_ESTIMATE
from qwenjax.sim.traces import SharedPrefix

MODEL = QWEN2_7B_H100_ESTIMATE
REPO = Path(__file__).resolve().parents[1]
STEP_MODEL = str(REPO / "benchmarks" / "results" / "step-profile-qwen2-7b-instruct-h100-2026-11-24.json")


def _loads(requests, tokens=None, cached=None, healthy=None):
    n = len(requests)
    tokens = tokens or [0] * n
    cached = cached or [0] * n
    healthy = healthy or [True] * n
    return [ReplicaLoad(i, requests[i], tokens[i], (lambda c: lambda hashes: min(c, len(hashes)))(cached[i]),
                        healthy[i]) for i in range(n)]


REQ = RouteRequest(prompt_len=64, block_hashes=(11, 12, 13, 14))


def test_round_robin_cycles_and_skips_unhealthy():
    r = RoundRobinRouter()
    assert [r.choose(REQ, _loads([0, 0, 0])) for _ in range(4)] == [0, 1, 2, 0]
    r = RoundRobinRouter()
    assert [r.choose(REQ, _loads([0, 0, 0], healthy=[True, False, True])) for _ in range(3)] == [0, 2, 0]


def test_least_loaded_counts_tokens_then_requests():
    r = LeastLoadedRouter()
    assert r.choose(REQ, _loads([5, 1, 3], tokens=[100, 900, 50])) == 2
    assert r.choose(REQ, _loads([5, 1, 3], tokens=[100, 100, 100])) == 1
    assert r.choose(REQ, _loads([2, 2], tokens=[7, 7])) == 0  # ties: the lowest index
    assert r.choose(REQ, _loads([0, 9], tokens=[0, 9], healthy=[False, True])) == 1


def test_prefix_aware_follows_cached_blocks_within_the_imbalance():
    r = PrefixAwareRouter(max_imbalance=4)
    # replica 2 holds 3 of the prompt's 4 blocks: chosen although replica 0 is less loaded
    assert r.choose(REQ, _loads([1, 1, 4], tokens=[10, 10, 40], cached=[0, 1, 3])) == 2
    # ... unless it is busier than the least-loaded replica by more than max_imbalance requests
    assert r.choose(REQ, _loads([1, 1, 6], tokens=[10, 10, 40], cached=[0, 1, 3])) == 0
    # nothing cached anywhere: least loaded; no hashes (a prompt shorter than a block): least loaded
    assert r.choose(REQ, _loads([3, 1, 2], tokens=[3, 1, 2])) == 1
    assert r.choose(RouteRequest(8), _loads([3, 1, 2], tokens=[3, 1, 2], cached=[4, 4, 4])) == 1
    # a cached replica that is down is never chosen
    assert r.choose(REQ, _loads([1, 1, 1], tokens=[1, 2, 3], cached=[0, 0, 4], healthy=[True, True, False])) == 0


def test_prefix_aware_remembers_where_it_sent_blocks_not_yet_cached():
    """A burst of requests sharing a prefix: the first one's blocks are not computed (so not cached) when the next
    arrives; the router remembers where it sent them and keeps the burst together."""
    r = PrefixAwareRouter(max_imbalance=8)
    loads = _loads([0, 0, 0, 0])
    first = r.choose(REQ, loads)
    r.on_routed(REQ, first)
    loads = _loads([1 if i == first else 0 for i in range(4)], tokens=[64 if i == first else 0 for i in range(4)])
    other = RouteRequest(64, (11, 12, 99, 100))  # shares two leading blocks
    assert r.choose(other, loads) == first
    assert r.choose(RouteRequest(64, (50, 51)), loads) != first  # shares nothing: least loaded


def test_router_errors_name_the_problem():
    with pytest.raises(ValueError, match="router must be one of 'round_robin', 'least_loaded', 'prefix_aware'"):
        make_router("random")
    with pytest.raises(RuntimeError, match="no healthy replica to route to \\(all 2 are down\\)"):
        LeastLoadedRouter().choose(REQ, _loads([0, 0], healthy=[False, False]))
    with pytest.raises(ValueError, match="max_imbalance >= 0"):
        PrefixAwareRouter(max_imbalance=-1)
    assert set(ROUTERS) == {"round_robin", "least_loaded", "prefix_aware"}
    assert isinstance(make_router(PrefixAwareRouter), PrefixAwareRouter)


def _config(**kw):
    return SimConfig.build(**{**dict(max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=2048,
                                     prefill_token_buckets=(256, 512), num_kv_pages=600), **kw})


def test_one_replica_is_the_single_engine_simulation():
    trace = make_trace(120, Poisson(25.0), Lengths(Uniform(64, 512), Uniform(16, 128)), seed=3,
                       shared_prefix=SharedPrefix(4, 256, 0.5))
    single = simulate(trace, MODEL, _config())
    for router in ROUTERS:
        one = simulate_cluster(trace, MODEL, _config(), 1, router)
        assert one.metrics == single.metrics
        assert one.routes == (0,) * len(trace)


def test_clusters_are_deterministic_and_return_every_page():
    trace = make_trace(200, Poisson(60.0), Lengths(Uniform(64, 768), Uniform(16, 128)), seed=4)
    a = simulate_cluster(trace, MODEL, _config(), 4, "least_loaded")  # check=True: every page back, invariants
    b = simulate_cluster(trace, MODEL, _config(), 4, "least_loaded")
    assert a.metrics == b.metrics and a.routes == b.routes
    assert sum(r["requests"] for r in a.replicas) == len(trace) and all(r["requests"] for r in a.replicas)
    rr = simulate_cluster(trace, MODEL, _config(), 4, "round_robin")
    assert rr.routes == tuple(i % 4 for i in range(len(trace)))


def test_prefix_aware_routing_wins_on_shared_prefixes():
    """Many long shared prefixes, replicas whose caches cannot each hold them all: prefix-aware routing keeps each
    prefix on one replica, so it hits the cache far more often and its requests wait less than round robin's."""
    trace = make_trace(400, Poisson(40.0), Lengths(Uniform(1100, 1400), Uniform(16, 64)), seed=5,
                       shared_prefix=SharedPrefix(groups=24, length=1024))
    cfg = _config(num_kv_pages=900)
    res = compare_routers(trace, MODEL, cfg, 4)
    rr, pa = res["round_robin"].metrics, res["prefix_aware"].metrics
    assert pa["prefix_cache_hit_rate"] > rr["prefix_cache_hit_rate"] + 0.2, (pa, rr)
    assert pa["ttft_ms_mean"] < rr["ttft_ms_mean"], (pa, rr)
    assert res["prefix_aware"].replicas != res["round_robin"].replicas


def test_a_router_of_your_own():
    class FirstReplica(Router):
        name = "first"

        def choose(self, request, replicas):
            return replicas[0].index

    trace = make_trace(30, Poisson(20.0), Lengths(Uniform(32, 128), Uniform(8, 32)), seed=6)
    rep = simulate_cluster(trace, MODEL, _config(), 3, FirstReplica)
    assert rep.router == "first" and rep.routes == (0,) * 30
    assert [r["requests"] for r in rep.replicas] == [30, 0, 0]


def test_routing_sim_benchmark_smoke(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import routing_sim

    result = routing_sim.main(["--num-requests", "80", "--replicas", "2", "--prefix-groups", "6", "--prefix-len",
                               "512", "--num-kv-pages", "400", "--max-model-len", "2048",
                               "--results-dir", str(tmp_path), "--step-model", STEP_MODEL])
    written = json.loads(next(tmp_path.glob("routing-sim-*.json")).read_text())
    assert written["metrics"] == result["metrics"]
    assert {"ttft_mean_speedup_prefix_vs_round_robin", "ttft_mean_ratio_random"} <= set(result["metrics"])
    assert result["config"]["replica_requests"]["random"]["round_robin"] == [40, 40]
