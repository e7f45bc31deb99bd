"""The frontend's side of the engine core process (qwenjax/engine/core.py): spawning it, two threads that talk to it,
and what the server reads of the engine without loading the model.

Threads of the frontend process, besides the caller's event loops:
  * the sender: takes the commands queued by `submit` (from any thread) and writes them to the child, all that
    gathered since its last write in one message. Callers never block on the pipe.
  * the reader: receives the child's messages; for each "step" it updates the `EngineView` and hands the outputs to
    `on_step` (AsyncLLMEngine routes them to their streams); when the child says goodbye, reports its death, or
    its pipe closes (the process died), it calls `on_exit` once with the reason.
JAX is never initialised here: the tokenizer is loaded from the directory the child reports, everything else the
server needs (max_model_len, the model config, generation defaults) comes in the child's "ready" message.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import types
from typing import Callable

from qwenjax.engine.core import KNOWN_ERRORS, run_engine_core, widen_pipe
from qwenjax.engine.request_stream import EngineDeadError
from qwenjax.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger("qwenjax")


class RemoteOutput:
    """One request's cumulative output in the frontend, rebuilt from the engine process's deltas (see
    engine_core.OutputEncoder). Lives on its stream's event loop; `build` makes a fresh RequestOutput."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "arrival_time", "comps", "finished",
                 "metrics", "lora_request")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None, arrival_time: float,
                 lora_request=None):
        self.request_id, self.prompt, self.arrival_time = request_id, prompt, arrival_time
        self.lora_request = lora_request
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = None
        self.comps: list[list] = []  # per completion: [token ids, text, logprobs, cumulative logprob, finish, stop]
        self.finished = False
        self.metrics = (None, None, None, 0)

    def apply(self, delta) -> None:
        comps, finished, extra = delta
        mine = self.comps
        while len(mine) < len(comps):
            mine.append([[], "", None, None, None, None])
        for c, (t0, ids, x0, text, l0, lps, cum, finish, stop) in zip(mine, comps):
            own = c[0]
            if t0 < len(own):
                del own[t0:]
            own.extend(ids)
            c[1] = c[1] + text if x0 >= len(c[1]) else c[1][:x0] + text
            if lps is not None:
                if c[2] is None:
                    c[2] = []
                del c[2][l0:]
                c[2].extend(lps)
            c[3], c[4], c[5] = cum, finish, stop
        self.finished = finished
        if extra:
            if extra.get("metrics") is not None:
                self.metrics = extra["metrics"]
            if "prompt_token_ids" in extra:
                self.prompt_token_ids = extra["prompt_token_ids"]
            if "prompt_logprobs" in extra:
                self.prompt_logprobs = extra["prompt_logprobs"]

    def build(self) -> RequestOutput:
        comps = [CompletionOutput(index=i, text=c[1], token_ids=list(c[0]), cumulative_logprob=c[3], logprobs=c[2],
                                  finish_reason=c[4], stop_reason=c[5]) for i, c in enumerate(self.comps)]
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids or [], prompt_logprobs=self.prompt_logprobs,
                             outputs=comps, finished=self.finished,
                             metrics=RequestMetrics(self.arrival_time, *self.metrics), lora_request=self.lora_request)


class EngineView:
    """What the server, its metrics and the tests read of an LLMEngine that lives in the engine core process.

    Config (args, tokenizer, model_config, scheduler_config, max_model_len, generation_defaults, eos_token_ids) is
    fixed at start-up. Counters (stats, num_running, num_waiting, blocks.usage / num_free / query_tokens /
    hit_tokens, has_unfinished_requests()) are those of the newest step message: each attribute is replaced whole,
    so one read of `stats` or `blocks` is one consistent snapshot.
    """

    def __init__(self, args, info: dict, client: "EngineCoreClient"):
        from qwenjax.tokenizer import load_tokenizer

        self.args = args
        self._client = client
        self.tokenizer = load_tokenizer(info["tokenizer_dir"], trust_remote_code=args.trust_remote_code)
        self.model_config = info["model_config"]
        self.scheduler_config = info["scheduler_config"]
        self.max_model_len = info["max_model_len"]
        self.generation_defaults = info["generation_defaults"]
        self.eos_token_ids = info["eos_token_ids"]
        self._pages = (info["num_pages"], info["page_size"])
        self.update(info["stats"])

    def update(self, snap: dict) -> None:
        num_pages, page_size = self._pages
        self.stats = types.SimpleNamespace(**snap["stats"])
        self.blocks = types.SimpleNamespace(usage=snap["kv_usage"], num_free=snap["num_free_pages"],
                                            num_pages=num_pages, page_size=page_size,
                                            query_tokens=snap["query_tokens"], hit_tokens=snap["hit_tokens"])
        self.num_running, self.num_waiting = snap["num_running"], snap["num_waiting"]
        self.num_requests = snap["num_requests"]

    def has_unfinished_requests(self) -> bool:
        return self.num_requests > 0

    def reset_prefix_cache(self) -> int:
        """LLMEngine.reset_prefix_cache in the engine process, after every command submitted before it."""
        return self._client.call("reset_prefix_cache")


class EngineCoreClient:
    """Spawns the engine core process and carries commands to it and its messages back (see the module doc)."""

    def __init__(self, args, *, on_step: Callable, on_exit: Callable[[str], None], stream_interval: int = 1,
                 log_interval_s: float = 5.0, engine_setup: Callable | None = None):
        self.args = args
        self.on_step, self.on_exit = on_step, on_exit
        self.options = {"stream_interval": stream_interval, "log_interval_s": log_interval_s,
                        "engine_setup": engine_setup, "log_level": logging.getLogger("qwenjax").getEffectiveLevel(),
                        "log_format": _root_format()}
        self.process = None
        self.view: EngineView | None = None
        self._cond = threading.Condition()
        self._outbox: list = []
        self._closing = False
        self._calls: dict[int, list] = {}   # call id -> [event, value]
        self._call_ids = itertools.count()
        self._exit_reason: str | None = None
        self._sender = self._reader = None

    @property
    def is_running(self) -> bool:
        return self._reader is not None and self._reader.is_alive() and self.process.is_alive()

    def start(self) -> EngineView:
        """Starts the process and waits until its engine is built (model loaded, buckets compiled). Raises what the
        engine's start-up raised (ValueError, NotImplementedError, FileNotFoundError, RuntimeError, ...)."""
        ctx = multiprocessing.get_context("spawn")
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_w = ctx.Pipe(duplex=False)
        widen_pipe(self._cmd)
        self.process = ctx.Process(target=run_engine_core, args=(self.args, cmd_r, out_w, self.options),
                                   name="qwenjax-engine-core", daemon=True)
        self.process.start()
        cmd_r.close()  # the child's ends: once it exits, reads here see EOF
        out_w.close()
        try:
            info = self._wait_ready()
            self.view = EngineView(self.args, info, self)
        except BaseException:
            self._stop_process(timeout=5.0)
            raise
        logger.info("engine core process %d ready", self.process.pid)
        self._sender = threading.Thread(target=self._send_loop, name="qwenjax-engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="qwenjax-engine-reader", daemon=True)
        self._sender.start()
        self._reader.start()
        return self.view

    def _wait_ready(self) -> dict:
        while True:
            if self._out.poll(0.5):
                try:
                    msg = self._out.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:
                    self.process.join(5.0)
                    raise RuntimeError(f"the engine process {_how_it_ended(self.process)} during start-up")
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "failed":
                    kind = KNOWN_ERRORS.get(msg[1])
                    raise kind(msg[2]) if kind is not None else RuntimeError(f"{msg[1]}: {msg[2]}")
            elif not self.process.is_alive():
                raise RuntimeError(f"the engine process {_how_it_ended(self.process)} during start-up")

    # ------------------------------------------------------------------ commands
    def submit(self, command: tuple) -> None:
        """Queues a command for the child (thread-safe, never blocks on the pipe)."""
        with self._cond:
            if self._closing:
                return
            self._outbox.append(command)
            self._cond.notify()

    def call(self, name: str, timeout: float = 300.0):
        """Runs engine.<name>() in the child after every command submitted before, and returns its value."""
        slot = [threading.Event(), None]
        call_id = next(self._call_ids)
        with self._cond:
            if self._exit_reason is not None:
                raise _dead(self._exit_reason)
            self._calls[call_id] = slot
        self.submit(("call", call_id, name))
        if not slot[0].wait(timeout):
            raise TimeoutError(f"the engine process did not answer {name}() within {timeout} s")
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1]

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._outbox and not self._closing:
                    self._cond.wait()
                batch, self._outbox = self._outbox, []
                done = self._closing
            if batch:
                try:
                    self._cmd.send(batch)
                except (OSError, ValueError):
                    return  # the child is gone: the reader reports it
            if done:
                return

    # ------------------------------------------------------------------ messages
    def _read_loop(self) -> None:
        reason = None
        try:
            while reason is None:
                msg = self._out.recv()
                kind = msg[0]
                if kind == "step":
                    _, t, outputs, errors, stats = msg
                    self.view.update(stats)
                    self.on_step(t, outputs, errors, stats)
                elif kind == "reply":
                    slot = self._calls.pop(msg[1], None)
                    if slot is not None:
                        slot[1] = msg[2]
                        slot[0].set()
                elif kind == "dead":
                    reason = msg[1]
                elif kind == "bye":
                    reason = "the engine was shut down"
        except (EOFError, OSError):
            self.process.join(5.0)
            reason = f"the engine process {_how_it_ended(self.process)}"
            logger.error("%s; failing every open request", reason)
        except BaseException as e:  # noqa: BLE001 - a bug here must still fail the waiting requests
            logger.exception("the engine reader thread failed")
            reason = f"the frontend's reader failed: {type(e).__name__}: {e}"
        with self._cond:
            self._exit_reason = reason
            self._closing = True
            calls, self._calls = list(self._calls.values()), {}
            self._cond.notify()
        for slot in calls:
            slot[1] = _dead(reason)
            slot[0].set()
        self.on_exit(reason)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Asks the child to stop after its current step, then waits for it (terminating it past `timeout`)."""
        with self._cond:
            if not self._closing:
                self._outbox.append(("shutdown",))
                self._closing = True
                self._cond.notify()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)
        self._stop_process(timeout)

    def _stop_process(self, timeout: float | None) -> None:
        p = self.process
        if p is None:
            return
        p.join(timeout)
        if p.is_alive():
            logger.warning("the engine process did not stop within %s s; terminating it", timeout)
            p.terminate()
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)


def _dead(reason: str) -> BaseException:
    return EngineDeadError(f"the engine loop is not running: {reason}")


def _how_it_ended(p) -> str:
    if hasattr(p, "describe_exit"):  # a Ray actor standing for the process (qwenjax/engine/ray_replica.py)
        return p.describe_exit()
    code = p.exitcode
    if code is None:
        return "closed its pipe"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _root_format() -> str | None:
    for h in logging.getLogger().handlers:
        if h.formatter is not None and h.formatter._fmt:
            return h.formatter._fmt
    return None
