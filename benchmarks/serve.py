"""serve: the OpenAI-compatible server under load, in the style of vLLM's serving benchmark (BENCHMARKS.md `serve`).

Workload: `fixed` (throughput-fixed's requests: 512 x (512 -> 256)) or `random` (prompt / output lengths uniform in
ranges, seed 0); seeded random prompt token ids sent as `prompt` token lists to /v1/completions (so lengths are
exact), greedy, `ignore_eos`, streamed with `stream_options.include_usage`. Requests go out at `--request-rate`
(Poisson, or gamma with `--burstiness`; default: all at once) with at most `--max-concurrency` in flight (default
512).

Per request: TTFT = send to first text chunk; ITL = gaps between text chunks; TPOT = (latency - TTFT) / (tokens - 1)
with tokens from the server's usage; each request must return exactly its output length. Figures: ttft_ms_*, tpot_ms_*,
itl_ms_* (mean, p50, p99), req_s, output_tok_s (generated tokens / duration of the run), total_tok_s, and with an
offline figure for the same workload and engine, speedup_vs_offline = output_tok_s / offline output_tok_s.

By default the script builds the engine itself (random weights in `--model`'s shape, like the other benchmarks),
optionally runs the same workload offline through LLM.generate first (`--compare-offline`), then serves it with
uvicorn on loopback as `python -m server` does, the engine in an engine core process of its own, and drives it from
client subprocesses (so the clients' Python does not compete with the server's for one interpreter). The device
belongs to one process at a time: the ceilings and the offline run happen in a child process that exits before the
served engine starts (same engine arguments, so the same engine). `--disable-frontend-multiprocessing` serves from a
thread of this process instead, on the very engine of the offline run. With `--base-url` it only drives a server that
is already running.

  python benchmarks/serve.py --model qwen2-7b-instruct --compare-offline --out $OUT      # the issue's bar
  python benchmarks/serve.py --model tiny --scale 0.02 --compare-offline                 # CPU smoke run
  python benchmarks/serve.py --base-url http://localhost:8000 --model qwen2-7b-instruct --request-rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=("fixed", "random"), default="fixed")
    w.add_argument("--num-prompts", type=int, default=None, help="default 512 (fixed) / 500 (random), x --scale")
    w.add_argument("--prompt-len", type=int, default=None, help="fixed: default 512 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="fixed: default 256 (x --scale)")
    w.add_argument("--prompt-range", type=common._int_list, default=None, help="random: lo,hi (default 128,1024)")
    w.add_argument("--output-range", type=common._int_list, default=None, help="random: lo,hi (default 64,512)")
    w.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    w.add_argument("--max-concurrency", type=int, default=512, help="requests in flight at most")
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default=None, help="drive this running server instead of starting one")
    s.add_argument("--served-model-name", default=None, help="`model` to send (default: the server's first)")
    s.add_argument("--compare-offline", action="store_true",
                   help="first run the same workload through LLM.generate on the same engine (speedup_vs_offline)")
    s.add_argument("--offline-output-tok-s", type=float, default=None,
                   help="an offline output_tok_s measured elsewhere on this workload, for speedup_vs_offline")
    s.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                   help="uvicorn's HTTP implementation (auto: httptools when installed)")
    s.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    s.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="gc.collect() + gc.freeze() before each timed run (offline and served alike), as python -m "
                        "server does after start-up")
    s.add_argument("--frontend-gc-threshold", type=int, default=None,
                   help="gc.set_threshold(N) in the serving process for the served run; default: python -m server's "
                        "(server/__main__.py GC_THRESHOLD0); another value gives the result file a -gcN suffix")
    s.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="the server's flag: its engine runs in a thread of the server's process (and the offline "
                        "run on that same engine) instead of an engine process of its own")
    s.add_argument("--sample-stacks", action="store_true",
                   help="sample the event-loop thread's Python stacks during the served run, and the engine "
                        "thread's (thread mode) or the engine reader thread's (process mode)")
    s.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="client processes sharing the requests")
    s.add_argument("--client-only", default=None, help=argparse.SUPPRESS)  # internal: workload JSON path
    s.add_argument("--client-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workload = args.dataset  # throughput.py's name, for its helpers
    import throughput

    return throughput.fill_workload_defaults(args, random_prompts=500)


# ----------------------------------------------------------------------------------------------- the client
def _body(model: str, prompt: list[int], out_len: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


class _Record:
    """One request as the client saw it."""

    def __init__(self, prompt_len: int, want: int):
        self.d = {"ok": False, "prompt_len": prompt_len, "want": want, "ttft": None, "itl": [], "tokens": 0}
        self.t0 = time.perf_counter()
        self.last = None

    def line(self, line: str) -> bool:
        """Feeds one SSE line; False on an error event."""
        if not line.startswith("data: ") or line == "data: [DONE]":
            return True
        chunk = json.loads(line[6:])
        if "error" in chunk:
            self.d["error"] = chunk["error"].get("message")
            return False
        now = time.perf_counter()
        if any(c.get("text") for c in chunk.get("choices", ())):
            if self.d["ttft"] is None:
                self.d["ttft"] = now - self.t0
            else:
                self.d["itl"].append(now - self.last)
            self.last = now
        if chunk.get("usage"):
            self.d["tokens"] = chunk["usage"]["completion_tokens"]
        return True

    def done(self) -> dict:
        d = self.d
        d["latency"] = time.perf_counter() - self.t0
        d["t_start"], d["t_end"] = time.time() - d["latency"], time.time()
        d["ok"] = d["tokens"] == d["want"] and d["ttft"] is not None
        if not d["ok"] and "error" not in d:
            d["error"] = f"got {d['tokens']} tokens, wanted {d['want']}"
        return d


async def _one_aiohttp(session, url, model, prompt, out_len) -> dict:
    rec = _Record(len(prompt), out_len)
    try:
        async with session.post(url + "/v1/completions", json=_body(model, prompt, out_len)) as r:
            if r.status != 200:
                rec.d["error"] = f"HTTP {r.status}: {(await r.read())[:300]!r}"
                return rec.done()
            async for raw in r.content:
                if not rec.line(raw.decode("utf-8").rstrip("\r\n")):
                    break
    except Exception as e:  # noqa: BLE001 - recorded as a failed request
        rec.d["error"] = f"{type(e).__name__}: {e}"
    return rec.done()


async def _one_httpx(client, url, model, prompt, out_len) -> dict:
    rec = _Record(len(prompt), out_len)
    try:
        async with client.stream("POST", url + "/v1/completions", json=_body(model, prompt, out_len)) as r:
            if r.status_code != 200:
                rec.d["error"] = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return rec.done()
            async for line in r.aiter_lines():
                if not rec.line(line):
                    break
    except Exception as e:  # noqa: BLE001 - recorded as a failed request
        rec.d["error"] = f"{type(e).__name__}: {e}"
    return rec.done()


async def _drive(url: str, model: str, prompts, olens, rate: float, burstiness: float, concurrency: int,
                 seed: int, start_at: float) -> list[dict]:
    """Sends the requests (aiohttp when installed: its C parser keeps the client out of the way; else httpx)."""
    import numpy as np

    try:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 8, force_close=False),
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=60))
        one = _one_aiohttp
    except ImportError:
        import httpx

        n = concurrency + 8
        session = httpx.AsyncClient(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                                    timeout=httpx.Timeout(None, connect=60))
        one = _one_httpx
    async with session:
        warm = await one(session, url, model, prompts[0][:16], 4)
        if not warm["ok"]:
            raise SystemExit(f"the warm-up request failed: {warm.get('error')}")
        await asyncio.sleep(max(0.0, start_at - time.time()))
        sem = asyncio.Semaphore(concurrency)
        rng = np.random.default_rng(seed)

        async def limited(p, o):
            async with sem:
                return await one(session, url, model, p, o)

        tasks = []
        for i, (p, o) in enumerate(zip(prompts, olens)):
            tasks.append(asyncio.ensure_future(limited(p, o)))
            if math.isfinite(rate) and i + 1 < len(prompts):
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        return list(await asyncio.gather(*tasks))


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[dict]) -> dict:
    recs = [r for r in records if r["ok"]]
    dur = max(r["t_end"] for r in records) - min(r["t_start"] for r in records)
    ttft = [r["ttft"] for r in recs]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in recs if r["tokens"] > 1]
    itl = [x for r in recs for x in r["itl"]]
    out_tok = sum(r["tokens"] for r in recs)
    in_tok = sum(r["prompt_len"] for r in recs)
    m = {"completed": len(recs), "failed": len(records) - len(recs), "duration_s": dur,
         "req_s": len(recs) / dur, "output_tok_s": out_tok / dur, "total_tok_s": (in_tok + out_tok) / dur}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        m[f"{name}_ms_mean"] = statistics.fmean(xs) * 1e3 if xs else None
        m[f"{name}_ms_p50"] = _pct(xs, 0.5) * 1e3 if xs else None
        m[f"{name}_ms_p99"] = _pct(xs, 0.99) * 1e3 if xs else None
    m["e2e_ms_mean"] = statistics.fmean(r["latency"] for r in recs) * 1e3 if recs else None
    m["chunks_per_token"] = (sum(len(r["itl"]) + 1 for r in recs) / out_tok) if out_tok else None
    errors = [r.get("error") for r in records if not r["ok"]]
    return {"metrics": m, "errors": errors[:5], "t_start": min(r["t_start"] for r in records),
            "t_end": max(r["t_end"] for r in records)}


def client_main(args) -> None:
    work = json.loads(Path(args.client_only).read_text())
    recs = asyncio.run(_drive(args.base_url, work["model"], work["prompts"], work["olens"], args.request_rate,
                              args.burstiness, args.max_concurrency, args.seed, work["start_at"]))
    Path(args.client_json).write_text(json.dumps(recs))


def run_clients(args, url: str, prompts, olens, at_start=None) -> dict:
    """Splits the requests over --client-procs processes (rate and concurrency split alike) and merges them.

    The clients connect and warm up, then all start at one agreed time, when `at_start()` (if given) is called."""
    import httpx

    model = args.served_model_name or httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
    k = max(1, min(args.client_procs, len(prompts)))
    with tempfile.TemporaryDirectory() as d:
        start_at = time.time() + 5.0 + 0.2 * k  # every client imports, warms up, then starts together
        procs, outs = [], []
        for j in range(k):
            work, res = Path(d) / f"work{j}.json", Path(d) / f"result{j}.json"
            work.write_text(json.dumps({"prompts": prompts[j::k], "olens": olens[j::k], "model": model,
                                        "start_at": start_at}))
            conc = max(1, args.max_concurrency // k + (j < args.max_concurrency % k))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--client-only", str(work), "--client-json",
                   str(res), "--base-url", url, "--request-rate", str(args.request_rate / k), "--burstiness",
                   str(args.burstiness), "--max-concurrency", str(conc), "--seed", str(args.seed + j), "--model",
                   args.model]
            env = dict(os.environ, JAX_PLATFORMS="cpu")  # the clients never touch the accelerator
            procs.append(subprocess.Popen(cmd, env=env))
            outs.append(res)
        if at_start is not None:
            time.sleep(max(0.0, start_at - time.time()))
            at_start()
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"client processes exited with {codes}")
        records = [r for res in outs for r in json.loads(res.read_text())]
    return {"model": model, **summarize(records)}


# ----------------------------------------------------------------------------------------------- the server
class _Uvicorn:
    def __init__(self, app, http: str = "auto"):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=4096, timeout_keep_alive=60,
                                                   http=http))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def server_gc_threshold() -> int:
    from server.__main__ import GC_THRESHOLD0

    return GC_THRESHOLD0


def gc_threshold(args) -> int:
    return args.frontend_gc_threshold or server_gc_threshold()


class _GCTimer:
    """Seconds spent in garbage collection, by generation, while active (gc.callbacks)."""

    def __init__(self):
        self.seconds, self.count, self._t0, self.active = [0.0] * 3, [0] * 3, None, False
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if not self.active:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._t0
            self.count[g] += 1

    def report(self) -> dict:
        return {"seconds": [round(x, 4) for x in self.seconds], "collections": list(self.count)}


class _StackSampler:
    """Samples where named threads are every `interval` seconds (a poor man's py-spy: frames of sys._current_frames),
    and counts the innermost frames that are in our code or the libraries that matter."""

    def __init__(self, threads: dict[str, int], interval: float = 0.002, depth: int = 4):
        self.threads, self.interval, self.depth = threads, interval, depth
        self.counts = {name: {} for name in threads}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        idents = {t.native_id: t.ident for t in threading.enumerate()}
        want = {name: idents.get(tid) for name, tid in self.threads.items()}
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            for name, ident in want.items():
                f, parts = frames.get(ident), []
                while f is not None and len(parts) < self.depth:
                    code = f.f_code
                    parts.append(f"{Path(code.co_filename).name}:{code.co_name}:{f.f_lineno}")
                    f = f.f_back
                key = " < ".join(parts)
                self.counts[name][key] = self.counts[name].get(key, 0) + 1

    def report(self, top: int = 12) -> dict:
        out = {}
        for name, c in self.counts.items():
            total = sum(c.values()) or 1
            out[name] = [(round(n / total, 3), k) for k, n in sorted(c.items(), key=lambda kv: -kv[1])[:top]]
        return out


def _thread_cpu(tid: int) -> float | None:
    """CPU seconds (user + system) of one thread of this process, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of a whole process, every thread included, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _device_phase(args, spec, prompts, olens, keep_llm: bool = False) -> dict:
    """Everything that needs the device before serving: device info, the engine's arguments (sized against the
    device's memory), ceilings, the engine's start-up and the offline run (--compare-offline). Runs in a child process
    unless the server's engine runs in a thread (then `llm` is kept for it)."""
    import throughput

    common.setup_jax(args)
    cfg = common.model_config(spec)
    dev = common.device_info()
    kwargs = common.engine_kwargs(args, **throughput.engine_defaults(args, prompts, olens))
    ceilings = common.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                       gemm_tokens=kwargs["max_num_batched_tokens"] or 8192)
    llm, startup = common.build_llm(spec, kwargs)
    gct = _GCTimer()
    common.warm_generate(llm, prompts)
    out = {"dev": dev, "kwargs": kwargs, "ceilings": ceilings, "config": common.engine_config(llm, kwargs, startup),
           "metrics": {}, "offline": None}
    if args.compare_offline:
        params = [common.greedy(o) for o in olens]
        before = common.stats_snapshot(llm)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        gct.active = True
        cpu0 = time.thread_time()
        outs, wall = common.timed_generate(llm, prompts, params)
        out["config"]["offline_thread_cpu_s"] = round(time.thread_time() - cpu0, 3)
        gct.active = False
        out["config"]["offline_gc"] = gct.report()
        off_stats = common.stats_delta(before, common.stats_snapshot(llm))
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != sum(olens):
            raise RuntimeError(f"offline run generated {got} tokens, wanted {sum(olens)}")
        out["offline"] = got / wall
        out["metrics"].update(offline_wall_s=wall, offline_step_ms=1e3 * wall / max(off_stats["steps"], 1),
                              offline_steps=off_stats["steps"])
        out["config"]["offline_engine_stats"] = off_stats
    if keep_llm:
        out["llm"] = llm
    return out


def _server_info(srv) -> dict:
    import importlib.metadata as md

    cfg = srv.server.config
    info = {"http": type(cfg.http_protocol_class).__name__ if not isinstance(cfg.http_protocol_class, type)
            else cfg.http_protocol_class.__name__, "loop": cfg.loop, "stream_interval": None}
    for pkg in ("uvicorn", "fastapi", "starlette", "uvloop", "httptools", "aiohttp", "httpx"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.client_only:
        return client_main(args)
    import throughput

    spec = common.resolve_model(args.model)
    prompts, olens = throughput.make_workload(args, spec.config["vocab_size"])
    config = {"dataset": args.dataset, "num_requests": args.num_prompts, "seed": args.seed, "dtype": args.dtype,
              "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "endpoint": "/v1/completions",
              "greedy": True, "ignore_eos": True, "stream": True, "prompt_tokens": sum(map(len, prompts)),
              "output_tokens": sum(olens)}
    if args.dataset == "fixed":
        config.update(prompt_len=args.prompt_len, output_len=args.output_len,
                      standard=(args.num_prompts, args.prompt_len, args.output_len, args.max_concurrency) ==
                      (512, 512, 256, 512) and math.isinf(args.request_rate))
    else:
        config.update(prompt_len_range=list(args.prompt_range), output_len_range=list(args.output_range))
    metrics_extra, ceilings = {}, {}
    offline = args.offline_output_tok_s

    if args.base_url:
        dev = {"device": f"remote server at {args.base_url}", "devtag": "remote", "platform": "remote", "count": None}
        client = run_clients(args, args.base_url, prompts, olens)
    else:
        process = not args.disable_frontend_multiprocessing
        if process:
            # One process owns the device at a time: the ceilings and the offline run happen in a child that exits
            # before the served engine's own process starts (this one never initialises JAX, as python -m server).
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                phase = pool.submit(_device_phase, args, spec, prompts, olens).result()
        else:
            phase = _device_phase(args, spec, prompts, olens, keep_llm=True)
        dev, ceilings, kwargs = phase["dev"], phase["ceilings"], phase["kwargs"]
        config.update(phase["config"])
        metrics_extra.update(phase["metrics"])
        offline = phase["offline"] or offline
        from qwenjax.config import EngineArgs
        from qwenjax.engine.async_llm import AsyncLLMEngine
        from server.app import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("qwenjax.server").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if process:
            if args.compilation_cache_dir:  # the engine's process finds the programs the device phase compiled
                os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(args.compilation_cache_dir),
                                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            engine = AsyncLLMEngine(EngineArgs(model=spec.dir, load_format="dummy", **kwargs),
                                    stream_interval=args.stream_interval)
        else:
            llm = phase["llm"]
            # Served from a cold prefix cache, like the offline run: the offline run's pages would otherwise turn
            # every served prompt into a prefix hit (one context-prefill step each), which is another workload.
            llm.reset_prefix_cache()
            engine = AsyncLLMEngine(llm.llm_engine, stream_interval=args.stream_interval)
        gct = _GCTimer()
        try:
            with _Uvicorn(create_app(engine, served_model_names=[spec.name]), args.http) as srv:
                # The server's own first requests, on reversed prompts: nothing they cache is a prefix of the run's.
                warm = [p[::-1] for p in prompts[:8]]
                run_clients(args, srv.url, warm, [4] * len(warm))
                mark = {}

                def cpu():
                    eng = _proc_cpu(engine.engine_pid) if process else _thread_cpu(engine._thread.native_id)
                    return {"loop": _thread_cpu(srv.thread.native_id), "engine": eng}

                def at_start():
                    mark.update(wall=time.time(), stats=dict(vars(engine.engine.stats)), steps=engine.num_steps,
                                step_s=engine.step_seconds, idle_s=engine.idle_seconds_now(), cpu=cpu())

                if args.gc_freeze:
                    gc.collect()
                    gc.freeze()
                gc.set_threshold(gc_threshold(args), *gc.get_threshold()[1:])  # as python -m server does
                config["server_gc_threshold"] = list(gc.get_threshold())
                gct.active = True
                threads = {"loop": srv.thread.native_id}
                threads.update({"reader": engine._client._reader.native_id} if process else
                               {"engine": engine._thread.native_id})
                sampler = _StackSampler(threads) if args.sample_stacks else contextlib.nullcontext()
                with sampler:
                    client = run_clients(args, srv.url, prompts, olens, at_start)
                gct.active = False
                config["server_gc"] = gct.report()
                if args.sample_stacks:
                    config["stack_samples"] = sampler.report()
                    for name, rows in config["stack_samples"].items():
                        print(f"-- {name} thread, top stacks")
                        for frac, key in rows:
                            print(f"  {frac:6.3f}  {key}")
                stats = common.stats_delta(mark["stats"], dict(vars(engine.engine.stats)))
                steps, step_s = engine.num_steps - mark["steps"], engine.step_seconds - mark["step_s"]
                # Idle within the clients' window only (duration_s): not before their first request left (a
                # client that warmed up late), nor after their last response (idle now, while the clients exit).
                # The engine's last step ended `drain` seconds before the clients' last response: the frontend's
                # backlog of outputs (0 when the engine kept pace).
                idle_s = engine.idle_seconds_now() - mark["idle_s"] - max(0.0, client["t_start"] - mark["wall"])
                drain = 0.0
                if engine.idle_since is not None:
                    idle_now, since_end = time.monotonic() - engine.idle_since, max(0.0, time.time() - client["t_end"])
                    idle_s -= min(idle_now, since_end)
                    drain = max(0.0, idle_now - since_end)
                config["client_start_delay_s"] = round(client["t_start"] - mark["wall"], 4)
                cpu_end = cpu()
        finally:
            engine.shutdown()
        dur = client["metrics"]["duration_s"]
        config["engine_stats"] = stats
        config["server"] = _server_info(srv)
        config["server"]["stream_interval"] = args.stream_interval
        config["server"]["engine"] = "process" if process else "thread"
        # The engine loop's time over the run: in engine.step() (busy), blocked for requests with none unfinished
        # (idle), and the rest (between steps: applying commands, collecting and sending the step's outputs).
        metrics_extra.update(server_step_ms=1e3 * step_s / max(steps, 1), server_engine_busy=step_s / dur,
                             server_steps=steps, server_engine_idle_s=idle_s,
                             server_engine_between_steps_s=max(0.0, dur - step_s - idle_s),
                             server_output_drain_s=drain)
        if cpu_end["loop"] is not None:  # CPU seconds of the server's loop thread and its engine over the timed run
            config["server"]["loop_thread_cpu_s"] = round(cpu_end["loop"] - mark["cpu"]["loop"], 3)
            config["server"]["engine_process_cpu_s" if process else "engine_thread_cpu_s"] = \
                round(cpu_end["engine"] - mark["cpu"]["engine"], 3)
            config["server"]["loop_cpu_us_per_token"] = round(1e6 * config["server"]["loop_thread_cpu_s"] /
                                                              sum(olens), 2)
    metrics = dict(client["metrics"])
    metrics.update(metrics_extra)
    if offline:
        metrics["offline_output_tok_s"] = offline
        metrics["speedup_vs_offline"] = metrics["output_tok_s"] / offline
    config["errors"] = client["errors"]
    result = common.make_result(benchmark="serve", model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                metrics=metrics)
    name = None
    if gc_threshold(args) != server_gc_threshold():
        name = common.result_name(f"serve-gc{gc_threshold(args)}", spec.name, dev["devtag"])
    path = common.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out, name=name)
    rows = [("model", spec.name), ("device", dev["device"]), ("requests ok / failed",
                                                              f"{metrics['completed']} / {metrics['failed']}")]
    rows += [(k, metrics[k]) for k in ("duration_s", "req_s", "output_tok_s", "total_tok_s", "ttft_ms_mean",
                                       "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99",
                                       "itl_ms_mean", "itl_ms_p50", "itl_ms_p99", "chunks_per_token",
                                       "server_step_ms", "server_engine_busy", "server_engine_idle_s",
                                       "server_engine_between_steps_s", "server_output_drain_s", "server_steps",
                                       "offline_step_ms",
                                       "offline_steps") if metrics.get(k) is not None]
    if offline:
        rows += [("offline_output_tok_s", offline), ("speedup_vs_offline", metrics["speedup_vs_offline"])]
    rows.append(("result", str(path)))
    common.print_table(f"serve {spec.name}", rows)
    if metrics["failed"]:
        raise SystemExit(f"{metrics['failed']} requests failed, e.g. {client['errors'][:2]}")
    return result


if __name__ == "__main__":
    main()
