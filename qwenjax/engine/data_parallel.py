"""DataParallelEngine: N engine replicas behind one server, a router choosing the replica of each request.

`python -m server --data-parallel-size N` (vLLM's flag; EngineArgs.data_parallel_size) serves one endpoint from N
replicas. Each replica is an AsyncLLMEngine in process mode: its own engine core process (JAX, the model, its KV
cache and prefix cache) on its own device group, with the arguments' tensor_parallel_size each. The replicas run
as processes of this host (distributed_executor_backend "mp", the default) or as Ray actors placed on a cluster
("ray", qwenjax/engine/ray_replica.py).

The server talks to this class exactly as to one AsyncLLMEngine (add_request -> RequestStream, abort, dead, error,
engine, shutdown). Routing (qwenjax/core/routing.py, the routers the simulator runs):
  * each request is routed once, at add_request, on the event loop; its stream stays with that replica.
  * a replica's load (ReplicaLoad) is counted here, not read from its engine's lagging snapshot: its requests not
    finished yet, and their outstanding tokens (the prompt until its first token arrives, plus n * max_tokens). The
    router thus sees a request the moment it was sent.
  * prefix_aware routes on the prompt's block hashes, computed here with the block manager's hash chain and the
    replicas' page size; it relies on the router's memory of where it sent each block (no lookups in the replicas'
    caches, which live in other processes).
  * a replica whose engine died is unhealthy: never chosen; its streams end with EngineDeadError naming the replica
    (the server answers 503), the others keep serving. `dead` only once every replica is down. With Ray, a dead
    replica's actor is restarted by Ray (max_restarts) and the replica rejoins once its engine answers again.

Device groups ("mp"): on GPUs each replica sees tensor_parallel_size devices of the visible ones
(CUDA_VISIBLE_DEVICES, split in order: replica i gets devices [i * tp, (i + 1) * tp)); on the CPU (JAX_PLATFORMS=cpu)
each replica process has its own XLA CPU devices (tp of them, through XLA_FLAGS).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import types

from qwenjax.core.block_manager import block_hash
from qwenjax.core.routing import ReplicaLoad, RouteRequest, make_router
from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.engine.request_stream import EngineDeadError, RequestStream

logger = logging.getLogger("qwenjax")

DEFAULT_ROUTING = "least_loaded"
HEALTH_INTERVAL_S = 1.0  # how often a down replica is checked for a restart (Ray)
# What every replica has alike (the same model and arguments): read from the first replica's engine view.
CONFIG_FIELDS = ("tokenizer", "model_config", "scheduler_config", "max_model_len", "generation_defaults",
                 "eos_token_ids")


def replica_args(args):
    """A replica's own EngineArgs: one engine (data_parallel_size 1) with the same arguments, seed included, so that
    greedy and seeded requests give the same tokens whichever replica serves them."""
    return dataclasses.replace(args, data_parallel_size=1, distributed_executor_backend=None)


def device_env(index: int, tensor_parallel_size: int, environ=os.environ) -> dict[str, str]:
    """Environment of replica `index`'s engine process: its slice of the visible GPUs, or its CPU device count."""
    tp = tensor_parallel_size
    if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        if tp == 1:
            return {}
        flags = " ".join(f for f in environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
        return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={tp}".strip()}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    want = range(index * tp, (index + 1) * tp)
    if devices is not None and want.stop > len(devices):
        raise ValueError(f"data parallel replica {index} needs devices {want.start}..{want.stop - 1} of "
                         f"CUDA_VISIBLE_DEVICES={visible!r} ({len(devices)} devices): data_parallel_size x "
                         f"tensor_parallel_size must not exceed the visible devices")
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[i] if devices else str(i) for i in want)}


class Replica:
    """One slot: its index, its engine (an AsyncLLMEngine; replaced when Ray restarts the replica), and the
    requests routed to it that have not finished (request id -> (stream, outstanding tokens at admission))."""

    def __init__(self, index: int, engine: AsyncLLMEngine):
        self.index = index
        self.engine = engine
        self.inflight: dict[str, tuple[RequestStream, tuple[int, int]]] = {}  # (prompt, n * max_tokens)

    @property
    def healthy(self) -> bool:
        return not self.engine.dead

    def load(self) -> ReplicaLoad:
        """Unfinished requests and their outstanding tokens (finished streams are dropped here)."""
        live = self.inflight
        for rid in [rid for rid, (s, _) in live.items() if s.finished]:
            del live[rid]
        tokens = sum(generate + (prompt if stream.first_token_time is None else 0)
                     for stream, (prompt, generate) in live.values())
        return ReplicaLoad(self.index, len(live), tokens, healthy=self.healthy)


class DataParallelEngine:
    """N replicas of one engine behind the AsyncLLMEngine API (see the module doc)."""

    def __init__(self, args, *, routing=DEFAULT_ROUTING, stream_interval: int = 1, log_interval_s: float = 5.0,
                 engine_setup=None, ray_address: str | None = None, max_restarts: int = 4):
        """args: EngineArgs with data_parallel_size N. routing: a router name of qwenjax.core.routing.ROUTERS
        (round_robin, least_loaded, prefix_aware), a Router subclass or instance. ray_address / max_restarts: for
        distributed_executor_backend "ray" (ray.init's address, default RAY_ADDRESS or a local cluster; how often
        Ray restarts a replica that died). Returns once every replica's engine is built; a replica that fails to
        start stops the others and raises its error."""
        self.args = args
        self.router = make_router(routing)
        self.backend = args.distributed_executor_backend or "mp"
        self.num_replicas = args.data_parallel_size
        self.replicas: list[Replica] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._ray = None
        options = dict(stream_interval=stream_interval, log_interval_s=log_interval_s, engine_setup=engine_setup)
        try:
            if self.backend == "ray":
                from qwenjax.engine.ray_replica import RayReplicas

                self._ray = RayReplicas(replica_args(args), self.num_replicas,
                                        address=ray_address, max_restarts=max_restarts, options=options,
                                        device_env=device_env)
                engines = self._ray.start_engines()
            else:
                engines = self._start_mp(options)
        except BaseException:
            self.shutdown()
            raise
        self.replicas = [Replica(i, e) for i, e in enumerate(engines)]
        self.engine = DataParallelView(self)
        if self._ray is not None:
            self._watcher = threading.Thread(target=self._watch, name="qwenjax-dp-health", daemon=True)
            self._watcher.start()

    def _start_mp(self, options) -> list[AsyncLLMEngine]:
        """Every replica's engine process, started together (their start-ups overlap), each on its device group."""
        tp = self.args.tensor_parallel_size
        engines = []
        for i in range(self.num_replicas):
            env = device_env(i, tp)
            engines.append(AsyncLLMEngine(replica_args(self.args), multiprocess=True, start=False,
                                          core_client=_named_client(i, env), **options))
        self._starting = engines
        errors: list[BaseException] = []

        def start(e):
            try:
                e.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, for the first replica that failed
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return engines

    # ------------------------------------------------------------------ state
    @property
    def dead(self) -> bool:
        """True once every replica is down (and none can come back: shutdown, or the mp backend)."""
        if self._error is not None:
            return True
        return bool(self.replicas) and all(not r.healthy for r in self.replicas) and self._ray is None

    @property
    def error(self) -> BaseException | None:
        if self._error is not None:
            return self._error
        errors = [f"replica {r.index}: {r.engine.error}" for r in self.replicas if not r.healthy]
        return EngineDeadError("; ".join(errors)) if errors else None

    @property
    def is_running(self) -> bool:
        return any(r.engine.is_running for r in self.replicas)

    def health(self) -> list[dict]:
        """Per replica: {"engine": index, "healthy": bool, "error": the reason it is down, or None}."""
        return [{"engine": r.index, "healthy": r.healthy, "error": None if r.healthy else str(r.engine.error)}
                for r in self.replicas]

    def loads(self) -> list[ReplicaLoad]:
        return [r.load() for r in self.replicas]

    # ------------------------------------------------------------------ requests
    def route_request(self, prompt_ids) -> RouteRequest:
        """The router's view of a prompt: its length and the hash chain of its full blocks (the replicas' page
        size), as each replica's block manager names them."""
        ps = self.engine.page_size
        hashes, parent = [], None
        for i in range(len(prompt_ids) // ps):
            parent = block_hash(parent, prompt_ids[i * ps:(i + 1) * ps])
            hashes.append(parent)
        return RouteRequest(len(prompt_ids), tuple(hashes))

    def add_request(self, request_id: str, prompt: str | None, params, *, prompt_token_ids=None, priority: int = 0,
                    arrival_time: float | None = None, lora_request=None) -> RequestStream:
        """Routes the request to a healthy replica and queues it there (AsyncLLMEngine.add_request). Raises
        EngineDeadError when no replica is healthy."""
        if self._error is not None:
            raise EngineDeadError(f"the engine is not running: {self._error}")
        ids = prompt_token_ids
        if ids is None:
            ids = self.engine.tokenizer.encode(prompt or "", add_special_tokens=False)
        request = self.route_request(list(ids))
        with self._lock:
            for _ in self.replicas:  # a replica that died since its load was read is passed over
                try:
                    index = self.router.choose(request, self.loads())
                except RuntimeError as e:  # no healthy replica
                    raise EngineDeadError(f"the engine is not running: {e} ({self.error})") from None
                replica = self.replicas[index]
                try:
                    stream = replica.engine.add_request(request_id, prompt, params,
                                                        prompt_token_ids=prompt_token_ids, priority=priority,
                                                        arrival_time=arrival_time, lora_request=lora_request)
                except EngineDeadError:
                    continue
                self.router.on_routed(request, index)
                replica.inflight[str(request_id)] = (stream, (len(ids), params.n * (params.max_tokens or 0)))
                stream.replica = index  # which replica serves it (tests, logs)
                return stream
        raise EngineDeadError(f"the engine is not running: every replica is down ({self.error})")

    generate = AsyncLLMEngine.generate  # the same over this add_request: yields until finished, aborts on leaving

    def abort(self, request_id: str) -> None:
        rid = str(request_id)
        for r in self.replicas:
            if rid in r.inflight:
                r.engine.abort(rid)

    # ------------------------------------------------------------------ Ray: restarts
    def _watch(self) -> None:
        """Ray backend: a down replica rejoins once Ray has restarted its actor (or its mesh, restarted whole) and its
        engine is built again."""
        while not self._stopping.wait(HEALTH_INTERVAL_S):
            for r in self.replicas:
                if self._stopping.is_set():
                    break
                if r.healthy:
                    self._ray.check(r.index)  # a mesh whose follower died is stopped (then restarted whole)
                    continue
                engine = self._ray.reconnect(r.index)
                if engine is not None:
                    with self._lock:
                        r.engine, r.inflight = engine, {}
                    logger.info("data parallel replica %d is healthy again", r.index)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        if self._error is None:
            self._error = EngineDeadError("the engine was shut down")
        engines = [r.engine for r in self.replicas] or getattr(self, "_starting", [])
        for e in engines:
            try:
                e.shutdown(timeout)
            except Exception:  # noqa: BLE001 - stop the others anyway
                logger.exception("stopping a data parallel replica failed")
        if self._ray is not None:
            self._ray.shutdown()


def _named_client(index: int, env: dict):
    """EngineCoreClient whose engine process runs on replica `index`'s devices and whose death names the replica."""
    from qwenjax.engine.core_client import EngineCoreClient

    def make(args, *, on_exit, **kwargs):
        client = EngineCoreClient(args, on_exit=lambda reason: on_exit(f"data parallel replica {index}: {reason}"),
                                  **kwargs)
        client.options["env"] = env
        return client

    return make


class DataParallelView:
    """What the server and its metrics read of the replicas: the first replica's config and tokenizer (all
    replicas serve the same model), counters summed over the replicas, and `replica_views()` for per-replica
    series."""

    def __init__(self, dp: DataParallelEngine):
        first = dp.replicas[0].engine.engine
        self._dp = dp
        self.args = dp.args
        for name in CONFIG_FIELDS:
            setattr(self, name, getattr(first, name))
        self.page_size = first.blocks.page_size

    def replica_views(self) -> list:
        """(index, the replica's EngineView) of every replica (a down one reports its last counters)."""
        return [(r.index, r.engine.engine) for r in self._dp.replicas]

    def _views(self):
        return [v for _, v in self.replica_views()]

    @property
    def num_running(self) -> int:
        return sum(v.num_running for v in self._views())

    @property
    def num_waiting(self) -> int:
        return sum(v.num_waiting for v in self._views())

    @property
    def stats(self):
        return summed_stats(self._views())

    @property
    def blocks(self):
        views = self._views()
        num_pages = sum(v.blocks.num_pages for v in views)
        return types.SimpleNamespace(usage=sum(v.blocks.usage * v.blocks.num_pages for v in views) / num_pages,
                                     num_free=sum(v.blocks.num_free for v in views), num_pages=num_pages,
                                     page_size=self.page_size,
                                     query_tokens=sum(v.blocks.query_tokens for v in views),
                                     hit_tokens=sum(v.blocks.hit_tokens for v in views))

    def has_unfinished_requests(self) -> bool:
        return any(v.has_unfinished_requests() for v in self._views())

    def reset_prefix_cache(self) -> int:
        return sum(r.engine.engine.reset_prefix_cache() for r in self._dp.replicas if r.healthy)


def summed_stats(views) -> types.SimpleNamespace:
    """Engine counters of several replicas as one: numbers summed (max_decode_batch: the largest), per-position lists
    summed position by position, spec_decode_acceptance_rate from the summed counts."""
    first = vars(views[0].stats)
    total = {}
    for k, v in first.items():
        values = [getattr(x.stats, k) for x in views]
        if k == "max_decode_batch":
            total[k] = max(values)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = sum(values)
        elif isinstance(v, list):
            width = max(len(x) for x in values)
            total[k] = [sum(x[j] for x in values if j < len(x)) for j in range(width)]
    proposed = total.get("spec_decode_num_draft_tokens", 0)
    total["spec_decode_acceptance_rate"] = total.get("spec_decode_num_accepted_tokens", 0) / proposed \
        if proposed else None
    return types.SimpleNamespace(**total)
