"""rope-kv-write: the fused RoPE + K/V page-write kernel against the jnp path it replaces, per call, on one GPU.

The jnp path is what a layer ran after its qkv GEMM before the kernel: apply_rope on q, apply_rope on k, write_kv of
k and of v (four XLA kernels at batch 1). Shape: Qwen2-7B's attention (28 q heads, 4 kv heads, head dim 128), bf16
values and pages, pages of 16 tokens, 2000 pages; T tokens a call (1: batch-1 decode; 64: a decode batch; 8192: a
packed prefill step).

Method: R calls chained in one jitted program (pages donated and carried from call to call, q fed back, every call's
inputs passed through an optimization barrier so XLA can neither fuse nor share work across calls), timed by wall
clock (median of --runs programs) / R: the device's time a call, gaps between kernels included. Beside it, from a
jax.profiler trace of the same program, the kernels' own time a call (`kernel_us`). `--sweep` also times the
kernel's block_tokens x num_warps grid.

    JAX_PLATFORMS=cuda python3 benchmarks/rope_kv_write.py [--tokens 1,64,8192] [--sweep] [--out DIR]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.rope_kv_write import apply_rope, default_block_tokens, rope_kv_write  # noqa: E402
from qwenjax.layers.attention import write_kv  # noqa: E402
from qwenjax.layers.rotary import rope_cos_sin  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, PAGES = 28, 4, 128, 16, 2000


def jnp_path(q, k, v, cos, sin, k_pages, v_pages, slots):
    k = apply_rope(k, cos, sin)
    return apply_rope(q, cos, sin), write_kv(k_pages, k, slots), write_kv(v_pages, v, slots)


def inputs(T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (T, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(kk, (T, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (T, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 32768, T), jnp.int32), HEAD_DIM, 1e6)
    slots = jnp.asarray(rng.permutation(PAGES * PAGE)[:T].astype(np.int32))
    return q, k, v, cos, sin, slots


def chained(fn, reps: int):
    """One program of `reps` calls of fn(q, k, v, cos, sin, k_pages, v_pages, slots) -> (q, k_pages, v_pages)."""
    def program(q, k, v, cos, sin, k_pages, v_pages, slots):
        for _ in range(reps):
            q, k, v, k_pages, v_pages = jax.lax.optimization_barrier((q, k, v, k_pages, v_pages))
            q, k_pages, v_pages = fn(q, k, v, cos, sin, k_pages, v_pages, slots)
        return q, k_pages, v_pages
    return jax.jit(program, donate_argnums=(5, 6))


def time_per_call(fn, T: int, reps: int, runs: int, profile: bool = False) -> dict:
    q, k, v, cos, sin, slots = inputs(T)
    kp = jnp.zeros((KV_HEADS, PAGES, PAGE, HEAD_DIM), jnp.bfloat16)
    vp = jnp.zeros_like(kp)
    prog = chained(fn, reps)
    q2, kp, vp = prog(q, k, v, cos, sin, kp, vp, slots)  # compile and warm up
    jax.block_until_ready(kp)
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        q2, kp, vp = prog(q, k, v, cos, sin, kp, vp, slots)
        jax.block_until_ready((q2, kp, vp))
        walls.append((time.perf_counter() - t0) / reps * 1e6)
    out = {"us": round(statistics.median(walls), 3), "us_min": round(min(walls), 3)}
    if profile:
        logdir = tempfile.mkdtemp(prefix="rkv-prof-")
        jax.profiler.start_trace(logdir)
        for _ in range(3):
            q2, kp, vp = prog(q, k, v, cos, sin, kp, vp, slots)
        jax.block_until_ready((q2, kp, vp))
        jax.profiler.stop_trace()
        out.update(kernel_time(logdir, calls=3 * reps))
    return out


def kernel_time(logdir: str, calls: int) -> dict:
    """Kernel time a call from the trace's GPU stream lines, and the kernels by name (us a call)."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"kernel_note": "no trace file"}
    pd = ProfileData.from_file(files[0])
    by_name: dict[str, float] = {}
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                if ev.name.lower().startswith(("memcpy", "memset")):
                    continue
                by_name[ev.name] = by_name.get(ev.name, 0.0) + ev.duration_ns
    total = sum(by_name.values())
    return {"kernel_us": round(total / calls / 1e3, 3),
            "kernels": {n[:60]: round(t / calls / 1e3, 3) for n, t in sorted(by_name.items(), key=lambda x: -x[1])[:6]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,64,8192")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="also time block_tokens x num_warps")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    device = jax.devices()[0].device_kind
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        reps = 100 if T <= 64 else 20
        old = time_per_call(jnp_path, T, reps, args.runs, profile=True)
        new = time_per_call(rope_kv_write, T, reps, args.runs, profile=True)
        row = {"tokens": T, "jnp_path": old, "kernel": new, "block_tokens": default_block_tokens(T),
               "speedup": round(old["us"] / new["us"], 3)}
        if args.sweep:
            row["sweep"] = {}
            for bt in ((1, 2) if T <= 64 else (1, 4, 8, 16)):
                for warps in (1, 2, 4):
                    fn = lambda *a, bt=bt, w=warps: rope_kv_write(*a, block_tokens=bt, num_warps=w)  # noqa: E731
                    row["sweep"][f"bt{bt}_w{warps}"] = time_per_call(fn, T, reps // 2, max(5, args.runs // 4))["us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "rope-kv-write", "device": device, "jax": jax.__version__,
              "shape": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page=PAGE, pages=PAGES,
                            dtype="bfloat16"), "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rope-kv-write.json"), "w") as f:
            json.dump(result, f, indent=1)
    print("T      jnp path us  kernel us  (kernels only: jnp / kernel)  speedup")
    for r in rows:
        print(f"{r['tokens']:<6} {r['jnp_path']['us']:>11.2f} {r['kernel']['us']:>10.2f}  "
              f"({r['jnp_path'].get('kernel_us')} / {r['kernel'].get('kernel_us')})  {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
