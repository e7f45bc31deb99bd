"""RequestStream: the outputs of one served request on its event loop, fed by the engine's loop (thread or
process mode, see qwenjax/engine/async_llm.py); EngineDeadError, what every open stream raises once the engine stops."""

from __future__ import annotations

import asyncio

from qwenjax.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an exception in a step, or shutdown); no request can be served any more."""


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs ending with a finished one.

    Lives on one event loop; `_put`, `_put_delta` and `_fail` run on that loop (scheduled by the engine or reader
    thread). Timing fields are monotonic times of the engine steps that produced tokens: `first_token_time`, and
    `itl`, the gaps between consecutive token-producing steps, which a metrics consumer drains with `take_itl()`.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort, remote=None):
        self.request_id = request_id
        self.loop = loop
        self._abort = abort
        self._remote = remote    # process mode: the request's RemoteOutput, which deltas update
        self._latest = None      # the newest RequestOutput, or `_remote` when deltas arrived since the last take
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
                if out is self._remote:
                    out = out.build()
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
        self._times(times)
        self._latest = out
        if out.finished:
            self._closed = True
            self.finished_time = times[-1] if times else t
        self._event.set()

    def _put_delta(self, delta, times: list[float], t: float) -> None:
        """Process mode: what changed since the last delta (engine_core.OutputEncoder); as `_put` otherwise."""
        if self._closed:
            return
        self._times(times)
        self._remote.apply(delta)
        self._latest = self._remote
        if self._remote.finished:
            self._closed = True
            self.finished_time = times[-1] if times else t
        self._event.set()

    def _times(self, times: list[float]) -> None:
        for step_time in times:
            if self._last_token_time is None:
                self.first_token_time = step_time
            else:
                self._itl.append(step_time - self._last_token_time)
            self._last_token_time = step_time

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = exc
        self._event.set()
