"""jax.profiler around a benchmark: a trace with the Python tracer off, a profiled repeat of a generate, and
device_busy (the union of the device's stream events over wall time) with the top kernels and host events, read
from the trace's xplane file."""

from __future__ import annotations

import contextlib
import gc
import glob
import math
import os
import re
import tempfile
import time
from typing import Any

from workloads import stats_delta, stats_snapshot


@contextlib.contextmanager
def quiet_trace(logdir: str, host_tracer_level: int = 0):
    """jax.profiler's trace into `logdir` with the Python tracer off (it slows the host's launches most) and the
    host's TraceMe spans at `host_tracer_level` (0: none, 1: JAX's and XLA's own)."""
    import jax

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    opts.host_tracer_level = host_tracer_level
    jax.profiler.start_trace(logdir, profiler_options=opts)
    try:
        yield logdir
    finally:
        jax.profiler.stop_trace()


def profile_generate(llm, prompts, params, *, profile_dir: str | None,
                     unprofiled_wall_s: float | None = None, lora_request=None, top: int = 20) -> dict:
    """Repeats a generate under jax.profiler.trace and reports device_busy = device-active time / wall time.

    Method: the trace spans only this generate call (started right before it, stopped right after), so no clock
    alignment between host and device timestamps is needed. Device-active time is the union of the intervals of
    every event on the GPU planes' stream lines ("/device:GPU:N", lines named "Stream #..."; kernels, memcpys and
    memsets as CUPTI records them), merged across streams so overlapping work counts once; wall time is the host's
    perf_counter around the call. Beside it: `kernel_busy` (kernels alone, no memcpy/memset), `module_busy` (the
    union of the "XLA Modules" line, one span per executable run, gaps between its kernels included) and
    `device_busy_unprofiled` (the same device-active time over the unprofiled run's wall: CUPTI slows the host's
    launches a little, so the profiled wall is longer). The Python tracer is off. On CPU the trace has no device
    plane (XLA runs on host threads): device_busy is then None and `note` says why. lora_request goes to generate
    (one request or one per prompt); `top`: how many kernels (by device time) the result lists.
    """
    import jax

    logdir = profile_dir or tempfile.mkdtemp(prefix="qwenjax-profile-")
    os.makedirs(logdir, exist_ok=True)
    # From a cold prefix cache, as timed_generate: otherwise the repeat finds every prompt cached and runs another
    # workload (each prompt a one-row context step), as the profiles of sessions 1-8 did (benchmarks/NOTES.md).
    llm.reset_prefix_cache()
    gc.collect()
    before = stats_snapshot(llm)
    with quiet_trace(logdir, host_tracer_level=1):
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False, lora_request=lora_request)
        wall = time.perf_counter() - t0
    steps = stats_delta(before, stats_snapshot(llm))  # the profiled run's steps: the timed run's, if it repeats it
    info: dict[str, Any] = {"trace_dir": logdir, "wall_s": round(wall, 4), "device_busy": None,
                            "engine_stats": {k: steps[k] for k in ("steps", "prefill_steps", "decode_steps",
                                                                   "mixed_steps", "multi_steps", "prefix_cache_hits")}}
    if jax.default_backend() == "cpu":  # a GPU machine's trace shows its idle GPU even when JAX runs on the CPU
        info["note"] = "JAX runs on the CPU (XLA on host threads): device_busy not computed"
        return info
    try:
        info.update(device_busy_from_trace(logdir, wall, top=top))
        if info.get("device_active_s") is not None and unprofiled_wall_s:
            info["device_busy_unprofiled"] = round(info["device_active_s"] / unprofiled_wall_s, 4)
    except Exception as e:  # a profile that cannot be read must not lose the benchmark's figures
        info["note"] = f"could not read the trace: {type(e).__name__}: {e}"
    return info


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "TensorFlow Name Scope", "TensorFlow Ops",
                  "Framework Name Scope", "Framework Ops", "Source code", "Launch Stats", "Host Threads")


def device_busy_from_trace(logdir: str, wall_s: float, top: int = 20) -> dict:
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {"note": "the trace wrote no .xplane.pb file"}
    pd = ProfileData.from_file(files[-1])
    planes = [p for p in pd.planes if re.match(r"/device:(GPU|TPU)", p.name)]
    if not planes:
        return {"note": "no device plane in the trace (on CPU XLA runs on host threads): device_busy not computed",
                "planes": [p.name for p in pd.planes], "top_host_events": top_host_events(pd)}
    busy_ns = kernel_ns = module_ns = 0.0
    n_events, used_lines = 0, []
    by_name: dict[str, list[float]] = {}  # kernel name -> [total ns, count]: where the device time goes
    for plane in planes:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        if not streams:
            streams = [ln for ln in lines if ln.name not in _DERIVED_LINES]
        every, kernels = [], []
        for ln in streams:
            used_lines.append(f"{plane.name}:{ln.name}")
            for ev in ln.events:
                iv = (ev.start_ns, ev.start_ns + ev.duration_ns)
                every.append(iv)
                if not ev.name.lower().startswith(("memcpy", "memset")):
                    kernels.append(iv)
                acc = by_name.setdefault(ev.name, [0.0, 0])
                acc[0] += ev.duration_ns
                acc[1] += 1
        n_events += len(every)
        busy_ns += _union_ns(every)
        kernel_ns += _union_ns(kernels)
        mods = [ln for ln in lines if ln.name == "XLA Modules"]
        module_ns += _union_ns([(ev.start_ns, ev.start_ns + ev.duration_ns) for ln in mods for ev in ln.events])
    n = len(planes)  # several devices: the mean over them
    wall_ns = wall_s * 1e9
    return {"device_busy": round(busy_ns / n / wall_ns, 4), "kernel_busy": round(kernel_ns / n / wall_ns, 4),
            "module_busy": round(module_ns / n / wall_ns, 4) if module_ns else None,
            "device_active_s": round(busy_ns / n / 1e9, 6), "events": n_events, "lines": used_lines[:32],
            "top_kernels": [{"name": name[:160], "ms": round(ns / 1e6, 3), "count": c,
                             "share": round(ns / max(busy_ns, 1.0), 4)}
                            for name, (ns, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
            "top_host_events": top_host_events(pd),
            "xplane": files[-1]}


def top_host_events(pd, n: int = 40) -> list[dict]:
    """The host's side of a trace (where the launches come from): TraceMe spans of JAX, PjRt and XLA's thunks, and
    the CUDA API calls CUPTI records, summed by plane and name; inclusive (a span contains its children)."""
    host: dict[str, list[float]] = {}
    for plane in pd.planes:
        if re.match(r"/device:", plane.name):
            continue
        for ln in plane.lines:
            for ev in ln.events:
                acc = host.setdefault(f"{plane.name}|{ev.name[:100]}", [0.0, 0])
                acc[0] += ev.duration_ns
                acc[1] += 1
    return [{"name": name, "ms": round(ns / 1e6, 3), "count": c}
            for name, (ns, c) in sorted(host.items(), key=lambda kv: -kv[1][0])[:n]]


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total
