"""Data-parallel replicas in the simulator: N engines, each its own Scheduler and BlockManager on its own clock,
behind a router (qwenjax.core.routing) on one trace, so routing research needs no GPUs.

Each replica runs the single-engine simulation's bookkeeping (sim/replica.py); a request is routed when it arrives,
with every replica as it is at that moment (its queue, its running sequences, its prefix cache). The report has the
whole cluster's metrics (the single-engine names: ttft_ms_mean, ttft_ms_p99, output_tok_s, prefix_cache_hit_rate,
...) and each replica's share.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from qwenjax.core.policies import POLICIES
from qwenjax.core.routing import ROUTERS, Router, make_router
from qwenjax.sim.replica import Replica
from qwenjax.sim.simulator import SimConfig, check_trace, new_records, replay, report_metrics
from qwenjax.sim.step_model import StepTimeModel
from qwenjax.sim.traces import NUM_REGULAR_TOKENS, Trace


@dataclasses.dataclass(frozen=True)
class ClusterReport:
    router: str
    metrics: dict                      # the cluster's, as SimReport.metrics
    replicas: tuple[dict, ...]         # per replica: requests routed, its prefix-cache hits, its busy time
    routes: tuple[int, ...]            # the replica each trace request went to, in trace order

    def to_dict(self) -> dict:
        return {"router": self.router, "metrics": dict(self.metrics), "replicas": list(self.replicas)}


def simulate_cluster(trace: Trace, model: StepTimeModel, config: SimConfig, replicas: int,
                     router: str | type[Router] | Router = "least_loaded", policy: str = "fcfs", *,
                     vocab_size: int = NUM_REGULAR_TOKENS, check: bool = True) -> ClusterReport:
    """`replicas` engines of `config` behind `router` (a registered name, a Router subclass or an instance), each
    scheduling under `policy`. `check`: every replica's block manager keeps its invariants and gets every page back."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    route = make_router(router)
    check_trace(trace, config)
    records = new_records(trace)
    reps = [Replica(i, model, config, POLICIES[policy](), records) for i in range(replicas)]
    routes = [0] * len(trace)
    replay(trace, reps, route, vocab_size=vocab_size, on_route=routes.__setitem__)
    if check:
        for r in reps:
            r.check()
    per = tuple({"replica": r.index, "requests": r.num_routed, "prefix_cache_hits": r.blocks.hit_tokens,
                 "prefix_cache_queries": r.blocks.query_tokens, "busy_s": r.busy} for r in reps)
    return ClusterReport(router=route.name or type(route).__name__, metrics=report_metrics(records, reps),
                         replicas=per, routes=tuple(routes))


def compare_routers(trace: Trace, model: StepTimeModel, config: SimConfig, replicas: int,
                    routers: Iterable[str | type[Router]] = tuple(ROUTERS), **kw) -> dict[str, ClusterReport]:
    """One cluster simulation per router on the same trace, model and config, keyed by router name."""
    reports = [simulate_cluster(trace, model, config, replicas, r, **kw) for r in routers]
    return {r.router: r for r in reports}
