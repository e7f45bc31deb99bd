"""The offline LLM over data-parallel replicas: `LLM(data_parallel_size=N)` (vLLM's argument).

`OfflineDataParallel` drives a DataParallelEngine (qwenjax/engine/data_parallel.py: N engine replicas, each an
engine core process on its own device group, or a Ray actor with distributed_executor_backend="ray"; the router of
qwenjax/core/routing.py picks each request's replica) from blocking calls. It is what `LLM.llm_engine` is then.

Threads: the replicas' streams live on one event loop, run by a daemon thread of this object; `generate` submits one
coroutine to it and blocks on its result. Calling from a thread that runs an event loop of its own (Jupyter) is
therefore fine.

generate's contract, as one engine's (LLM.generate):
  * outputs in prompt order, one RequestOutput per prompt, with the same fields (built by each replica's stream).
    Greedy and seeded requests give the tokens of one engine (every replica has the same arguments, seed included);
    unseeded random sampling draws from each replica's own generator, so it differs from one engine's draws.
  * a prompt a replica refuses (ValueError, TypeError, NotImplementedError: too long, bad parameters, ...) raises
    that error naming the prompt ("prompt i: ..."), the one of the lowest index when several are refused; every
    other request of the call is aborted first, so nothing of the call stays queued and every KV page comes back.
  * a request a step fails alone raises RuntimeError("prompt i failed in the engine: ...") after aborting the rest.
  * a replica that dies mid-call: its prompts are lost, the other replicas' prompts run to the end, then
    `ReplicaDiedError` (an EngineDeadError) names the replica, its reason and the lost prompts, and carries the
    outputs of the others in `outputs` (prompt order, None for a lost prompt). The dead replica is never chosen
    again; later calls run on the others (mp replicas are not restarted; Ray restarts its actors).
"""

from __future__ import annotations

import asyncio
import threading
import time

from qwenjax.engine.data_parallel import CONFIG_FIELDS, DataParallelEngine
from qwenjax.engine.request_stream import EngineDeadError
from qwenjax.outputs import RequestOutput

REFUSALS = (ValueError, TypeError, NotImplementedError)  # what add_request raises for a bad request


class ReplicaDiedError(EngineDeadError):
    """A data-parallel replica died during generate(); `outputs` holds the other prompts' outputs (None: lost)."""

    def __init__(self, message: str, outputs: list[RequestOutput | None]):
        super().__init__(message)
        self.outputs = outputs


class ReplicaAttributeError(NotImplementedError, AttributeError):
    """An LLMEngine attribute that one engine has and the replicas' driver does not (hasattr() is False)."""


class OfflineDataParallel:
    """LLM.llm_engine with data_parallel_size > 1 (see the module doc)."""

    is_leader = True

    def __init__(self, args, *, routing="least_loaded", ray_address: str | None = None, max_restarts: int = 4):
        self.args = args
        try:
            self.dp = DataParallelEngine(args, routing=routing, ray_address=ray_address, max_restarts=max_restarts,
                                         log_interval_s=float("inf"))
        except RuntimeError as e:
            if "during start-up" not in str(e):
                raise
            raise RuntimeError(f"{e}; its error is in the log above. A common cause: the replicas are spawned "
                               f"processes, which import the main module again, so a script must build LLM("
                               f"data_parallel_size=...) under `if __name__ == \"__main__\":`") from e
        view = self.dp.engine
        for name in CONFIG_FIELDS:
            setattr(self, name, getattr(view, name))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwenjax-offline-dp", daemon=True)
        self._thread.start()
        self._closed = False

    def __getattr__(self, name: str):
        """Only for attributes not set here: the engine's internals (runner, scheduler, requests, ...) live in the
        replicas' processes."""
        if name.startswith("__"):
            raise AttributeError(name)
        size = self.__dict__["args"].data_parallel_size if "args" in self.__dict__ else "N"
        raise ReplicaAttributeError(
            f"llm.llm_engine.{name} is not available with data_parallel_size={size}: each replica's engine lives in "
            f"its own process; read stats, blocks, replica_views() (each replica's counters) or health() instead")

    # ------------------------------------------------------------------ what LLM reads
    @property
    def stats(self):
        """The engine counters summed over the replicas (max_decode_batch: the largest; the acceptance rate from
        the summed counts)."""
        return self.dp.engine.stats

    @property
    def blocks(self):
        return self.dp.engine.blocks

    def replica_views(self) -> list:
        """(index, EngineView) of each replica: its own counters (stats, blocks)."""
        return self.dp.engine.replica_views()

    def health(self) -> list[dict]:
        return self.dp.health()

    def has_unfinished_requests(self) -> bool:
        return self.dp.engine.has_unfinished_requests()

    def reset_prefix_cache(self) -> int:
        """Resets every healthy replica's prefix cache; returns the pages dropped over all of them."""
        return self.dp.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stops every replica's process (or actor) and the event loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.dp.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)

    # ------------------------------------------------------------------ generate
    def generate(self, requests: list[dict], use_tqdm: bool = True) -> list[RequestOutput]:
        """requests: per prompt, the keyword arguments of DataParallelEngine.add_request (request_id, prompt,
        params, prompt_token_ids, priority, lora_request). Blocks until every prompt finished (see the module doc
        for errors); KeyboardInterrupt aborts the call's requests."""
        if self._closed:
            raise EngineDeadError("the LLM was shut down: its data parallel replicas are stopped")
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True)
        future = asyncio.run_coroutine_threadsafe(self._generate(requests, bar), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt: the coroutine's `finally` aborts what is still running
            raise
        finally:
            if bar is not None:
                bar.close()

    async def _generate(self, requests: list[dict], bar) -> list[RequestOutput]:
        streams = []
        try:
            for kw in requests:  # EngineDeadError here: every replica is down (the `finally` aborts the others)
                streams.append(self.dp.add_request(kw.pop("request_id"), kw.pop("prompt"), kw.pop("params"), **kw))
            return await self._collect(streams, bar)
        finally:
            for s in streams:
                s.abort()  # no-op for a finished stream

    async def _collect(self, streams, bar) -> list[RequestOutput]:
        n = len(streams)
        outputs: list[RequestOutput | None] = [None] * n
        errors: dict[int, BaseException] = {}
        t0, tokens = time.perf_counter(), 0
        tasks = [asyncio.ensure_future(_last(i, s)) for i, s in enumerate(streams)]
        try:
            for next_done in asyncio.as_completed(tasks):
                i, out, err = await next_done
                if err is None:
                    outputs[i] = out
                    tokens += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"output {tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
                    continue
                if not isinstance(err, EngineDeadError) and not any(not isinstance(e, EngineDeadError)
                                                                    for e in errors.values()):
                    for s in streams:  # the call fails: abort the rest (their streams end with 'abort')
                        s.abort()
                errors[i] = err
        finally:
            for t in tasks:
                t.cancel()
        failed = sorted(i for i, e in errors.items() if not isinstance(e, EngineDeadError))
        if failed:
            i = failed[0]
            e = errors[i]
            if isinstance(e, REFUSALS):
                raise type(e)(f"prompt {i}: {e}") from None
            raise RuntimeError(f"prompt {i} failed in the engine: {type(e).__name__}: {e}") from e
        if errors:
            raise _replica_died(streams, errors, outputs)
        return outputs


async def _last(i: int, stream):
    """(i, the stream's finished output, None) or (i, None, the exception it raised)."""
    out = None
    try:
        async for out in stream:
            pass
    except Exception as e:  # noqa: BLE001 - reported per prompt by the caller
        return i, None, e
    return i, out, None


def _replica_died(streams, errors: dict[int, BaseException], outputs) -> ReplicaDiedError:
    by_replica: dict[int, list[int]] = {}
    for i in sorted(errors):
        by_replica.setdefault(getattr(streams[i], "replica", -1), []).append(i)
    parts = []
    for r, lost in by_replica.items():
        shown = ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else "")
        parts.append(f"{len(lost)} prompts lost on data parallel replica {r} ({errors[lost[0]]}): prompts {shown}")
    done = sum(o is not None for o in outputs)
    return ReplicaDiedError(f"{'; '.join(parts)}. The other {done} prompts finished: their outputs are in this "
                            f"error's `outputs` (prompt order, None for a lost prompt); later generate() calls run on "
                            f"the replicas still up", outputs)

