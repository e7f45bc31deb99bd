"""A replica's mesh over hosts on Ray: processes 1..P-1 (MeshFollowerActor) and what process 0 needs to lead them
(its jax.distributed coordinator address). Placement and whole-mesh restarts: engine/ray_replica.py's RayReplicas."""

from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger("qwenjax")

EXIT_DELAY_S = 2.0  # an actor whose engine (or mesh) died lingers so its error can be read, then exits


def where() -> dict:
    """The node and pid of the calling actor's process."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class MeshFollowerActor:
    """Process k > 0 of a replica's mesh over hosts: builds its shard of the engine, then replays process 0's steps
    until process 0 stops (LLMEngine.follow), in a thread of the actor."""

    def __init__(self, args, env: dict):
        os.environ.update(env)
        self.steps: int | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(args,), name="qwenjax-mesh-follower", daemon=True).start()

    def _run(self, args) -> None:
        from qwenjax.engine.llm_engine import LLMEngine

        try:
            self.steps = LLMEngine(args).follow()
        except BaseException:  # noqa: BLE001 - the mesh is broken: die, so that done() tells the frontend
            logger.exception("mesh follower %d failed", args.process_id)
            time.sleep(EXIT_DELAY_S)
            os._exit(1)
        self._done.set()

    def done(self) -> int:
        """Blocks until process 0 stopped and this process followed it out (the steps replayed); a follower that
        dies makes this call fail instead (RayReplicas.check watches it)."""
        self._done.wait()
        return self.steps

    def where(self) -> dict:
        return where()

    def followed(self) -> int | None:
        """Steps replayed, once process 0 stopped (None before)."""
        return self.steps


def coordinator_address() -> str:
    """This node's address and a free port on it."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"
