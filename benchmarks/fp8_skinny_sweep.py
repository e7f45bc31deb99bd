"""fp8-skinny-sweep: the FP8 skinny kernel's settings searched at Qwen2-7B's fused decode products, timed as the model
runs them.

For each row count M (default 1 and 256) and fused layer shape (qkv 3584->4608, o 3584->3584, gate_up 3584->37888,
down 18944->3584), in quant_matmul.py's way (quant_sweep.Sweep: one jitted program runs the product on 48 distinct
weight copies, far more than the L2, median of device-synced groups, divided by 48: `us`, launch gaps included; on a
GPU also `device_us` from a profile, the kernels alone, and the top kernels by name):
  bf16      jnp.dot with a bf16 [K, N] weight: the float model's product
  fp8_xla   Fp8Linear's work on XLA's path (QWENJAX_FP8_SKINNY=0): the activations quantized per token by XLA,
            then layers/fp8_matmul's dot (cuBLASLt's FP8 GEMM where XLA takes it)
  skinny    the activations quantized as the model does (layers/fp8_matmul.quantize_for), then
            pallas_kernels/fp8_skinny.py at given settings (block_n, block_k,
            num_splits, num_warps, num_stages): first its heuristic's, then a greedy search, one setting at a time
            in that order (coordinate descent from the best so far; --budget-s bounds it)
  act       QWENJAX_FP8_ACT_KERNEL=1's product for o_proj: pallas_kernels/fp8_act_quant.py's one-kernel
            quantization, then fp8_skinny_rows.py at the heuristic's settings (x's rows under a mask, the scaled
            output written); the model's other inputs come quantized by the kernels that write them, not timed here
  fused     pallas_kernels/fp8_skinny_rows.py at the heuristic's settings with x quantized inside
            (QWENJAX_FP8_ACT_KERNEL=fused)
Every variant's output on copy 0 is checked against a float32 product of the same quantized values (above 2e-2 of
relative error it is marked wrong and never chosen). The result: per (layer, M) the heuristic's time, the best
settings and their time, and `copy_frac` (the FP8 weight's bytes over the time, against the copy bandwidth measured
in the same run). A setting that beats the heuristic by more than the run's noise is the evidence for changing
fp8_skinny.heuristic.

  python benchmarks/fp8_skinny_sweep.py --rows 1 --budget-s 200 --out $OUT         # H100 (gpu_campaign.sh fp8-sweep)
  JAX_PLATFORMS=cpu python benchmarks/fp8_skinny_sweep.py --interpret               # CPU dry run: tiny shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import result_files  # noqa: E402
from quant_sweep import Sweep, add_sweep_args, n_copies  # noqa: E402

BENCHMARK = "fp8-skinny-sweep"
SHAPES_7B = {"gate_up": (3584, 37888), "down": (18944, 3584), "qkv": (3584, 4608), "o": (3584, 3584)}
SHAPES_TINY = {"qkv": (256, 384), "down": (512, 256)}
# the settings in the order searched: indices into (block_n, block_k, num_splits, num_warps, num_stages)
ORDER = (2, 0, 1, 4, 2, 3)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2-7b-instruct", help="names the result file; shapes are Qwen2-7B's")
    p.add_argument("--rows", type=cli_args._int_list, default=(1, 256))
    p.add_argument("--layers", default=",".join(SHAPES_7B), help="comma-separated subset of " + ",".join(SHAPES_7B))
    add_sweep_args(p, budget_s=200.0)
    a = p.parse_args(argv)
    shapes = SHAPES_TINY if a.interpret else SHAPES_7B
    a.shapes = {k: v for k, v in shapes.items() if k in a.layers.split(",")} or dict(shapes)
    if a.interpret:
        a.rows = (1,)
    return a


def neighbours(cfg, param, m, k, n):
    """Valid settings differing from `cfg` in one setting (index `param` of ORDER's tuple)."""
    from pallas_kernels import fp8_skinny

    bn, bk, s, w, st = cfg
    vals = {0: (64, 128, 256), 1: (64, 128, 256, 512), 2: sorted({max(1, s // 4), max(1, s // 2), s * 2, s * 4}),
            3: (4, 8), 4: (2, 3, 4, 5, 6)}[param]
    out = []
    for v in vals:
        c = tuple(v if i == param else x for i, x in enumerate(cfg))
        if c != tuple(cfg) and fp8_skinny.why_not(m, k, n, x_dtype=fp8_skinny._FP8, w_dtype=fp8_skinny._FP8,
                                                  block_n=c[0], block_k=c[1]) is None and c[2] <= k // c[1]:
            out.append(c)
    return out


def copy_bandwidth(small: bool) -> float:
    """TB/s of x * c on bf16 (bytes read + written), as device_ceilings measures its copy ceiling."""
    import statistics

    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), ((1 << 22) if small else (1 << 30),), jnp.bfloat16)
    c = jnp.asarray(1.0009765625, jnp.bfloat16)  # exact in bf16; not 1, so nothing folds away
    t = statistics.median(device_ceilings._time_fn(jax.jit(lambda x, c: x * c), x, c, reps=7, inner=5))
    return round(2 * x.nbytes / t / 1e12, 4)


def main(argv=None):
    a = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import fp8_skinny, fp8_skinny_rows
    from qwenjax.layers.fp8_matmul import ACT_KERNEL_ENV, SKINNY_ENV, fp8_matmul, quantize_for
    from qwenjax.quantization.fp8_quant import quantize_activations, quantize_weight_per_channel

    dev = result_files.device_info()
    copy_tbps = copy_bandwidth(a.interpret)
    sw = Sweep(a)
    bf16 = jnp.bfloat16

    def layer_fn(cfg):
        def fn(x, wq, ws):
            xq, xs = quantize_for(x, wq)  # as Fp8Linear: the Pallas kernel where the skinny kernel takes the product
            if cfg is None:  # XLA's path: the switch is read when traced
                return fp8_matmul(xq, xs, wq, ws, out_dtype=bf16)
            bn, bk, s, w, st = cfg
            return fp8_skinny.fp8_skinny(xq, xs, wq, ws, out_dtype=bf16, block_n=bn, block_k=bk, num_splits=s,
                                         num_warps=w, num_stages=st, interpret=a.interpret)
        return fn

    def rows_fn(x, wq, ws):  # QWENJAX_FP8_ACT_KERNEL=1's o_proj (quantize_for reads the switch when traced)
        xq, xs = quantize_for(x, wq)
        return fp8_skinny_rows.fp8_skinny_rows(xq, wq, ws, xs, out_dtype=bf16, interpret=a.interpret)

    def ref(x, wq, ws):
        # the barrier keeps the float8 rounding (XLA folds float32 -> float8 -> float32 otherwise: fp8_matmul.py's
        # block_scaled_reference); highest precision: no TF32 on the GPU
        xq, xs = jax.lax.optimization_barrier(quantize_activations(x))
        return jnp.dot(xq.astype(jnp.float32) * xs, wq.astype(jnp.float32).T * ws, precision="highest")

    summary, lines = {}, []
    print(f"== {BENCHMARK}: rows {list(a.rows)}, layers {list(a.shapes)}, copy {copy_tbps} TB/s", flush=True)
    for m in a.rows:
        for layer, (k, n) in a.shapes.items():
            key = jax.random.key(k * 7 + n + m)
            x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.float32).astype(bf16)
            copies = n_copies(k * n, a.interpret)
            ws_bf16, ws_fp8 = [], []
            for c in range(copies):
                w = (jax.random.normal(jax.random.fold_in(key, c), (k, n), jnp.float32) * 0.02).astype(bf16)
                ws_bf16.append((w,))
                wq, sc = quantize_weight_per_channel(w)
                ws_fp8.append((jnp.asarray(wq.T), sc))
                del w
            base = {"fmt": "fp8", "layer": layer, "m": m, "k": k, "n": n}
            sw.measure(dict(base, fmt="bf16", variant="bf16"), lambda x, w: jnp.dot(x, w), ws_bf16, x, None)
            ws_bf16.clear()
            os.environ[SKINNY_ENV] = "0"
            sw.measure(dict(base, variant="xla"), jax.jit(layer_fn(None)), ws_fp8, x, ref)
            os.environ.pop(SKINNY_ENV)
            default = tuple(fp8_skinny.heuristic(m, k, n)[1:])
            os.environ[ACT_KERNEL_ENV] = "1"  # quantize_for takes the kernel (read when traced)
            sw.measure(dict(base, variant="act"), jax.jit(rows_fn), ws_fp8, x, ref)
            os.environ.pop(ACT_KERNEL_ENV)
            sw.measure(dict(base, variant="fused"), jax.jit(lambda x, wq, ws: fp8_skinny_rows.fp8_skinny_rows(
                x, wq, ws, out_dtype=bf16, interpret=a.interpret)), ws_fp8, x, ref)
            seen = {}

            def trial(c):
                if c not in seen:
                    r = sw.measure(dict(base, variant="skinny", cfg=list(c)), layer_fn(c), ws_fp8, x, ref)
                    seen[c] = r.get("us") if r["status"] == "ok" else None
                return seen[c]

            best, cfg = trial(default), default
            for p in ORDER:
                for c in neighbours(cfg, p, m, k, n):
                    t = trial(c)
                    if t is not None and (best is None or t < best):
                        best, cfg = t, c
            ws_fp8.clear()  # the copies go before the next shape's
            tag = f"{layer}_m{m}"
            times = {r["variant"]: r.get("us") for r in sw.runs if (r["layer"], r["m"]) == (layer, m)
                     and r["variant"] != "skinny" and r["status"] == "ok"}
            summary.update({f"skinny_{tag}_default_us": seen.get(default), f"skinny_{tag}_best_us": best,
                            f"bf16_{tag}_us": times.get("bf16"), f"xla_{tag}_us": times.get("xla"),
                            f"act_{tag}_us": times.get("act"), f"fused_{tag}_us": times.get("fused")})
            summary[f"skinny_{tag}_best_cfg"] = list(cfg)
            if best and copy_tbps:
                summary[f"skinny_{tag}_best_copy_frac"] = k * n / (best * 1e-6) / (copy_tbps * 1e12)
            lines.append(f"{layer:8s} m={m:<4d} bf16 {times.get('bf16') or 0:8.2f}  xla {times.get('xla') or 0:8.2f}  "
                         f"skinny default {seen.get(default) or 0:8.2f} {list(default)}  best {best or 0:8.2f} "
                         f"{list(cfg)}  act {times.get('act') or 0:8.2f}  fused {times.get('fused') or 0:8.2f} us")
    print("== fp8 skinny settings (us a product, launch gaps included)")
    print("\n".join(lines))
    config = {"rows": list(a.rows), "shapes": {k: list(v) for k, v in a.shapes.items()}, "budget_s": a.budget_s,
              "settings": "(block_n, block_k, num_splits, num_warps, num_stages)", "runs": sw.runs,
              "method": "benchmarks/fp8_skinny_sweep.py docstring"}
    metrics = {k: (float(np.round(v, 3)) if isinstance(v, float) else v) for k, v in summary.items()}
    result = result_files.make_result(benchmark=BENCHMARK, model=a.model + ("-tiny" if a.interpret else ""),
                                      dev=dev, config=config, ceilings={"copy_tbps": copy_tbps}, metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=a.results_dir, out=a.out)
    print(f"result {path}")
    return result


if __name__ == "__main__":
    main()
