"""Issue 32: `--distributed-executor-backend ray`: two replicas as Ray actors on a local Ray cluster of two nodes
(ray.cluster_utils.Cluster, one CPU each, so the placement group's SPREAD puts one replica on each), behind one
server. One cluster and one pair of replicas serve the whole module (Ray's start-up is slow on two cores); the
restart test kills a replica; the mesh test then stops the pair (the cluster's two CPUs go to the mesh's two
processes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import time

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster

from qwenjax.engine.data_parallel import DataParallelEngine
from server.app import create_app
from tests.test_data_parallel import ARGS, PROMPTS, complete, one_engine_texts, per_engine, wait_until_streaming
from tests.test_server import ServerThread

RAY_ARGS = dataclasses.replace(ARGS, distributed_executor_backend="ray")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def dp(cluster):
    eng = DataParallelEngine(RAY_ARGS, routing="round_robin", max_restarts=2)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(dp):
    with ServerThread(create_app(dp, served_model_names=["tiny"])) as s:
        yield s


def test_two_ray_replicas_on_two_nodes_give_the_tokens_of_one_engine(server, dp):
    nodes = {ray.get(a.where.remote())["node_id"] for a in dp._ray.actors}
    assert len(nodes) == 2  # one replica per node
    want = one_engine_texts()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda ids: complete(server.url, ids), PROMPTS))
    assert [r.json()["choices"][0]["text"] for r in got] == want
    assert all(q > 0 for q in per_engine(server.url, "prefix_cache_queries"))  # both replicas served


def test_a_killed_ray_replica_fails_its_requests_is_restarted_and_serves_again(server, dp):
    old_pid = dp.replicas[1].engine.engine_pid
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(complete, server.url, [5, 6, 7, i], 120) for i in range(4)]
        wait_until_streaming(dp.replicas[1], 2)
        os.kill(old_pid, signal.SIGKILL)
        got = [f.result() for f in futures]
    assert sorted(r.status_code for r in got) == [200, 200, 503, 503], [r.text for r in got]
    for r in got:
        if r.status_code == 503:
            assert "data parallel replica 1: the engine process (Ray actor" in r.json()["error"]["message"]
    # While replica 1 restarts, every request goes to replica 0.
    assert [complete(server.url, ids).status_code for ids in PROMPTS[:2]] == [200, 200]
    deadline = time.monotonic() + 240  # Ray restarts the actor, which rebuilds its engine
    while not all(e["healthy"] for e in httpx.get(server.url + "/health").json()["engines"]):
        assert time.monotonic() < deadline, httpx.get(server.url + "/health").text
        time.sleep(0.5)
    assert dp.replicas[1].engine.engine_pid != old_pid
    before = per_engine(server.url, "prefix_cache_queries")
    assert [complete(server.url, ids).status_code for ids in PROMPTS[:4]] == [200] * 4
    after = per_engine(server.url, "prefix_cache_queries")
    assert after[1] > before[1]  # the restarted replica serves again (round robin)


def test_a_mesh_over_two_nodes_placed_by_ray_gives_mesh_1_greedy_tokens(server, dp):
    """One replica whose model spans two processes (num_processes 2, jax.distributed, a mesh of 2 CPU devices), one
    process per node: the greedy tokens of one engine on one device; after its follower is killed, the mesh is
    restarted whole and gives them again."""
    dp.shutdown()  # frees the cluster's two CPUs
    args = dataclasses.replace(RAY_ARGS, data_parallel_size=1, num_processes=2, tensor_parallel_size=2)
    mesh = DataParallelEngine(args)
    try:
        nodes = {ray.get(a.where.remote())["node_id"] for a in mesh._ray.actors + mesh._ray.followers}
        assert len(nodes) == 2
        want = one_engine_texts()
        with ServerThread(create_app(mesh, served_model_names=["tiny"])) as s:
            got = [complete(s.url, ids) for ids in PROMPTS]
            assert [r.json()["choices"][0]["text"] for r in got] == want
            # The follower process dies mid-request: process 0 would wait in a collective forever, so the replica
            # is stopped (its requests fail with a clear 503, no hang) and placed again whole (both processes new).
            old = {ray.get(a.where.remote())["pid"] for a in mesh._ray.actors + mesh._ray.followers}
            follower_pid = ray.get(mesh._ray.followers[0].where.remote())["pid"]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(complete, s.url, [5, 6, 7, i], 120) for i in range(2)]
                wait_until_streaming(mesh.replicas[0], 2)
                os.kill(follower_pid, signal.SIGKILL)
                codes = [f.result().status_code for f in futures]
            assert codes == [503, 503]
            deadline = time.monotonic() + 300
            while not mesh.replicas[0].healthy:
                assert time.monotonic() < deadline, "the mesh was not restarted"
                time.sleep(0.5)
            assert mesh._ray.restarts == [1]
            new = {ray.get(a.where.remote())["pid"] for a in mesh._ray.actors + mesh._ray.followers}
            assert len(new) == 2 and not new & old
            got = [complete(s.url, ids) for ids in PROMPTS]
            assert [r.json()["choices"][0]["text"] for r in got] == want
    finally:
        mesh.shutdown()


def test_offline_llm_over_two_ray_replicas_gives_the_tokens_of_one_engine(cluster):
    """`LLM(data_parallel_size=2, distributed_executor_backend="ray")`: one generate() through two Ray replicas (after
    the tests above, whose replicas are stopped: the cluster's two CPUs are free)."""
    from qwenjax import LLM, SamplingParams

    args = {f.name: getattr(RAY_ARGS, f.name) for f in dataclasses.fields(RAY_ARGS) if f.name != "usage_context"}
    llm = LLM(**args, data_parallel_routing="round_robin")
    try:
        assert llm.llm_engine.dp.backend == "ray"
        got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=8, temperature=0),
                           use_tqdm=False)
        assert [o.outputs[0].text for o in got] == one_engine_texts()
        assert all(v.stats.prompt_tokens > 0 for _, v in llm.llm_engine.replica_views())  # both replicas served
    finally:
        llm.shutdown()
