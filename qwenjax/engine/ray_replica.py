"""Data-parallel replicas as Ray actors (`--distributed-executor-backend ray`, vLLM's flag).

Each replica is one `EngineReplicaActor`: the engine core loop of qwenjax/engine/core.py (`run_engine_core`, the
same code as the "mp" backend's engine process) in a thread of a Ray actor, with two in-process queues standing in
for its pipes. The frontend's `RayCoreClient` is EngineCoreClient with those pipes replaced by actor calls: the
sender thread calls `submit(batch)` (waiting for each, so batches are applied in order), the reader thread long-polls
`poll()` for the core's messages. Everything above (AsyncLLMEngine, its streams, the EngineView) is unchanged.

Placement: one placement group with one bundle per replica ({"CPU": 1}, plus {"GPU": tensor_parallel_size} unless
JAX_PLATFORMS=cpu), strategy SPREAD, on the cluster `ray.init` finds (an address, RAY_ADDRESS, or a local one).
Failure: an actor created with max_restarts is restarted by Ray when its process dies (and the actor exits on
purpose when its engine loop dies, so that Ray restarts it); the frontend sees the actor's death as the engine
process's (its streams fail with EngineDeadError naming the replica), and DataParallelEngine's watcher polls the
restarted actor's `ready()` and reconnects once its engine is built again.

A replica that spans hosts (num_processes P > 1: one model over a jax.distributed mesh, one process per host) is P
actors in a placement group of its own (STRICT_SPREAD: one per node): process 0 is the EngineReplicaActor (it picks
the coordinator address on its node and serves), processes 1..P-1 are MeshFollowerActors replaying its steps
(LLMEngine.follow). A mesh is restarted as a whole or not at all, so its actors are created without max_restarts:
a follower that dies (watched through its `done` call) gets process 0 killed, so the replica's requests fail at once
instead of waiting in a collective that can never finish; a replica down for either reason is then placed again
whole (all P actors, a new coordinator) by `reconnect`, at most max_restarts times.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time

from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.engine.core import run_engine_core
from qwenjax.engine.core_client import EngineCoreClient
from qwenjax.engine.ray_mesh import EXIT_DELAY_S, MeshFollowerActor, coordinator_address, where

logger = logging.getLogger("qwenjax")

POLL_S = 0.5            # a reader's long poll: how long the actor waits for a message before answering empty
READY_TIMEOUT_S = 1800  # a replica's start-up (load, compile) on a busy host


def import_ray():
    """The ray module, or a RuntimeError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("distributed_executor_backend='ray' (--distributed-executor-backend ray) needs Ray, "
                           "which is not installed: pip install ray") from None
    return ray


class _QueueEnd:
    """One end of an in-process channel with the multiprocessing.Connection methods run_engine_core uses."""

    def __init__(self, q: queue.Queue):
        self.q = q

    def send(self, obj) -> None:
        self.q.put(obj)

    def recv(self):
        return self.q.get()

    def poll(self, timeout: float = 0.0) -> bool:
        return not self.q.empty()

    def fileno(self):
        raise OSError("an in-process queue, not a pipe")


class EngineReplicaActor:
    """A replica's engine core loop inside a Ray actor (threaded: ready/poll block while submit runs)."""

    def __init__(self, args, options: dict):
        self._cmd: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._ready = None
        self._lock = threading.Lock()
        if args.num_processes > 1 and args.distributed_coordinator is None:  # process 0 of a mesh over hosts
            args = dataclasses.replace(args, distributed_coordinator=coordinator_address())
        self._coordinator = args.distributed_coordinator
        threading.Thread(target=self._run, args=(args, options), name="qwenjax-engine-core", daemon=True).start()

    def coordinator(self) -> str | None:
        """host:port of this mesh's jax.distributed coordinator (process 0, here); None for one process."""
        return self._coordinator

    def _run(self, args, options) -> None:
        run_engine_core(args, _QueueEnd(self._cmd), _QueueEnd(self._out), options)
        if self._ready is not None and self._ready[0] == "ready" and not getattr(self, "_said_bye", False):
            # The loop died (its "dead" message is queued): refuse reconnects, then exit so that Ray restarts us.
            self._ready = ("failed", "RuntimeError", "the replica's engine loop died; Ray restarts the actor")
            time.sleep(EXIT_DELAY_S)
            os._exit(1)

    def ready(self):
        """("ready", info) once the engine is built, or ("failed", type name, message); the first message."""
        with self._lock:
            if self._ready is None:
                self._ready = self._out.get(timeout=READY_TIMEOUT_S)
            return self._ready

    def where(self) -> dict:
        return where()

    def submit(self, batch: list) -> None:
        if any(c[0] == "shutdown" for c in batch):
            self._said_bye = True
        self._cmd.put(batch)

    def poll(self, timeout: float = POLL_S) -> list:
        """The core's messages since the last poll, waiting up to `timeout` for the first."""
        try:
            msgs = [self._out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                msgs.append(self._out.get_nowait())
            except queue.Empty:
                return msgs


class _ActorProcess:
    """Stands for the engine process in EngineCoreClient's bookkeeping: the actor's pid, and how it ended."""

    def __init__(self, actor, where: dict):
        self.actor, self.pid, self.node_id = actor, where["pid"], where["node_id"]
        self.exitcode = None
        self.ended: str | None = None

    def is_alive(self) -> bool:
        return self.ended is None

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        pass

    kill = terminate

    def describe_exit(self) -> str:
        return self.ended or "closed its connection"


class _ActorChannel:
    """The client's two pipe ends over actor calls: `send` runs submit (in order), `recv` returns the next message
    from `poll`; a dead or restarting actor reads as EOF."""

    def __init__(self, ray, actor, process: _ActorProcess):
        self.ray, self.actor, self.process = ray, actor, process
        self._buffer: list = []

    def send(self, batch) -> None:
        try:
            self.ray.get(self.actor.submit.remote(batch))
        except self.ray.exceptions.RayError as e:
            raise OSError(str(e)) from None

    def recv(self):
        while not self._buffer:
            try:
                self._buffer = self.ray.get(self.actor.poll.remote())
            except self.ray.exceptions.RayError as e:
                self.process.ended = f"(Ray actor, pid {self.process.pid}) died: {type(e).__name__}"
                raise EOFError(str(e)) from None
        return self._buffer.pop(0)


class RayCoreClient(EngineCoreClient):
    """EngineCoreClient over an EngineReplicaActor (see the module doc)."""

    def __init__(self, args, *, actor, index: int, on_exit, **kwargs):
        super().__init__(args, on_exit=lambda reason: on_exit(f"data parallel replica {index}: {reason}"), **kwargs)
        self.actor = actor

    def start(self):
        ray = import_ray()
        msg = ray.get(self.actor.ready.remote())
        if msg[0] == "failed":
            from qwenjax.engine.core import KNOWN_ERRORS

            kind = KNOWN_ERRORS.get(msg[1])
            raise kind(msg[2]) if kind is not None else RuntimeError(f"{msg[1]}: {msg[2]}")
        from qwenjax.engine.core_client import EngineView

        self.process = _ActorProcess(self.actor, ray.get(self.actor.where.remote()))
        self._cmd = self._out = _ActorChannel(ray, self.actor, self.process)
        self.view = EngineView(self.args, msg[1], self)
        self._sender = threading.Thread(target=self._send_loop, name="qwenjax-ray-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="qwenjax-ray-reader", daemon=True)
        self._sender.start()
        self._reader.start()
        return self.view

    def _stop_process(self, timeout) -> None:
        """The actor stays (RayReplicas kills it); its engine loop has said goodbye or died."""
        if self.process is not None and self.process.ended is None:
            self.process.ended = "was shut down"


class RayReplicas:
    """The replicas' actors and their placement group."""

    def __init__(self, args, num_replicas: int, *, address: str | None, max_restarts: int, options: dict,
                 device_env):
        """device_env(index, tensor_parallel_size): a replica's environment on the CPU (data_parallel.device_env)."""
        ray = self.ray = import_ray()
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True)
        self.args, self.options = args, options
        cpu = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
        nproc = args.num_processes
        if args.tensor_parallel_size % nproc:
            raise ValueError(f"tensor_parallel_size ({args.tensor_parallel_size}) must be a multiple of "
                             f"num_processes ({nproc}): each host of a replica's mesh holds as many devices")
        tp = args.tensor_parallel_size // nproc  # devices of each process
        bundle = {"CPU": 1} if cpu else {"CPU": 1, "GPU": tp}
        # One group for single-process replicas (spread over the nodes); one group per mesh (a process per node).
        if nproc == 1:
            shared = placement_group([dict(bundle) for _ in range(num_replicas)], strategy="SPREAD")
            groups = [(shared, i) for i in range(num_replicas)]  # (group, the replica's bundle)
        else:
            groups = [(placement_group([dict(bundle) for _ in range(nproc)], strategy="STRICT_SPREAD"), 0)
                      for _ in range(num_replicas)]
        self.pgs = list({id(pg): pg for pg, _ in groups}.values())
        self._wait_placed(self.pgs, num_replicas, bundle)
        self.nproc, self.tp, self.cpu, self.bundle, self.max_restarts = nproc, tp, cpu, bundle, max_restarts
        self.env = device_env(0, tp) if cpu else {}  # on GPUs Ray sets CUDA_VISIBLE_DEVICES from the bundle
        self.restarts = [0] * num_replicas  # whole-mesh restarts done, per replica (num_processes > 1)
        self.actors: list = [None] * num_replicas       # each replica's process 0 (its EngineReplicaActor)
        self.mesh_followers: list[list] = [[] for _ in range(num_replicas)]  # processes 1..P-1 of each replica
        self._watches: list[list] = [[] for _ in range(num_replicas)]  # their done() refs
        self.groups = groups
        for i in range(num_replicas):
            self._place(i)
        self._pending: dict[int, object] = {}

    def _wait_placed(self, pgs, num_replicas, bundle) -> None:
        try:
            self.ray.get([pg.ready() for pg in pgs], timeout=300)
        except self.ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"Ray could not place {num_replicas} replicas of {self.args.num_processes} x {bundle} "
                               f"within 300 s (a mesh needs {self.args.num_processes} nodes); the cluster has "
                               f"{self.ray.cluster_resources()}") from None

    def _place(self, index: int) -> None:
        """Creates replica `index`'s actors in its bundle(s): one EngineReplicaActor (restarted by Ray up to
        max_restarts times), or for a mesh over hosts process 0 and its followers, never restarted by Ray (a mesh is
        restarted whole, by `reconnect`)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, (pg, first) = self.ray, self.groups[index]

        def place(k, cls, restarts):
            return ray.remote(cls).options(
                num_cpus=1, num_gpus=0 if self.cpu else self.tp, max_restarts=restarts, max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k))

        core_options = dict(self.options, env=self.env,
                            log_level=logging.getLogger("qwenjax").getEffectiveLevel())
        leader = place(first, EngineReplicaActor, self.max_restarts if self.nproc == 1 else 0).remote(
            dataclasses.replace(self.args, process_id=0), core_options)
        self.actors[index] = leader
        if self.nproc > 1:
            coordinator = ray.get(leader.coordinator.remote())
            self.mesh_followers[index] = [place(k, MeshFollowerActor, 0).remote(
                dataclasses.replace(self.args, process_id=k, distributed_coordinator=coordinator), self.env)
                for k in range(1, self.nproc)]
            self._watches[index] = [f.done.remote() for f in self.mesh_followers[index]]

    @property
    def followers(self) -> list:
        return [f for fs in self.mesh_followers for f in fs]

    def check(self, index: int) -> None:
        """A healthy mesh replica whose follower died (its process 0 may wait forever in a collective): kill process
        0 too, so its requests fail now (EngineDeadError) and the replica is restarted whole by `reconnect`."""
        watches = self._watches[index]
        if not watches:
            return
        done, _ = self.ray.wait(watches, timeout=0)
        if done:
            logger.warning("data parallel replica %d: a process of its mesh ended; stopping the replica", index)
            self._watches[index] = []
            self._kill([self.actors[index]])

    def _kill(self, actors) -> None:
        for a in actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _replace_mesh(self, index: int) -> bool:
        """Replica `index` (a mesh over hosts) again from scratch: its actors killed, fresh ones placed in its
        placement group (the bundles free again once the old actors are gone). False past max_restarts."""
        if self.restarts[index] >= self.max_restarts:
            return False
        self.restarts[index] += 1
        logger.warning("data parallel replica %d: restarting its mesh of %d processes (restart %d of %d)", index,
                       self.nproc, self.restarts[index], self.max_restarts)
        self._kill([self.actors[index], *self.mesh_followers[index]])
        self._place(index)
        return True

    def engine(self, index: int) -> AsyncLLMEngine:
        """An AsyncLLMEngine over replica `index`'s actor, started (waits for the actor's engine)."""
        actor = self.actors[index]

        def client(args, **kwargs):
            return RayCoreClient(args, actor=actor, index=index, **kwargs)

        opts = self.options
        # The frontend serves one process's worth of arguments (its engine, and any mesh, live in the actors).
        front = dataclasses.replace(self.args, num_processes=1, process_id=0, distributed_coordinator=None)
        return AsyncLLMEngine(front, multiprocess=True, core_client=client,
                              stream_interval=opts["stream_interval"], log_interval_s=opts["log_interval_s"])

    def start_engines(self) -> list[AsyncLLMEngine]:
        return [self.engine(i) for i in range(len(self.actors))]

    def reconnect(self, index: int) -> AsyncLLMEngine | None:
        """Replica `index`'s engine again once its restarted actor is ready; None while it is not (yet)."""
        ray = self.ray
        ref = self._pending.get(index)
        if ref is None:
            if self.nproc > 1 and not self._replace_mesh(index):
                return None  # restarted max_restarts times already: stays down
            ref = self._pending[index] = self.actors[index].ready.remote()
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return None
        del self._pending[index]
        try:
            msg = ray.get(ref)
        except ray.exceptions.RayError:
            return None  # died again, or still restarting: ask the next incarnation
        if msg[0] != "ready":
            return None
        try:
            return self.engine(index)
        except Exception:  # noqa: BLE001 - the actor went away between ready() and the connection: retry later
            logger.warning("data parallel replica %d: reconnecting failed; retrying", index, exc_info=True)
            return None

    def shutdown(self) -> None:
        self._kill([a for a in self.actors if a is not None] + self.followers)
        for pg in self.pgs:
            try:
                self.ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone
                pass
