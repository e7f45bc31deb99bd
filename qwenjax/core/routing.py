"""Routing: which engine replica takes a request, when several serve behind one endpoint (data parallelism).

A router is one class, as a scheduling policy is (core/policies.py): `choose(request, replicas)` returns the index of
the replica that takes `request`, given what each replica reports now (`ReplicaLoad`); `on_routed` is told the
choice. The same routers drive the simulator (qwenjax.sim.cluster) and a server's replicas.

- round_robin:   replicas in turn, whatever their load.
- least_loaded:  the replica with the fewest outstanding tokens (prompt tokens still to compute plus output tokens
                 still to generate; then the fewest unfinished requests; then the lowest index). In the simulator
                 (8 replicas, a Poisson trace of mixed prompt lengths) counting tokens gave a lower mean TTFT than
                 counting requests, which did worse than round robin.
- prefix_aware:  the replica whose prefix cache holds the longest run of the prompt's leading blocks (or, for blocks
                 not cached anywhere yet, the replica this router last sent them to), unless that replica is busier
                 than the least-loaded one by more than `max_imbalance`; otherwise least_loaded. Requests that share
                 a system prompt then meet their cached blocks instead of recomputing them on every replica.

Plain Python; never imports jax. Unhealthy replicas are never chosen; with none healthy, `choose` raises.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    prompt_len: int
    block_hashes: tuple[int, ...] = ()  # the prompt's full blocks, as the block manager names them (hash chain)


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports to the router: unfinished requests, tokens still to compute or generate (prompt tokens
    not yet prefilled, output tokens not yet drawn), and a lookup of how many leading blocks of a hash chain its
    prefix cache holds."""

    index: int
    num_requests: int
    num_tokens: int = 0
    cached_blocks: Callable[[Sequence[int]], int] = lambda hashes: 0
    healthy: bool = True

    @property
    def load(self) -> tuple[int, int, int]:
        """Least first: outstanding tokens, then unfinished requests, then the index (deterministic ties)."""
        return self.num_tokens, self.num_requests, self.index


class Router:
    name = ""

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> int:
        raise NotImplementedError

    def on_routed(self, request: RouteRequest, index: int) -> None:
        """Told where `request` went (stateful routers remember it)."""


def _healthy(replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    up = [r for r in replicas if r.healthy]
    if not up:
        raise RuntimeError(f"no healthy replica to route to (all {len(replicas)} are down)")
    return up


class RoundRobinRouter(Router):
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose(self, request, replicas):
        up = {r.index for r in _healthy(replicas)}
        n = len(replicas)
        for k in range(n):
            i = (self._next + k) % n
            if replicas[i].index in up:
                self._next = i + 1
                return replicas[i].index
        raise AssertionError("unreachable: _healthy found one")


class LeastLoadedRouter(Router):
    name = "least_loaded"

    def choose(self, request, replicas):
        return min(_healthy(replicas), key=lambda r: r.load).index


class PrefixAwareRouter(Router):
    """`max_imbalance`: how many more unfinished requests than the least-loaded replica a replica holding the
    prompt's blocks may have and still be chosen. `memory`: how many block hashes the router remembers (LRU), for
    prompts whose blocks are still being computed where it sent them."""

    name = "prefix_aware"

    def __init__(self, max_imbalance: int = 8, memory: int = 1 << 16):
        if max_imbalance < 0 or memory < 1:
            raise ValueError(f"PrefixAwareRouter needs max_imbalance >= 0 and memory >= 1, got {max_imbalance}, "
                             f"{memory}")
        self.max_imbalance = max_imbalance
        self._memory = memory
        self._sent: collections.OrderedDict[int, int] = collections.OrderedDict()  # block hash -> replica index

    def choose(self, request, replicas):
        up = _healthy(replicas)
        least = min(up, key=lambda r: r.load)
        hashes = request.block_hashes
        if not hashes:
            return least.index
        by_index = {r.index: r for r in up}
        best, best_blocks = least, 0
        for r in up:
            n = r.cached_blocks(hashes)
            if n > best_blocks or (n == best_blocks and n and r.load < best.load):
                best, best_blocks = r, n
        remembered = self._remembered(hashes)
        if remembered is not None and remembered[1] > best_blocks and remembered[0] in by_index:
            best, best_blocks = by_index[remembered[0]], remembered[1]
        if best_blocks and best.num_requests - least.num_requests <= self.max_imbalance:
            return best.index
        return least.index

    def on_routed(self, request, index):
        for h in request.block_hashes:
            self._sent[h] = index
            self._sent.move_to_end(h)
        while len(self._sent) > self._memory:
            self._sent.popitem(last=False)

    def _remembered(self, hashes) -> tuple[int, int] | None:
        """(replica, leading blocks) of the longest run of `hashes` this router sent to one replica."""
        where, n = None, 0
        for h in hashes:
            i = self._sent.get(h)
            if i is None or (where is not None and i != where):
                break
            where, n = i, n + 1
        return None if where is None else (where, n)


ROUTERS: dict[str, type[Router]] = {c.name: c for c in (RoundRobinRouter, LeastLoadedRouter, PrefixAwareRouter)}


def make_router(router: str | type[Router] | Router) -> Router:
    """A router from a registered name, a Router subclass (a fresh instance) or an instance."""
    if isinstance(router, Router):
        return router
    if isinstance(router, type) and issubclass(router, Router):
        return router()
    if router in ROUTERS:
        return ROUTERS[router]()
    raise ValueError(f"router must be one of {', '.join(map(repr, ROUTERS))} or a Router subclass, got {router!r}")
