"""What one request may cost the server's process before the engine sees it: body size, and the thread that prepares
it (JSON parsing, validation, chat templating, tokenizing) off the event loop.

- `BodyLimit`: an ASGI middleware answering 413 to a body past `max_bytes` before anything reads it (from its
  Content-Length; a chunked body is cut off, and answered 413, once it passes the limit).
- `Preparer`: one worker thread (vLLM runs its tokenizer in a one-thread pool the same way) on which every request's
  preparation runs, so the event loop keeps answering /health, streams and other requests while a large prompt is
  tokenized; after a large body it hands freed heap back to the OS, so the process's memory comes back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from server.protocol import APIError

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024  # --max-request-body-bytes: 16 MiB, ~100x a 128k-token prompt
TRIM_AFTER_BYTES = 1 << 20  # bodies at least this large return the heap they freed to the OS once prepared

T = TypeVar("T")


def too_large(size: int, limit: int, *, exact: bool) -> APIError:
    got = f"{size} bytes" if exact else f"more than {limit} bytes"
    return APIError(f"the request body is too large: {got}, at most {limit} bytes are allowed "
                    f"(--max-request-body-bytes)", status=413, code="request_too_large")


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body past `max_bytes`, before the app reads it."""

    def __init__(self, app, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be at least 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, too_large(int(length), self.max_bytes, exact=True))
        seen = 0
        limit = self.max_bytes

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(seen, limit, exact=False)  # the app answers it (its APIError handler)
            return message

        return await self.app(scope, limited, send)


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _malloc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


class Preparer:
    """Runs requests' preparation on one worker thread; `await preparer.run(fn, raw_body)`."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenjax-prepare")
        self._trim = _malloc_trim()

    async def run(self, fn: Callable[[bytes], T], raw: bytes) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._call, fn, raw)

    def _call(self, fn: Callable[[bytes], T], raw: bytes) -> T:
        try:
            return fn(raw)
        finally:
            if len(raw) >= TRIM_AFTER_BYTES:
                self._trim()  # glibc keeps freed heap otherwise: the process would stay at its peak

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
