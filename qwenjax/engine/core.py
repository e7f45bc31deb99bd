"""The engine core process: an LLMEngine and its step loop in a child process, fed and drained through two pipes.

`AsyncLLMEngine(args, multiprocess=True)` (the server's default) spawns `run_engine_core` in a fresh "spawn" process:
JAX, the model and the device belong to that process alone, and its host work per step (scheduling, building
inputs, reading tokens, detokenizing) no longer shares a GIL with the server's event loop. vLLM v1 splits its
engine core off the same way.

Messages (pickled, one per `Connection.send`):
  parent -> child: a list of commands, applied in order between steps:
      ("add", request_id, kwargs of LLMEngine.add_request)  ("abort", request_id)
      ("call", call_id, method name)  (a read-only or small LLMEngine method, e.g. reset_prefix_cache)
      ("shutdown",)
  child -> parent:
      ("ready", info)                 once, after start-up: the resolved config the frontend serves with
      ("failed", type name, message)  instead of "ready" when start-up raised
      ("step", t, outputs, errors, stats)
          outputs: [(request_id, delta, token step times)], each `delta` as OutputEncoder.encode builds it
          errors:  [(request_id, type name, message)] of adds the engine refused (ValueError, TypeError, ...)
          stats:   `snapshot(engine)` plus the loop's counters, the newest state of the engine
      ("reply", call_id, value)
      ("dead", message)               the loop died (an exception in a step); the process then exits
      ("bye",)                        the loop stopped on ("shutdown",) or on the parent's end closing

One "step" message goes out per engine step, once the next step is on the device (`on_dispatch`): pickling and a
write that might block on a full pipe then overlap the device's work. Outputs travel as deltas (new token ids, new
text, new logprobs) against what the parent already has: a 512-request decode step (prompts of 512 tokens) pickles
to ~40 KB in ~0.1 ms and unpickles in ~0.3 ms (CPU), against ~0.9 MB, ~14 ms and ~30 ms for the cumulative
RequestOutputs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("qwenjax")

# Exceptions a start-up or a bad request may raise that the frontend re-raises with the same type.
KNOWN_ERRORS = {e.__name__: e for e in (ValueError, TypeError, NotImplementedError, FileNotFoundError, RuntimeError,
                                        MemoryError, KeyError)}


def error_kind(e: BaseException) -> tuple[str, str]:
    """(type name, message) to send for an exception: its nearest class the frontend re-raises as is (a
    ModelNotFoundError goes as FileNotFoundError), else RuntimeError with the real type in the message."""
    for cls in type(e).__mro__:
        if KNOWN_ERRORS.get(cls.__name__) is cls:
            return cls.__name__, str(e)
    return "RuntimeError", f"{type(e).__name__}: {e}"


PIPE_BYTES = 1 << 20  # asked of the kernel for each pipe (Linux F_SETPIPE_SZ): a step's message never blocks


def widen_pipe(conn) -> None:
    """Best effort: a 1 MiB pipe buffer instead of 64 KiB, so a writer rarely waits for the reader."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (OSError, ImportError, ValueError):
        pass


def snapshot(engine) -> dict:
    """The engine's counters and occupancy, as the server's /metrics, the log line and the tests read them."""
    blocks = engine.blocks
    return {"stats": dict(vars(engine.stats)), "num_running": engine.num_running, "num_waiting": engine.num_waiting,
            "num_requests": len(engine.requests), "kv_usage": blocks.usage, "num_free_pages": blocks.num_free,
            "query_tokens": blocks.query_tokens, "hit_tokens": blocks.hit_tokens}


def ready_info(engine) -> dict:
    """What the frontend needs to serve without the model: resolved lengths, config, defaults, the tokenizer's
    directory (the frontend loads its own copy)."""
    tok = engine.tokenizer
    return {"max_model_len": engine.max_model_len, "model_config": engine.model_config,
            "scheduler_config": engine.scheduler_config, "generation_defaults": dict(engine.generation_defaults or {}),
            "eos_token_ids": tuple(engine.eos_token_ids), "tokenizer_dir": getattr(tok, "name_or_path", None),
            "num_pages": engine.blocks.num_pages, "page_size": engine.blocks.page_size, "stats": snapshot(engine)}



def add_or_refuse(engine, rid: str, kw: dict) -> Exception | None:
    """Adds a served request (an "add" command's fields) to `engine`. A request the engine refuses, or whose add
    raises, fails alone: the exception is returned, not raised (an unexpected one is logged with its traceback)."""
    try:
        engine.add_request(rid, kw["prompt"], kw["params"], prompt_token_ids=kw["prompt_token_ids"],
                           arrival_time=kw["arrival_time"], priority=kw["priority"],
                           lora_request=kw.get("lora_request"))
    except Exception as e:  # noqa: BLE001 - a refused add fails that request alone
        if not isinstance(e, (ValueError, TypeError, NotImplementedError)):
            logger.exception("adding request %s raised; it fails alone", rid)
        return e
    return None

class ThroughputLog:
    """Logs throughput, queue sizes and KV usage every `interval` seconds while the engine is busy (the loop of
    either mode calls it with the LLMEngine it runs)."""

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
        # The tail of a burst, unless too short to say anything (or logging is off: interval inf, offline replicas).
        if self.busy and now - self.t0 >= 1.0 and self.interval != float("inf"):
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


class OutputEncoder:
    """Turns each request's cumulative RequestOutputs into deltas against what was already sent.

    Per request it remembers, for each completion, how many token ids, characters and logprob entries went out.
    Token ids and logprobs only grow while a request runs; text only grows too, except at the end (a stop string is
    cut out), so a finished output carries its whole text. A delta is (completions, finished, extra): each completion
    is (token start, new ids, text start, new text, logprob start, new logprob entries or None, cumulative logprob,
    finish reason, stop reason), and the receiver replaces everything from each start on; `extra` is None or a dict
    with `metrics` (a RequestMetrics' fields but arrival) on the first and last delta, and `prompt_token_ids` /
    `prompt_logprobs` on the first when the frontend cannot know them.
    """

    def __init__(self):
        # request id -> [per completion [tokens, chars, logprob entries] sent (None before the first), whether the
        # first delta carries the prompt's token ids]
        self.sent: dict[str, list] = {}

    def add(self, request_id: str, *, send_prompt_ids: bool) -> None:
        self.sent[request_id] = [None, send_prompt_ids]

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)

    def encode(self, out) -> tuple:
        """The delta of a RequestOutput."""
        comps = [(c.token_ids, len(c.token_ids), c.text, c.logprobs, c.cumulative_logprob, c.finish_reason,
                  c.stop_reason) for c in out.outputs]
        m = out.metrics
        return self._encode(out.request_id, comps, out.finished, lambda: None if m is None else (
            m.first_scheduled_time, m.first_token_time, m.finished_time, m.num_preemptions), out)

    def encode_request(self, req) -> tuple:
        """The same delta read straight from a live Request (LLMEngine.raw_outputs): no RequestOutput is built and no
        token list copied, which is most of the per-request host work of a serving step."""
        comps = [(s.output_token_ids, s.num_known_outputs, s.output_text, s.logprobs,
                  s.cumulative_logprob if s.logprobs is not None else None, s.finish_reason, s.stop_reason)
                 for s in req.seqs]
        return self._encode(req.request_id, comps, req.finished, lambda: (
            req.first_scheduled_time, min((s.first_token_time for s in req.seqs if s.first_token_time), default=None),
            req.finished_time, sum(s.num_preemptions for s in req.seqs)), req)

    def _encode(self, rid: str, comps: list, finished: bool, metrics, out) -> tuple:
        """comps: per completion (token ids, how many of them are known, text, logprobs, cumulative logprob,
        finish reason, stop reason); metrics() gives the timing tuple; `out` has prompt_token_ids and
        prompt_logprobs."""
        state = self.sent.get(rid)
        if state is None:  # not added through this encoder (cannot happen in the core loop): send all of it
            state = [None, True]
        first = state[0] is None
        if first:
            state[0] = [[0, 0, 0] for _ in comps]
        counts, deltas = state[0], []
        for (ids, known, text, lps, cum, reason, stop), n in zip(comps, counts):
            t0 = n[0] if n[0] <= known else 0
            x0 = 0 if finished or n[1] > len(text) else n[1]
            l0 = 0 if lps is None or n[2] > len(lps) else n[2]
            deltas.append((t0, ids[t0:known], x0, text[x0:], l0, None if lps is None else lps[l0:], cum, reason, stop))
            n[0], n[1], n[2] = known, len(text), 0 if lps is None else len(lps)
        extra = None
        if first or finished:
            extra = {"metrics": metrics()}
            if first:
                if state[1]:
                    extra["prompt_token_ids"] = out.prompt_token_ids
                if out.prompt_logprobs is not None:
                    extra["prompt_logprobs"] = out.prompt_logprobs
        if finished:
            self.sent.pop(rid, None)
        else:
            self.sent[rid] = state
        return deltas, finished, extra


class EngineCore:
    """The child's loop over one LLMEngine: commands in, one "step" message out per engine step."""

    def __init__(self, engine, cmd_conn, out_conn, *, stream_interval: int = 1, log_interval_s: float = 5.0):
        self.engine = engine
        engine.final_only = False
        engine.raw_outputs = True  # step() hands back the touched Requests; encode_request reads them directly
        self.cmd, self.out = cmd_conn, out_conn
        self.stream_interval = stream_interval
        self.log_interval_s = log_interval_s
        self.encoder = OutputEncoder()
        self.live: dict[str, list] = {}   # request id -> [token step times not yet sent, an output went out]
        self.outputs: list = []            # (request id, delta, times) not yet sent
        self.errors: list = []             # (request id, type name, message) not yet sent
        self.dirty = False                 # something changed since the last message (send stats before sleeping)
        self.num_steps = 0
        self.step_seconds = 0.0
        self.idle_seconds = 0.0
        self.idle_since: float | None = None  # when the current wait for requests began (None while working)

    # ------------------------------------------------------------------ messages
    def flush(self) -> None:
        """Sends what is pending, with the engine's current counters, as one "step" message."""
        if not (self.outputs or self.errors or self.dirty):
            return
        stats = snapshot(self.engine)
        stats.update(num_steps=self.num_steps, step_seconds=self.step_seconds, idle_seconds=self.idle_seconds,
                     idle_since=self.idle_since)
        outputs, errors = self.outputs, self.errors
        self.outputs, self.errors, self.dirty = [], [], False
        self.out.send(("step", time.monotonic(), outputs, errors, stats))

    def _receive(self, block: bool) -> list | None:
        """Every command list waiting in the pipe (blocking for the first one if `block`); None once the parent's
        end is closed."""
        commands = []
        try:
            if block:
                commands.extend(self.cmd.recv())
            while self.cmd.poll():
                commands.extend(self.cmd.recv())
        except (EOFError, OSError):
            return None
        return commands

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        engine = self.engine
        log = ThroughputLog(engine, self.log_interval_s)
        while True:
            idle = not engine.has_unfinished_requests()
            if idle:
                self.idle_since, self.dirty = time.monotonic(), True  # the frontend learns the engine waits
                self.flush()
                log.idle()
            commands = self._receive(block=idle)
            if idle:
                self.idle_seconds += time.monotonic() - self.idle_since
                self.idle_since = None
            if commands is None:  # the frontend is gone: nobody is left to tell
                engine.shutdown()
                return
            if not self._apply(commands):
                break
            if engine.has_unfinished_requests():
                log.begin()
                t0 = time.monotonic()
                outs = engine.step(on_dispatch=self.flush)  # the last step's message leaves once this one is on
                t = time.monotonic()                         # the device
                self.step_seconds += t - t0
                self.num_steps += 1
                self.dirty = True
                self._collect(outs, t)
                self._report_failed()
                log.step(t)
                if not engine.has_unfinished_requests():
                    self.flush()
        self.flush()
        engine.shutdown()  # several hosts: release the other processes (nothing otherwise)

    def _report_failed(self) -> None:
        """Requests the engine failed alone in this step go back as errors (their callers get the exception)."""
        for rid, exc in self.engine.take_failed():
            self.errors.append((rid, *error_kind(exc)))
            self.live.pop(rid, None)
            self.encoder.forget(rid)

    def _collect(self, outs, t: float) -> None:
        """This step's outputs to send: every request's first and last, the others every `stream_interval` steps."""
        live, enc = self.live, self.encoder
        due = self.stream_interval <= 1 or self.num_steps % self.stream_interval == 0
        for o in outs:
            st = live.get(o.request_id)
            if st is None:
                continue
            st[0].append(t)
            if due or o.finished or not st[1]:
                try:
                    self.outputs.append((o.request_id, enc.encode_request(o), st[0]))
                except Exception as e:  # noqa: BLE001 - one request's output must not end the loop
                    self.engine.abort_request(o.request_id)
                    self.engine.failed.append((o.request_id, e))
                    continue
                st[0], st[1] = [], True
            if o.finished:
                del live[o.request_id]

    def _apply(self, commands) -> bool:
        """Applies commands in order; False on shutdown."""
        engine = self.engine
        self.dirty = True
        for cmd in commands:
            kind = cmd[0]
            if kind == "add":
                rid, kw = cmd[1], cmd[2]
                refused = add_or_refuse(engine, rid, kw)
                if refused is not None:
                    self.errors.append((rid, *error_kind(refused)))
                    continue
                self.live[rid] = [[], False]
                self.encoder.add(rid, send_prompt_ids=kw["prompt_token_ids"] is None)
            elif kind == "abort":
                rid = cmd[1]
                req = engine.requests.get(rid)
                engine.abort_request(rid)
                if req is not None and self.live.pop(rid, None) is not None:
                    self.outputs.append((rid, self.encoder.encode(engine.request_output(req)), []))
                self.encoder.forget(rid)
            elif kind == "call":
                call_id, name = cmd[1], cmd[2]
                try:
                    value = getattr(engine, name)()
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    value = e
                self.flush()  # the call saw the state after everything before it; so does its caller
                self.out.send(("reply", call_id, value))
            elif kind == "shutdown":
                return False
        return True


def run_engine_core(args, cmd_conn, out_conn, options: dict) -> None:
    """The child process's entry point (multiprocessing "spawn"): builds the LLMEngine, then runs its loop."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when the engine stops. (A Ray actor
    # runs this loop in a thread, where signals cannot be set: Ray owns the actor process's signals.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A data-parallel replica's device group (CUDA_VISIBLE_DEVICES, XLA_FLAGS), set before JAX starts its backend.
    os.environ.update(options.get("env") or {})
    # The parent's root format when its application configured logging (root level untouched: JAX's INFO lines stay
    # quiet); otherwise the "qwenjax" logger's own handler (qwenjax/logger.py) prints, as in the parent.
    if options.get("log_format") and not logging.getLogger().handlers:
        logging.basicConfig(format=options["log_format"])
    logging.getLogger("qwenjax").setLevel(options.get("log_level", logging.INFO))
    widen_pipe(out_conn)
    try:
        from qwenjax.engine.llm_engine import LLMEngine

        engine = LLMEngine(args)
        setup = options.get("engine_setup")
        if setup is not None:
            setup(engine)
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        logger.debug("engine start-up failed", exc_info=True)
        out_conn.send(("failed", *error_kind(e)))
        return
    out_conn.send(("ready", ready_info(engine)))
    core = EngineCore(engine, cmd_conn, out_conn, stream_interval=options.get("stream_interval", 1),
                      log_interval_s=options.get("log_interval_s", 5.0))
    try:
        core.run()
    except (BrokenPipeError, ConnectionResetError):  # the frontend died mid-send: nobody is left to tell
        return
    except BaseException as e:  # noqa: BLE001 - every failure must reach the waiting requests
        logger.exception("the engine loop died; failing every open request")
        try:
            out_conn.send(("dead", f"the engine loop died: {type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass
        return
    try:
        out_conn.send(("bye",))
    except (OSError, ValueError):
        pass
