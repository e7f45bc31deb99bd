"""AsyncLLMEngine: one background thread owns the LLMEngine (and so the device); asyncio code talks to it.

Threads and ownership:
  * the engine thread is the only one that calls into the LLMEngine's mutating methods (add_request, step,
    abort_request). Other threads submit commands to `_commands` under `_cond` and wake it.
  * each request has a RequestStream living on the caller's event loop. The engine thread never touches a stream's
    loop-side state: it hands each step's outputs to the loop with ONE `call_soon_threadsafe` per loop, at the moment
    the next step has been dispatched to the device (so the loop's per-token work runs while the engine thread waits
    for the device with the GIL released, instead of competing with its host work), or at once when no step follows.
  * a stream keeps only the newest RequestOutput (outputs are cumulative, so nothing is lost by skipping older ones
    when the consumer is slower than the engine), plus the step times of its tokens for latency metrics. With
    `stream_interval` N > 1 a request's outputs are handed over every N steps (first and last at once).

Failure: an exception escaping `step()` kills the loop. Every open stream then raises EngineDeadError, later
submissions raise it at once, and `dead` turns True (the server's /health answers 503). A bad request (ValueError
or TypeError from add_request) fails only its own stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator

from qwenjax.outputs import RequestOutput
from qwenjax.sampling_params import SamplingParams

logger = logging.getLogger("qwenjax")

LOG_INTERVAL_S = 5.0


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an exception in a step, or shutdown); no request can be served any more."""


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs ending with a finished one.

    Lives on one event loop; `_put` and `_fail` run on that loop (scheduled by the engine thread). Timing fields are
    monotonic times of the engine steps that produced tokens: `first_token_time`, and `itl`, the gaps between
    consecutive token-producing steps, which a metrics consumer drains with `take_itl()`.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort):
        self.request_id = request_id
        self.loop = loop
        self._abort = abort
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False       # the consumer has received the finished output (or the error)
        self._closed = False     # a finished output or an error has arrived
        self._event = asyncio.Event()
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self._last_token_time: float | None = None
        self._step_times: list[float] = []  # engine thread only: token steps not yet delivered
        self._delivered = False  # engine thread only: an output went out
        self._itl: list[float] = []

    @property
    def finished(self) -> bool:
        """True once the final output or an error arrived: nothing of this request remains in the engine."""
        return self._closed

    def take_itl(self) -> list[float]:
        """Inter-token gaps (seconds) recorded since the last call."""
        out, self._itl = self._itl, []
        return out

    def abort(self) -> None:
        """Asks the engine to drop this request (thread-safe, idempotent); the stream then ends with 'abort'."""
        if not self._closed:
            self._abort(self.request_id)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                if out.finished:
                    self._done = True
                return out
            if self._error is not None and not self._done:
                self._done = True
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()

    # ---- called on the stream's loop
    def _put(self, out: RequestOutput, times: list[float], t: float) -> None:
        """The newest output; `times` are the engine steps that produced tokens since the last one, `t` now."""
        if self._closed:
            return
        for step_time in times:
            if self._last_token_time is None:
                self.first_token_time = step_time
            else:
                self._itl.append(step_time - self._last_token_time)
            self._last_token_time = step_time
        self._latest = out
        if out.finished:
            self._closed = True
            self.finished_time = times[-1] if times else t
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = exc
        self._event.set()


class AsyncLLMEngine:
    """Serves an LLMEngine to asyncio code: `add_request` / `generate` from any event loop, `abort` from anywhere.

    Read-only attributes of the wrapped engine (tokenizer, max_model_len, model_config, counters) may be read from
    other threads; nothing else of it may be called while the loop runs.
    """

    def __init__(self, engine, *, log_interval_s: float = LOG_INTERVAL_S, stream_interval: int = 1,
                 start: bool = True):
        """stream_interval: a request's outputs reach its stream every this many engine steps (its first and last
        output always at once). Above 1 it cuts the event loop's per-token work under heavy load, at the price of
        chunks that carry several tokens."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
        self.engine = engine
        engine.final_only = False
        self.log_interval_s = log_interval_s
        self.stream_interval = stream_interval
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()  # ("add", stream, kwargs) | ("abort", id)
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._pending: list = []  # the last step's (stream, output, step times), delivered at the next dispatch
        # Counters for benchmarks: engine.step() calls, seconds inside them, seconds asleep with nothing to do.
        self.num_steps = 0
        self.step_seconds = 0.0
        self.idle_seconds = 0.0
        self._stopping = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, args, **kwargs) -> "AsyncLLMEngine":
        from qwenjax.engine import LLMEngine

        return cls(LLMEngine(args), **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def dead(self) -> bool:
        """True once the loop has stopped (an exception, or shutdown)."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="qwenjax-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stops the loop after its current step; open streams fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None, params: SamplingParams, *,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> RequestStream:
        """Queues a request for the engine thread and returns its stream. Must be called on a running event loop.

        Validation errors of the engine (ValueError, TypeError) are raised by the stream's first `__anext__`.
        """
        stream = RequestStream(str(request_id), asyncio.get_running_loop(), self.abort)
        kwargs = dict(prompt=prompt, params=params, prompt_token_ids=prompt_token_ids, priority=priority,
                      arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        with self._cond:
            if self._error is not None:
                raise EngineDeadError(f"the engine loop is not running: {self._error}") from self._error
            self._commands.append(("add", stream, kwargs))
            self._cond.notify()
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
        with self._cond:
            if self._error is None:
                self._commands.append(("abort", str(request_id)))
                self._cond.notify()

    # ------------------------------------------------------------------ the engine thread
    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._deliver(pending)

    def _run(self) -> None:
        engine = self.engine
        log = _ThroughputLog(engine, self.log_interval_s)
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._flush()
                        log.idle()
                        t_idle = time.monotonic()
                        self._cond.wait()
                        self.idle_seconds += time.monotonic() - t_idle
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
                try:
                    engine.add_request(rid, kw["prompt"], kw["params"], prompt_token_ids=kw["prompt_token_ids"],
                                       arrival_time=kw["arrival_time"], priority=kw["priority"])
                except (ValueError, TypeError, NotImplementedError) as e:
                    self._fail([stream], e)
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

    @staticmethod
    def _deliver(ready) -> None:
        """Hands (stream, output, step time) triples to their event loops, one callback per loop."""
        by_loop: dict = {}
        for item in ready:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items, time.monotonic())
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


class _ThroughputLog:
    """Logs throughput, queue sizes and KV usage every `interval` seconds while the engine is busy."""

    def __init__(self, engine, interval: float):
        self.engine = engine
        self.interval = interval
        self.t0 = time.monotonic()
        self.prompt0 = engine.stats.prompt_tokens
        self.gen0 = engine.stats.generation_tokens
        self.busy = False

    def begin(self) -> None:
        if not self.busy:  # a burst starts: measure from here, not from the end of the last one
            self.t0 = time.monotonic()
            self.prompt0, self.gen0 = self.engine.stats.prompt_tokens, self.engine.stats.generation_tokens
            self.busy = True

    def step(self, now: float) -> None:
        if now - self.t0 >= self.interval:
            self._emit(now)

    def idle(self) -> None:
        now = time.monotonic()
        if self.busy and now - self.t0 >= 1.0:  # the tail of a burst, unless too short to say anything
            self._emit(now)
        self.busy = False

    def _emit(self, now: float) -> None:
        e, dt = self.engine, max(now - self.t0, 1e-9)
        s = e.stats
        logger.info("prompt throughput: %.1f tokens/s, generation throughput: %.1f tokens/s, running: %d, "
                    "waiting: %d, KV cache usage: %.1f%%, preemptions: %d", (s.prompt_tokens - self.prompt0) / dt,
                    (s.generation_tokens - self.gen0) / dt, e.num_running, e.num_waiting, 100.0 * e.blocks.usage,
                    s.preemptions)
        self.t0, self.prompt0, self.gen0 = now, s.prompt_tokens, s.generation_tokens
