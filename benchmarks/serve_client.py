"""serve.py's load generator: client processes (serve.py --client-only) that send the workload's streamed
/v1/completions requests at the set rate and concurrency, record each request as the client saw it (TTFT, gaps
between text chunks, tokens from the server's usage), and the summary of those records (the run's figures)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVE_SCRIPT = Path(__file__).resolve().with_name("serve.py")  # what a client process runs (with --client-only)


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
            cmd = [sys.executable, str(SERVE_SCRIPT), "--client-only", str(work), "--client-json",
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
