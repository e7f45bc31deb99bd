"""One HTTP request's engine requests (`Job`: one per prompt, their outputs merged, their metrics), the prompt they
run (`Prompt`, vLLM's `truncate_prompt_tokens`), and the race between a response and the client leaving
(`race_disconnect`): a client that leaves gets its requests aborted and their pages freed at once.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, NamedTuple

from fastapi import Request

from qwenjax.engine.async_llm import AsyncLLMEngine, EngineDeadError
from server.metrics import ServerMetrics
from server.protocol import APIError
from server.structured_outputs import constraint_error


class Prompt(NamedTuple):
    text: str | None
    ids: list[int]


def truncated(prompt: Prompt, k: int | None) -> Prompt:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (its text then no longer applies). The engine cuts
    the same way; the server cuts first so that max_tokens and usage count the tokens that run."""
    if k is None or k < 1 or len(prompt.ids) <= k:
        return prompt  # k < 1 is refused by SamplingParams, naming the field
    return Prompt(None, prompt.ids[-k:])


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, awaitable, on_disconnect):
    """Awaits `awaitable` unless the client disconnects first: then calls on_disconnect() and raises ClientGone."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = not work.done()
        if gone:
            on_disconnect()
            work.cancel()
        watch.cancel()
    if gone:
        raise ClientGone()
    return work.result()


class Job:
    """The engine requests of one HTTP request (one per prompt), their merged outputs and their metrics."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, prompts: list[Prompt], params, base_id: str,
                 arrival: float, constraint_param: str | None = None, lora_request=None):
        self.streams = []
        self.constraint_param = constraint_param  # the request field of params.structured_outputs, for its errors
        self.trackers = [metrics.tracker(arrival, len(p.ids)) for p in prompts]
        try:
            for i, p in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                self.streams.append(engine.add_request(rid, p.text, params, prompt_token_ids=p.ids,
                                                       priority=params.priority, arrival_time=arrival,
                                                       lora_request=lora_request))
        except EngineDeadError as e:
            self.abort()
            raise _dead(e) from None

    def abort(self) -> None:
        for s, t in zip(self.streams, self.trackers):
            if not s.finished:
                s.abort()
                t.abort()

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, cumulative output) until every request finished; engine errors become APIErrors."""
        try:
            if len(self.streams) == 1:
                async for out in self.streams[0]:
                    self.trackers[0].update(self.streams[0], out)
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i, stream):
                try:
                    async for out in stream:
                        queue.put_nowait((i, out, None))
                except Exception as e:  # noqa: BLE001 - handed to the consumer
                    queue.put_nowait((i, None, e))
                queue.put_nowait((i, None, None))

            tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
            try:
                left = len(tasks)
                while left:
                    i, out, err = await queue.get()
                    if err is not None:
                        raise err
                    if out is None:
                        left -= 1
                        continue
                    self.trackers[i].update(self.streams[i], out)
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
        except EngineDeadError as e:
            raise _dead(e) from None
        except (ValueError, TypeError, NotImplementedError) as e:
            raise constraint_error(str(e), self.constraint_param) from None
        except RuntimeError as e:  # the engine failed this request alone (it keeps serving the others)
            raise APIError(f"the engine failed this request: {e}", status=500, type="server_error",
                           code=500) from None
        finally:
            self.abort()  # a no-op for finished requests

    async def collect(self) -> list:
        finals = [None] * len(self.streams)
        async for i, out in self.outputs():
            finals[i] = out
        return finals


def _dead(e: EngineDeadError) -> APIError:
    return APIError(f"the engine is not running: {e}", status=503, type="server_error", code=503)
