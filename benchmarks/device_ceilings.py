"""Ceilings measured in the benchmark's own process, so that every ratio (MBU, MFU) is against this machine as it is
now: copy bandwidth (x * c on bf16) and the bf16 matmul rate, and the timing loop they use (`_time_fn`, also the
kernel sweeps'). ../shared/BENCHMARKS.md defines the workloads, metric names and the result format."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def _time_fn(fn: Callable, *args, reps: int, inner: int) -> list[float]:
    """Seconds per call: `reps` groups of `inner` back-to-back calls, each group ended by a device sync."""
    import jax

    jax.block_until_ready(fn(*args))  # compile + first run
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            y = fn(*args)
        jax.block_until_ready(y)
        out.append((time.perf_counter() - t0) / inner)
        del y
    return out


def measure_ceilings(cfg, *, mode: str, platform: str, gemm_tokens: int = 8192) -> dict:
    """Copy bandwidth (x * c on bf16, bytes read + written) and the bf16 matmul rate, measured now.

    The matmul ceiling is the best (highest) median rate over 8192^3 and the model's largest GEMMs at `gemm_tokens`
    rows (gate/up: [M, D] x [D, F]; down: [M, F] x [F, D]); BENCHMARKS.md explains why the model's own shapes are
    among them. `mode` "small" uses sizes that finish in a second on a CPU.
    """
    if mode == "none":
        return {"copy_tbps": None, "matmul_tflops": None, "detail": {"skipped": True}}
    import jax
    import jax.numpy as jnp

    if mode == "auto":
        mode = "small" if platform == "cpu" else "full"
    full = mode == "full"
    key = jax.random.key(0)
    copy_elems = (1 << 30) if full else (1 << 22)  # 2 GiB / 8 MiB of bf16
    x = jax.random.normal(key, (copy_elems,), jnp.bfloat16)
    c = jnp.asarray(1.0009765625, jnp.bfloat16)  # exact in bf16; not 1, so nothing folds away
    scale = jax.jit(lambda x, c: x * c)
    times = _time_fn(scale, x, c, reps=7 if full else 3, inner=5 if full else 2)
    t_copy = statistics.median(times)
    copy_tbps = 2 * x.nbytes / t_copy / 1e12
    del x

    D, F = cfg.hidden_size, cfg.intermediate_size
    if full:
        shapes = {"8192^3": (8192, 8192, 8192), "gate_up": (gemm_tokens, D, F), "down": (gemm_tokens, F, D)}
    else:
        shapes = {"512^3": (512, 512, 512), "gate_up": (min(gemm_tokens, 256), D, F),
                  "down": (min(gemm_tokens, 256), F, D)}
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    rates = {}
    for name, (m, k, n) in shapes.items():
        k1, k2 = jax.random.split(jax.random.fold_in(key, m * 31 + n))
        a = jax.random.normal(k1, (m, k), jnp.bfloat16)
        b = jax.random.normal(k2, (k, n), jnp.bfloat16)
        t = statistics.median(_time_fn(mm, a, b, reps=5 if full else 3, inner=10 if full else 2))
        rates[name] = {"shape": [m, k, n], "ms": round(t * 1e3, 4), "tflops": round(2 * m * k * n / t / 1e12, 2)}
        del a, b
    best = max(rates.values(), key=lambda r: r["tflops"])
    return {"copy_tbps": round(copy_tbps, 4), "matmul_tflops": best["tflops"],
            "detail": {"mode": mode, "copy_bytes": 2 * copy_elems * 2, "copy_ms": round(t_copy * 1e3, 4),
                       "matmul": rates}}
