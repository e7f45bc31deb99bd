"""The server's data-parallel flags and the engine they build (qwenjax/engine/data_parallel.py).

  --data-parallel-size N                  (vLLM's) N engine replicas behind this endpoint, each with its own
                                          devices and its own --tensor-parallel-size
  --data-parallel-routing POLICY          (qwenjax's; vLLM balances its replicas by their queue lengths with no
                                          flag) least_loaded (default), prefix_aware or round_robin
  --distributed-executor-backend mp|ray   (vLLM's) replicas as processes of this host, or as Ray actors
  --ray-address ADDRESS                   the Ray cluster to join (default: RAY_ADDRESS, else a local one)
  --data-parallel-max-restarts N          how often Ray restarts a replica that died
"""

from __future__ import annotations

import argparse

from qwenjax.config import DISTRIBUTED_EXECUTOR_BACKENDS
from qwenjax.core.routing import ROUTERS

DATA_PARALLEL_ENGINE_FLAGS = ("data_parallel_size", "distributed_executor_backend")


def add_data_parallel_flags(e) -> None:
    e.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas behind this endpoint, each on its own devices (tensor-parallel-size of "
                        "them); a router picks the replica of each request")
    e.add_argument("--data-parallel-routing", default="least_loaded", choices=list(ROUTERS),
                   help="how a request's replica is chosen: least_loaded (fewest outstanding tokens), prefix_aware "
                        "(where the prompt's leading blocks went before, unless much busier), round_robin")
    e.add_argument("--distributed-executor-backend", default=None, choices=list(DISTRIBUTED_EXECUTOR_BACKENDS),
                   help="where replicas run: mp (processes of this host, the default) or ray (Ray actors placed on "
                        "a cluster, restarted when they die; needs `pip install ray`)")
    e.add_argument("--ray-address", default=None,
                   help="with --distributed-executor-backend ray: the cluster's address (default: RAY_ADDRESS, else "
                        "a local cluster)")
    e.add_argument("--data-parallel-max-restarts", type=int, default=4,
                   help="with --distributed-executor-backend ray: how often Ray restarts a replica that died")


def uses_data_parallel(args) -> bool:
    return args.data_parallel_size > 1 or args.distributed_executor_backend == "ray"


def check_data_parallel(ns: argparse.Namespace) -> None:
    """ValueError for flags that do not combine (before anything starts)."""
    if ns.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {ns.data_parallel_size}")
    if (ns.data_parallel_size > 1 or ns.distributed_executor_backend == "ray") and \
            ns.disable_frontend_multiprocessing:
        raise ValueError("--disable-frontend-multiprocessing runs one engine in a thread of the server; data "
                         "parallel replicas (--data-parallel-size > 1, --distributed-executor-backend ray) each run in "
                         "their own process: drop one of the flags")
    if ns.data_parallel_max_restarts < 0:
        raise ValueError(f"--data-parallel-max-restarts must be at least 0, got {ns.data_parallel_max_restarts}")


def data_parallel_engine(args, ns: argparse.Namespace, **options):
    """The DataParallelEngine of these flags (returns once every replica is built)."""
    from qwenjax.engine.data_parallel import DataParallelEngine

    return DataParallelEngine(args, routing=ns.data_parallel_routing, ray_address=ns.ray_address,
                              max_restarts=ns.data_parallel_max_restarts, **options)
