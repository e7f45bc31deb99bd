"""AsyncLLMEngine: serves an LLMEngine to asyncio code, from a child process (the default) or from a thread.

Two modes, one API (add_request -> RequestStream, abort, generate, `dead`, shutdown):

  * process mode (`AsyncLLMEngine(engine_args)`, `python -m server`): the LLMEngine lives in an engine core process
    (qwenjax/engine/core.py) spawned at start; this process never initialises JAX. The engine's host work per step
    then runs on its own core instead of competing for one GIL with the event loop's per-token work. Commands go to
    the child through a sender thread, one message per batch; a reader thread receives one message per engine step
    (the outputs as deltas, plus a stats snapshot) and routes each output to its stream (qwenjax/engine/core_client.py).
    `engine.engine` is then an EngineView: the tokenizer, config and counters the server reads, without the model.
  * thread mode (`AsyncLLMEngine(llm_engine)`, or `multiprocess=False`, `--disable-frontend-multiprocessing`): one
    background thread of this process owns the LLMEngine. Multi-host runs (num_processes > 1) always use it.

Threads and ownership:
  * only the engine's own loop (the thread, or the child) calls the LLMEngine's mutating methods (add_request, step,
    abort_request). Other threads submit commands and wake it.
  * each request has a RequestStream living on the caller's event loop. The engine thread (or the reader thread)
    never touches a stream's loop-side state: it hands each step's outputs to the loop with ONE
    `call_soon_threadsafe` per loop. The engine loop sends a step's outputs once the next step has been dispatched to
    the device (in thread mode the loop's per-token work then runs while the engine thread waits for the device with
    the GIL released; in process mode the pickling and the write overlap the device's work), or at once when no
    step follows.
  * a stream keeps only the newest output (outputs are cumulative, so nothing is lost by skipping older ones when
    the consumer is slower than the engine), plus the step times of its tokens for latency metrics. In process mode
    the newest output is kept as the request's accumulated deltas and built into a RequestOutput when the consumer
    takes it. With `stream_interval` N > 1 a request's outputs are handed over every N steps (first and last at once).

Failure: an exception escaping `step()` kills the loop, and in process mode so does the child's death (killed, out of
memory). Every open stream then raises EngineDeadError, later submissions raise it at once, and `dead` turns True
(the server's /health answers 503). A bad request (ValueError or TypeError from add_request) fails only its own
stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator

from qwenjax.engine.core import KNOWN_ERRORS, ThroughputLog, add_or_refuse
from qwenjax.engine.core_client import EngineCoreClient, RemoteOutput
from qwenjax.engine.request_stream import EngineDeadError, RequestStream
from qwenjax.outputs import RequestOutput
from qwenjax.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestStream"]

logger = logging.getLogger("qwenjax")

LOG_INTERVAL_S = 5.0


class AsyncLLMEngine:
    """Serves an LLMEngine to asyncio code: `add_request` / `generate` from any event loop, `abort` from anywhere.

    `engine` is EngineArgs (the engine is built in an engine core process, or with `multiprocess=False` here and run
    in a thread) or an LLMEngine already built (run in a thread). `engine.engine` is what the server reads of the
    engine: the LLMEngine itself in thread mode (read-only attributes only, from other threads), an EngineView in
    process mode.
    """

    def __init__(self, engine, *, multiprocess: bool | None = None, log_interval_s: float = LOG_INTERVAL_S,
                 stream_interval: int = 1, start: bool = True, engine_setup=None, core_client=None):
        """multiprocess: run the engine in its own process (default when `engine` is EngineArgs; an LLMEngine
        object always runs in a thread). stream_interval: a request's outputs reach its stream every this many engine
        steps (its first and last output always at once); above 1 it cuts the event loop's per-token work under
        heavy load, at the price of chunks that carry several tokens. engine_setup: a function called with the
        LLMEngine once it is built, in whichever process runs it (picklable in process mode: a module-level
        function); tests use it to script the sampler. core_client: process mode's client class (default
        EngineCoreClient; qwenjax/engine/ray_replica.py passes one that talks to a Ray actor)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
        from qwenjax.config import EngineArgs

        self.args = engine if isinstance(engine, EngineArgs) else getattr(engine, "args", None)
        if not isinstance(engine, EngineArgs):
            if multiprocess:
                raise ValueError("multiprocess=True needs EngineArgs (the engine is built in the engine process), "
                                 f"got a built {type(engine).__name__}")
            multiprocess = False
        else:
            multiprocess = True if multiprocess is None else bool(multiprocess)
            if multiprocess and engine.num_processes > 1:
                logger.warning("num_processes=%d: the engine runs in a thread of this process (the engine core "
                               "process does not combine with multi-host runs yet)", engine.num_processes)
                multiprocess = False
        self.multiprocess = multiprocess
        self.log_interval_s = log_interval_s
        self.stream_interval = stream_interval
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()  # thread mode: ("add", stream, kwargs) | ("abort", id)
        self._streams: dict[str, RequestStream] = {}  # thread mode: engine thread only; process mode: under _cond
        self._pending: list = []  # the last step's (stream, output, step times), delivered at the next dispatch
        # Counters for benchmarks: engine.step() calls, seconds inside them, seconds asleep with nothing to do.
        self.num_steps = 0
        self.step_seconds = 0.0
        self.idle_seconds = 0.0
        self.idle_since: float | None = None  # when the engine's current wait for requests began (None: working)
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self.engine = None
        if multiprocess:
            self._client = (core_client or EngineCoreClient)(engine, on_step=self._on_step, on_exit=self._on_exit,
                                            stream_interval=stream_interval, log_interval_s=log_interval_s,
                                            engine_setup=engine_setup)
        else:
            if isinstance(engine, EngineArgs):
                from qwenjax.engine.llm_engine import LLMEngine

                engine = LLMEngine(engine)
            if engine_setup is not None:
                engine_setup(engine)
            self.engine = engine
            engine.final_only = False
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, args, **kwargs) -> "AsyncLLMEngine":
        """The engine built from `args`: in an engine core process unless `multiprocess=False`."""
        return cls(args, **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def dead(self) -> bool:
        """True once the loop has stopped (an exception, the engine process's death, or shutdown)."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def is_running(self) -> bool:
        if self._client is not None:
            return self._client.is_running
        return self._thread is not None and self._thread.is_alive()

    def idle_seconds_now(self) -> float:
        """Seconds the engine loop has waited for requests with none unfinished, the wait in progress included (in
        process mode as of the engine's last message; the clocks are the host's monotonic clock)."""
        since = self.idle_since
        return self.idle_seconds + (time.monotonic() - since if since is not None else 0.0)

    @property
    def engine_pid(self) -> int | None:
        """The engine core process's id (process mode), else None."""
        return self._client.process.pid if self._client is not None and self._client.process is not None else None

    def start(self) -> None:
        """Starts the engine loop. Process mode: spawns the engine process and returns once its engine is built
        (raising what its start-up raised)."""
        if self._thread is not None or (self._client is not None and self._client.process is not None):
            raise RuntimeError("the engine loop is already started")
        if self._client is not None:
            self.engine = self._client.start()
            return
        self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the loop after its current step (process mode: and the engine process); open streams fail with
        EngineDeadError."""
        if self._client is not None:
            self._client.shutdown(timeout)
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams, *,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None, lora_request=None) -> RequestStream:
        """Queues a request for the engine and returns its stream. Must be called on a running event loop.

        Validation errors of the engine (ValueError, TypeError) are raised by the stream's first `__anext__`.
        """
        rid = str(request_id)
        loop = asyncio.get_running_loop()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        kwargs = dict(prompt=prompt, params=params, prompt_token_ids=prompt_token_ids, priority=priority,
                      arrival_time=arrival, lora_request=lora_request)
        if self._client is None:
            stream = RequestStream(rid, loop, self.abort)
            with self._cond:
                if self._error is not None:
                    raise EngineDeadError(f"the engine loop is not running: {self._error}") from self._error
                self._commands.append(("add", stream, kwargs))
                self._cond.notify()
            return stream
        stream = RequestStream(rid, loop, self.abort, RemoteOutput(rid, prompt, prompt_token_ids, arrival,
                                                                 lora_request))
        with self._cond:
            if self._error is not None:
                raise EngineDeadError(f"the engine loop is not running: {self._error}") from self._error
            if rid in self._streams:
                loop.call_soon(stream._fail, ValueError(f"request id {rid!r} is already in use"))
                return stream
            self._streams[rid] = stream
        self._client.submit(("add", rid, kwargs))
        return stream

    async def generate(self, prompt: str | None, params: SamplingParams, request_id: str,
                       prompt_token_ids: list[int] | None = None, *, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs until the finished one. Leaving early (break, cancellation) aborts."""
        stream = self.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Drops a request (thread-safe). Applied between steps; its pages are freed before the next step."""
        if self._client is not None:
            if self._error is None:
                self._client.submit(("abort", str(request_id)))
            return
        with self._cond:
            if self._error is None:
                self._commands.append(("abort", str(request_id)))
                self._cond.notify()

    # ------------------------------------------------------------------ process mode: the reader thread
    def _on_step(self, t_sent: float, outputs, errors, stats) -> None:
        """One step message of the engine process: each output goes to its stream, each refused add fails its own."""
        self.num_steps, self.step_seconds = stats["num_steps"], stats["step_seconds"]
        self.idle_seconds, self.idle_since = stats["idle_seconds"], stats["idle_since"]
        ready, failed = [], []
        with self._cond:
            streams = self._streams
            for rid, delta, times in outputs:
                stream = streams.get(rid)
                if stream is None:
                    continue
                if delta[1]:  # finished
                    del streams[rid]
                ready.append((stream, delta, times))
            for rid, kind, message in errors:
                stream = streams.pop(rid, None)
                if stream is not None:
                    failed.append((stream, _rebuild_error(kind, message)))
        if ready:
            self._deliver(ready, _put_deltas)
        for stream, exc in failed:
            self._fail([stream], exc)

    def _on_exit(self, reason: str) -> None:
        exc = EngineDeadError(reason)
        with self._cond:
            self._error = exc
            streams, self._streams = list(self._streams.values()), {}
        self._fail(streams, exc)

    # ------------------------------------------------------------------ thread mode: the engine thread
    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._deliver(pending)

    def _run(self) -> None:
        engine = self.engine
        log = ThroughputLog(engine, self.log_interval_s)
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._flush()
                        log.idle()
                        self.idle_since = time.monotonic()
                        self._cond.wait()
                        self.idle_seconds += time.monotonic() - self.idle_since
                        self.idle_since = None
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, collections.deque()
                self._deliver(self._apply(commands))
                if engine.has_unfinished_requests():
                    log.begin()
                    t0 = time.monotonic()
                    # The previous step's outputs go to the event loop once this step is on the device: the
                    # loop's per-token work then runs while this thread waits for the device (GIL released).
                    outs = engine.step(on_dispatch=self._flush)
                    t = time.monotonic()
                    self.step_seconds += t - t0
                    self.num_steps += 1
                    self._flush()  # the step did not dispatch (nothing schedulable)
                    self._pending = self._collect(outs, t)
                    for rid, exc in engine.take_failed():  # requests the step failed alone
                        stream = self._streams.pop(rid, None)
                        if stream is not None:
                            self._fail([stream], exc)
                    log.step(t)
                    if not engine.has_unfinished_requests():
                        self._flush()
            self._flush()
            engine.shutdown()  # several hosts: release the other processes (nothing otherwise)
            reason: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as e:  # noqa: BLE001 - every failure must reach the waiting requests
            logger.exception("the engine loop died; failing every open request")
            reason = EngineDeadError(f"the engine loop died: {type(e).__name__}: {e}")
            reason.__cause__ = e
        with self._cond:
            self._error = reason
            pending, self._commands = self._commands, collections.deque()
        streams = list(self._streams.values()) + [c[1] for c in pending if c[0] == "add"]
        streams += [p[0] for p in self._pending]
        self._pending = []
        self._streams.clear()
        self._fail(streams, reason)

    def _collect(self, outs, t: float) -> list:
        """(stream, output, token step times) to deliver for this step's outputs: every request's first and last
        output, and the others every `stream_interval` steps."""
        streams, ready = self._streams, []
        due = self.stream_interval <= 1 or self.num_steps % self.stream_interval == 0
        for o in outs:
            stream = streams.get(o.request_id)
            if stream is None:
                continue
            stream._step_times.append(t)
            if due or o.finished or not stream._delivered:
                ready.append((stream, o, stream._step_times))
                stream._step_times, stream._delivered = [], True
            if o.finished:
                del streams[o.request_id]
        return ready

    def _apply(self, commands) -> list:
        """Applies queued adds and aborts in submission order; returns outputs of aborted requests to deliver."""
        engine, ready = self.engine, []
        for cmd in commands:
            if cmd[0] == "add":
                stream, kw = cmd[1], cmd[2]
                rid = stream.request_id
                if rid in self._streams:
                    self._fail([stream], ValueError(f"request id {rid!r} is already in use"))
                    continue
                refused = add_or_refuse(engine, rid, kw)
                if refused is not None:
                    self._fail([stream], refused)
                    continue
                self._streams[rid] = stream
            else:
                rid = cmd[1]
                stream = self._streams.pop(rid, None)
                req = engine.requests.get(rid)
                engine.abort_request(rid)
                if stream is not None and req is not None:
                    ready.append((stream, engine.request_output(req), []))  # finished, finish_reason "abort"
        return ready

    # ------------------------------------------------------------------ both modes
    @staticmethod
    def _deliver(ready, put=None) -> None:
        """Hands (stream, output, step times) triples to their event loops, one callback per loop."""
        by_loop: dict = {}
        for item in ready:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put or _put_all, items, time.monotonic())
            except RuntimeError:  # the loop is closed: its clients are gone
                pass

    @staticmethod
    def _fail(streams, exc: BaseException) -> None:
        for s in streams:
            try:
                s.loop.call_soon_threadsafe(s._fail, exc)
            except RuntimeError:
                pass


def _put_all(items, t: float) -> None:
    for stream, out, times in items:
        stream._put(out, times, t)


def _put_deltas(items, t: float) -> None:
    for stream, delta, times in items:
        stream._put_delta(delta, times, t)


def _rebuild_error(kind: str, message: str) -> BaseException:
    """The engine process's validation error as the same exception type (ValueError, TypeError, ...)."""
    cls = KNOWN_ERRORS.get(kind)
    return cls(message) if cls is not None else RuntimeError(f"{kind}: {message}")
